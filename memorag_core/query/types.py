"""The query engine's request, result and event types: plain dataclasses that cross process boundaries (Ray Serve
deployments pass them by value) and turn into JSON with :meth:`to_dict`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from memorag_core.errors import InvalidInputError

TASKS = ("memorag", "qa", "summarize")


@dataclass(frozen=True)
class QueryLimits:
    """Upper bounds every request is checked against (the Serve app and the CLI use the same ones).

    Attributes:
        max_query_chars: longest question, in characters.
        max_new_tokens: most answer tokens a request may ask for.
        max_clue_tokens: most tokens per clue generation.
        max_units: most unit memories one request may consult.
        max_top_k: most evidence passages one request may receive.
    """

    max_query_chars: int = 4000
    max_new_tokens: int = 1024
    max_clue_tokens: int = 256
    max_units: int = 16
    max_top_k: int = 50


def _int_in(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidInputError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


@dataclass
class QueryRequest:
    """One question to a collection.

    Attributes:
        query: the question (None only for ``task="summarize"``).
        task: ``memorag`` (the memory model's attention re-ranks the retrieved candidates; text clues from unit
            memories when the plan asks), ``qa`` (the question alone retrieves: plain RAG, no memory model), ``summarize`` (key points from memories; ``doc_id`` for one document, else the
            collection).
        max_new_tokens: most tokens of the answer.
        units: most unit memories that write clues.
        top_k: evidence passages handed to the generator.
        clue_max_new_tokens: most tokens per clue generation.
        doc_id: summarize: the document to summarize (None = the collection).
        use_draft: memorag: also ask each memory for a draft answer, which joins retrieval as one more query
            (never as evidence: exactly ``top_k`` passages reach the generator).
        session_id: a conversation session (see :mod:`memorag_core.query.sessions`): its memory rewrites the
            question and adds ``session`` retrieval queries; the turn is recorded after the answer.
        user_id: a user whose lifelong memory adds ``user`` retrieval queries.
        candidates: also return the final ranking's first ``candidates`` passages (at least ``top_k`` are ranked
            then) in ``QueryResult.ranking``: the re-ranked candidates of the memorag task, the retrieval's of qa.
            The generator still reads exactly ``top_k``. 0 (default): no ranking in the result.
    """

    query: str | None = None
    task: str = "memorag"
    max_new_tokens: int = 256
    units: int = 4
    top_k: int = 5
    clue_max_new_tokens: int = 128
    doc_id: str | None = None
    use_draft: bool = False
    session_id: str | None = None
    user_id: str | None = None
    candidates: int = 0

    def validate(self, limits: QueryLimits = QueryLimits()) -> "QueryRequest":
        """Check every field against ``limits``; returns self. Raises InvalidInputError naming the field."""
        if self.task not in TASKS:
            raise InvalidInputError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.query is not None and not isinstance(self.query, str):
            raise InvalidInputError(f"query must be a string, got {type(self.query).__name__}")
        if self.task != "summarize" and (self.query is None or not self.query.strip()):
            raise InvalidInputError(f"query is empty; task {self.task!r} needs a question")
        if self.query is not None and len(self.query) > limits.max_query_chars:
            raise InvalidInputError(f"query is {len(self.query)} characters; the limit is {limits.max_query_chars}")
        if self.query is not None and "\x00" in self.query:
            raise InvalidInputError("query contains NUL bytes")
        _int_in("max_new_tokens", self.max_new_tokens, 1, limits.max_new_tokens)
        _int_in("units", self.units, 1, limits.max_units)
        _int_in("top_k", self.top_k, 1, limits.max_top_k)
        _int_in("clue_max_new_tokens", self.clue_max_new_tokens, 1, limits.max_clue_tokens)
        _int_in("candidates", self.candidates, 0, limits.max_top_k)
        if self.doc_id is not None and (not isinstance(self.doc_id, str) or not self.doc_id):
            raise InvalidInputError("doc_id must be a non-empty string")
        if not isinstance(self.use_draft, bool):
            raise InvalidInputError("use_draft must be a boolean")
        if self.session_id is not None or self.user_id is not None:
            from memorag_core.query.sessions import check_session_id, check_user_id

            if self.task == "summarize":
                raise InvalidInputError("session_id and user_id apply to questions, not to task 'summarize'")
            if self.session_id is not None:
                check_session_id(self.session_id)
            if self.user_id is not None:
                check_user_id(self.user_id)
        return self


@dataclass
class RoutedUnit:
    """A unit picked for a query: ``reason`` is ``dense`` (holds one of the question's best hits), ``router``
    (its gist is near the question) or ``document`` (it holds the document being summarized)."""

    unit_id: str
    score: float
    reason: str


@dataclass
class UnitClues:
    """What one unit's memory wrote for a query.

    Attributes:
        unit_id: the unit.
        spans: recalled text spans. surrogates: surrogate questions. draft: a draft answer (or None).
        key_points: summarize: the memory's key points.
        pointers: (passage key, score) that the question's attention over the memory points at, best first
            (empty unless the stage computes them).
        seconds: wall time of this unit's clue decode (memory load included).
        cached: True when the unit's memory came from the in-process cache.
    """

    unit_id: str
    spans: list[str] = field(default_factory=list)
    surrogates: list[str] = field(default_factory=list)
    draft: str | None = None
    key_points: list[str] = field(default_factory=list)
    pointers: list = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Evidence:
    """One retrieved passage.

    Attributes:
        doc_id, unit_id, chunk_id: where it comes from. score: its fused score (higher is better).
        text: the passage. sources: which query sources found it (``question``, ``span``, ...).
        query: the query that ranked it best. start, end: char offsets in the document.
    """

    doc_id: str
    unit_id: str
    chunk_id: str
    score: float
    text: str
    sources: list[str] = field(default_factory=list)
    query: str = ""
    start: int | None = None
    end: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Ranked:
    """One place of a query's final ranking (``QueryResult.ranking``): where the passage comes from and its
    score (the re-ranking's interpolated score for the memorag task, the retrieval's fused score for qa)."""

    doc_id: str
    unit_id: str
    chunk_id: str
    score: float


@dataclass
class QueryResult:
    """The answer to a :class:`QueryRequest`, with everything that led to it.

    Attributes:
        answer: the generated answer. collection, version: what was queried (the version the query started on).
        task: the task. units: the routed units. clues: per unit. evidence: the passages the generator read.
        timings: seconds per stage (``route``, ``clues``, ``retrieve``, ``generate``, ``total``).
        retrieval_queries: the queries sent to the retriever, with their sources.
        session: what the session / user memories contributed (``SessionContext.to_dict()``), else None.
        question: the question that was routed, clued and answered: the request's, or a conversation's standalone
            rewrite that keeps its content words (see :func:`memorag_core.query.compose.keeps_question`).
        warnings: what went wrong without failing the query (e.g. a turn that could not be recorded).
        ranking: the final ranking's first ``request.candidates`` passages, best first (empty unless asked).
    """

    answer: str
    collection: str
    version: str
    task: str
    units: list[RoutedUnit] = field(default_factory=list)
    clues: list[UnitClues] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    retrieval_queries: list[tuple[str, str]] = field(default_factory=list)
    session: dict | None = None
    question: str | None = None
    warnings: list[str] = field(default_factory=list)
    ranking: list[Ranked] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        d["retrieval_queries"] = [{"source": s, "query": q} for s, q in self.retrieval_queries]
        return d

    def to_api(self) -> dict:
        """The JSON object of the API's answer: the body of ``POST /v1/collections/{name}/query`` (and of its
        final stream event), and what ``memorag ask --json`` prints. :meth:`to_dict` with plain JSON values (numpy
        scalars become Python numbers, tuples lists), so ``json.dumps`` takes it as it is."""
        return _json_ready(self.to_dict())


def _json_ready(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and tuples as lists, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        return value.item()  # numpy scalar
    return value


@dataclass
class StreamEvent:
    """One event of a streamed answer: ``kind`` is ``token`` (``text`` holds a piece of the answer) or ``final``
    (``result`` holds the whole :class:`QueryResult`)."""

    kind: str
    text: str = ""
    result: QueryResult | None = None
