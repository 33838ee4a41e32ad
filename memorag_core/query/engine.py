"""The query engine over published collections, in one process: route -> clues -> retrieve -> answer.

:class:`QueryEngine` owns one object per stage, each of which a Ray Serve deployment can own on its own (the Serve
app in ``pipeline/serve`` does exactly that, with the same classes), and runs the one query composition
(:class:`~.compose.QueryComposition`, shared with the Serve ingress, the facade and the evaluation) over them:

==========  =====================================================  ======================================
stage       what it does                                           object
==========  =====================================================  ======================================
open        live version (pointer checked every few seconds),       :class:`~.catalog.CollectionCatalog`
            version loaded once (chunks, shards, router), leases
route       units: holders of the question's best hits + router    :class:`~.retrieve.EvidenceRetriever`
clues       one batched decode per unit after its memory            :class:`~.clues.ClueWriter`
retrieve    question + clues -> shard search -> rank fusion         :class:`~.retrieve.EvidenceRetriever`
answer      generator on the evidence, whole or streamed            :class:`~.answer.Answerer`
==========  =====================================================  ======================================

A request is pinned to the version that was live when it started (``QueryResult.version``): a version published
meanwhile serves the next request. Tasks: ``memorag`` (the full loop), ``qa`` (plain RAG: the question alone
retrieves, no memory is read), ``summarize`` (key points from the memories of one document's units, or of up to
``units`` units spread over the collection, drive retrieval; the generator writes the summary). A summary that the
bulk summarization job stored for the version is returned as is when the request allows it (see
:meth:`QueryEngine.stored_summary`).

Conversations: a request with ``session_id`` / ``user_id`` first reads those memories
(:class:`~.sessions.Conversations`, on :attr:`QueryEngine.conversations`): the standalone rewrite and recalls they
write join retrieval (sources ``session`` and ``user``); the rewrite also routes, writes clues and is answered
when it keeps the question's content words; the turn is appended to the session memory after the answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from memorag_core.query.answer import Answerer
from memorag_core.query.catalog import CollectionCatalog
from memorag_core.query.clues import ClueWriter
from memorag_core.query.compose import LocalStages, QueryComposition, final_result, run_sync
from memorag_core.query.retrieve import EvidenceRetriever
from memorag_core.query.types import QueryLimits, QueryRequest, QueryResult, StreamEvent
from memorag_core.retrieval.fusion import FusionConfig
from memorag_core.retrieval.queries import PlanConfig

logger = logging.getLogger(__name__)


class StoredSummaries:
    """Reads the summaries that the bulk summarization job stored, for the engine and the Serve retriever.

    Summaries live in their own namespace of the store (:mod:`memorag_core.store.summaries`); its live pointer
    is re-read at most every ``catalog.refresh_s``. :meth:`lookup` returns a stored summary only when it is
    current for the view: the collection summary computed over exactly the view's unit set, a document's summary
    over the document's units in the view (a document alone in one unit is summarized by that unit's summary).
    Unit ids are content hashes, so a collection version that re-publishes the same units keeps its summaries;
    any change to the units makes them stale until the next summarize run, and the engine summarizes live.
    """

    def __init__(self, catalog) -> None:
        self.catalog = catalog
        self._store = None
        self._cache: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def lookup(self, view, request: QueryRequest) -> str | None:
        """The current stored summary for ``request`` (``doc_id`` or the collection) on ``view``, else None."""
        stored = self._open(view.name)
        if stored is None:
            return None
        if request.doc_id:
            try:
                doc_units = view.units_of_doc(request.doc_id)
            except Exception:  # noqa: BLE001 - unknown document: the live path raises the right error
                return None
            return stored.document_summary(request.doc_id, doc_units, view.unit_docs)
        return stored.collection_summary(view.units)

    def _open(self, name: str):
        from memorag_core.store.summaries import SummaryStore

        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and now - cached[2] < self.catalog.refresh_s:
                return cached[1]
            if self._store is None:
                self._store = SummaryStore(self.catalog.store)
        try:
            version = self._store.current_version(name)
            if cached is not None and cached[0] == version:
                stored = cached[1]
            else:
                stored = self._store.open(name, version) if version else None
        except Exception as exc:  # noqa: BLE001 - stored summaries are an optimization: summarize live instead
            logger.warning("cannot read stored summaries of %s: %s", name, exc)
            version, stored = None, None
        with self._lock:
            self._cache[name] = (version, stored, now)
        return stored


class QueryEngine:
    """Answers questions over the collections of one store.

    Args:
        store: a :class:`memorag_core.store.CollectionStore` or root URL (local folder, ``s3://...``).
        storage_options: fsspec options for a URL.
        generator: generator spec or object (see :class:`~.answer.Answerer`); None = the collection's memory
            model itself (no second copy of the weights), as the single-process facade does.
        limits: request bounds.
        plan: how the question and the clues become fused evidence (sources, grounding, depth, and
            ``plan.fusion``: the rank-fusion settings, ``question_floor`` included); one setting for every door.
        fusion: shorthand that replaces ``plan.fusion``.
        cache_bytes: loaded unit memories kept per process.
        device: where the memory model and embedder run.
        refresh_s: how often the live pointer of a collection is re-read.
        session_config: bounds of session and user memories (:class:`~.sessions.SessionConfig`).
    """

    def __init__(self, store, storage_options: dict | None = None, *, generator=None,
                 limits: QueryLimits | None = None, plan: PlanConfig | None = None,
                 fusion: FusionConfig | None = None, cache_bytes: int = 2 << 30,
                 device: str | None = None, refresh_s: float = 5.0, session_config=None) -> None:
        self.catalog = CollectionCatalog(store, storage_options, refresh_s=refresh_s)
        self.clue_writer = ClueWriter(self.catalog, cache_bytes=cache_bytes, device=device)
        self.retriever = EvidenceRetriever(self.catalog, plan=plan, fusion=fusion, device=device or "auto")
        self.limits = limits or QueryLimits()
        self._generator_spec = generator
        self._answerer: Answerer | None = None if generator is None else Answerer(generator)
        self.stored_summaries = StoredSummaries(self.catalog)
        self._session_config = session_config
        self._conversations = None
        self._stages = LocalStages(self)
        self.composition = QueryComposition(self._stages)

    @property
    def conversations(self):
        """Session and user memories over this engine's store and memory models (made on first use)."""
        if self._conversations is None:
            from memorag_core.query.sessions import Conversations, SessionStore

            self._conversations = Conversations(
                SessionStore(self.catalog.store, config=self._session_config),
                lambda name: self.clue_writer.memory_for(self.catalog.view(name)))
        return self._conversations

    # -- stages ----------------------------------------------------------------------------------------------
    def answerer_for(self, view, *, batch_size: int | None = None) -> Answerer:
        """The generator: the configured one, else the collection's memory model (shared weights; ``batch_size``:
        prompts per forward for that one, e.g. the bulk summarization's)."""
        if self._answerer is None:
            from memorag_core.generators import HFGenerator

            memory = self.clue_writer.memory_for(view)
            extra = {"batch_size": batch_size} if batch_size else {}
            self._answerer = Answerer(HFGenerator.from_model(memory.model, memory.tokenizer, **extra))
        return self._answerer

    @property
    def answerer(self) -> Answerer:
        """The generator made by :meth:`answerer_for` (a query makes it before it runs)."""
        if self._answerer is None:
            raise RuntimeError("no generator yet: call answerer_for(view) first")
        return self._answerer

    def stored_summary(self, view, request: QueryRequest) -> str | None:
        """The summary the bulk job stored for ``view`` (see :class:`StoredSummaries`), or None."""
        return self.stored_summaries.lookup(view, request)

    # -- calls -----------------------------------------------------------------------------------------------
    def query(self, name: str, request: QueryRequest, version: str | None = None, *,
              owner: str | None = None) -> QueryResult:
        """Answer ``request`` over collection ``name`` (``version`` None = the live one). ``owner``: the
        :func:`~.sessions.owner_of` the caller's key, which sessions and user memories belong to (None: the
        collection's anonymous owner).

        Raises:
            InvalidInputError: a request field out of bounds (named), an unknown task or document.
            ArtifactNotFoundError: no such collection or version, or session. CorruptArtifactError: damaged artifacts.
        """
        return final_result(self.stream(name, request, version, owner=owner))

    def stream(self, name: str, request: QueryRequest, version: str | None = None, *,
               owner: str | None = None) -> Iterator[StreamEvent]:
        """Like :meth:`query`, yielding the answer in pieces (``token`` events) and then a ``final`` event.

        Runs the one query composition (:class:`~.compose.QueryComposition`) over this engine's own stage objects.
        """
        request.validate(self.limits)
        t0 = time.perf_counter()
        view = self.catalog.view(name, version)
        timings = {"open": time.perf_counter() - t0}
        if owner is None and (request.session_id is not None or request.user_id is not None):
            from memorag_core.query.sessions import owner_of

            owner = owner_of(None, name)
        self.answerer_for(view)  # the generator: configured, or this collection's memory model
        yield from run_sync(self.composition.run(name, view.version, request, owner=owner, timings=timings))
