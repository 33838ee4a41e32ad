"""The router: a small index over per-unit gists, so that a query reaches the units that matter.

Built by the job from the gists the memory stage wrote (see :mod:`pipeline.memory_stage` for the ``summary`` /
``cheap`` choice) and their embeddings from the chunk + embed stage. Stored in the version as::

    router/units.parquet   unit_id, faiss_id, gist, n_tokens, doc_ids (sorted by unit_id)
    router/index.faiss     flat inner-product index over the normalized gist embeddings, ids = faiss_id

:class:`memorag_core.retrieval.router.UnitRouter` reads them back at query time (re-exported here).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

# The router's files and its query-time reader live in memorag_core (the query engine needs them without Ray).
from memorag_core.retrieval.router import ROUTER_INDEX, ROUTER_TABLE, UnitRouter  # noqa: F401

logger = logging.getLogger(__name__)


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
