"""The online half: answer questions over published collection versions, without Ray.

One engine answers for the CLI (``memorag ask --collection``), the Ray Serve app (``pipeline/serve``), the
evaluation and the bulk summarization: each stage is written once here and composed by each of them.

* :class:`CollectionCatalog` / :class:`CollectionView`: live-version resolution and loaded versions (leases).
* :class:`EvidenceRetriever`: routing to units, shard search, rank fusion, passages.
* :class:`ClueWriter`: clues and key points from unit memories (byte-bounded LRU of loaded memories).
* :class:`Answerer`: the generator on the evidence.
* :class:`QueryEngine`: all of the above in one process.
"""

from memorag_core.query.answer import Answerer, generation_prompt
from memorag_core.query.catalog import CollectionCatalog, CollectionInfo, CollectionView
from memorag_core.query.clues import ByteLRU, ClueWriter
from memorag_core.query.engine import QueryEngine
from memorag_core.query.retrieve import EvidenceRetriever, clue_queries
from memorag_core.query.types import (
    TASKS,
    Evidence,
    QueryLimits,
    QueryRequest,
    QueryResult,
    RoutedUnit,
    StreamEvent,
    UnitClues,
)

__all__ = [
    "TASKS",
    "Answerer",
    "ByteLRU",
    "ClueWriter",
    "CollectionCatalog",
    "CollectionInfo",
    "CollectionView",
    "Evidence",
    "EvidenceRetriever",
    "QueryEngine",
    "QueryLimits",
    "QueryRequest",
    "QueryResult",
    "RoutedUnit",
    "StreamEvent",
    "UnitClues",
    "clue_queries",
    "generation_prompt",
]
