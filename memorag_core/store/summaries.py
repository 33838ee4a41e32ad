"""Summaries of collections: their own versioned namespace beside the collections, with its own live pointer.

Layout under the store root (``<root>`` is the collections' store; everything here lives under
``<root>/summaries``, which is itself a :class:`CollectionStore` root, so versions, manifests, the
compare-and-swap pointer and gc are the collection store's own code)::

    summaries/collections/<name>/CURRENT                        the live summaries version of collection <name>
    summaries/collections/<name>/versions/<sv>/manifest.json    source collection version, its units, settings
    summaries/collections/<name>/versions/<sv>/summaries/units.parquet        one row per summarized unit
    summaries/collections/<name>/versions/<sv>/summaries/documents.parquet    documents spanning several units
    summaries/collections/<name>/versions/<sv>/summaries/collection.parquet   one row
    summaries/collections/<name>/versions/<sv>/report.md        the Markdown report
    summaries/staging/units/<key>.json        a finished unit summary, content-addressed (see below)
    summaries/staging/reduce/<key>.json       a finished reduce step (document or collection tree node)

Why a namespace of its own and not a new collection version: the memorize job publishes collection versions
with a compare-and-swap on ``collections/<name>/CURRENT``; a summarize run that published collection versions
would race it on that pointer (and lose or make it lose), and a summaries run would have to copy every chunk,
index and router file into a version of its own. Here the summaries pointer is separate, and each summaries
manifest names the collection version it was computed from (``extra.source_version``) and the exact unit set
(``extra.source_units_sha256``), so a reader can tell whether it is current for the version it serves.

Staged records are JSON (no pickle), written atomically, keyed by a content hash: a unit summary's key is
``sha256(unit id, generator, prompt version, settings)``, a reduce step's key hashes its input keys with the same
settings. A killed run leaves only whole records; a rerun finds them and recomputes nothing finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError
from memorag_core.store import fs as sfs
from memorag_core.store.collection import CollectionStore

logger = logging.getLogger(__name__)

NAMESPACE = "summaries"
"""Folder under the store root that holds the summaries store."""
UNITS_TABLE = "summaries/units.parquet"
DOCUMENTS_TABLE = "summaries/documents.parquet"
COLLECTION_TABLE = "summaries/collection.parquet"
REPORT = "report.md"


def units_digest(unit_ids) -> str:
    """sha256 of the sorted unit ids: what a summaries version was computed over."""
    return hashlib.sha256("\n".join(sorted(unit_ids)).encode()).hexdigest()


def content_key(*parts: Any) -> str:
    """A content key: sha256 of the JSON of ``parts`` (sorted keys), hex."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class SummaryStore:
    """The summaries namespace of one store: staged unit/reduce records and published summaries versions.

    Args:
        store: the collections' :class:`CollectionStore` or its root URL.
        storage_options: fsspec options when ``store`` is a URL.

    Attributes:
        store: the collections' store. versions: the :class:`CollectionStore` rooted at ``<root>/summaries`` that
            holds summaries versions (one "collection" there per summarized collection, same name).
    """

    def __init__(self, store: CollectionStore | str, storage_options: dict | None = None) -> None:
        self.store = store if isinstance(store, CollectionStore) else CollectionStore(store, storage_options)
        self.versions = CollectionStore(sfs.join(self.store.url, NAMESPACE), self.store.storage_options)
        self.fs = self.versions.fs
        self.url = self.versions.url

    # -- staged records ---------------------------------------------------------------------------------------
    def _staged_path(self, kind: str, key: str) -> str:
        if kind not in ("units", "reduce") or not key.isalnum():
            raise ValueError(f"bad staged record {kind}/{key}")
        return sfs.join(self.versions.root, "staging", kind, f"{key}.json")

    def staged(self, kind: str, key: str) -> dict | None:
        """The staged record ``kind`` (``units`` / ``reduce``) with ``key``, or None when there is none."""
        path = self._staged_path(kind, key)
        try:
            data = sfs.with_retries(lambda: self.fs.cat_file(path), what=f"read {sfs.url_of(self.fs, path)}")
        except ArtifactNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:  # atomic writes make this unlikely; treat it as absent and recompute
            logger.warning("ignoring unreadable staged record %s: %s", sfs.url_of(self.fs, path), exc)
            return None

    def staged_many(self, kind: str, keys: list[str]) -> dict[str, dict]:
        """The staged records among ``keys`` (one listing, then reads of the ones present)."""
        base = sfs.join(self.versions.root, "staging", kind)
        try:
            present = {p.rstrip("/").split("/")[-1][:-5] for p in self.fs.ls(base, detail=False)
                       if p.endswith(".json")}
        except FileNotFoundError:
            present = set()
        out = {}
        for k in keys:
            if k in present:
                rec = self.staged(kind, k)
                if rec is not None:
                    out[k] = rec
        return out

    def stage(self, kind: str, key: str, record: dict) -> bool:
        """Write a staged record atomically unless one exists (then the existing one wins: exactly once).
        Returns True when this call wrote it."""
        path = self._staged_path(kind, key)
        if sfs.with_retries(lambda: self.fs.exists(path), what=f"stat {sfs.url_of(self.fs, path)}"):
            return False
        body = json.dumps({**record, "key": key, "staged_at": time.time()}, ensure_ascii=False, sort_keys=True)
        sfs.write_atomic(self.fs, path, body.encode())
        return True

    def staged_keys(self, kind: str) -> list[str]:
        """Every staged key of ``kind`` (for checks and gc)."""
        base = sfs.join(self.versions.root, "staging", kind)
        try:
            return sorted(p.rstrip("/").split("/")[-1][:-5] for p in self.fs.ls(base, detail=False)
                          if p.endswith(".json"))
        except FileNotFoundError:
            return []

    # -- versions ---------------------------------------------------------------------------------------------
    def current_version(self, collection: str) -> str | None:
        """The live summaries version of ``collection`` (None: never summarized)."""
        return self.versions.current_version(collection)

    def open(self, collection: str, version: str | None = None) -> "StoredSummaries | None":
        """The live (or given) summaries version of ``collection``, loaded; None when there is none."""
        version = version or self.current_version(collection)
        if version is None:
            return None
        return StoredSummaries(self.versions.open_version(collection, version))

    def new_version(self, collection: str):
        """A :class:`VersionWriter` for a new summaries version (published with the store's pointer swap)."""
        return self.versions.new_version(collection)

    def gc(self, collection: str, keep_last: int = 2, *, min_age_s: float = 3600.0, dry_run: bool = False) -> dict:
        """Remove old summaries versions (the collection store's gc) and staged records that no kept summaries
        version uses and that are older than ``min_age_s`` (``dry_run``: remove nothing, report what would go).

        Returns counts (``removed_versions``, ``removed_staged``), the ids (``versions``: summaries versions,
        ``staged``: ``<kind>/<key>`` records) and ``freed_bytes`` of the removed versions."""
        report = self.versions.gc(collection, keep_last, min_age_s=min_age_s, dry_run=dry_run)
        used: set[str] = set()
        for c in self.versions.list_collections():
            for v in self.versions.list_versions(c):
                if c == collection and v in report.removed_versions:
                    continue
                m = self.versions.read_manifest(c, v)
                used.update((m.extra or {}).get("staged_keys") or [])
        removed: list[str] = []
        now = time.time()
        for kind in ("units", "reduce"):
            for k in self.staged_keys(kind):
                if k in used:
                    continue
                path = self._staged_path(kind, k)
                try:
                    age = now - self.fs.modified(path).timestamp()
                except (FileNotFoundError, NotImplementedError):
                    continue
                if age >= min_age_s:
                    if not dry_run:
                        self.fs.rm(path)
                    removed.append(f"{kind}/{k}")
        return {"removed_versions": len(report.removed_versions), "removed_staged": len(removed),
                "versions": report.removed_versions, "staged": removed, "freed_bytes": report.freed_bytes}


@dataclass
class StoredSummaries:
    """One published summaries version, read: its manifest and tables.

    Attributes:
        reader: the :class:`VersionReader` of the summaries version.
        source_version: the collection version it was computed from.
        source_units_sha256: :func:`units_digest` of that version's units.
    """

    reader: Any
    units: pa.Table | None = None
    documents: pa.Table | None = None
    collection: pa.Table | None = None
    _unit_rows: dict[str, dict] = field(default_factory=dict)
    _doc_rows: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr, rel in (("units", UNITS_TABLE), ("documents", DOCUMENTS_TABLE),
                          ("collection", COLLECTION_TABLE)):
            if rel in self.reader.manifest.files:
                setattr(self, attr, pq.read_table(io.BytesIO(self.reader.read_bytes(rel))))
        if self.units is not None:
            self._unit_rows = {r["unit_id"]: r for r in self.units.to_pylist()}
        if self.documents is not None:
            self._doc_rows = {r["doc_id"]: r for r in self.documents.to_pylist()}

    @property
    def version(self) -> str:
        return self.reader.version

    @property
    def extra(self) -> dict:
        return self.reader.manifest.extra or {}

    @property
    def source_version(self) -> str | None:
        return self.extra.get("source_version")

    @property
    def source_units_sha256(self) -> str | None:
        return self.extra.get("source_units_sha256")

    def collection_summary(self, unit_ids) -> str | None:
        """The collection summary when it was computed over exactly ``unit_ids`` (the serving version's units:
        a collection version with the same units, e.g. a republish, is served too); else None."""
        if self.collection is None or self.collection.num_rows == 0:
            return None
        if self.source_units_sha256 != units_digest(unit_ids):
            return None
        return self.collection.column("summary")[0].as_py()

    def document_summary(self, doc_id: str, doc_units: list[str], unit_docs: dict[str, list[str]]) -> str | None:
        """The summary of ``doc_id`` when it is current for the serving version, whose units of the document are
        ``doc_units`` and whose unit -> documents map is ``unit_docs``; else None.

        A document that spans several units has its own row (current when its unit list is the same). A
        document alone in one unit is summarized by that unit's summary (current when the unit id is the same:
        unit ids are content hashes). A document packed with others into one unit has no summary of its own.
        """
        row = self._doc_rows.get(doc_id)
        if row is not None and sorted(row.get("unit_ids") or []) == sorted(doc_units):
            return row["summary"]
        if len(doc_units) == 1 and list(unit_docs.get(doc_units[0]) or []) == [doc_id]:
            urow = self._unit_rows.get(doc_units[0])
            if urow is not None:
                return urow["summary"]
        return None


def read_report(summaries: SummaryStore, collection: str, version: str | None = None) -> str:
    """The Markdown report of a summaries version. Raises ArtifactNotFoundError when there is none."""
    stored = summaries.open(collection, version)
    if stored is None:
        raise ArtifactNotFoundError(f"collection {collection!r} has no summaries at {summaries.url}")
    try:
        return stored.reader.read_bytes(REPORT).decode()
    except UnicodeDecodeError as exc:  # pragma: no cover - we write UTF-8
        raise CorruptArtifactError(f"{REPORT} of {collection}/{stored.version} is not UTF-8") from exc
