"""Collections: versioned, published atomically; content-addressed unit memories shared across versions.

Layout under one fsspec root (a local folder, or ``s3://bucket/prefix``)::

    collections/<name>/CURRENT                         {"version": <v>, "published_at": ...}: the live version
    collections/<name>/versions/<v>/manifest.json      models, config, schema version, units, files + sha256
    collections/<name>/versions/<v>/<kind>/<n>.parquet chunks, summaries, quarantine, documents, units
    collections/<name>/versions/<v>/index/...          FAISS shards (faiss.serialize_index bytes) and the like
    units/<unit_id>/memory.safetensors                 shared by every version and collection
    units/<unit_id>/memory.json                        sidecar: the memory header, sha256 and size (written
                                                       after the memory file, so a resume reads a few hundred
                                                       bytes instead of downloading the memory)

Publishing (:meth:`VersionWriter.publish`): the version's files are written first, then its manifest, then the
``CURRENT`` pointer is replaced, last. Until that last step readers keep seeing the previous version in full;
after it they see the new one in full (every file it lists already exists). Version ids are
``<UTC yyyymmddThhmmss.ffffff>Z-<8 hex>``, so they sort by creation time and two writers never collide.

The store is one class made of parts, one file each: the pointer's compare-and-swap
(:mod:`memorag_core.store.pointer`), leases (:mod:`memorag_core.store.leases`), garbage collection
(:mod:`memorag_core.store.gc`), and the version writer and reader (:mod:`memorag_core.store.versions`); names and
ids are checked in :mod:`memorag_core.store.names`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError
from memorag_core.store import fs as sfs
from memorag_core.store.gc import GCMixin, GCReport
from memorag_core.store.leases import JobLease, LeaseMixin
from memorag_core.store.memory_file import MemoryFileInfo, MemoryTensors, encode_memory, load_memory
from memorag_core.store.names import (  # noqa: F401 - is_*/COLLECTION_PATTERN: public, re-exported
    COLLECTION_PATTERN,
    COLLECTION_RE as _COLLECTION_RE,
    UNIT_RE as _UNIT_RE,
    VERSION_RE as _VERSION_RE,
    check_collection,
    check_unit,
    is_collection_name,
    is_version_id,
    new_version_id,
    version_time,
)
from memorag_core.store.pointer import PointerMixin, _is_precondition_failure
from memorag_core.store.schemas import SCHEMA_VERSION, UNIT_SIDECAR_FORMAT, Manifest, parse_versioned_json
from memorag_core.store.versions import VersionFolder, VersionReader, VersionWriter

logger = logging.getLogger(__name__)

__all__ = ["COLLECTION_PATTERN", "is_collection_name", "is_version_id", "CollectionStore", "GCReport", "JobLease", "VersionFolder", "VersionReader", "VersionWriter",
           "new_version_id", "version_time", "_is_precondition_failure"]
# the names other modules imported from here before the split
_check_collection, _check_unit = check_collection, check_unit
__all__ += ["_COLLECTION_RE", "_UNIT_RE", "_VERSION_RE", "_check_collection", "_check_unit"]


class CollectionStore(PointerMixin, LeaseMixin, GCMixin):
    """The artifact store of collections and unit memories under one root URL.

    Args:
        root_url: local folder, ``file://`` or ``s3://bucket/prefix``.
        storage_options: filesystem options (see :func:`memorag_core.store.fs.open_url`).
    """

    def __init__(self, root_url: str, storage_options: dict | None = None):
        self.storage_options = storage_options
        self.fs, self.root = sfs.open_url(root_url, storage_options)
        self.url = sfs.url_of(self.fs, self.root)

    # -- paths -----------------------------------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return sfs.join(self.root, *parts)

    def _u(self, path: str) -> str:
        return sfs.url_of(self.fs, path)

    def _version_dir(self, collection: str, version: str) -> str:
        return self._p("collections", check_collection(collection), "versions", version)

    def unit_memory_url(self, unit_id: str) -> str:
        """URL of a unit's memory file: ``<root>/units/<unit_id>/memory.safetensors``."""
        return self._u(self._p("units", check_unit(unit_id), "memory.safetensors"))

    # -- units -----------------------------------------------------------------------------------------------
    def has_unit(self, unit_id: str) -> bool:
        """True if the unit's memory file exists (a finished unit: files appear whole or not at all)."""
        path = self._p("units", check_unit(unit_id), "memory.safetensors")
        return bool(sfs.with_retries(lambda: self.fs.exists(path), what=f"stat {self._u(path)}"))

    def missing_units(self, unit_ids, *, list_above: int = 64) -> list[str]:
        """The ids among ``unit_ids`` that have no memory file in the store, sorted.

        Up to ``list_above`` ids are checked one stat each; more are checked against one listing of ``units/``
        (S3: one request per 1,000 keys, two keys per unit), so the cost grows by listing pages, not by units.
        """
        ids = sorted(set(unit_ids))
        if len(ids) <= list_above:
            return [u for u in ids if not self.has_unit(u)]
        units_dir = self._p("units")
        present = {p[len(units_dir):].strip("/").split("/")[0]
                   for p in sfs.list_files(self.fs, units_dir, what=f"list {self._u(units_dir)}")
                   if p.endswith("/memory.safetensors")}
        return [u for u in ids if u not in present]

    def write_unit_memory(self, unit_id: str, m: MemoryTensors, storage_dtype: str | None = None) -> MemoryFileInfo:
        """Write a unit's memory (atomically), then its sidecar (:meth:`write_unit_sidecar`); returns the info to
        record in ``Manifest.units[unit_id]``."""
        path = self._p("units", check_unit(unit_id), "memory.safetensors")
        data = encode_memory(m, storage_dtype)
        sfs.write_atomic(self.fs, path, data)
        info = MemoryFileInfo(url=self._u(path), sha256=sfs.sha256_hex(data), nbytes=len(data),
                              storage_dtype=storage_dtype or "keep")
        self.write_unit_sidecar(unit_id, info.sha256, info.nbytes, info.storage_dtype, m.header)
        return info

    def _file_tag(self, path: str) -> tuple[int, str | None]:
        """(size, tag) of a file from one stat: the tag changes whenever the file is replaced, even by bytes of the
        same size (S3: the ETag, an MD5 of the content; local: inode and mtime in ns of the renamed file)."""
        info = sfs.with_retries(lambda: self.fs.info(path, refresh=True), what=f"stat {self._u(path)}")
        tag = info.get("ETag") or info.get("etag")
        if tag is None and info.get("ino") is not None and info.get("mtime") is not None:
            tag = f"ino {info['ino']} mtime {info['mtime']!r}"
        return int(info["size"]), (str(tag).strip('"') if tag is not None else None)

    def write_unit_sidecar(self, unit_id: str, sha256: str, nbytes: int, storage_dtype: str, header: dict) -> None:
        """Write ``units/<unit_id>/memory.json`` (atomically): the memory's header, sha256, size, storage dtype and
        the memory file's tag (:meth:`_file_tag`, one stat).

        Written after the memory file, so a sidecar names a memory that exists; a memory without one (an older
        store, or a kill between the two writes) is read whole by :meth:`unit_memory_info`'s callers instead.
        The tag ties the sidecar to the bytes it describes: a unit id names (model, config, text), but batched
        and one-at-a-time memorizing give allclose, not byte-identical, files (docs/memory.md), so another
        writer of the same unit can replace the file with bytes of the same size and another sha256.
        """
        _, tag = self._file_tag(self._p("units", check_unit(unit_id), "memory.safetensors"))
        body = {"format": UNIT_SIDECAR_FORMAT, "schema_version": SCHEMA_VERSION, "sha256": sha256,
                "nbytes": int(nbytes), "storage_dtype": storage_dtype, "header": header, "file_tag": tag}
        sfs.write_atomic(self.fs, self._p("units", check_unit(unit_id), "memory.json"),
                         json.dumps(body, sort_keys=True, allow_nan=False).encode())

    def unit_memory_info(self, unit_id: str) -> dict | None:
        """A finished unit's sidecar ``{sha256, nbytes, storage_dtype, header}``, or None when it has none.

        Costs one small read and one stat (the memory file's size and tag must equal the sidecar's), never a
        download of the memory. A sidecar that is unreadable, of another format, written before tags, or whose
        size or tag disagrees with the memory file (replaced by another writer since) is ignored (logged) and None
        is returned: the caller then reads the memory file itself, computes its sha256 and rewrites the sidecar.
        """
        side = self._p("units", check_unit(unit_id), "memory.json")
        mem = self._p("units", unit_id, "memory.safetensors")
        try:
            raw = sfs.with_retries(lambda: self.fs.cat_file(side), what=f"read {self._u(side)}")
        except ArtifactNotFoundError:
            return None
        try:
            data = parse_versioned_json(raw, self._u(side), UNIT_SIDECAR_FORMAT, "a memory sidecar")
            info = {"sha256": str(data["sha256"]), "nbytes": int(data["nbytes"]),
                    "storage_dtype": str(data.get("storage_dtype", "keep")), "header": dict(data["header"])}
            recorded_tag = data.get("file_tag")
            size, tag = self._file_tag(mem)
        except (CorruptArtifactError, KeyError, TypeError, ValueError, ArtifactNotFoundError) as exc:
            logger.warning("ignoring sidecar %s: %s", self._u(side), exc)
            return None
        if size != info["nbytes"]:
            logger.warning("ignoring sidecar %s: it records %d bytes, the memory file has %d", self._u(side),
                           info["nbytes"], size)
            return None
        if recorded_tag is None or recorded_tag != tag:
            logger.warning("ignoring sidecar %s: it was written for file %s, the memory file is now %s (replaced "
                           "since); its sha256 is recomputed", self._u(side), recorded_tag, tag)
            return None
        return info

    def read_unit_memory(self, unit_id: str, expected_sha256: str | None = None, **kw: Any) -> MemoryTensors:
        """Load a unit's memory; ``kw`` as :func:`load_memory` (dtype, device). Verifies ``expected_sha256``."""
        return load_memory(self.unit_memory_url(unit_id), expected_sha256=expected_sha256,
                           storage_options=self.storage_options, **kw)

    # -- versions --------------------------------------------------------------------------------------------
    def new_version(self, collection: str) -> "VersionWriter":
        """Start writing a new version; it stays invisible until :meth:`VersionWriter.publish`."""
        return VersionWriter(self, check_collection(collection), new_version_id(), self.current_version(collection))

    def current_version(self, collection: str) -> str | None:
        """The live version id, or None if the collection has never been published."""
        return self._read_pointer(collection)[0]

    def read_manifest(self, collection: str, version: str | None = None) -> Manifest:
        """The manifest of ``version`` (None = the live one).

        Raises ArtifactNotFoundError (no live version / no such version), CorruptArtifactError, SchemaVersionError.
        """
        if version is None:
            version = self.current_version(collection)
            if version is None:
                raise ArtifactNotFoundError(f"collection {collection!r} at {self.url} has no live version")
        path = sfs.join(self._version_dir(collection, version), "manifest.json")
        data = sfs.with_retries(lambda: self.fs.cat_file(path), what=f"read {self._u(path)}")
        return Manifest.from_json(data, what=self._u(path))

    def list_versions(self, collection: str) -> list[str]:
        """Ids of the versions that have a manifest (published or written but lost a race), oldest first."""
        base = sfs.join(self._p("collections", check_collection(collection)), "versions")
        try:
            paths = sfs.with_retries(lambda: self.fs.glob(sfs.join(base, "*", "manifest.json")),
                                     what=f"list {self._u(base)}")
        except ArtifactNotFoundError:
            return []
        return sorted(p.rstrip("/").split("/")[-2] for p in paths)

    def list_collections(self) -> list[str]:
        """Names of the collections under this root."""
        base = self._p("collections")
        try:
            paths = sfs.with_retries(lambda: self.fs.ls(base, detail=False), what=f"list {self._u(base)}")
        except ArtifactNotFoundError:
            return []
        return sorted(p.rstrip("/").split("/")[-1] for p in paths)

    def open_version(self, collection: str, version: str | None = None) -> "VersionReader":
        """A reader of ``version`` (None = the live one), pinned to that version's manifest."""
        manifest = self.read_manifest(collection, version)
        return VersionReader(self, manifest)
