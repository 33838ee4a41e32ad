"""Published collections as the query engine sees them: live-version resolution, loaded versions, leases.

:class:`CollectionCatalog` answers "which version is live?" from the store's ``CURRENT`` pointer, read at most
once every ``refresh_s`` seconds per collection, so a version published while a service runs is picked up
without a restart. :meth:`CollectionCatalog.view` loads one version into a :class:`CollectionView` (chunk
tables without embeddings, shard indexes, router), every file sha256-verified against the version's manifest; a
few views stay cached (an LRU), so a query in flight keeps the view of the version it started on even when a
newer one goes live.

Leases: while a catalog holds a version, it keeps a lease object for it in the store
(``collections/<name>/leases/<holder>.json``, renewed every ``refresh_s``, expiring after ``lease_ttl_s``), and
:meth:`memorag_core.store.CollectionStore.gc` never removes a leased version. A replica that dies stops renewing,
so its lease simply expires.

Memory: a view holds its chunk texts and ids in memory (Arrow, no embeddings: the FAISS shards hold those); at
corpus scale that is the text size of the collection, shared by every request of a replica.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memorag_core.errors import (
    ArtifactNotFoundError,
    CorruptArtifactError,
    InvalidInputError,
    StoreAccessError,
    StoreUnavailableError,
)

logger = logging.getLogger(__name__)

_CHUNK_COLUMNS = ["chunk_id", "doc_id", "unit_id", "chunk_index", "text", "faiss_id"]


@dataclass
class CollectionInfo:
    """What ``GET /v1/collections`` lists for one collection."""

    name: str
    version: str | None
    documents: int = 0
    tokens: int = 0
    units: int = 0
    chunks: int = 0
    created_at: str | None = None


class CollectionView:
    """One published version, loaded for answering: chunk rows, shard indexes, router and the manifest.

    Args:
        reader: a :class:`memorag_core.store.VersionReader` pinned to the version.

    Attributes:
        name, version, manifest: what it is.
        chunks: Arrow table (``chunk_id, doc_id, unit_id, chunk_index, text, faiss_id, doc_start, doc_end``),
            all shards concatenated; a row number is a passage's key inside this view.
        dim: embedding dimension.
    """

    def __init__(self, reader) -> None:
        from memorag_core.retrieval.index import IndexConfig, VectorIndex
        from memorag_core.retrieval.router import ROUTER_INDEX, UnitRouter

        t0 = time.perf_counter()
        self.reader = reader
        self.manifest = reader.manifest
        self.name, self.version = reader.collection, reader.version
        extra = self.manifest.extra or {}
        self.dim = int(extra.get("dim") or 0)
        index_cfg = extra.get("index") or {}
        metric = index_cfg.get("metric", "ip")
        self.index_config = IndexConfig(kind=index_cfg.get("kind", "flat"), metric=metric,
                                        nprobe=int((self.manifest.config.get("index") or {}).get("nprobe", 8)))
        shard_files = [p for p in reader.files("index/") if p.startswith("index/shard-") and p.endswith(".faiss")]
        if not shard_files:
            raise CorruptArtifactError(f"{self.name}/{self.version} lists no index shards (index/shard-*.faiss)")
        tables, self.shards = [], []
        offset = 0
        for rel in sorted(shard_files):
            stem = rel[len("index/"):-len(".faiss")]
            index = VectorIndex.from_bytes(reader.read_bytes(rel), self.index_config)
            table = self._read_chunks(f"chunks/{stem}.parquet")
            if len(index) != table.num_rows:
                raise CorruptArtifactError(f"{self.name}/{self.version}: {rel} holds {len(index)} vectors but "
                                           f"chunks/{stem}.parquet has {table.num_rows} rows")
            fids = table.column("faiss_id").to_numpy()  # (n,) int64
            order = np.argsort(fids, kind="stable")  # (n,)
            self.shards.append((index, fids[order], order + offset))
            tables.append(table)
            offset += table.num_rows
        self.chunks = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        if self.dim and any(ix.dim != self.dim for ix, _, _ in self.shards):
            raise CorruptArtifactError(f"{self.name}/{self.version}: shard dims differ from the manifest's {self.dim}")
        self.dim = self.dim or self.shards[0][0].dim
        self._unit_col = self.chunks.column("unit_id").to_numpy(zero_copy_only=False)  # (n,) object
        self._doc_col = self.chunks.column("doc_id").to_numpy(zero_copy_only=False)  # (n,) object
        self.router = UnitRouter.from_version(reader) if ROUTER_INDEX in self.manifest.files else None
        self.unit_docs: dict[str, list[str]] = {}
        if self.router is not None:
            for uid, docs in zip(self.router.table.column("unit_id").to_pylist(),
                                 self.router.table.column("doc_ids").to_pylist()):
                self.unit_docs[uid] = list(docs or [])
        self.load_seconds = time.perf_counter() - t0
        logger.info("loaded %s/%s: %d chunks in %d shards, %d units, %.2f s", self.name, self.version,
                    self.chunks.num_rows, len(self.shards), len(self.manifest.units), self.load_seconds)

    def _read_chunks(self, rel: str) -> pa.Table:
        data = self.reader.read_bytes(rel)
        table = pq.read_table(io.BytesIO(data))
        missing = [c for c in _CHUNK_COLUMNS if c not in table.column_names]
        if missing:
            raise CorruptArtifactError(f"{self.name}/{self.version}: {rel} lacks columns {missing}")
        cols = _CHUNK_COLUMNS + [c for c in ("doc_start", "doc_end") if c in table.column_names]
        return table.select(cols)

    # -- facts -----------------------------------------------------------------------------------------------
    @property
    def memory_config(self) -> dict:
        """The memory config the units were memorized with (``MemoryConfig`` fields)."""
        return dict((self.manifest.config.get("memory_stage") or {}).get("memory") or {})

    @property
    def embedder_id(self) -> str | None:
        ref = self.manifest.models.get("embedder")
        return ref.id if ref else None

    @property
    def units(self) -> list[str]:
        return sorted(self.manifest.units)

    def units_of_doc(self, doc_id: str) -> list[str]:
        """The units holding ``doc_id`` (in unit-id order). Raises ArtifactNotFoundError when none does."""
        units = sorted(u for u, docs in self.unit_docs.items() if doc_id in docs)
        if not units:
            mask = self._doc_col == doc_id
            units = sorted(set(self._unit_col[mask].tolist()))
        if not units:
            raise ArtifactNotFoundError(f"collection {self.name!r} version {self.version} has no document "
                                        f"{doc_id!r}")
        return units

    def info(self) -> CollectionInfo:
        s = self.manifest.stats or {}
        return CollectionInfo(self.name, self.version, int(s.get("documents", 0)), int(s.get("tokens", 0)),
                              len(self.manifest.units), int(s.get("chunks", self.chunks.num_rows)),
                              self.manifest.created_at)

    # -- search ----------------------------------------------------------------------------------------------
    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` passages for each query over every shard.

        Args:
            q: ``(nq, dim)`` normalized query embeddings.
        Returns:
            scores ``(nq, k')`` (higher is better; distances are negated for l2) and row numbers ``(nq, k')`` into
            :attr:`chunks`, -1 padded, with ``k' = min(k, passages)``.
        """
        q = np.asarray(q, np.float32).reshape(-1, self.dim)  # (nq, dim)
        k = max(1, min(int(k), self.chunks.num_rows))
        all_s, all_r = [], []
        for index, sorted_fids, rows in self.shards:
            if len(index) == 0:
                continue
            s, ids = index.search(q, min(k, len(index)))  # (nq, k_s), (nq, k_s) faiss ids
            if not self.index_config.higher_is_better:
                s = -s
            pos = np.searchsorted(sorted_fids, ids)  # (nq, k_s)
            pos = np.clip(pos, 0, len(sorted_fids) - 1)
            ok = (ids >= 0) & (sorted_fids[pos] == ids)
            r = np.where(ok, rows[pos], -1)  # (nq, k_s) row numbers
            all_s.append(np.where(ok, s, -np.inf))
            all_r.append(r)
        if not all_s:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        s, r = np.concatenate(all_s, axis=1), np.concatenate(all_r, axis=1)  # (nq, shards * k)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]  # (nq, k)
        return np.take_along_axis(s, order, 1), np.take_along_axis(r, order, 1)

    def row(self, i: int) -> dict:
        """The chunk row ``i`` as a dict."""
        return {c: self.chunks.column(c)[i].as_py() for c in self.chunks.column_names}

    def unit_of_row(self, i: int) -> str:
        return str(self._unit_col[i])

    def rows_of_units(self, unit_ids: list[str]) -> np.ndarray:
        """Row numbers of the chunks of ``unit_ids`` ``(n,)``."""
        return np.flatnonzero(np.isin(self._unit_col, np.asarray(unit_ids, dtype=object)))

    def rows_of_doc(self, doc_id: str) -> np.ndarray:
        return np.flatnonzero(self._doc_col == doc_id)


class CollectionCatalog:
    """The collections of one store, as the query side needs them.

    Args:
        store: a :class:`memorag_core.store.CollectionStore` or its root URL.
        storage_options: fsspec options when ``store`` is a URL.
        refresh_s: the live pointer of a collection is re-read at most this often (seconds).
        max_views: loaded versions kept (LRU); the live version of each busy collection plus a few old ones.
        lease_ttl_s: lease lifetime; renewed every ``refresh_s`` while the view stays loaded.
        holder: lease holder id (default: a random id for this process).
    """

    def __init__(self, store, storage_options: dict | None = None, *, refresh_s: float = 5.0, max_views: int = 4,
                 lease_ttl_s: float = 600.0, holder: str | None = None) -> None:
        from memorag_core.store import CollectionStore

        self.store = store if isinstance(store, CollectionStore) else CollectionStore(store, storage_options)
        if refresh_s < 0 or max_views < 1 or lease_ttl_s <= refresh_s:
            raise InvalidInputError("refresh_s >= 0, max_views >= 1 and lease_ttl_s > refresh_s are required")
        self.refresh_s, self.max_views, self.lease_ttl_s = refresh_s, max_views, lease_ttl_s
        self.holder = holder or f"{uuid.uuid4().hex[:16]}"
        self._live: dict[str, tuple[str | None, float]] = {}
        self._views: OrderedDict[tuple[str, str], CollectionView] = OrderedDict()
        self._leased_at: dict[str, float] = {}
        self._lock = threading.RLock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        #: collections served from a remembered live version because the store did not answer (name -> error)
        self.degraded: dict[str, str] = {}

    def live_version(self, name: str) -> str:
        """The live version of ``name`` (pointer re-read at most every ``refresh_s``). While the store does not
        answer, the version read last is kept (and ``name`` is listed in :attr:`degraded`).

        Raises ArtifactNotFoundError when the collection has no live version; InvalidInputError for a bad name.
        """
        now = time.monotonic()
        with self._lock:
            cached = self._live.get(name)
        if cached is None or now - cached[1] >= self.refresh_s:
            try:
                version = self.store.current_version(name)
            except (StoreUnavailableError, StoreAccessError) as exc:
                if cached is None or cached[0] is None:
                    raise
                # The store does not answer: keep serving the version this catalog knows (loaded views need no
                # store read), report degraded, and try the pointer again after refresh_s.
                with self._lock:
                    if name not in self.degraded:
                        logger.warning("collection %s: store unavailable (%s); serving version %s", name,
                                       type(exc).__name__, cached[0])
                    self.degraded[name] = type(exc).__name__
                    self._live[name] = (cached[0], now)
                return cached[0]
            with self._lock:
                if cached is not None and cached[0] != version:
                    logger.info("collection %s: live version %s -> %s", name, cached[0], version)
                self._live[name] = (version, now)
                if self.degraded.pop(name, None) is not None:
                    logger.warning("collection %s: store reachable again", name)
            self._renew_leases(name)
        else:
            version = cached[0]
        if version is None:
            raise ArtifactNotFoundError(f"collection {name!r} does not exist or has no published version")
        return version

    def view(self, name: str, version: str | None = None) -> CollectionView:
        """The loaded view of ``version`` (None: the live one). Raises ArtifactNotFoundError for an unknown
        collection or version, CorruptArtifactError for damaged files."""
        version = version or self.live_version(name)
        key = (name, version)
        with self._lock:
            v = self._views.get(key)
            if v is not None:
                self._views.move_to_end(key)
                return v
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one loader per version; concurrent requests wait for it
            with self._lock:
                v = self._views.get(key)
                if v is not None:
                    return v
            try:
                reader = self.store.open_version(name, version)
            except ArtifactNotFoundError as exc:
                raise ArtifactNotFoundError(f"collection {name!r} has no version {version!r}") from exc
            v = CollectionView(reader)
            with self._lock:
                self._views[key] = v
                while len(self._views) > self.max_views:
                    old, _ = self._views.popitem(last=False)
                    logger.info("unloaded %s/%s", *old)
                self._loading.pop(key, None)
        self._renew_leases(name, force=True)
        return v

    def known_versions(self) -> dict[str, str]:
        """``collection -> live version`` as this catalog last read them (no store read)."""
        with self._lock:
            return {n: v for n, (v, _) in self._live.items() if v is not None}

    def held_collections(self) -> list[str]:
        """Names of the collections with a loaded version (whose leases this holder keeps)."""
        with self._lock:
            return sorted({n for n, _ in self._views})

    def held_versions(self, name: str) -> list[str]:
        with self._lock:
            return sorted(v for (n, v) in self._views if n == name)

    def _renew_leases(self, name: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._leased_at.get(name, -1e18) < self.refresh_s:
            return
        held = self.held_versions(name)
        try:
            if held:
                self.store.write_lease(name, self.holder, held, ttl_s=self.lease_ttl_s)
            self._leased_at[name] = now
        except Exception as exc:  # noqa: BLE001 - a read-only store still serves; gc grace covers it
            logger.warning("could not write lease for %s (%s): %s", name, held, exc)

    def release(self) -> None:
        """Drop every view and delete this holder's leases (a replica shutting down)."""
        with self._lock:
            names = sorted({n for n, _ in self._views})
            self._views.clear()
        for n in names:
            try:
                self.store.delete_lease(n, self.holder)
            except Exception as exc:  # noqa: BLE001
                logger.warning("could not delete lease of %s: %s", n, exc)

    def collections(self) -> list[CollectionInfo]:
        """Every collection of the store with its live version's counts (from the manifest only)."""
        out = []
        for name in self.store.list_collections():
            try:
                version = self.live_version(name)
            except ArtifactNotFoundError:
                out.append(CollectionInfo(name, None))
                continue
            m = self.store.read_manifest(name, version)
            s = m.stats or {}
            out.append(CollectionInfo(name, version, int(s.get("documents", 0)), int(s.get("tokens", 0)),
                                      len(m.units), int(s.get("chunks", 0)), m.created_at))
        return out
