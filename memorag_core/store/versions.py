"""One collection version: written by :class:`VersionWriter` (invisible until its publish swaps the pointer),
by Ray tasks through a picklable :class:`VersionFolder`, and read by :class:`VersionReader` (pinned to its manifest,
every read verified).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError, InvalidInputError
from memorag_core.store import fs as sfs
from memorag_core.store.bundle import check_relpath, parquet_to_table, table_to_parquet, verify
from memorag_core.store.memory_file import MemoryTensors
from memorag_core.store.schemas import TABLE_SCHEMAS, Manifest, conform_table

logger = logging.getLogger(__name__)
_UNSET: Any = ...


class VersionWriter:
    """Writes one new version of a collection; nothing is visible to readers until :meth:`publish`.

    Obtained from :meth:`CollectionStore.new_version`. ``base`` is the version that was live when writing began.
    """

    def __init__(self, store, collection: str, version: str, base: str | None):
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

    def _check_files(self) -> None:
        """Every file this writer recorded is still in the version folder with its size (one listing): a gc that
        removed the folder under a running job makes the publish fail instead of publishing a broken version."""
        listed = {p[len(self.dir):].strip("/"): int(i.get("size") or 0)
                  for p, i in sfs.list_files(self.store.fs, self.dir, what=f"list {self.store._u(self.dir)}").items()}
        for rel, entry in sorted(self.files.items()):
            if listed.get(rel) != int(entry["nbytes"]):
                raise ArtifactNotFoundError(
                    f"publish {self.collection}/{self.version}: file {rel!r} is "
                    + ("missing" if rel not in listed else f"{listed[rel]} bytes, recorded {entry['nbytes']}")
                    + f" in {self.store._u(self.dir)} (deleted by a gc that ignored this job's lease?)")

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
            ArtifactNotFoundError: a unit listed in the manifest has no memory in the store, or a file this writer
                wrote is gone.
            Store errors when the store fails; the previous version then stays live.
        """
        if self.published:
            raise InvalidInputError(f"version {self.collection}/{self.version} is already published")
        expected = self.base if expected_current is _UNSET else expected_current
        missing = self.store.missing_units(manifest.units)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ArtifactNotFoundError(f"publish {self.collection}/{self.version}: unit {missing[0]!r} listed in the "
                                        f"manifest has no memory at {self.store.unit_memory_url(missing[0])}{more}")
        self._check_files()
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

    def __init__(self, store, manifest: Manifest):
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
