"""Index stage: FAISS over chunk embeddings, trained once on a sample, filled per shard in parallel, then merged.

* A chunk's shard is :func:`shard_of` its unit id, so a unit's chunks always land in the same shard and a shard's
  content changes only when its units do.
* :func:`train_index` trains the one shared index (IVF quantizer; nothing to train for flat) on the embeddings of
  the units with the smallest ids, in order, up to ``train_sample`` vectors: deterministic for a given corpus.
* :class:`BuildShard` (Ray Data ``map_groups``, one group per shard, run in parallel) reads the staged chunk tables
  of its units, sorts them by ``(unit_id, chunk_index)``, adds them to a clone of the trained index with ids
  ``faiss_id`` (a hash of the chunk id, so ids are unique across shards), and returns the shard's chunk table
  and index as bytes for the driver to write into the version.
* :func:`merge_shards` merges the shard indexes, in shard order, into one (``IndexStageConfig.merge``).
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import IndexStageConfig

logger = logging.getLogger(__name__)

SHARD_OUT_SCHEMA = pa.schema([("shard", pa.int64()), ("n_chunks", pa.int64()), ("chunks_parquet", pa.binary()),
                              ("units_parquet", pa.binary()), ("index_bytes", pa.binary())])


def units_table(group: pa.Table) -> pa.Table:
    """The UNITS table rows of a shard's units, sorted by unit id (``start``/``end`` set for a one-document unit:
    its span in that document; null when documents were packed)."""
    import json

    rows, seen = [], set()
    for r in sorted(group.select(["unit_id", "doc_ids", "text", "n_tokens", "members"]).to_pylist(),
                    key=lambda r: r["unit_id"]):
        if r["unit_id"] in seen:
            continue
        seen.add(r["unit_id"])
        members = json.loads(r["members"])
        one = members[0] if len(members) == 1 else None
        rows.append({"unit_id": r["unit_id"], "doc_ids": r["doc_ids"], "text": r["text"], "n_tokens": r["n_tokens"],
                     "start": one["doc_start"] if one else None, "end": one["doc_end"] if one else None})
    schema = pa.schema([("unit_id", pa.string()), ("doc_ids", pa.list_(pa.string())), ("text", pa.string()),
                        ("n_tokens", pa.int64()), ("start", pa.int64()), ("end", pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema)


def shard_of(unit_id: str, shards: int) -> int:
    """The index shard of a unit (a hash of its id modulo ``shards``)."""
    return int(unit_id[:12], 16) % shards


def index_config(config: IndexStageConfig, n_train: int):
    """The memorag_core IndexConfig for a stage config; IVF lists capped so that training has enough vectors."""
    from memorag_core.retrieval import IndexConfig

    nlist = max(1, min(config.nlist, n_train // 4 or 1)) if config.kind == "ivf" else config.nlist
    if config.kind == "ivf" and nlist < config.nlist:
        logger.warning("ivf: nlist lowered from %d to %d for a training sample of %d vectors", config.nlist, nlist,
                       n_train)
    return IndexConfig(kind=config.kind, metric=config.metric, nlist=nlist, nprobe=min(config.nprobe, nlist))


def read_chunk_table(fs, path: str) -> pa.Table:
    """Read a staged per-unit chunk table."""
    from memorag_core.store import fs as sfs

    return pq.read_table(io.BytesIO(bytes(sfs.read_all(fs, path))))


def train_index(config: IndexStageConfig, dim: int, fs, chunk_paths: list[str]) -> bytes:
    """Train the shared (empty) index on a deterministic sample; returns its bytes.

    Args:
        chunk_paths: staged chunk files, sorted by unit id; read in order until ``train_sample`` vectors.
    """
    from memorag_core.retrieval import VectorIndex

    sample: list[np.ndarray] = []
    total = 0
    if config.kind == "ivf":
        for path in chunk_paths:
            emb = read_chunk_table(fs, path).column("embedding").to_pylist()
            if emb:
                sample.append(np.asarray(emb, dtype=np.float32))  # (n, dim)
                total += len(emb)
            if total >= config.train_sample:
                break
    x = np.concatenate(sample)[: config.train_sample] if sample else np.zeros((0, dim), np.float32)
    index = VectorIndex(dim, index_config(config, len(x)))
    if config.kind == "ivf":
        index.train(x)
        logger.info("index trained on %d vectors (%d lists)", len(x), index.config.nlist)
    return index.to_bytes()


class BuildShard:
    """``map_groups`` fn: the embed-stage rows of one shard -> one ``SHARD_OUT_SCHEMA`` row."""

    def __init__(self, config: IndexStageConfig, trained: bytes, n_train: int, store_url: str,
                 storage_options: dict | None):
        self.config, self.trained, self.n_train = config, trained, n_train
        self.store_url, self.storage_options = store_url, storage_options
        self.__name__ = type(self).__name__  # Ray Data names the operator after its fn

    def __call__(self, group: pa.Table) -> pa.Table:
        from memorag_core.retrieval import VectorIndex
        from memorag_core.store import fs as sfs
        from memorag_core.store.bundle import table_to_parquet
        from memorag_core.store.schemas import conform_table

        fs, _ = sfs.open_url(self.store_url, self.storage_options)
        shard = int(group.column("shard")[0].as_py())
        paths = sorted(set(zip(group.column("unit_id").to_pylist(), group.column("chunks_path").to_pylist())))
        tables = [read_chunk_table(fs, p) for _, p in paths]
        table = pa.concat_tables(tables) if tables else None
        index = VectorIndex.from_bytes(self.trained, index_config(self.config, self.n_train)).clone_empty()
        if table is not None and table.num_rows:
            table = table.sort_by([("unit_id", "ascending"), ("chunk_index", "ascending")])
            x = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)  # (n, dim)
            index.add(x, table.column("faiss_id").to_numpy())
        n = table.num_rows if table is not None else 0
        chunks = table_to_parquet(conform_table(table, "chunks")) if table is not None else b""
        logger.info("shard %d: %d chunks", shard, n)
        units = table_to_parquet(conform_table(units_table(group), "units"))
        return pa.Table.from_pylist([{"shard": shard, "n_chunks": n, "chunks_parquet": chunks,
                                      "units_parquet": units, "index_bytes": index.to_bytes()}],
                                    schema=SHARD_OUT_SCHEMA)


def merge_shards(config: IndexStageConfig, shard_bytes: list[bytes], n_train: int) -> bytes:
    """Merge shard indexes (in the given order) into one; returns its bytes."""
    from memorag_core.retrieval import VectorIndex

    cfg = index_config(config, n_train)
    merged = VectorIndex.from_bytes(shard_bytes[0], cfg)
    for data in shard_bytes[1:]:
        merged.merge_from(VectorIndex.from_bytes(data, cfg))
    return merged.to_bytes()
