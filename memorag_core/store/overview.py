"""What a store holds, at a glance: per collection its live version and counts, and per version what it changed.

Read-only, from manifests, pointers and key records (plus, for :func:`version_history`, each version's units
tables, for the documents it added or removed). Used by ``memorag collections``; every field is JSON-ready
(:meth:`CollectionOverview.to_dict`, :meth:`VersionChange.to_dict`).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field

from memorag_core.errors import ArtifactNotFoundError
from memorag_core.store.collection import CollectionStore
from memorag_core.store.schemas import Manifest


def manifest_bytes(manifest: Manifest) -> int:
    """Bytes a version uses: its files plus the unit memories it lists (shared units counted in full)."""
    return (sum(int(f.get("nbytes") or 0) for f in manifest.files.values())
            + sum(int(u.get("nbytes") or 0) for u in manifest.units.values()))


@dataclass
class CollectionOverview:
    """One collection of a store.

    Attributes:
        collection: its name. live_version: the version CURRENT names (None: never published).
        published_at: ISO-8601 UTC time the live version became live. documents, units, tokens: the live version's
            counts (from its manifest). bytes: what the live version uses (:func:`manifest_bytes`).
        summaries_version: the live summaries version (None: never summarized). keys: API keys of the collection.
        versions: versions with a manifest (live, older, or unpublished).
    """

    collection: str
    live_version: str | None = None
    published_at: str | None = None
    documents: int = 0
    units: int = 0
    tokens: int = 0
    bytes: int = 0
    summaries_version: str | None = None
    keys: int = 0
    versions: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class VersionChange:
    """One version of a collection and what it changed against the version before it (its ``parent``, else the
    previous one by id).

    Attributes:
        version, created_at, parent: from the manifest. live: whether CURRENT names it.
        documents, units, tokens, bytes: its counts. units_added / units_removed, documents_added /
            documents_removed: ids, sorted.
    """

    version: str
    created_at: str
    parent: str | None
    live: bool
    documents: int
    units: int
    tokens: int
    bytes: int
    units_added: list[str] = field(default_factory=list)
    units_removed: list[str] = field(default_factory=list)
    documents_added: list[str] = field(default_factory=list)
    documents_removed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def collection_overview(store: CollectionStore, name: str) -> CollectionOverview:
    """The :class:`CollectionOverview` of ``name``. Raises ArtifactNotFoundError when the store has no such
    collection, InvalidInputError for a malformed name."""
    from memorag_core.store.keys import ApiKeyStore
    from memorag_core.store.summaries import SummaryStore

    versions = store.list_versions(name)
    pointer = store.current_pointer(name)
    if pointer is None and not versions and name not in store.list_collections():
        raise ArtifactNotFoundError(f"store {store.url} has no collection {name!r}")
    out = CollectionOverview(name, versions=len(versions), keys=len(ApiKeyStore(store).list(name)),
                             summaries_version=SummaryStore(store).current_version(name))
    if pointer is not None:
        m = store.read_manifest(name, pointer["version"])
        s = m.stats or {}
        out.live_version, out.published_at = pointer["version"], pointer.get("published_at") or m.created_at
        out.documents, out.tokens = int(s.get("documents", 0)), int(s.get("tokens", 0))
        out.units, out.bytes = len(m.units), manifest_bytes(m)
    return out


def store_overview(store: CollectionStore) -> list[CollectionOverview]:
    """Every collection of ``store``, by name."""
    return [collection_overview(store, name) for name in store.list_collections()]


def version_documents(store: CollectionStore, name: str, version: str) -> set[str]:
    """The document ids of a version (from its units tables; an empty set when it has none)."""
    import pyarrow.parquet as pq

    reader = store.open_version(name, version)
    docs: set[str] = set()
    for rel in reader.files("units/"):
        if rel.endswith(".parquet"):
            t = pq.read_table(io.BytesIO(reader.read_bytes(rel)), columns=["doc_ids"])
            docs.update(d for ids in t.column("doc_ids").to_pylist() for d in (ids or []))
    return docs


def version_history(store: CollectionStore, name: str) -> list[VersionChange]:
    """Every version of ``name`` with a manifest, oldest first, with what each added or removed. Raises
    ArtifactNotFoundError when there is none."""
    versions = store.list_versions(name)
    if not versions:
        raise ArtifactNotFoundError(f"store {store.url} has no version of collection {name!r}")
    live = store.current_version(name)
    manifests = {v: store.read_manifest(name, v) for v in versions}
    docs = {v: version_documents(store, name, v) for v in versions}
    out = []
    for i, v in enumerate(versions):
        m = manifests[v]
        base = m.parent if m.parent in manifests else (versions[i - 1] if i else None)
        units, base_units = set(m.units), set(manifests[base].units) if base else set()
        base_docs = docs[base] if base else set()
        s = m.stats or {}
        out.append(VersionChange(
            version=v, created_at=m.created_at, parent=m.parent, live=v == live,
            documents=int(s.get("documents", len(docs[v]))), units=len(units), tokens=int(s.get("tokens", 0)),
            bytes=manifest_bytes(m), units_added=sorted(units - base_units), units_removed=sorted(base_units - units),
            documents_added=sorted(docs[v] - base_docs), documents_removed=sorted(base_docs - docs[v])))
    return out
