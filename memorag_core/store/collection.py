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

Why a conditional write on the pointer, not a lock object. Two publishers racing on one collection must not
both win. A lock object (create ``LOCK`` if absent, publish, delete it) needs a lease: a publisher that crashes
holding it blocks everyone until the lease expires, and a publisher that stalls past its lease (GC pause,
network partition) still goes on to write, so the lock does not actually fence it. A compare-and-swap on the
pointer itself has neither problem: the server applies ``PUT CURRENT If-Match: <etag read before>`` (or
``If-None-Match: *`` for a collection's first version) atomically and answers 412 Precondition Failed to the
loser, which raises :class:`PublishConflictError`; nothing is left to clean up but an unpublished version
folder that :meth:`CollectionStore.gc` removes later. AWS S3 supports both conditions on PutObject (since 2024),
as do MinIO and moto 5.2.5 (``moto/s3/responses.py: put_object`` checks ``If-Match`` and ``If-None-Match``),
and s3fs passes ``IfMatch`` through ``pipe_file(**kwargs)`` to PutObject and maps ``mode="create"`` to
``IfNoneMatch="*"``. On a local folder the same compare-and-swap runs under an exclusive ``fcntl.flock`` on
``collections/<name>/.publish.lock`` (held only for the read-compare-rename, released by the kernel if the
process dies, so it cannot go stale), with the pointer replaced by an atomic rename. Other fsspec backends are
readable but publishing to them is refused, since neither mechanism is available there.

A publish whose PUT succeeded but whose response was lost is retried; the retry then fails its precondition, so
on 412 the pointer is read again and the publish counts as won when it already names this version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from memorag_core.errors import (
    ArtifactNotFoundError,
    CorruptArtifactError,
    InvalidInputError,
    PublishConflictError,
)
from memorag_core.store import fs as sfs
from memorag_core.store.bundle import check_relpath, parquet_to_table, table_to_parquet, verify
from memorag_core.store.memory_file import MemoryFileInfo, MemoryTensors, encode_memory, load_memory
from memorag_core.store.schemas import (
    SCHEMA_VERSION,
    TABLE_SCHEMAS,
    UNIT_SIDECAR_FORMAT,
    Manifest,
    conform_table,
    parse_versioned_json,
)

logger = logging.getLogger(__name__)

_COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UNIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_VERSION_RE = re.compile(r"^(\d{8}T\d{6}\.\d{6})Z-[0-9a-f]{8}$")
_UNSET: Any = ...


def is_collection_name(name: object) -> bool:
    """Whether ``name`` is a valid collection name (stays inside the store): :data:`COLLECTION_PATTERN`."""
    return isinstance(name, str) and bool(_COLLECTION_RE.match(name))


def is_version_id(version: object) -> bool:
    """Whether ``version`` is a version id (e.g. ``20260101T120000.000000Z-1a2b3c4d``)."""
    return isinstance(version, str) and bool(_VERSION_RE.match(version))


#: the pattern a collection name must match
COLLECTION_PATTERN = _COLLECTION_RE.pattern


def _check_collection(name: str) -> str:
    if not isinstance(name, str) or not _COLLECTION_RE.match(name):
        raise InvalidInputError(f"collection name {name!r} must match {_COLLECTION_RE.pattern}")
    return name


def _check_unit(unit_id: str) -> str:
    if not isinstance(unit_id, str) or not _UNIT_RE.match(unit_id):
        raise InvalidInputError(f"unit id {unit_id!r} must match {_UNIT_RE.pattern}")
    return unit_id


def new_version_id(now: datetime | None = None) -> str:
    """A sortable, unique version id: ``20260101T120000.123456Z-1a2b3c4d``."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S.%f}Z-{secrets.token_hex(4)}"


def version_time(version: str) -> datetime | None:
    """The UTC creation time encoded in a version id, or None if it is not one."""
    m = _VERSION_RE.match(version)
    return datetime.strptime(m.group(1), "%Y%m%dT%H%M%S.%f").replace(tzinfo=timezone.utc) if m else None


@dataclass
class GCReport:
    """What :meth:`CollectionStore.gc` removed and kept."""

    live: str | None
    """The live version (never removed)."""
    kept_versions: list[str] = field(default_factory=list)
    """Versions kept (the live one, the last ``keep_last`` and recent unpublished ones)."""
    removed_versions: list[str] = field(default_factory=list)
    """Version folders deleted."""
    removed_units: list[str] = field(default_factory=list)
    """Unit ids whose memory was deleted (referenced by no kept version of any collection)."""
    removed_staging: list[str] = field(default_factory=list)
    """Staged per-unit chunk tables deleted (``staging/chunks/<key>/<unit_id>.parquet``, as ``<key>/<unit_id>``)
    whose unit no kept version uses: the memorize job's resume cache for units that were dropped."""
    freed_bytes: int = 0
    """Bytes deleted."""


class CollectionStore:
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
        return self._p("collections", _check_collection(collection), "versions", version)

    def unit_memory_url(self, unit_id: str) -> str:
        """URL of a unit's memory file: ``<root>/units/<unit_id>/memory.safetensors``."""
        return self._u(self._p("units", _check_unit(unit_id), "memory.safetensors"))

    # -- units -----------------------------------------------------------------------------------------------
    def has_unit(self, unit_id: str) -> bool:
        """True if the unit's memory file exists (a finished unit: files appear whole or not at all)."""
        path = self._p("units", _check_unit(unit_id), "memory.safetensors")
        return bool(sfs.with_retries(lambda: self.fs.exists(path), what=f"stat {self._u(path)}"))

    def write_unit_memory(self, unit_id: str, m: MemoryTensors, storage_dtype: str | None = None) -> MemoryFileInfo:
        """Write a unit's memory (atomically), then its sidecar (:meth:`write_unit_sidecar`); returns the info to
        record in ``Manifest.units[unit_id]``."""
        path = self._p("units", _check_unit(unit_id), "memory.safetensors")
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
        _, tag = self._file_tag(self._p("units", _check_unit(unit_id), "memory.safetensors"))
        body = {"format": UNIT_SIDECAR_FORMAT, "schema_version": SCHEMA_VERSION, "sha256": sha256,
                "nbytes": int(nbytes), "storage_dtype": storage_dtype, "header": header, "file_tag": tag}
        sfs.write_atomic(self.fs, self._p("units", _check_unit(unit_id), "memory.json"),
                         json.dumps(body, sort_keys=True, allow_nan=False).encode())

    def unit_memory_info(self, unit_id: str) -> dict | None:
        """A finished unit's sidecar ``{sha256, nbytes, storage_dtype, header}``, or None when it has none.

        Costs one small read and one stat (the memory file's size and tag must equal the sidecar's), never a
        download of the memory. A sidecar that is unreadable, of another format, written before tags, or whose
        size or tag disagrees with the memory file (replaced by another writer since) is ignored (logged) and None
        is returned: the caller then reads the memory file itself, computes its sha256 and rewrites the sidecar.
        """
        side = self._p("units", _check_unit(unit_id), "memory.json")
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
        return VersionWriter(self, _check_collection(collection), new_version_id(), self.current_version(collection))

    def current_version(self, collection: str) -> str | None:
        """The live version id, or None if the collection has never been published."""
        return self._read_pointer(collection)[0]

    def current_pointer(self, collection: str) -> dict | None:
        """The live pointer, ``{"version": ..., "published_at": ISO-8601 UTC}``, or None if never published.
        Raises CorruptArtifactError for an unreadable pointer."""
        path = self._pointer_path(collection)
        try:
            data = sfs.with_retries(lambda: self.fs.cat_file(path), what=f"read {self._u(path)}")
        except ArtifactNotFoundError:
            self._check_bucket()
            return None
        try:
            pointer = json.loads(data)
            return {"version": str(pointer["version"]), "published_at": pointer.get("published_at")}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptArtifactError(f"{self._u(path)}: not a valid pointer ({exc})") from exc

    def _pointer_path(self, collection: str) -> str:
        return self._p("collections", _check_collection(collection), "CURRENT")

    def _read_pointer(self, collection: str, *, with_etag: bool = False) -> tuple[str | None, str | None]:
        """(live version or None, S3 ETag of the pointer read or None). The ETag is read before the content, so
        a pointer replaced in between makes the later conditional write fail (conservative)."""
        path = self._pointer_path(collection)
        etag = None
        try:
            if with_etag:
                info = sfs.with_retries(lambda: self.fs.info(path, refresh=True), what=f"stat {self._u(path)}")
                etag = info.get("ETag")
            data = sfs.with_retries(lambda: self.fs.cat_file(path), what=f"read {self._u(path)}")
        except ArtifactNotFoundError:
            self._check_bucket()  # a missing bucket is an error, not an empty collection
            return None, None
        try:
            version = json.loads(data)["version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptArtifactError(f"{self._u(path)}: not a valid pointer ({exc})") from exc
        return version, etag

    def _check_bucket(self) -> None:
        """Raise ArtifactNotFoundError naming the bucket if an S3 root's bucket does not exist."""
        if sfs.is_local(self.fs):
            return
        bucket = self.root.split("/", 1)[0]
        if not sfs.with_retries(lambda: self.fs.exists(bucket), what=f"stat bucket {bucket!r}"):
            raise ArtifactNotFoundError(f"store {self.url}: bucket {bucket!r} does not exist")

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
        base = sfs.join(self._p("collections", _check_collection(collection)), "versions")
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

    # -- leases (versions a running service holds) ------------------------------------------------------------
    def _lease_path(self, collection: str, holder: str) -> str:
        if not isinstance(holder, str) or not _UNIT_RE.match(holder):
            raise InvalidInputError(f"lease holder {holder!r} must match {_UNIT_RE.pattern}")
        return self._p("collections", _check_collection(collection), "leases", f"{holder}.json")

    def write_lease(self, collection: str, holder: str, versions: list[str], ttl_s: float = 600.0) -> None:
        """Record that ``holder`` (a serving replica) uses ``versions`` of ``collection`` for the next ``ttl_s``
        seconds; :meth:`gc` keeps them. Renew before it expires; :meth:`delete_lease` when done."""
        expires = datetime.now(timezone.utc).timestamp() + float(ttl_s)
        body = json.dumps({"holder": holder, "versions": sorted(versions), "expires_at": expires}).encode()
        sfs.write_atomic(self.fs, self._lease_path(collection, holder), body)

    def delete_lease(self, collection: str, holder: str) -> None:
        """Remove ``holder``'s lease (nothing happens when there is none)."""
        path = self._lease_path(collection, holder)
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass

    def leased_versions(self, collection: str) -> set[str]:
        """Versions of ``collection`` named by an unexpired lease. A malformed lease is ignored (logged)."""
        base = self._p("collections", _check_collection(collection), "leases")
        try:
            paths = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return set()
        now = datetime.now(timezone.utc).timestamp()
        out: set[str] = set()
        for p in paths:
            try:
                lease = json.loads(self.fs.cat_file(p))
                if float(lease["expires_at"]) > now:
                    out.update(str(v) for v in lease["versions"])
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("ignoring malformed lease %s: %s", self._u(p), exc)
        return out

    # -- garbage collection ----------------------------------------------------------------------------------
    def gc(self, collection: str, keep_last: int = 1, *, min_age_s: float = 3600.0,
           dry_run: bool = False) -> GCReport:
        """Delete old versions of ``collection``, and unit memories and staged chunk tables that no kept version of
        any collection uses.

        Kept: the live version; the newest ``keep_last`` versions with a manifest; versions a running service
        holds (an unexpired lease, see :meth:`write_lease`); and anything younger than ``min_age_s`` (a version
        or unit a concurrent job is still writing, not yet published). The live version and its units are never
        removed. With ``dry_run`` nothing is deleted: the report says what would be.

        Raises InvalidInputError for keep_last < 1 or a negative min_age_s.
        """
        if keep_last < 1 or min_age_s < 0:
            raise InvalidInputError(f"gc needs keep_last >= 1 and min_age_s >= 0 (got {keep_last}, {min_age_s})")
        now = datetime.now(timezone.utc)
        live = self.current_version(collection)
        report = GCReport(live=live)
        base = sfs.join(self._p("collections", _check_collection(collection)), "versions")
        try:
            folders = sorted(p.rstrip("/").split("/")[-1] for p in self.fs.ls(base, detail=False))
        except FileNotFoundError:
            folders = []
        with_manifest = set(self.list_versions(collection))
        leased = self.leased_versions(collection)
        keep = {live} | set(sorted(with_manifest)[-keep_last:]) | leased
        for v in folders:
            born = version_time(v)
            young = born is None or (now - born).total_seconds() < min_age_s
            if v in keep or young:
                report.kept_versions.append(v)
                continue
            path = self._version_dir(collection, v)
            report.freed_bytes += self._du(path)
            if not dry_run:
                sfs.with_retries(lambda: self.fs.rm(path, recursive=True), what=f"delete {self._u(path)}")
            report.removed_versions.append(v)
        # Units: referenced by any remaining manifest of any collection are kept.
        referenced: set[str] = set()
        for c in self.list_collections():
            for v in self.list_versions(c):
                if c != collection or v not in report.removed_versions:  # (still there on a dry run)
                    referenced.update(self.read_manifest(c, v).units)
        units_dir = self._p("units")
        try:
            unit_dirs = self.fs.ls(units_dir, detail=False)
        except FileNotFoundError:
            unit_dirs = []
        for d in unit_dirs:
            uid = d.rstrip("/").split("/")[-1]
            if uid in referenced:
                continue
            mem = sfs.join(units_dir, uid, "memory.safetensors")
            try:
                age = (now - self.fs.modified(mem).astimezone(timezone.utc)).total_seconds()
            except (FileNotFoundError, NotImplementedError):
                age = float("inf")  # an empty unit folder
            if age < min_age_s:
                continue
            report.freed_bytes += self._du(sfs.join(units_dir, uid))
            if not dry_run:
                sfs.with_retries(lambda: self.fs.rm(sfs.join(units_dir, uid), recursive=True),
                                 what=f"delete {self._u(sfs.join(units_dir, uid))}")
            report.removed_units.append(uid)
        self._gc_staging(referenced, now, min_age_s, report, dry_run)
        logger.info("gc %s%s: removed %d versions, %d units, %d staged chunk tables, %d bytes; live %s",
                    " (dry run)" if dry_run else "", collection,
                    len(report.removed_versions), len(report.removed_units), len(report.removed_staging),
                    report.freed_bytes, live)
        return report

    def _gc_staging(self, referenced: set[str], now: datetime, min_age_s: float, report: GCReport,
                    dry_run: bool = False) -> None:
        """Delete staged chunk tables (the memorize job's per-unit cache) of units no kept version uses."""
        staging = self._p("staging", "chunks")
        try:
            key_dirs = self.fs.ls(staging, detail=False)
        except FileNotFoundError:
            return
        for kdir in key_dirs:
            key = kdir.rstrip("/").split("/")[-1]
            try:
                files = self.fs.ls(kdir, detail=False)
            except FileNotFoundError:
                continue
            for f in files:
                name = f.rstrip("/").split("/")[-1]
                if not name.endswith(".parquet") or name[: -len(".parquet")] in referenced:
                    continue
                try:
                    info = self.fs.info(f)
                    age = (now - self.fs.modified(f).astimezone(timezone.utc)).total_seconds()
                except FileNotFoundError:
                    continue
                if age < min_age_s:  # a running job may be about to publish it
                    continue
                if not dry_run:
                    sfs.with_retries(lambda: self.fs.rm(f), what=f"delete {self._u(f)}")
                report.freed_bytes += int(info.get("size") or 0)
                report.removed_staging.append(f"{key}/{name[: -len('.parquet')]}")

    def _du(self, path: str) -> int:
        try:
            return int(sum(self.fs.du(path, total=False).values()))
        except FileNotFoundError:
            return 0

    # -- pointer compare-and-swap ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _local_lock(self, collection: str):
        import fcntl

        path = self._p("collections", collection, ".publish.lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _swap_pointer(self, collection: str, new: str, expected: str | None) -> None:
        """Replace CURRENT with ``new`` iff it names ``expected`` now (None: iff there is none)."""
        path = self._pointer_path(collection)
        body = json.dumps({"version": new, "published_at": datetime.now(timezone.utc).isoformat()}).encode()

        def conflict(actual: str | None) -> PublishConflictError:
            return PublishConflictError(
                f"publish of {collection}/{new} at {self.url} lost: the live version is {actual!r}, expected "
                f"{expected!r} (another publisher won); version {new} stays unpublished")

        if sfs.is_local(self.fs):
            with self._local_lock(collection):
                actual, _ = self._read_pointer(collection)
                if actual != expected:
                    raise conflict(actual)
                sfs.write_atomic(self.fs, path, body)
            return
        if "s3" not in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)):
            raise InvalidInputError(f"publishing needs a local folder or S3 (conditional writes); {self.url} is neither")
        actual, etag = self._read_pointer(collection, with_etag=True)
        if actual != expected:
            raise conflict(actual)
        cond = {"IfMatch": etag} if etag is not None else {"mode": "create"}
        try:
            sfs.with_retries(lambda: self.fs.pipe_file(path, body, **cond), what=f"publish {self._u(path)}")
        except Exception as exc:  # noqa: BLE001 - a failed precondition is a lost race; others propagate
            if not _is_precondition_failure(exc):
                raise
            actual, _ = self._read_pointer(collection)
            if actual != new:  # not our own earlier attempt whose response was lost
                raise conflict(actual) from exc


def _is_precondition_failure(exc: BaseException) -> bool:
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FileExistsError):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict) and (response.get("Error", {}).get("Code") == "PreconditionFailed"
                                           or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412):
            return True
        if "PreconditionFailed" in str(e) or "pre-conditions you specified did not hold" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class VersionWriter:
    """Writes one new version of a collection; nothing is visible to readers until :meth:`publish`.

    Obtained from :meth:`CollectionStore.new_version`. ``base`` is the version that was live when writing began.
    """

    def __init__(self, store: CollectionStore, collection: str, version: str, base: str | None):
        self.store, self.collection, self.version, self.base = store, collection, version, base
        self.dir = store._version_dir(collection, version)
        self.files: dict[str, dict[str, Any]] = {}
        self.published = False

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write raw bytes at ``relpath`` in the version folder (e.g. ``index/shard-000.faiss``); returns relpath."""
        check_relpath(relpath)
        if relpath == "manifest.json":
            raise InvalidInputError("manifest.json is written by publish()")
        if self.published:
            raise InvalidInputError(f"version {self.collection}/{self.version} is already published")
        data = bytes(data)
        sfs.write_atomic(self.store.fs, sfs.join(self.dir, relpath), data)
        self.files[relpath] = {"sha256": sfs.sha256_hex(data), "nbytes": len(data)}
        return relpath

    def folder(self) -> "VersionFolder":
        """A small picklable handle through which Ray tasks write files of this (unpublished) version themselves;
        they return the :meth:`VersionFolder.write` entries, which :meth:`record_file` then lists."""
        return VersionFolder(self.store.url, self.store.storage_options, self.dir)

    def record_file(self, relpath: str, sha256: str, nbytes: int) -> str:
        """List a file that a task wrote through :meth:`folder` (its sha256 and size go into the manifest, and
        readers verify them). Checks only that the file exists with that size (a stat, no download).

        Raises ArtifactNotFoundError (missing) or CorruptArtifactError (another size).
        """
        check_relpath(relpath)
        if self.published:
            raise InvalidInputError(f"version {self.collection}/{self.version} is already published")
        path = sfs.join(self.dir, relpath)
        size = int(sfs.with_retries(lambda: self.store.fs.info(path)["size"], what=f"stat {self.store._u(path)}"))
        if size != int(nbytes):
            raise CorruptArtifactError(f"{self.store._u(path)}: {size} bytes, the writer reported {nbytes}")
        self.files[relpath] = {"sha256": str(sha256), "nbytes": int(nbytes)}
        return relpath

    def write_table(self, kind: str, name: str, table: pa.Table) -> str:
        """Write a table of ``kind`` (chunks|summaries|quarantine|documents|units) as ``<kind>/<name>.parquet``.

        The table must have that kind's columns (see :mod:`memorag_core.store.schemas`); they are cast to the
        schema. Returns the relative path. Raises InvalidInputError naming a missing or mistyped column.
        """
        if kind not in TABLE_SCHEMAS:
            raise InvalidInputError(f"unknown table kind {kind!r}; expected one of {sorted(TABLE_SCHEMAS)}")
        table = conform_table(table, kind)
        return self.write_bytes(f"{kind}/{check_relpath(name)}.parquet", table_to_parquet(table))

    def publish(self, manifest: Manifest, *, expected_current: str | None = _UNSET) -> str:
        """Write the manifest, then make this version live by swapping CURRENT last.

        Args:
            manifest: models, config, units (each unit must exist in the store), stats. ``collection``,
                ``version``, ``created_at``, ``parent`` and the written ``files`` are filled in here.
            expected_current: the version that must be live for this publish to win; default: the one that was
                live when :meth:`CollectionStore.new_version` was called. ``None``: the collection must have no
                live version.

        Returns:
            The published version id.

        Raises:
            PublishConflictError: another publisher changed the live version first (nothing live changed).
            ArtifactNotFoundError: a unit listed in the manifest has no memory in the store.
            Store errors when the store fails; the previous version then stays live.
        """
        if self.published:
            raise InvalidInputError(f"version {self.collection}/{self.version} is already published")
        expected = self.base if expected_current is _UNSET else expected_current
        for uid in manifest.units:
            if not self.store.has_unit(uid):
                raise ArtifactNotFoundError(f"publish {self.collection}/{self.version}: unit {uid!r} listed in the "
                                            f"manifest has no memory at {self.store.unit_memory_url(uid)}")
        manifest.collection, manifest.version, manifest.parent = self.collection, self.version, expected
        manifest.created_at = datetime.now(timezone.utc).isoformat()
        manifest.files = {**manifest.files, **self.files}
        sfs.write_atomic(self.store.fs, sfs.join(self.dir, "manifest.json"), manifest.to_json().encode())
        self.store._swap_pointer(self.collection, self.version, expected)
        self.published = True
        logger.info("published %s/%s at %s (parent %s)", self.collection, self.version, self.store.url, expected)
        return self.version


@dataclass(frozen=True)
class VersionFolder:
    """Where the files of one unpublished version go, as plain data (picklable: Ray tasks get it as an argument).

    Tasks write shard files, router files and the like straight into the version folder and return only the
    small entry of :meth:`write`; nothing large travels back to the driver. Until
    :meth:`VersionWriter.publish` the files are invisible to readers (no manifest lists them), and a version
    that is never published is removed by :meth:`CollectionStore.gc`.
    """

    store_url: str
    storage_options: dict | None
    dir: str

    def write(self, relpath: str, data: bytes) -> dict[str, Any]:
        """Write ``data`` at ``relpath`` (atomically); returns ``{"path", "sha256", "nbytes"}``."""
        check_relpath(relpath)
        if relpath == "manifest.json":
            raise InvalidInputError("manifest.json is written by publish()")
        fs, _ = sfs.open_url(self.store_url, self.storage_options)
        sfs.write_atomic(fs, sfs.join(self.dir, relpath), data)
        return {"path": relpath, "sha256": sfs.sha256_hex(data), "nbytes": len(data)}

    def read(self, relpath: str) -> bytes:
        """The bytes of a file written into this folder (by :meth:`write`), not verified."""
        fs, _ = sfs.open_url(self.store_url, self.storage_options)
        return bytes(sfs.read_all(fs, sfs.join(self.dir, check_relpath(relpath))))


class VersionReader:
    """Reads the files of one version, pinned to its manifest; every read is sha256-verified."""

    def __init__(self, store: CollectionStore, manifest: Manifest):
        self.store, self.manifest = store, manifest
        self.collection, self.version = manifest.collection, manifest.version
        self.dir = store._version_dir(manifest.collection, manifest.version)

    def files(self, prefix: str = "") -> list[str]:
        """Relative paths of the version's files starting with ``prefix`` (e.g. ``"index/"``)."""
        return sorted(p for p in self.manifest.files if p.startswith(prefix))

    def read_bytes(self, relpath: str) -> bytes:
        """A file's bytes, verified. ArtifactNotFoundError if the manifest does not list it."""
        entry = self.manifest.files.get(check_relpath(relpath))
        if entry is None:
            raise ArtifactNotFoundError(f"{self.collection}/{self.version} has no file {relpath!r}")
        path = sfs.join(self.dir, relpath)
        data = sfs.read_all(self.store.fs, path)
        verify(data, entry, self.store._u(path))
        return bytes(data)

    def tables(self, kind: str) -> list[str]:
        """Names (without ``.parquet``) of the tables of ``kind``."""
        return [p[len(kind) + 1:-len(".parquet")] for p in self.files(f"{kind}/") if p.endswith(".parquet")]

    def read_table(self, kind: str, name: str | None = None) -> pa.Table:
        """Table ``<kind>/<name>.parquet``, or all tables of ``kind`` concatenated when name is None.

        Raises ArtifactNotFoundError when there is no such table.
        """
        names = [name] if name is not None else self.tables(kind)
        if not names:
            raise ArtifactNotFoundError(f"{self.collection}/{self.version} has no {kind} tables")
        tables = []
        for n in names:
            rel = f"{kind}/{n}.parquet"
            data = self.read_bytes(rel)
            tables.append(parquet_to_table(data, self.store._u(sfs.join(self.dir, rel))))
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]

    def read_unit_memory(self, unit_id: str, **kw: Any) -> MemoryTensors:
        """A unit's memory, verified against the sha256 this version recorded."""
        entry = self.manifest.units.get(unit_id)
        if entry is None:
            raise ArtifactNotFoundError(f"{self.collection}/{self.version} does not use unit {unit_id!r}")
        return self.store.read_unit_memory(unit_id, expected_sha256=entry.get("sha256"), **kw)
