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


ROUTER_COLUMNS = ["unit_id", "gist", "gist_embedding", "n_tokens", "doc_ids"]
"""The embed-stage columns the router is built from."""


def build_router(units: pa.Table) -> tuple[bytes, bytes]:
    """Router table and index bytes from embed-stage unit rows (:data:`ROUTER_COLUMNS`; a unit id seen twice is
    kept once). The gist embeddings go from their Arrow column to FAISS as one ``(units, dim)`` array."""
    from memorag_core.retrieval import IndexConfig, VectorIndex
    from memorag_core.store.bundle import table_to_parquet

    from pipeline.chunk_embed import faiss_id_for
    from pipeline.index import embedding_matrix

    units = unique_units(units.select(ROUTER_COLUMNS))
    unit_ids = units.column("unit_id").to_pylist()
    table = pa.table({
        "unit_id": pa.array(unit_ids, pa.string()),
        "faiss_id": pa.array([faiss_id_for(u) for u in unit_ids], pa.int64()),
        "gist": units.column("gist").cast(pa.string()),
        "n_tokens": units.column("n_tokens").cast(pa.int64()),
        "doc_ids": units.column("doc_ids").cast(pa.list_(pa.string())),
    })
    x = embedding_matrix(units.column("gist_embedding"))  # (units, dim)
    index = VectorIndex(x.shape[1], IndexConfig(kind="flat", metric="ip"))
    if len(x):
        index.add(x, table.column("faiss_id").to_numpy())
    return table_to_parquet(table), index.to_bytes()


def unique_units(units: pa.Table) -> pa.Table:
    """Rows sorted by ``unit_id``, the first row of each id kept (an id repeats only when two groups have the
    same text: identical documents under different ids)."""
    units = units.sort_by([("unit_id", "ascending")])
    ids = units.column("unit_id").to_numpy(zero_copy_only=False)  # (n,) object
    if len(ids) < 2:
        return units
    keep = np.concatenate([[True], ids[1:] != ids[:-1]])  # (n,) bool
    return units if keep.all() else units.filter(pa.array(keep))


def write_router(folder, *blocks: pa.Table) -> list[dict]:
    """Task body: build the router from the embed stage's Arrow ``blocks`` (:data:`ROUTER_COLUMNS` are read) and
    write its two files into ``folder`` (a :class:`memorag_core.store.VersionFolder`); returns their entries."""
    units = pa.concat_tables([b.select(ROUTER_COLUMNS) for b in blocks if b.num_rows])
    table_bytes, index_bytes = build_router(units)
    return [folder.write(ROUTER_TABLE, table_bytes), folder.write(ROUTER_INDEX, index_bytes)]
