"""The router: a small index over per-unit gists, so that a query reaches the units that matter.

Built by the job from the gists the memory stage wrote (see :mod:`pipeline.memory_stage` for the ``summary`` /
``cheap`` choice) and their embeddings from the chunk + embed stage. Stored in the version as::

    router/units.parquet   unit_id, faiss_id, gist, n_tokens, doc_ids (sorted by unit_id)
    router/index.faiss     flat inner-product index over the normalized gist embeddings, ids = faiss_id

:class:`UnitRouter` reads them back at query time.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

ROUTER_TABLE = "router/units.parquet"
ROUTER_INDEX = "router/index.faiss"


def build_router(rows: list[dict], dim: int) -> tuple[bytes, bytes]:
    """Router table and index bytes from unit rows (``unit_id, gist, gist_embedding, n_tokens, doc_ids``)."""
    from memorag_core.retrieval import IndexConfig, VectorIndex
    from memorag_core.store.bundle import table_to_parquet

    from pipeline.chunk_embed import faiss_id_for

    rows = sorted(rows, key=lambda r: r["unit_id"])
    table = pa.table({
        "unit_id": pa.array([r["unit_id"] for r in rows], pa.string()),
        "faiss_id": pa.array([faiss_id_for(r["unit_id"]) for r in rows], pa.int64()),
        "gist": pa.array([r["gist"] for r in rows], pa.string()),
        "n_tokens": pa.array([r["n_tokens"] for r in rows], pa.int64()),
        "doc_ids": pa.array([list(r["doc_ids"]) for r in rows], pa.list_(pa.string())),
    })
    index = VectorIndex(dim, IndexConfig(kind="flat", metric="ip"))
    if rows:
        x = np.asarray([r["gist_embedding"] for r in rows], dtype=np.float32)  # (units, dim)
        index.add(x, table.column("faiss_id").to_numpy())
    return table_to_parquet(table), index.to_bytes()


class UnitRouter:
    """Query-time router over a published version's unit gists.

    Args:
        table: the ``router/units.parquet`` table. index_bytes: ``router/index.faiss``.
    """

    def __init__(self, table: pa.Table, index_bytes: bytes):
        from memorag_core.retrieval import IndexConfig, VectorIndex

        self.table = table
        self.index = VectorIndex.from_bytes(index_bytes, IndexConfig(kind="flat", metric="ip"))
        self._unit_of = dict(zip(table.column("faiss_id").to_pylist(), table.column("unit_id").to_pylist()))

    @classmethod
    def from_version(cls, reader) -> "UnitRouter":
        """Load from a :class:`memorag_core.store.VersionReader` (sha256-verified reads)."""
        import io

        import pyarrow.parquet as pq

        return cls(pq.read_table(io.BytesIO(reader.read_bytes(ROUTER_TABLE))), reader.read_bytes(ROUTER_INDEX))

    def route(self, query_embedding: np.ndarray, k: int = 4) -> list[tuple[str, float]]:
        """The ``k`` units whose gists are nearest to a normalized query embedding ``(dim,)``: (unit_id, score)."""
        if len(self.index) == 0:
            return []
        scores, ids = self.index.search(np.asarray(query_embedding, np.float32).reshape(1, -1),
                                        min(k, len(self.index)))
        return [(self._unit_of[int(i)], float(s)) for s, i in zip(scores[0], ids[0]) if int(i) >= 0]
