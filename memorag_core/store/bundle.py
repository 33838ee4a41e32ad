"""Bundles: a self-contained folder of artifacts with a ``manifest.json`` written last.

Used by ``MemoRAG.memorize(save_dir=...)`` / ``MemoRAG.load(save_dir)`` for one memory and its retrieval
artifacts, local or ``s3://``. Layout::

    <url>/manifest.json            written LAST: {format, schema_version, generation, created_at, files, ...}
    <url>/g-<generation>/<name>    the files of that generation

Each :class:`Bundle` that writes starts a fresh generation folder, so rewriting an existing bundle never touches
the files the current manifest points to. :meth:`Bundle.commit` replaces ``manifest.json`` atomically (local
rename / one S3 PUT) and only then deletes older generation folders: a crash at any point leaves either the old
bundle or the new one loadable, never a mix. Every read verifies the sha256 and size recorded in the manifest.
A bundle has one writer at a time (collections, with many publishers, use :class:`CollectionStore`); a reader
that races a rewrite may find the old generation already deleted and gets ArtifactNotFoundError, then retries.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import time
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError, InvalidInputError
from memorag_core.store import fs as sfs
from memorag_core.store.memory_file import MemoryFileInfo, MemoryTensors, encode_memory, load_memory
from memorag_core.store.schemas import BUNDLE_FORMAT, SCHEMA_VERSION, parse_versioned_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_RESERVED = {"format", "schema_version", "generation", "created_at", "files"}


def check_relpath(name: str) -> str:
    """Validate a file name relative to a bundle/version folder (letters, digits, ``_.-``, '/'-separated).

    Raises InvalidInputError for empty, absolute, ``..`` or otherwise unsafe names.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or any(p in (".", "..") for p in name.split("/")):
        raise InvalidInputError(f"artifact name {name!r} must be a relative path of [A-Za-z0-9_.-] parts")
    return name


def table_to_parquet(table: pa.Table) -> bytes:
    """Serialize an Arrow table to Parquet bytes (zstd)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def parquet_to_table(data: bytes | bytearray, what: str) -> pa.Table:
    """Parse Parquet bytes; CorruptArtifactError naming ``what`` if they do not parse."""
    try:
        return pq.read_table(pa.BufferReader(pa.py_buffer(data)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptArtifactError(f"{what}: not a readable Parquet file ({exc})") from exc


def verify(data: bytes | bytearray, entry: dict, what: str) -> None:
    """Check ``data`` against a manifest entry ``{sha256, nbytes}``; CorruptArtifactError naming ``what``."""
    if len(data) != entry.get("nbytes"):
        raise CorruptArtifactError(f"{what}: {len(data)} bytes, manifest records {entry.get('nbytes')} (truncated?)")
    digest = sfs.sha256_hex(data)
    if digest != entry.get("sha256"):
        raise CorruptArtifactError(f"{what}: sha256 {digest} does not match the manifest's {entry.get('sha256')}")


class Bundle:
    """A folder of artifacts (bytes, Parquet tables, memory files) described by a manifest written last.

    Args:
        url: folder URL (local path, ``file://`` or ``s3://bucket/prefix``).
        storage_options: filesystem options (see :func:`memorag_core.store.fs.open_url`).

    Writes (``write_*``) go to a new generation and are invisible until :meth:`commit`; reads (``read_*``)
    always follow the committed manifest.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self._storage_options = storage_options
        self.fs, self.path = sfs.open_url(url, storage_options)
        self.url = sfs.url_of(self.fs, self.path)
        self.generation = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"
        self._pending: dict[str, dict[str, Any]] = {}
        self._manifest: dict | None = None

    # -- writing ---------------------------------------------------------------------------------------------
    def _write(self, name: str, data: bytes, kind: str, **extra: Any) -> dict:
        relpath = f"g-{self.generation}/{check_relpath(name)}"
        sfs.write_atomic(self.fs, sfs.join(self.path, relpath), data)
        entry = {"path": relpath, "sha256": sfs.sha256_hex(data), "nbytes": len(data), "kind": kind, **extra}
        self._pending[name] = entry
        return entry

    def write_bytes(self, name: str, data: bytes) -> None:
        """Stage raw bytes (e.g. a FAISS index from ``faiss.serialize_index``) under ``name``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInputError(f"{name!r}: expected bytes, got {type(data).__name__}")
        self._write(name, bytes(data), "bytes")

    def write_table(self, name: str, table: pa.Table) -> None:
        """Stage an Arrow table as Parquet under ``name``."""
        if not isinstance(table, pa.Table):
            raise InvalidInputError(f"{name!r}: expected a pyarrow.Table, got {type(table).__name__}")
        self._write(name, table_to_parquet(table), "table", rows=table.num_rows)

    def write_memory(self, name: str, m: MemoryTensors, storage_dtype: str | None = None) -> MemoryFileInfo:
        """Stage a memory file (see :mod:`memorag_core.store.memory_file`) under ``name``."""
        data = encode_memory(m, storage_dtype)
        entry = self._write(name, data, "memory", storage_dtype=storage_dtype or "keep")
        return MemoryFileInfo(url=sfs.join(self.url, entry["path"]), sha256=entry["sha256"], nbytes=len(data),
                              storage_dtype=storage_dtype or "keep")

    def commit(self, manifest_extra: dict | None = None) -> dict:
        """Write ``manifest.json`` (last) listing the staged files, then delete older generations.

        Args:
            manifest_extra: JSON-serializable top-level fields to record (config, models, stats ...); may not use
                the reserved keys format, schema_version, generation, created_at, files.

        Returns:
            The manifest dict, as written.

        Raises:
            InvalidInputError: nothing staged, reserved keys, or non-JSON extra. Store errors on write failure;
            the previous manifest then stays in place.
        """
        extra = dict(manifest_extra or {})
        if not self._pending:
            raise InvalidInputError(f"bundle {self.url}: nothing written to commit")
        if clash := _RESERVED & set(extra):
            raise InvalidInputError(f"bundle {self.url}: manifest_extra uses reserved keys {sorted(clash)}")
        manifest = {**extra, "format": BUNDLE_FORMAT, "schema_version": SCHEMA_VERSION,
                    "generation": self.generation, "created_at": datetime.now(timezone.utc).isoformat(),
                    "files": dict(self._pending)}
        try:
            text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"bundle {self.url}: manifest_extra is not JSON-serializable: {exc}") from exc
        sfs.write_atomic(self.fs, sfs.join(self.path, MANIFEST_NAME), text.encode())
        self._manifest = manifest
        self._delete_old_generations()
        logger.info("committed bundle %s (%d files, %d bytes)", self.url, len(self._pending),
                    sum(e["nbytes"] for e in self._pending.values()))
        return manifest

    def _delete_old_generations(self) -> None:
        keep = f"g-{self.generation}"
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("g-") and base != keep:
                try:
                    self.fs.rm(entry, recursive=True)
                except Exception as exc:  # noqa: BLE001 - leftover garbage is harmless, the manifest is swapped
                    logger.warning("bundle %s: could not delete old generation %s: %s", self.url, base, exc)

    # -- reading ---------------------------------------------------------------------------------------------
    def read_manifest(self) -> dict:
        """The committed manifest. ArtifactNotFoundError if there is none (no bundle at this URL)."""
        what = sfs.join(self.url, MANIFEST_NAME)
        try:
            data = sfs.read_all(self.fs, sfs.join(self.path, MANIFEST_NAME))
        except ArtifactNotFoundError as exc:
            raise ArtifactNotFoundError(f"no bundle at {self.url}: {MANIFEST_NAME} not found") from exc
        manifest = parse_versioned_json(data, what, BUNDLE_FORMAT, "a memorag bundle manifest")
        self._manifest = manifest
        return manifest

    def names(self) -> list[str]:
        """Names of the committed files."""
        return sorted((self._manifest or self.read_manifest())["files"])

    def _read(self, name: str) -> bytearray:
        manifest = self._manifest or self.read_manifest()
        entry = manifest["files"].get(name)
        if entry is None:
            raise ArtifactNotFoundError(f"bundle {self.url} has no file {name!r} (has {sorted(manifest['files'])})")
        what = sfs.join(self.url, entry["path"])
        data = sfs.read_all(self.fs, sfs.join(self.path, entry["path"]))
        verify(data, entry, what)
        return data

    def read_bytes(self, name: str) -> bytes:
        """A committed file's bytes, sha256-verified. ArtifactNotFoundError / CorruptArtifactError name it."""
        return bytes(self._read(name))

    def read_table(self, name: str) -> pa.Table:
        """A committed Parquet table, sha256-verified."""
        return parquet_to_table(self._read(name), f"{self.url}/{name}")

    def read_memory(self, name: str, *, dtype: torch.dtype | None = None, device: str = "cpu") -> MemoryTensors:
        """A committed memory file, sha256-verified (see :func:`memorag_core.store.memory_file.load_memory`)."""
        manifest = self._manifest or self.read_manifest()
        entry = manifest["files"].get(name)
        if entry is None:
            raise ArtifactNotFoundError(f"bundle {self.url} has no file {name!r} (has {sorted(manifest['files'])})")
        # load_memory maps local files instead of copying them, and verifies the sha256 over the whole file.
        return load_memory(sfs.join(self.url, entry["path"]), expected_sha256=entry["sha256"], dtype=dtype,
                           device=device, storage_options=self._storage_options)
