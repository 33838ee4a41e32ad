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

    def staged_many(self, kind: str, keys: list[str], *, batch: int = 256) -> dict[str, dict]:
        """The staged records among ``keys``: one listing of the prefix, then the present ones read ``batch`` at a
        time in one concurrent call each (s3fs issues the GETs together), not one request after another."""
        base = sfs.join(self.versions.root, "staging", kind)
        present = {p.rstrip("/").split("/")[-1][:-5]
                   for p in sfs.list_files(self.fs, base, what=f"list {sfs.url_of(self.fs, base)}")
                   if p.endswith(".json")}
        todo = [k for k in dict.fromkeys(keys) if k in present]
        out: dict[str, dict] = {}
        for i in range(0, len(todo), batch):
            paths = {self._staged_path(kind, k): k for k in todo[i:i + batch]}
            # cat_ranges from byte 0: one GET per record, issued together (fs.cat, or no start, would also HEAD each)
            got = sfs.with_retries(lambda: self.fs.cat_ranges(list(paths), [0] * len(paths), [None] * len(paths),
                                                              on_error="return"),
                                   what=f"read {len(paths)} staged records under {sfs.url_of(self.fs, base)}")
            for (path, k), data in zip(paths.items(), got):
                if isinstance(data, FileNotFoundError):  # deleted since the listing: absent
                    continue
                if isinstance(data, BaseException):  # a transient failure: read it again, with retries
                    data = self.staged(kind, k)
                    if data is not None:
                        out[k] = data
                    continue
                try:
                    out[k] = json.loads(data)
                except (ValueError, TypeError) as exc:  # atomic writes make this unlikely; recompute it
                    logger.warning("ignoring unreadable staged record %s: %s", sfs.url_of(self.fs, path), exc)
        return out

    def stage(self, kind: str, key: str, record: dict) -> bool:
        """Create a staged record unless one exists, in one atomic step (:func:`fs.write_if_absent`: a local
        hard link, or an S3 PUT with ``If-None-Match: *``), so of two racing writers exactly one wins and the
        record is never replaced. Returns True when this call wrote it."""
        path = self._staged_path(kind, key)
        body = json.dumps({**record, "key": key, "staged_at": time.time()}, ensure_ascii=False, sort_keys=True)
        return sfs.write_if_absent(self.fs, path, body.encode())

    def staged_keys(self, kind: str) -> list[str]:
        """Every staged key of ``kind`` (for checks and gc), from one listing."""
        base = sfs.join(self.versions.root, "staging", kind)
        return sorted(p.rstrip("/").split("/")[-1][:-5]
                      for p in sfs.list_files(self.fs, base, what=f"list {sfs.url_of(self.fs, base)}")
                      if p.endswith(".json"))

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
        """Remove old summaries versions (the collection store's gc, leases and file-time ages included) and staged
        records that no kept summaries version uses and that are older than ``min_age_s``; with ``dry_run``
        delete nothing. While a summarize job holds a lease (:meth:`CollectionStore.job_lease` on
        :attr:`versions`), no staged record is deleted: the running job's records are listed by no manifest until it
        publishes. Returns counts (``removed_*``: deleted, or that would be) and ``deferred`` (why staged records
        were kept, or None), the ids (``versions``: summaries versions, ``staged``: ``<kind>/<key>``
        records) and ``freed_bytes`` of the removed versions."""
        report = self.versions.gc(collection, keep_last, min_age_s=min_age_s, dry_run=dry_run)
        jobs = self.versions.job_leases()
        removed: list[str] = []
        if not jobs:
            used: set[str] = set()
            for c in self.versions.list_collections():
                for v in self.versions.list_versions(c):
                    if c == collection and v in report.removed_versions:
                        continue
                    m = self.versions.read_manifest(c, v)
                    used.update((m.extra or {}).get("staged_keys") or [])
            now = time.time()
            for kind in ("units", "reduce"):
                base = sfs.join(self.versions.root, "staging", kind)
                for path, info in sfs.list_files(self.fs, base, what=f"list {sfs.url_of(self.fs, base)}").items():
                    name = path.rstrip("/").split("/")[-1]
                    t = sfs.modified_ts(info)
                    if not name.endswith(".json") or name[:-5] in used or t is None or now - t < min_age_s:
                        continue
                    if not dry_run:
                        self.fs.rm(path)
                    removed.append(f"{kind}/{name[:-5]}")
        deferred = (f"{len(jobs)} summarize job(s) hold leases: staged records kept" if jobs else None)
        return {"removed_versions": len(report.removed_versions), "removed_staged": len(removed), "deferred": deferred,
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


def summaries_current(previous, run_key: str, digest: str, retry_skipped: bool = False) -> bool:
    """Whether the live summaries version ``previous`` (a :class:`StoredSummaries` or None) already is what a run
    would publish: same settings (``run_key``), same units (``digest``), and complete. A version whose document or
    collection reduce failed is never current (the next run retries the failed steps, reusing every staged one);
    one with skipped units is current unless ``retry_skipped``."""
    if previous is None or previous.extra.get("run_key") != run_key or previous.source_units_sha256 != digest:
        return False
    if previous.extra.get("failed_reduce"):
        return False
    return not (retry_skipped and previous.extra.get("skipped"))


def write_summary_table(writer, name: str, rows: list[dict]) -> None:
    """Write ``summaries/<name>.parquet`` (units, documents or collection rows; an empty table for none)."""
    import pyarrow as pa

    from memorag_core.store.schemas import SUMMARIES

    if rows:
        table = pa.Table.from_pylist(rows)
    else:
        table = SUMMARIES.empty_table()
    writer.write_table("summaries", name, table)


def build_report(collection, source_version, summaries_version, model, coll_rows, doc_rows, unit_rows, errors,
                 stats, unit_limit: int = 200) -> str:
    """The Markdown report of a summaries version (``stats``: the run's ``SummarizeStats``)."""
    lines = [f"# Summaries of `{collection}`", "",
             f"* collection version: `{source_version}`", f"* summaries version: `{summaries_version}`",
             f"* generator: `{model}`", f"* written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"* units: {stats.units} ({stats.units_summarized} summarized by this run, {stats.units_cached} "
             f"reused, {stats.units_skipped} skipped)", "", "## Collection", ""]
    lines += [coll_rows[0]["summary"] if coll_rows else "_No collection summary (no unit could be summarized)._", ""]
    if doc_rows:
        lines += ["## Documents", ""]
        for r in doc_rows:
            lines += [f"### {r['doc_id']}", "", f"_{len(r['unit_ids'])} units_", "", r["summary"], ""]
    lines += ["## Units", ""]
    for r in unit_rows[:unit_limit]:
        docs = ", ".join(r["doc_ids"][:5]) + (" ..." if len(r["doc_ids"]) > 5 else "")
        lines += [f"* `{r['unit_id'][:12]}` ({docs}): " + " ".join(r["summary"].split())]
    if len(unit_rows) > unit_limit:
        lines += [f"* ... {len(unit_rows) - unit_limit} more in summaries/units.parquet"]
    if errors:
        lines += ["", "## Skipped units", "", "| unit | reason | detail |", "|---|---|---|"]
        lines += [f"| `{u}` | {c} | {d.replace('|', '/')[:200]} |" for u, (c, d) in sorted(errors.items())]
    return "\n".join(lines) + "\n"


def summary_preview(store_url: str, collection: str, storage_options: dict | None = None, rows: int = 8) -> str:
    """A short table of the live summaries (kind, id, start of the text) for the CLI."""
    stored = SummaryStore(store_url, storage_options).open(collection)
    if stored is None:
        return "(no summaries)"
    out = []
    for kind, table, id_col in (("collection", stored.collection, "collection"), ("document", stored.documents,
                                                                                   "doc_id"),
                                ("unit", stored.units, "unit_id")):
        if table is None:
            continue
        for r in table.to_pylist():
            ident = str(r.get(id_col) or "")[:24]
            out.append((kind, ident, " ".join(str(r["summary"]).split())[:70]))
    shown = out[:rows]
    w0 = max([4] + [len(k) for k, _, _ in shown])
    w1 = max([2] + [len(i) for _, i, _ in shown])
    lines = [f"{'kind':<{w0}}  {'id':<{w1}}  summary", f"{'-' * w0}  {'-' * w1}  {'-' * 40}"]
    lines += [f"{k:<{w0}}  {i:<{w1}}  {s}" for k, i, s in shown]
    if len(out) > rows:
        lines.append(f"... {len(out) - rows} more")
    return "\n".join(lines)


def summary_rows(collection: str, version: str, model: str, good: list, keys: dict, staged: dict, texts: dict,
                 multi: dict, doc_roots: dict, coll_root: str | None) -> tuple[list[dict], list[dict], list[dict]]:
    """The rows of the three summaries tables (``SUMMARIES`` schema): one per summarized unit (``good``, their
    staged records in ``staged``), one per multi-unit document whose reduce finished (listing the units that were
    reduced), and the collection's row when its reduce finished. ``texts``: content key -> (summary, language)."""
    from memorag_core.query.summarize import PROMPT_VERSION

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    common = {"model": model, "prompt_version": PROMPT_VERSION, "source_version": version}
    unit_rows = [{"unit_id": u.unit_id, "summary": texts[keys[u.unit_id]][0],
                  "key_points": staged[keys[u.unit_id]].get("key_points") or [], "kind": "unit",
                  "doc_ids": u.doc_ids, "key": keys[u.unit_id], "language": texts[keys[u.unit_id]][1],
                  "created_at": staged[keys[u.unit_id]].get("created_at") or now, **common} for u in good]
    doc_rows = [{"unit_id": None, "summary": texts[r][0], "key_points": None, "kind": "document", "doc_id": d,
                 "unit_ids": [u.unit_id for u in multi[d] if keys[u.unit_id] in texts],  # the units reduced
                 "key": r, "language": texts[r][1], "created_at": now, **common}
                for d, r in sorted(doc_roots.items()) if r in texts]
    coll_rows = ([{"unit_id": None, "summary": texts[coll_root][0], "key_points": None, "kind": "collection",
                   "collection": collection, "key": coll_root, "language": texts[coll_root][1],
                   "units": len(good), "created_at": now, **common}]
                 if coll_root is not None and coll_root in texts else [])
    return unit_rows, doc_rows, coll_rows


def summaries_manifest(model: str, memory_ref, generator: str, settings: dict, *, collection: str, version: str,
                       digest: str, run_key: str, n_units: int, unit_rows: list[dict], doc_rows: list[dict],
                       skipped: dict[str, str], failed: set[str], node_keys: set[str], texts: dict):
    """The manifest of a summaries version: the generator and memory model, the settings, counts, and in ``extra``
    the source version and unit digest, the run key, skipped units, failed reduce steps and every staged key the
    version uses (what :meth:`SummaryStore.gc` keeps)."""
    from memorag_core.query.summarize import PROMPT_VERSION
    from memorag_core.store.schemas import Manifest, ModelRef

    used_keys = sorted({r["key"] for r in unit_rows} | node_keys & set(texts))
    return Manifest(
        models={"generator": ModelRef(id=model), **({"memory": memory_ref} if memory_ref is not None else {})},
        config={"generator": generator, "settings": settings},
        stats={"units": n_units, "unit_summaries": len(unit_rows), "documents": len(doc_rows),
               "skipped": len(skipped), "reduce_nodes": len(node_keys)},
        extra={"source_collection": collection, "source_version": version, "source_units_sha256": digest,
               "run_key": run_key, "prompt_version": PROMPT_VERSION, "skipped": skipped,
               "failed_reduce": sorted(failed), "staged_keys": used_keys,
               "tables": [UNITS_TABLE, DOCUMENTS_TABLE, COLLECTION_TABLE], "report": REPORT})
