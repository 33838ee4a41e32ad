"""Rank fusion of several retrieval queries: the question's own ranking counts most.

MemoRAG sends the question and the memory's clues (recalled spans, surrogate questions, a draft answer) to the
retriever. Ranking the union of their hits by raw cosine lets a hallucinated span that *reads like* a passage
outrank the question's gold hits. Here every query contributes a ranking, and passages are fused by weighted
reciprocal rank (Cormack et al., 2009)::

    score(d) = sum over rankings r that hold d of  w(r) / (rrf_k + rank_r(d))        rank from 1

where a source's weight (``question``, ``span``, ``surrogate``, ``draft``, ``pointer``, ...) is split evenly over
that source's rankings, so ten recalled spans weigh what one span source weighs, never ten times the question.
Raw scores are used only to break ties. The facade, the query engine and the evaluation all call :func:`fuse`.

``FusionConfig(method="interpolate")`` fuses raw scores instead: each ranking's scores are min-max normalized per
query to [0, 1] and summed with the same per-source weights (a passage a ranking lacks gets 0 from it). A source
of weight 0 is left out entirely, so ``{"question": 1, "attention": 0}`` *is* the question's ranking; this is the
no-loss fusion for a re-ranker whose scores carry more than their order (Weller et al., arXiv 2309.08541: equal
votes let expansions hurt strong retrievers). Either method honours a confidence gate: a ranking that reports a
``confidence`` below ``FusionConfig.gate`` is dropped for that query (the question's own ranking never is).

Clue queries that merely restate the question add nothing but double its weight: :func:`drop_restatements`
removes them (same words after normalization, or embeddings nearly identical).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from memorag_core.errors import InvalidInputError

#: how rankings are combined: weighted reciprocal rank, or weighted per-query normalized scores
FUSION_METHODS = ("rrf", "interpolate")
#: default weight of each query source (its total, split over its rankings)
DEFAULT_WEIGHTS: dict[str, float] = {
    "question": 1.0, "span": 0.5, "surrogate": 0.5, "draft": 0.25, "pointer": 0.5, "grounded": 0.75,
    "session": 0.5, "user": 1.0, "user_recall": 0.25,
}
# "user": the user's own earlier words that the request's attention over their user memory points at
# (Conversations.point_records): weighed like the question, since an ambiguous request ("where should I go this
# Saturday?") is only answerable with them, and the question's floor keeps its own best hits whatever they add.
# "user_recall": lines the memory model decoded from the user memory (often generic with a small model).


@dataclass(frozen=True)
class Ranking:
    """One query's hits, best first.

    Attributes:
        source: what wrote the query (``question``, ``span``, ``surrogate``, ``draft``, ``pointer``, ...).
        query: the query text (for reporting which query found a passage).
        keys: passage keys (any hashable: chunk ids, row numbers), best first, no repeats.
        scores: the retriever's scores, same length as ``keys`` (higher is better).
        confidence: how sure the ranking's producer is for this query, in [0, 1] (None: no opinion, never gated).
    """

    source: str
    query: str
    keys: Sequence[Hashable]
    scores: Sequence[float]
    confidence: float | None = None


@dataclass
class FusionConfig:
    """How rankings are fused.

    Attributes:
        rrf_k: the reciprocal-rank constant (60 in the original paper; smaller favours each list's top hits).
        weights: total weight per source; a source not listed weighs ``default_weight``.
        default_weight: weight of an unlisted source.
        question_floor: the question's own top-N passages are always kept in the fused top (a clue can add
            passages but never push the question's best ones out of the budget); 0 disables.
        method: ``rrf`` (weighted reciprocal rank) or ``interpolate`` (weighted sum of per-query min-max
            normalized scores; weight 0 leaves a source out).
        gate: a non-question ranking whose ``confidence`` is below this is dropped for that query (0: none is).
    """

    rrf_k: float = 60.0
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    default_weight: float = 0.25
    question_floor: int = 1
    method: str = "rrf"
    gate: float = 0.0

    def __post_init__(self) -> None:
        if self.rrf_k < 0 or self.default_weight < 0 or self.question_floor < 0:
            raise InvalidInputError("fusion rrf_k, default_weight and question_floor must be >= 0")
        if self.method not in FUSION_METHODS:
            raise InvalidInputError(f"fusion method must be one of {FUSION_METHODS}, got {self.method!r}")
        if not 0.0 <= self.gate <= 1.0:
            raise InvalidInputError(f"fusion gate must be in [0, 1], got {self.gate}")
        bad = {k: v for k, v in self.weights.items() if not isinstance(v, (int, float)) or v < 0}
        if bad:
            raise InvalidInputError(f"fusion weights must be numbers >= 0, got {bad}")

    def weight(self, source: str) -> float:
        return float(self.weights.get(source, self.default_weight))


@dataclass
class Fused:
    """One fused passage.

    Attributes:
        key: the passage key.
        score: fused score (sum of weighted reciprocal ranks).
        best_score: its best raw retriever score over the rankings.
        sources: the sources whose rankings held it, in first-seen order.
        query: the query that ranked it best (lowest rank, then highest raw score).
        rank: its best rank (1-based) in any ranking.
    """

    key: Hashable
    score: float
    best_score: float
    sources: list[str]
    query: str
    rank: int


def fuse(rankings: Sequence[Ranking], config: FusionConfig | None = None, limit: int | None = None) -> list[Fused]:
    """Weighted reciprocal-rank fusion of ``rankings`` (or score interpolation: ``config.method``), after the
    confidence gate; the best ``limit`` passages (all when None), best first.

    Raises:
        InvalidInputError: a ranking whose keys and scores differ in length, or ``limit`` < 1.
    """
    config = config or FusionConfig()
    if limit is not None and limit < 1:
        raise InvalidInputError(f"fusion limit must be >= 1, got {limit}")
    per_source: dict[str, int] = {}
    for r in rankings:
        if len(r.keys) != len(r.scores):
            raise InvalidInputError(f"ranking of {r.source!r} has {len(r.keys)} keys but {len(r.scores)} scores")
    interpolate = config.method == "interpolate"
    rankings = [r for r in rankings if r.source == "question" or r.confidence is None or r.confidence >= config.gate]
    if interpolate:  # a weight of 0 leaves the source out (not even a tie-breaker), so it cannot change anything
        rankings = [r for r in rankings if r.source == "question" or config.weight(r.source) > 0]
    for r in rankings:
        if len(r.keys):
            per_source[r.source] = per_source.get(r.source, 0) + 1
    out: dict[Hashable, Fused] = {}
    for r in rankings:
        if not len(r.keys):
            continue
        w = config.weight(r.source) / per_source[r.source]
        if interpolate:
            gains = w * normalized(r.scores)  # (n,)
        else:
            gains = [w / (config.rrf_k + rank) for rank in range(1, len(r.keys) + 1)]
        for rank, (key, raw, gain) in enumerate(zip(r.keys, r.scores, gains), start=1):
            f = out.get(key)
            if f is None:
                out[key] = Fused(key, float(gain), float(raw), [r.source], r.query, rank)
                continue
            f.score += float(gain)
            if r.source not in f.sources:
                f.sources.append(r.source)
            if (rank, -float(raw)) < (f.rank, -f.best_score):
                f.rank, f.query = rank, r.query
            f.best_score = max(f.best_score, float(raw))
    ranked = sorted(out.values(), key=lambda f: (-f.score, -f.best_score, str(f.key)))
    if limit is None or len(ranked) <= limit:
        return ranked
    floor: list[Hashable] = []
    for r in rankings:
        if r.source == "question":
            floor.extend(k for k in r.keys[: config.question_floor] if k not in floor)
    top = ranked[:limit]
    missing = [out[k] for k in floor if out[k] not in top]
    if missing:
        # Make room for the question's floor by dropping the weakest passages that are not in it.
        keep = [f for f in top if f.key in floor]
        rest = [f for f in top if f.key not in floor][: max(0, limit - len(keep) - len(missing))]
        top = sorted(keep + missing + rest, key=lambda f: (-f.score, -f.best_score, str(f.key)))[:limit]
    return top


def normalized(scores: Sequence[float]) -> np.ndarray:
    """(n,) min-max normalized scores in [0, 1] (all 1 when they are equal: no preference among them)."""
    s = np.asarray(scores, dtype=np.float64)
    if not len(s):
        return s
    lo, hi = float(s.min()), float(s.max())
    return np.ones_like(s) if hi - lo <= 0 else (s - lo) / (hi - lo)


_NON_WORD = re.compile(r"[\W_]+")


def normalize_query(text: str) -> str:
    """Lower case, punctuation and spacing collapsed: the key of exact restatements."""
    return _NON_WORD.sub(" ", text).strip().lower()


def drop_restatements(question: str, queries: Sequence[str], *, question_vec: np.ndarray | None = None,
                      query_vecs: np.ndarray | None = None, threshold: float = 0.97) -> list[int]:
    """Indices of ``queries`` to keep: not a restatement of ``question`` nor of an earlier kept query.

    A query restates another when both normalize to the same words, or (given normalized embeddings
    ``question_vec`` ``(dim,)`` and ``query_vecs`` ``(n, dim)``) when their cosine is at least ``threshold``.
    """
    qkey = normalize_query(question)
    keep: list[int] = []
    seen = {qkey}
    for i, q in enumerate(queries):
        key = normalize_query(q)
        if not key or key in seen:
            continue
        if question_vec is not None and query_vecs is not None:
            v = query_vecs[i]  # (dim,)
            if float(v @ question_vec) >= threshold:
                continue
            if keep and float((query_vecs[keep] @ v).max()) >= threshold:  # (kept,) cosines
                continue
        seen.add(key)
        keep.append(i)
    return keep
