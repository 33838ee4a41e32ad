"""One query, composed once: session -> stored summary -> route -> clues -> retrieve -> evidence -> generate -> record.

Every door runs this composition: the CLI and the in-process :class:`~.engine.QueryEngine` (stages are the engine's
own objects), the Ray Serve ingress (stages are thin async adapters over deployment handles,
``pipeline/serve/app.py``), the single-process facade (a bundle is a one-unit collection,
:mod:`memorag_core.facade`) and the evaluation (which runs the facade per question and the engine over a published
pool). A figure the evaluation measures is therefore a figure of what is served, and a change to drafts, sessions
or stored summaries is made here once.

The composition is written ``async``; it only awaits its stages. In process the stages are plain synchronous calls
wrapped in coroutines that never suspend, so :func:`run_sync` drives the composition without an event loop (it
also works inside a notebook whose loop is running). In Serve the same coroutines await deployment handles.

Stage interfaces (duck-typed; every method is ``async`` except :meth:`AnswerStage.stream`, an async iterator):

=================  ===========================================================================================
``sessions``       ``prepare(name, owner, query, session_id, user_id) -> SessionContext``;
                   ``record(name, owner, session_id, question, answer, doc_ids, standalone) -> None``
``retriever``      ``stored_summary(name, version, request) -> str | None``;
                   ``units(name, version, request) -> list[RoutedUnit]``;
                   ``retrieve(name, version, query, clues, top_k, doc_id, extra) -> (evidence, queries)``
``memory``         ``clues(name, version, unit_ids, query, max_new_tokens, with_draft) -> list[UnitClues]``;
                   ``key_points(name, version, unit_ids, max_new_tokens) -> list[UnitClues]``;
                   ``rerank(name, version, question, lines, dense_scores, prefix_unit, max_tokens, bridge_slots,
                   bridge_width) -> CandidateScores | None`` (scores per line, and the bridge span when
                   ``bridge_slots``; None: the memory model has no head set)
``generator``      ``generate(task, query, evidence, max_new_tokens) -> str``;
                   ``stream(task, query, evidence, max_new_tokens) -> AsyncIterator[str]``
=================  ===========================================================================================

Decisions written here once:

* **The memory points.** The ``memorag`` task retrieves ``plan.rerank_candidates`` fused candidates and the
  memory model's calibrated attention re-ranks them (:mod:`memorag_core.retrieval.rerank`), interpolated with the
  retrieval's own scores (weight 0 = plain order), before the budget is cut; the kept passages reach the
  generator in the retrieval's order (``plan.evidence_order``, chosen on dev), and the whole final order is the
  result's ``ranking`` when the request asks (``candidates``). Text clues are decoded only when the plan asks
  (``text_clues``) or the request wants a draft (``use_draft``).
* **Budgets hold.** Exactly the ``top_k`` fused passages reach the generator. A draft answer is a retrieval query
  (source ``draft``), never an extra line of evidence, whatever ``use_draft`` or the number of units.
* **A conversation never loses the question.** A session's standalone rewrite always joins retrieval (source
  ``session``); it replaces the question that routes, writes clues and is answered only when it keeps the
  question's content words (:func:`keeps_question`). A small model can rewrite "Where did he go next?" into
  "I have read the text. What is the task?"; the rewrite then only retrieves.
* **A failed turn record loses no answer.** The answer is returned with a warning in ``QueryResult.warnings``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from memorag_core.query.types import QueryRequest, QueryResult, Ranked, RoutedUnit, StreamEvent, UnitClues

logger = logging.getLogger(__name__)

T = TypeVar("T")

# -- driving a composition without an event loop ---------------------------------------------------------------


def complete(awaitable: Awaitable[T]) -> T:
    """The value of an awaitable that finishes without suspending (in-process stages).

    Raises:
        RuntimeError: the awaitable suspended (it awaits real I/O): run it on an event loop instead.
    """
    step = awaitable.__await__()
    try:
        step.send(None)
    except StopIteration as stop:
        return stop.value
    step.close()
    raise RuntimeError("an in-process stage suspended; run this composition on an event loop")


def run_sync(events: AsyncIterator[T]) -> Iterator[T]:
    """Iterate an async iterator whose awaits all complete at once (see :func:`complete`); closes it when the
    caller stops early."""
    try:
        while True:
            try:
                item = complete(events.__anext__())
            except StopAsyncIteration:
                return
            yield item
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            complete(aclose())


# -- the question a conversation answers -----------------------------------------------------------------------

_STOP = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each else ever few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just let like me more most my myself next no nor not
now of off on once only or other our ours out over own please same she should so some such tell than that the their
theirs them themselves then there these they this those through to too under until up very was we were what when
where which while who whom whose why will with would you your yours yourself
""".split()) - {"next"}
_CJK_STOP = frozenset("的了是吗呢吧啊他她它们这那什么怎么哪谁和与在有也都就还")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_CJK = re.compile(r"[\u4e00-\u9fff]")


def content_words(text: str) -> set[str]:
    """Lower-cased words of ``text`` that carry its content: not a function word or pronoun, at least 3 letters
    (digits count at any length); for Chinese, each CJK character that is not a function character."""
    out: set[str] = set()
    for w in _WORD.findall(text.lower()):
        if _CJK.search(w):
            out.update(c for c in w if _CJK.match(c) and c not in _CJK_STOP)
        elif w.isdigit() or (len(w) >= 3 and w not in _STOP):
            out.add(w)
    return out


def _stem(word: str) -> str:
    return word[:5] if not _CJK.match(word) else word


def keeps_question(question: str, rewrite: str | None) -> bool:
    """Whether ``rewrite`` keeps every content word of ``question`` (English words compared by their first five
    letters, so "brother" matches "brothers"; Chinese characters one by one). A question with no content words
    ("and him?") is kept by any rewrite."""
    if not rewrite or not rewrite.strip():
        return False
    have = {_stem(w) for w in content_words(rewrite)}
    return all(_stem(w) in have for w in content_words(question))


# -- one query's state -----------------------------------------------------------------------------------------


@dataclass
class QueryState:
    """Everything one query has gathered so far; each step of :class:`QueryComposition` fills part of it.

    Attributes:
        name, version: the collection and the version the query is pinned to (resolved once, before the steps).
        request: the validated request. owner: whose sessions and user memories are read.
        session: what the conversation memories contributed (None without ``session_id`` / ``user_id``).
        question: the question that routes, writes clues and is answered (the request's, or a standalone rewrite
            that keeps it: :func:`keeps_question`).
        units, clues, evidence, queries: what route, clues and retrieve produced.
        ranking: the final ranking of every candidate (Evidence, best first), kept by the rerank step.
        timings: seconds per step. warnings: what went wrong without failing the query.
    """

    name: str
    version: str
    request: QueryRequest
    owner: str | None = None
    session: Any = None
    question: str | None = None
    units: list[RoutedUnit] = field(default_factory=list)
    clues: list[UnitClues] = field(default_factory=list)
    evidence: list = field(default_factory=list)
    queries: list[tuple[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ranking: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.question is None:
            self.question = self.request.query

    @property
    def evidence_texts(self) -> list[str]:
        """What the generator reads: the fused passages, exactly as many as retrieved (at most ``top_k``)."""
        return [e.text for e in self.evidence]

    def result(self, answer: str) -> QueryResult:
        return QueryResult(answer, self.name, self.version, self.request.task, units=self.units, clues=self.clues,
                           evidence=self.evidence, timings=self.timings, retrieval_queries=self.queries,
                           session=self.session.to_dict() if self.session is not None else None,
                           question=self.question, warnings=list(self.warnings),
                           ranking=[Ranked(e.doc_id, e.unit_id, e.chunk_id, float(e.score))
                                    for e in self.ranking[: self.request.candidates]])


@dataclass
class Stages:
    """The four stage objects a composition calls (see the module docstring for their methods)."""

    retriever: Any
    memory: Any
    generator: Any
    sessions: Any = None
    plan: Any = None  # the PlanConfig the retriever runs (None: the defaults); the composition reads its rerank_*


class QueryComposition:
    """The steps of a query, each written once; :meth:`run` chains them.

    Args:
        stages: the stage objects (in process: :class:`LocalStages` over an engine, or the facade's bundle
            stages; in Serve: adapters over deployment handles).
    """

    def __init__(self, stages: Stages) -> None:
        from memorag_core.retrieval.queries import PlanConfig

        self.stages = stages
        self.plan = PlanConfig.from_dict(getattr(stages, "plan", None))

    # -- steps -----------------------------------------------------------------------------------------------
    async def prepare_session(self, state: QueryState) -> None:
        """Read the session / user memories: the standalone rewrite and recalls (``state.session``), and the
        question that is answered (:func:`keeps_question`)."""
        r = state.request
        if r.session_id is None and r.user_id is None:
            return
        if self.stages.sessions is None:
            from memorag_core.errors import InvalidInputError

            raise InvalidInputError("this door keeps no conversations: session_id and user_id are not accepted")
        t = time.perf_counter()
        state.session = await self.stages.sessions.prepare(state.name, state.owner, r.query, r.session_id,
                                                           r.user_id)
        standalone = state.session.standalone
        if standalone and keeps_question(r.query, standalone):
            state.question = standalone
        elif standalone:
            logger.info("standalone rewrite drops content words of the question; it only retrieves")
        state.timings["session"] = time.perf_counter() - t

    async def stored_summary(self, state: QueryState) -> str | None:
        """The summary the bulk job stored for this version, when the request is a summary and one is current."""
        if state.request.task != "summarize":
            return None
        return await self.stages.retriever.stored_summary(state.name, state.version, state.request)

    async def route(self, state: QueryState) -> None:
        """The units whose memories write clues (memorag: the question's; summarize: the document's or a spread;
        qa: none)."""
        t = time.perf_counter()
        asked = state.request if state.question == state.request.query else dataclasses.replace(
            state.request, query=state.question)
        state.units = await self.stages.retriever.units(state.name, state.version, asked)
        state.timings["route"] = time.perf_counter() - t

    async def write_clues(self, state: QueryState, *, text_clues: bool | None = None) -> None:
        """Clues (memorag: when the plan's ``text_clues``, a draft is asked, or ``text_clues=True``) or key
        points (summarize) from each routed unit's memory."""
        r = state.request
        t = time.perf_counter()
        ids = [u.unit_id for u in state.units]
        wanted = self.plan.decodes_clues(r.use_draft) if text_clues is None else text_clues
        if r.task == "memorag" and ids and wanted:
            state.clues = await self.stages.memory.clues(state.name, state.version, ids, state.question,
                                                         r.clue_max_new_tokens, r.use_draft)
        elif r.task == "summarize" and ids:
            state.clues = await self.stages.memory.key_points(state.name, state.version, ids,
                                                              max(r.clue_max_new_tokens, 128))
        state.timings["clues"] = time.perf_counter() - t

    async def retrieve(self, state: QueryState) -> None:
        """The question, the clues and the conversation's queries -> the fused top ``top_k`` passages."""
        r = state.request
        t = time.perf_counter()
        extra = state.session.queries() if state.session is not None else None
        depth = max(r.top_k, r.candidates, self.plan.rerank_candidates if self.reranks(state) else 0)
        state.evidence, state.queries = await self.stages.retriever.retrieve(
            state.name, state.version, r.query, state.clues, depth, r.doc_id if r.task == "summarize" else None,
            extra)
        state.timings["retrieve"] = time.perf_counter() - t

    def reranks(self, state: QueryState) -> bool:
        """Whether this query's candidates are re-ranked by the memory model's attention."""
        return state.request.task == "memorag" and self.plan.reranks

    async def rerank(self, state: QueryState) -> None:
        """The memory model's calibrated attention re-orders the candidates; the ``top_k`` best of its
        interpolation with the retrieval's scores are kept (the retrieval's order, and no ``rerank`` timing, when
        the memory model has no head set: :func:`memorag_core.retrieval.rerank.reranker_for` logs it once). With
        ``plan.bridge_weight`` the span the attention leans on retrieves too (source ``bridge``). Every candidate's
        place is kept in ``state.ranking``; ``plan.evidence_order`` decides the order the generator reads."""
        r = state.request
        state.ranking = list(state.evidence)
        if not self.reranks(state) or len(state.evidence) <= 1:
            del state.evidence[r.top_k:]
            return
        from memorag_core.retrieval.rerank import passage_line

        t = time.perf_counter()
        # "[title] body" when the chunk opens with its document's id as a title (the form the heads were chosen
        # on); otherwise the chunk as stored (a bundle's doc_id names the bundle, not the passage)
        lines = [passage_line(e.doc_id, e.text) if e.doc_id and e.text.startswith(f"{e.doc_id}: ") else e.text
                 for e in state.evidence]
        dense = [float(e.score) for e in state.evidence]
        prefix = state.units[0].unit_id if self.plan.rerank_prefix and state.units else None
        bridge_slots = self.plan.bridge_slots if self.plan.bridge_weight > 0 else 0
        read = await self.stages.memory.rerank(state.name, state.version, state.question, lines, dense, prefix,
                                               self.plan.rerank_max_tokens, bridge_slots, self.plan.bridge_width)
        if read is None:  # no head set for this memory model (logged once when the model was first asked)
            del state.evidence[r.top_k:]
            return
        bridge = None
        if bridge_slots and read.span:
            query = f"{state.question} {read.span}"
            bridge, _ = await self.stages.retriever.retrieve(state.name, state.version, query, [],
                                                             len(state.evidence), None, None)
            state.queries = list(state.queries) + [("bridge", query)]
        retrieved = list(state.evidence)
        state.ranking = reranked(retrieved, read.scores, state.question, r.top_k, self.plan, bridge=bridge,
                                 keep_all=True)
        state.evidence = state.ranking[: r.top_k]
        if self.plan.evidence_order == "retrieval":  # the same passages, in the order they were retrieved
            place = {passage_key(e): i for i, e in enumerate(retrieved)}
            state.evidence.sort(key=lambda e: place.get(passage_key(e), len(place)))
        state.timings["rerank"] = time.perf_counter() - t

    async def generate(self, state: QueryState, *, stream: bool = True) -> AsyncIterator[str]:
        """The answer from the evidence: pieces as the generator writes them (one piece when not ``stream``)."""
        r = state.request
        t = time.perf_counter()
        question = state.question if r.task != "summarize" else None
        if stream:
            async for piece in self.stages.generator.stream(r.task, question, state.evidence_texts, r.max_new_tokens):
                yield piece
        else:
            yield await self.stages.generator.generate(r.task, question, state.evidence_texts, r.max_new_tokens)
        state.timings["generate"] = time.perf_counter() - t

    async def record(self, state: QueryState, answer: str) -> None:
        """Append the turn to the session memory; a failure is a warning, never a lost answer."""
        r = state.request
        if r.session_id is None:
            return
        t = time.perf_counter()
        try:
            await self.stages.sessions.record(state.name, state.owner, r.session_id, r.query, answer,
                                              [e.doc_id for e in state.evidence], state.session.standalone)
        except Exception as exc:  # noqa: BLE001 - the answer is already written: return it, say what failed
            logger.warning("recording the turn of session %s failed: %s", r.session_id, type(exc).__name__)
            state.warnings.append(f"the turn was answered but not recorded in the session ({type(exc).__name__}); "
                                  "the next follow-up will not see it")
        state.timings["session"] = state.timings.get("session", 0.0) + time.perf_counter() - t

    # -- the chain -------------------------------------------------------------------------------------------
    async def run(self, name: str, version: str, request: QueryRequest, *, owner: str | None = None,
                  stream: bool = True, timings: dict[str, float] | None = None) -> AsyncIterator[StreamEvent]:
        """Answer ``request`` on ``(name, version)``: ``token`` events, then one ``final`` event.

        ``request`` must be validated and ``version`` resolved by the caller (each door has its own limits and
        version resolution); ``timings`` may carry what the door measured before (``open``).
        """
        t_start = time.perf_counter()
        state = QueryState(name, version, request, owner, timings=dict(timings or {}))
        await self.prepare_session(state)
        stored = await self.stored_summary(state)
        if stored is not None:
            state.timings["total"] = time.perf_counter() - t_start + state.timings.get("open", 0.0)
            yield StreamEvent("token", stored)
            yield StreamEvent("final", result=state.result(stored))
            return
        await self.route(state)
        await self.write_clues(state)
        await self.retrieve(state)
        await self.rerank(state)
        pieces: list[str] = []
        async for piece in self.generate(state, stream=stream):
            pieces.append(piece)
            yield StreamEvent("token", piece)
        answer = "".join(pieces).strip()
        await self.record(state, answer)
        state.timings["total"] = time.perf_counter() - t_start + state.timings.get("open", 0.0)
        logger.info("query %s/%s %s: %d units, %d passages, %.2f s", name, version, request.task, len(state.units),
                    len(state.evidence), state.timings["total"])
        yield StreamEvent("final", result=state.result(answer))


def passage_key(e) -> tuple[str, str]:
    """A passage's identity across two retrievals of one query (unit and chunk)."""
    return (e.unit_id, e.chunk_id)


def reranked(evidence: list, scores: list[float], question: str, top_k: int, plan, *,
             bridge: list | None = None, keep_all: bool = False) -> list:
    """The ``top_k`` best (``keep_all``: every candidate, best first) of ``evidence`` by the no-loss
    interpolation of the retrieval's scores (weight 1), the attention ``scores`` (``plan.rerank_weight``, gated
    by ``plan.rerank_gate``) and the bridge query's retrieval (``bridge``, at ``plan.bridge_weight``; its
    passages join the candidates). Each passage's score is the interpolated one; ``attention`` (``bridge``) joins
    its sources when that ranking put it in the top ``top_k``."""
    from memorag_core.retrieval.fusion import Ranking, fuse
    from memorag_core.retrieval.rerank import attention_fusion, attention_ranking

    if len(scores) != len(evidence):
        raise ValueError(f"{len(scores)} attention scores for {len(evidence)} candidates")
    pool = list(evidence)
    keys = list(range(len(evidence)))
    dense = Ranking("question", question, keys, [float(e.score) for e in evidence])
    by_attention = sorted(keys, key=lambda i: (-scores[i], i))
    rankings = [dense, attention_ranking(question, [(i, scores[i]) for i in by_attention])]
    marks = {i: ["attention"] for i in by_attention[:top_k]}
    if bridge:
        place = {passage_key(e): i for i, e in enumerate(pool)}
        bkeys = []
        for e in bridge:
            k = place.get(passage_key(e))
            if k is None:
                k = place[passage_key(e)] = len(pool)
                pool.append(dataclasses.replace(e, sources=[]))
            bkeys.append(k)
        rankings.append(Ranking("bridge", bridge[0].query or question, bkeys, [float(e.score) for e in bridge]))
        for k in bkeys[:top_k]:
            marks.setdefault(k, []).append("bridge")
    fused = fuse(rankings, attention_fusion(plan.rerank_weight, plan.rerank_gate, plan.bridge_weight),
                 limit=None if keep_all else top_k)
    out = []
    for f in fused:
        e = pool[int(f.key)]
        sources = list(e.sources) + [m for m in marks.get(int(f.key), []) if m not in e.sources]
        out.append(dataclasses.replace(e, score=float(f.score), sources=sources))
    return out


def final_result(events: Iterator[StreamEvent]) -> QueryResult:
    """The ``final`` event's result of a (synchronous) event stream."""
    for event in events:
        if event.kind == "final":
            return event.result
    raise RuntimeError("the query ended without a final event")  # pragma: no cover - run always ends so


# -- in-process stages over the engine's objects ---------------------------------------------------------------


class LocalStages(Stages):
    """The stages of an in-process :class:`~.engine.QueryEngine`: its retriever, clue writer, answerer and
    conversations, called directly (coroutines that never suspend)."""

    def __init__(self, engine) -> None:
        super().__init__(retriever=_LocalRetriever(engine), memory=_LocalMemory(engine),
                         generator=GeneratorStage(engine), sessions=_LocalSessions(engine),
                         plan=engine.retriever.plan)


class _LocalRetriever:
    def __init__(self, engine) -> None:
        self.engine = engine

    async def stored_summary(self, name, version, request):
        return self.engine.stored_summary(self.engine.catalog.view(name, version), request)

    async def units(self, name, version, request):
        return self.engine.retriever.units(name, version, request)

    async def retrieve(self, name, version, query, clues, top_k, doc_id=None, extra=None):
        return self.engine.retriever.retrieve(name, version, query, clues, top_k, doc_id=doc_id, extra=extra)


class _LocalMemory:
    def __init__(self, engine) -> None:
        self.engine = engine

    async def clues(self, name, version, unit_ids, query, max_new_tokens, with_draft=False):
        return self.engine.clue_writer.clues(name, version, list(unit_ids), query, max_new_tokens=max_new_tokens,
                                             with_draft=with_draft)

    async def key_points(self, name, version, unit_ids, max_new_tokens):
        return self.engine.clue_writer.key_points(name, version, list(unit_ids), max_new_tokens=max_new_tokens)

    async def rerank(self, name, version, question, lines, dense_scores, prefix_unit=None, max_tokens=None,
                     bridge_slots=0, bridge_width=2):
        return self.engine.clue_writer.rerank(name, version, question, lines, dense_scores, prefix_unit=prefix_unit,
                                              max_tokens=max_tokens, bridge_slots=bridge_slots,
                                              bridge_width=bridge_width)


class GeneratorStage:
    """The engine's answerer (made before the query runs: the configured generator or the collection's memory
    model), or any :class:`~.answer.Answerer`."""

    def __init__(self, engine=None, answerer=None) -> None:
        self.engine = engine
        self._answerer = answerer

    @property
    def answerer(self):
        return self._answerer if self._answerer is not None else self.engine.answerer

    async def generate(self, task, query, evidence, max_new_tokens):
        return self.answerer.generate(task, query, evidence, max_new_tokens=max_new_tokens).strip()

    async def stream(self, task, query, evidence, max_new_tokens):
        for piece in self.answerer.stream(task, query, evidence, max_new_tokens=max_new_tokens):
            yield piece


class _LocalSessions:
    def __init__(self, engine) -> None:
        self.engine = engine

    async def prepare(self, name, owner, query, session_id, user_id):
        return self.engine.conversations.prepare(name, owner, query, session_id=session_id, user_id=user_id)

    async def record(self, name, owner, session_id, question, answer, doc_ids, standalone):
        self.engine.conversations.record(name, owner, session_id, question, answer, doc_ids, standalone)
