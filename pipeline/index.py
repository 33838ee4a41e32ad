"""Index stage: FAISS over chunk embeddings, trained once on a sample, filled per shard in parallel, served as shards.

* A chunk's shard is :func:`shard_of` its unit id, so a unit's chunks always land in the same shard and a shard's
  content changes only when its units do.
* :func:`train_index` (a Ray task in the job) trains the one shared index (IVF quantizer; nothing to train for
  flat) on the embeddings of the units with the smallest ids, in order, up to ``train_sample`` vectors:
  deterministic for a given corpus. Only the trained, empty index (centroids) comes back.
* :class:`BuildShard` (Ray Data ``map_groups`` or a Ray task, one group per shard, run in parallel) reads the staged
  chunk tables of its units, sorts them by ``(unit_id, chunk_index)``, adds them to a clone of the trained index
  with ids ``faiss_id`` (a hash of the chunk id, so ids are unique across shards), and **writes** the shard's
  chunk table, unit table and index into the version being built (:class:`memorag_core.store.VersionFolder`).
  It returns one small row (shard, counts, and each file's path, sha256 and size), which the job records in the
  manifest: no shard, Parquet file or index travels through Ray Data as an Arrow ``binary`` value (those are
  limited to 2 GiB per array) or through the driver.
* Serving: the query engine (:class:`memorag_core.query.catalog.CollectionView`) searches the shards
  (``index/shard-*.faiss``) and fuses their hits, so no merged index is needed; that is the default. With
  ``IndexStageConfig.merge`` a Ray task (:func:`merge_shards`) also writes ``index/merged.faiss``, reading the shard
  files one at a time (it holds the merged index and one shard, never the driver).

Embeddings are arrays end to end: the embed stage stages them as a ``fixed_size_list<float32>[dim]`` column, and
:func:`embedding_matrix` turns such a column into an ``(n, dim)`` float32 array without Python lists.

faiss-gpu: when the installed faiss sees a GPU (``pip install 'memorag-ray[faiss-gpu]'`` on a GPU node) and
``IndexStageConfig.gpu`` is on, IVF training (k-means) and the shard adds (assigning vectors to lists) run on the
GPUs and the result is copied back to a CPU index, so the stored bytes are the CPU format either way.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import IndexStageConfig

logger = logging.getLogger(__name__)

SHARD_OUT_SCHEMA = pa.schema([("shard", pa.int64()), ("n_chunks", pa.int64()), ("n_units", pa.int64()),
                              ("files", pa.string())])
"""One row per shard: counts and ``files``, a JSON list of ``{"path", "sha256", "nbytes"}`` it wrote."""


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An ``(n, dim)`` float32 array from an embedding column (``fixed_size_list`` or ``list`` of float), chunk by
    chunk through the Arrow buffers (no Python lists).

    Raises ValueError for nulls or rows of different lengths.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    dim = column.type.list_size if pa.types.is_fixed_size_list(column.type) else None
    for chunk in chunks:
        n = len(chunk)
        if n == 0:
            continue
        if chunk.null_count:
            raise ValueError(f"embedding column has {chunk.null_count} null rows")
        if not pa.types.is_fixed_size_list(chunk.type):
            lengths = pc.list_value_length(chunk).to_numpy()  # (n,)
            if lengths.min() != lengths.max() or (dim is not None and lengths[0] != dim):
                raise ValueError("embedding rows have different lengths")
            dim = int(lengths[0])
        values = chunk.flatten().to_numpy(zero_copy_only=False)  # (n * dim,)
        parts.append(values.astype(np.float32, copy=False).reshape(n, -1))  # (n, dim)
    if not parts:
        return np.zeros((0, dim or 0), np.float32)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]  # (n, dim)


def embedding_array(x: np.ndarray) -> pa.FixedSizeListArray:
    """A ``fixed_size_list<float32>[dim]`` Arrow array over an ``(n, dim)`` array (one copy at most)."""
    x = np.ascontiguousarray(x, dtype=np.float32)  # (n, dim)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def units_table(group: pa.Table) -> pa.Table:
    """The UNITS table rows of a shard's units, sorted by unit id (``start``/``end`` set for a one-document unit:
    its span in that document; null when documents were packed)."""
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


def read_chunk_table(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """Read a staged per-unit chunk table; its ``embedding`` column comes back as ``fixed_size_list<float32>``
    (tables staged by older versions hold ``list<float32>``, cast here so that shards concatenate)."""
    from memorag_core.store import fs as sfs

    table = pq.read_table(io.BytesIO(bytes(sfs.read_all(fs, path))), columns=columns)
    if "embedding" in table.column_names and not pa.types.is_fixed_size_list(table.schema.field("embedding").type):
        i = table.column_names.index("embedding")
        x = embedding_matrix(table.column("embedding"))  # (n, dim)
        if x.shape[0]:
            table = table.set_column(i, "embedding", embedding_array(x))
    return table


def gpu_available(config: IndexStageConfig) -> bool:
    """True when ``config.gpu`` is on and the installed faiss (faiss-gpu) sees at least one GPU."""
    if not config.gpu:
        return False
    import faiss

    return bool(getattr(faiss, "get_num_gpus", lambda: 0)() > 0)


def _on_gpu(vindex, op: str, *args) -> None:
    """Run ``vindex.index.<op>(*args)`` on all GPUs; the index comes back to the CPU (same stored format)."""
    import faiss

    gpu_index = faiss.index_cpu_to_all_gpus(vindex.index)
    getattr(gpu_index, op)(*args)
    vindex.index = faiss.index_gpu_to_cpu(gpu_index)
    logger.info("faiss %s on %d GPU(s)", op, faiss.get_num_gpus())


def _train(config: IndexStageConfig, vindex, x: np.ndarray) -> None:
    """Train ``vindex`` on ``x`` ``(n, dim)``: on the GPUs when :func:`gpu_available`, else through
    :meth:`VectorIndex.train` (same checks and normalization either way)."""
    if not gpu_available(config):
        vindex.train(x)
        return
    x = vindex.check_vectors(x, "training vectors")  # (n, dim), normalized for cosine
    _on_gpu(vindex, "train", x)


def _add(config: IndexStageConfig, vindex, x: np.ndarray, ids: np.ndarray) -> None:
    """Add ``x`` ``(n, dim)`` with int64 ``ids`` ``(n,)``: on the GPUs when :func:`gpu_available` (IVF list
    assignment is the cost there), else through :meth:`VectorIndex.add`."""
    if not gpu_available(config) or config.kind != "ivf":
        vindex.add(x, ids)
        return
    x = vindex.check_vectors(x, "vectors")  # (n, dim)
    _on_gpu(vindex, "add_with_ids", x, np.ascontiguousarray(ids, dtype=np.int64))


def train_index(config: IndexStageConfig, dim: int, store_url: str, storage_options: dict | None,
                chunk_paths: list[str]) -> bytes:
    """Train the shared (empty) index on a deterministic sample; returns its bytes (run as a Ray task: the sample
    never reaches the driver).

    Args:
        chunk_paths: staged chunk files, sorted by unit id; read in order until ``train_sample`` vectors.
    """
    from memorag_core.retrieval import VectorIndex
    from memorag_core.store import fs as sfs

    fs, _ = sfs.open_url(store_url, storage_options)
    sample: list[np.ndarray] = []
    total = 0
    if config.kind == "ivf":
        for path in chunk_paths:
            emb = embedding_matrix(read_chunk_table(fs, path, ["embedding"]).column("embedding"))  # (n, dim)
            if len(emb):
                sample.append(emb)
                total += len(emb)
            if total >= config.train_sample:
                break
    x = np.concatenate(sample)[: config.train_sample] if sample else np.zeros((0, dim), np.float32)  # (n, dim)
    index = VectorIndex(dim, index_config(config, len(x)))
    if config.kind == "ivf":
        _train(config, index, x)
        logger.info("index trained on %d vectors (%d lists)", len(x), index.config.nlist)
    return index.to_bytes()


class BuildShard:
    """``map_groups`` fn (or task body): the embed-stage rows of one shard -> one ``SHARD_OUT_SCHEMA`` row; the
    shard's files are written into ``folder`` (``chunks/``, ``units/``, ``index/shard-<k>``)."""

    def __init__(self, config: IndexStageConfig, trained: bytes, n_train: int, store_url: str,
                 storage_options: dict | None, folder):
        self.config, self.trained, self.n_train = config, trained, n_train
        self.store_url, self.storage_options, self.folder = store_url, storage_options, folder
        self.__name__ = type(self).__name__  # Ray Data names the operator after its fn

    def __call__(self, group: pa.Table) -> pa.Table:
        from memorag_core.retrieval import VectorIndex
        from memorag_core.store import fs as sfs
        from memorag_core.store.bundle import table_to_parquet
        from memorag_core.store.schemas import conform_table

        fs, _ = sfs.open_url(self.store_url, self.storage_options)
        shard = int(group.column("shard")[0].as_py())
        paths = sorted(set(zip(group.column("unit_id").to_pylist(), group.column("chunks_path").to_pylist())))
        tables = [t for t in (read_chunk_table(fs, p) for _, p in paths) if t.num_rows]
        index = VectorIndex.from_bytes(self.trained, index_config(self.config, self.n_train)).clone_empty()
        name = f"shard-{shard:05d}"
        files = []
        n = 0
        if tables:
            table = pa.concat_tables(tables).sort_by([("unit_id", "ascending"), ("chunk_index", "ascending")])
            x = embedding_matrix(table.column("embedding"))  # (n, dim)
            _add(self.config, index, x, table.column("faiss_id").to_numpy())
            n = table.num_rows
            files.append(self.folder.write(f"chunks/{name}.parquet", table_to_parquet(conform_table(table, "chunks"))))
            del table, tables, x
        units = units_table(group)
        files.append(self.folder.write(f"units/{name}.parquet", table_to_parquet(conform_table(units, "units"))))
        files.append(self.folder.write(f"index/{name}.faiss", index.to_bytes()))
        logger.info("shard %d: %d chunks, %d units", shard, n, units.num_rows)
        return pa.Table.from_pylist([{"shard": shard, "n_chunks": n, "n_units": units.num_rows,
                                      "files": json.dumps(files)}], schema=SHARD_OUT_SCHEMA)


def merge_shards(config: IndexStageConfig, folder, shard_paths: list[str], n_train: int) -> dict:
    """Merge the shard indexes (in the given order) into ``index/merged.faiss`` in ``folder``; returns its file
    entry. Run as a Ray task: it reads one shard at a time, so it holds the merged index plus one shard.

    Why not FAISS's on-disk inverted lists (``faiss.contrib.ondisk.merge_ondisk``): they leave the lists in a
    second file referenced by an absolute local path and read through mmap, which a store on S3 cannot serve;
    the query engine serves the shards instead (see the module docstring).
    """
    from memorag_core.retrieval import VectorIndex

    cfg = index_config(config, n_train)
    merged = VectorIndex.from_bytes(folder.read(shard_paths[0]), cfg)
    for path in shard_paths[1:]:
        merged.merge_from(VectorIndex.from_bytes(folder.read(path), cfg))
    return folder.write("index/merged.faiss", merged.to_bytes())


SHARD_INPUT_COLUMNS = ["unit_id", "chunks_path", "doc_ids", "text", "n_tokens", "members"]
"""The embed-stage columns a shard build reads (the chunk tables themselves come from the staged files)."""


def _split_by_shard(shards: int, *blocks: pa.Table):
    """Task body: the rows of ``blocks`` (embed-stage Arrow blocks) split by :func:`shard_of` their unit id, with a
    ``shard`` column; returns ``shards`` tables (one per shard, possibly empty)."""
    tables = [b.select(SHARD_INPUT_COLUMNS) for b in blocks if b.num_rows]
    if not tables:
        empty = pa.table({c: pa.array([], pa.null()) for c in SHARD_INPUT_COLUMNS + ["shard"]})
        parts = [empty] * shards
    else:
        t = pa.concat_tables(tables)
        sid = np.fromiter((shard_of(u, shards) for u in t.column("unit_id").to_pylist()), np.int64,
                          count=t.num_rows)  # (rows,)
        t = t.append_column("shard", pa.array(sid))
        parts = [t.filter(pa.array(sid == k)) for k in range(shards)]
    return parts if shards > 1 else parts[0]


def _build_from_parts(build_shard: "BuildShard", *parts: pa.Table) -> dict | None:
    """Task body: one shard's rows from every split task -> its ``SHARD_OUT_SCHEMA`` row (None when empty)."""
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return None
    return build_shard(pa.concat_tables(parts)).to_pylist()[0]


def build_shards(block_refs: list, build_shard: BuildShard, shards: int, groups: int) -> list[dict]:
    """Build every non-empty shard with plain Ray tasks; returns their ``SHARD_OUT_SCHEMA`` rows by shard.

    A two-step hash partition over the embed stage's blocks (object refs; nothing is fetched to the driver):
    ``groups`` split tasks each read a slice of the blocks and return one part per shard, then one build task per
    shard concatenates its parts (unit rows only: ids, paths, unit text; the chunk tables and their embeddings
    are read from the staged files inside the task) and writes the shard's files. This is what Ray Data's
    ``groupby().map_groups()`` does, without its per-operator start-up (aggregator actors), which cost more than
    the shard builds themselves on small corpora.
    """
    import ray

    if not block_refs:
        return []
    groups = max(1, min(groups, len(block_refs)))
    split = ray.remote(_split_by_shard).options(num_returns=shards)
    parts = [split.remote(shards, *block_refs[g::groups]) for g in range(groups)]
    if shards == 1:
        parts = [[p] for p in parts]
    build = ray.remote(_build_from_parts)
    rows = ray.get([build.remote(build_shard, *[p[k] for p in parts]) for k in range(shards)])
    return [r for r in rows if r is not None]


def select_columns(column_sets: list[list[str]], *blocks: pa.Table) -> list[pa.Table]:
    """Task body (``num_returns=len(column_sets)``): for each list of columns, those columns of the non-empty
    ``blocks``, concatenated; tables holding ``gist_embedding`` carry its dimension in the schema metadata under
    ``dim``. Lets one pass over the blocks feed the driver (small metadata) and the router task (gist columns)
    without either fetching unit texts."""
    tables = [b for b in blocks if b.num_rows]
    out = []
    for columns in column_sets:
        if not tables:
            out.append(pa.table({c: pa.array([], pa.null()) for c in columns}))
            continue
        t = pa.concat_tables([b.select(columns) for b in tables])
        if "gist_embedding" in tables[0].column_names:
            t = t.replace_schema_metadata({b"dim": str(tables[0].schema.field("gist_embedding").type.list_size)
                                           .encode()})
        out.append(t)
    return out
