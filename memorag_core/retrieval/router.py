"""The unit router: a small index over per-unit gists, so that a query reaches the units that matter.

The memorize job builds it (``pipeline.router.build_router``) from the gists the memory stage wrote and their
embeddings; a published version stores it as::

    router/units.parquet   unit_id, faiss_id, gist, n_tokens, doc_ids (sorted by unit_id)
    router/index.faiss     flat inner-product index over the normalized gist embeddings, ids = faiss_id

:class:`UnitRouter` reads them back at query time (the query engine), without Ray.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

ROUTER_TABLE = "router/units.parquet"
ROUTER_INDEX = "router/index.faiss"


class UnitRouter:
    """Query-time router over a published version's unit gists.

    Args:
        table: the ``router/units.parquet`` table. index_bytes: ``router/index.faiss``.
    """

    def __init__(self, table: pa.Table, index_bytes: bytes):
        from memorag_core.retrieval.index import IndexConfig, VectorIndex

        self.table = table
        self.index = VectorIndex.from_bytes(index_bytes, IndexConfig(kind="flat", metric="ip"))
        self._unit_of = dict(zip(table.column("faiss_id").to_pylist(), table.column("unit_id").to_pylist()))

    @classmethod
    def from_version(cls, reader) -> "UnitRouter":
        """Load from a :class:`memorag_core.store.VersionReader` (sha256-verified reads)."""
        import pyarrow.parquet as pq

        return cls(pq.read_table(io.BytesIO(reader.read_bytes(ROUTER_TABLE))), reader.read_bytes(ROUTER_INDEX))

    def route(self, query_embedding: np.ndarray, k: int = 4) -> list[tuple[str, float]]:
        """The ``k`` units whose gists are nearest to a normalized query embedding ``(dim,)``: (unit_id, score)."""
        if len(self.index) == 0 or k < 1:
            return []
        scores, ids = self.index.search(np.asarray(query_embedding, np.float32).reshape(1, -1),
                                        min(k, len(self.index)))  # (1, k), (1, k)
        return [(self._unit_of[int(i)], float(s)) for s, i in zip(scores[0], ids[0]) if int(i) >= 0]
