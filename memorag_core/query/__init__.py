"""The online half: answer questions over published collection versions, without Ray.

One engine answers for the CLI (``memorag ask --collection``), the Ray Serve app (``pipeline/serve``), the
evaluation and the bulk summarization: each stage is written once here and composed by each of them.

* :class:`CollectionCatalog` / :class:`CollectionView`: live-version resolution and loaded versions (leases).
* :class:`EvidenceRetriever`: routing to units, shard search, rank fusion, passages.
* :class:`ClueWriter`: clues and key points from unit memories (byte-bounded LRU of loaded memories).
* :class:`Answerer`: the generator on the evidence.
* :class:`QueryComposition`: the one chain of a query (session, stored summary, route, clues, retrieve,
  evidence, generate, record) that every door runs over its stages.
* :class:`QueryEngine`: all of the above in one process.
"""

from memorag_core.query.answer import Answerer, generation_prompt
from memorag_core.query.catalog import CollectionCatalog, CollectionInfo, CollectionView
from memorag_core.query.clues import ByteLRU, ClueWriter
from memorag_core.query.engine import QueryEngine
from memorag_core.query.compose import QueryComposition, QueryState, Stages, keeps_question, run_sync
from memorag_core.query.retrieve import EvidenceRetriever
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
    "QueryComposition",
    "QueryEngine",
    "QueryLimits",
    "QueryRequest",
    "QueryResult",
    "QueryState",
    "RoutedUnit",
    "Stages",
    "StreamEvent",
    "UnitClues",
    "generation_prompt",
    "keeps_question",
    "run_sync",
]
