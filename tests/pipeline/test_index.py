"""Index stage without Ray: embeddings as arrays, shards that write their own files, the merge task's body."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from memorag_core.store import CollectionStore
from pipeline.chunk_embed import faiss_id_for, parquet_bytes
from pipeline.config import IndexStageConfig
from pipeline.index import (
    SHARD_OUT_SCHEMA,
    BuildShard,
    embedding_array,
    embedding_matrix,
    merge_shards,
    read_chunk_table,
    shard_of,
    train_index,
)

DIM = 8


def test_embedding_matrix_reads_fixed_and_variable_lists_without_python_lists():
    x = np.arange(30, dtype=np.float32).reshape(5, 6)  # (5, 6)
    fixed = embedding_array(x)
    assert fixed.type == pa.list_(pa.float32(), 6)
    chunked = pa.chunked_array([fixed.slice(0, 2), fixed.slice(2)])
    np.testing.assert_array_equal(embedding_matrix(chunked), x)
    as_list = pa.chunked_array([fixed.slice(1, 3).cast(pa.list_(pa.float32()))])
    np.testing.assert_array_equal(embedding_matrix(as_list), x[1:4])
    with pytest.raises(ValueError):
        embedding_matrix(pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32())))


def _stage_unit(store: CollectionStore, unit_id: str, n: int, rng, as_list: bool = False) -> str:
    """Write a staged chunk table for ``unit_id`` with ``n`` random unit vectors; returns its path."""
    from memorag_core.store import fs as sfs

    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"{unit_id}{k:04d}".ljust(32, "0") for k in range(n)]
    emb = embedding_array(x)
    table = pa.table({
        "chunk_id": ids, "doc_id": [f"d-{unit_id[:4]}"] * n, "unit_id": [unit_id] * n,
        "chunk_index": pa.array(range(n), pa.int32()), "start": pa.array(range(n), pa.int64()),
        "end": pa.array(range(1, n + 1), pa.int64()), "text": [f"c{k}" for k in range(n)],
        "embedding": emb.cast(pa.list_(pa.float32())) if as_list else emb,
        "doc_start": pa.array(range(n), pa.int64()), "doc_end": pa.array(range(1, n + 1), pa.int64()),
        "faiss_id": pa.array([faiss_id_for(i) for i in ids], pa.int64()),
    })
    path = sfs.join(store.root, "staging", "chunks", "k", f"{unit_id}.parquet")
    sfs.write_atomic(store.fs, path, parquet_bytes(table))
    return path


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_shards_write_their_files_and_the_version_verifies_them(tmp_path, kind):
    store = CollectionStore(str(tmp_path / "store"))
    rng = np.random.default_rng(0)
    unit_ids = sorted(f"{k:02x}" * 6 + "ab" * 10 for k in range(1, 9))
    # one unit staged by an older version (list<float32>): shards still concatenate
    paths = [_stage_unit(store, u, 20 + i, rng, as_list=(i == 0)) for i, u in enumerate(unit_ids)]
    assert pa.types.is_fixed_size_list(read_chunk_table(store.fs, paths[0]).schema.field("embedding").type)
    cfg = IndexStageConfig(kind=kind, nlist=4, nprobe=4, shards=2, merge=True)
    n_chunks = sum(20 + i for i in range(len(unit_ids)))
    trained = train_index(cfg, DIM, store.url, None, paths)
    writer = store.new_version("c")
    folder = writer.folder()
    build = BuildShard(cfg, trained, min(cfg.train_sample, n_chunks), store.url, None, folder)
    rows = []
    for k in range(cfg.shards):
        group_units = [(u, p) for u, p in zip(unit_ids, paths) if shard_of(u, cfg.shards) == k]
        group = pa.table({"unit_id": [u for u, _ in group_units], "chunks_path": [p for _, p in group_units],
                          "shard": pa.array([k] * len(group_units), pa.int64()),
                          "doc_ids": [[f"d-{u[:4]}"] for u, _ in group_units],
                          "text": ["t" * 50] * len(group_units), "n_tokens": pa.array([10] * len(group_units)),
                          "members": [json.dumps([{"doc_start": 0, "doc_end": 50}])] * len(group_units)})
        out = build(group)
        assert out.schema == SHARD_OUT_SCHEMA and out.num_rows == 1  # small metadata only, no binary column
        rows.append(out.to_pylist()[0])
    assert sum(r["n_chunks"] for r in rows) == n_chunks
    for r in rows:
        for f in json.loads(r["files"]):
            writer.record_file(f["path"], f["sha256"], f["nbytes"])
    f = merge_shards(cfg, folder, [f"index/shard-{r['shard']:05d}.faiss" for r in rows], n_chunks)
    writer.record_file(f["path"], f["sha256"], f["nbytes"])
    from memorag_core.store import Manifest

    writer.publish(Manifest(extra={"dim": DIM, "index": {"kind": kind, "metric": "ip"}}))
    reader = store.open_version("c")
    assert reader.files("index/") == ["index/merged.faiss", "index/shard-00000.faiss", "index/shard-00001.faiss"]
    chunks = reader.read_table("chunks")  # sha256-verified
    assert chunks.num_rows == n_chunks and chunks.schema.field("embedding").type == pa.list_(pa.float32())
    from memorag_core.retrieval import IndexConfig, VectorIndex

    merged = VectorIndex.from_bytes(reader.read_bytes("index/merged.faiss"),
                                    IndexConfig(kind=kind, metric="ip", nlist=4, nprobe=4))
    assert len(merged) == n_chunks
    row = chunks.slice(7, 1)
    _, ids = merged.search(embedding_matrix(row.column("embedding")), 1)
    assert int(ids[0, 0]) == row.column("faiss_id")[0].as_py()
    # a file the writer did not write with that size is refused
    from memorag_core.errors import CorruptArtifactError

    w2 = store.new_version("c")
    w2.folder().write("index/x.faiss", b"abc")
    with pytest.raises(CorruptArtifactError):
        w2.record_file("index/x.faiss", "0" * 64, 4)


def test_split_by_shard_and_select_columns_task_bodies():
    """The bodies of the split and selection tasks: every unit lands in the shard of its id; the driver's table and
    the router's table come from one pass, with the embedding dimension in the schema metadata."""
    from pipeline.index import _split_by_shard, select_columns

    ids = [f"{k:02x}" * 6 + "cd" * 10 for k in range(10)]
    block = pa.table({"unit_id": ids, "chunks_path": [f"p{k}" for k in range(10)], "doc_ids": [["d"]] * 10,
                      "text": ["t"] * 10, "n_tokens": list(range(10)), "members": ["[]"] * 10,
                      "gist": ["g"] * 10, "gist_embedding": embedding_array(np.ones((10, 4), np.float32))})
    parts = _split_by_shard(3, block.slice(0, 4), block.slice(4), block.slice(0, 0))
    assert len(parts) == 3 and sum(p.num_rows for p in parts) == 10
    for k, p in enumerate(parts):
        assert all(shard_of(u, 3) == k for u in p.column("unit_id").to_pylist())
        assert p.column("shard").to_pylist() == [k] * p.num_rows
    assert _split_by_shard(1, block).num_rows == 10
    meta, router = select_columns([["unit_id", "n_tokens"], ["unit_id", "gist_embedding"]], block, block.slice(0, 0))
    assert meta.column_names == ["unit_id", "n_tokens"] and meta.num_rows == 10
    assert router.schema.metadata[b"dim"] == b"4" and embedding_matrix(router.column("gist_embedding")).shape == (10, 4)
