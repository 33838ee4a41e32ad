"""From a question and the memory's clues to fused evidence: one code path for the facade, the query engine and
the evaluation.

    clues -> sources -> drop restatements -> grounding -> rankings -> fuse

* **Sources.** The question, recalled spans, surrogate questions, the draft answer, key points, and attention
  pointers (chunks the question attends to inside the memory, :mod:`memorag_core.memory.pointers`) are the
  sources of a :class:`ClueSet`. Labels a small model writes in front of a line (``Question:``, ``Answer:``) are
  stripped; lines of fewer than ``min_words`` words are dropped.
* **Restatements.** A clue query that restates the question (same words, or an embedding nearly identical) or an
  earlier clue is dropped (:func:`memorag_core.retrieval.fusion.drop_restatements`).
* **Grounding.** A recalled span that matches corpus text (most of its word trigrams occur in one chunk) points
  at that chunk directly (source ``grounded``); a span that matches nothing is a hallucination or a paraphrase
  and is searched densely with the weight of ``span`` (which the default keeps low; 0 drops it).
* **Rankings and fusion.** Every remaining query ranks ``depth`` chunks; the rankings are fused by weighted
  reciprocal rank (:func:`memorag_core.retrieval.fusion.fuse`), where the question's ranking counts most.

Passage keys are whatever ``search`` returns (row numbers of the index).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from memorag_core.errors import InvalidInputError
from memorag_core.retrieval.fusion import Fused, FusionConfig, Ranking, drop_restatements, fuse, normalize_query

#: ``search(vectors (n, dim), depth) -> (scores (n, k), keys (n, k))``; key -1 marks an empty slot
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
#: ``embed(texts) -> (n, dim)`` normalized query vectors
EmbedFn = Callable[[list[str]], np.ndarray]
#: ``passage_vectors(keys) -> (n, dim)`` normalized vectors of indexed passages (pseudo-relevance feedback)
PassageVecsFn = Callable[[list[Hashable]], np.ndarray]

_LABEL = re.compile(r"^\s*(?:question|answer|span|text|evidence|clue)\s*\d*\s*[:：]\s*", re.IGNORECASE)


@dataclass
class ClueSet:
    """What the memory wrote for one question (any field may be empty).

    Attributes:
        spans: recalled text spans. surrogates: surrogate questions. draft: the draft answer; drafts: more
        draft answers (one per further unit), each a query of its own.
        key_points: key points (summaries). pointers: (chunk key, score) pointed at by attention, best first.
        extra: more (source, text) queries from outside the memory (sessions, user memories).
    """

    spans: list[str] = field(default_factory=list)
    surrogates: list[str] = field(default_factory=list)
    draft: str | None = None
    drafts: list[str] = field(default_factory=list)
    key_points: list[str] = field(default_factory=list)
    pointers: list[tuple[Hashable, float]] = field(default_factory=list)
    extra: list[tuple[str, str]] = field(default_factory=list)
    """more (source, text) queries, e.g. a conversation's ``session`` and ``user`` queries; always used."""


@dataclass
class PlanConfig:
    """How clues become rankings.

    Attributes:
        sources: the clue sources used (subset of span, surrogate, draft, key_point, pointer); the question always.
        min_words: a clue line needs more than this many words (English; CJK lines need more characters).
        restatement_threshold: cosine at or above which a clue restates the question or an earlier clue.
        ground_spans: look recalled spans up in the corpus (needs a :class:`CorpusGrounder`).
        ground_min_overlap: share of a span's word trigrams that must occur in a chunk for it to ground there.
        pointer_depth: pointed chunks used as the pointer ranking.
        pointer_layers: memory-model layers whose attention points (None: all); see memorag_core.memory.pointers.
        pointer_normalize: ``mean`` (mass per kept entry), ``sqrt`` or ``sum`` (favours long chunks).
        depth: chunks per dense ranking before fusion (at least the budget).
        fusion: the fusion weights and constant.
        text_clues: the ``memorag`` task decodes text clues (spans, surrogate questions) from the routed units'
            memories and retrieves with them too. Off by default: with the embedded 135M model they cost ~25 s of
            decoding per query on a 2-core CPU and moved held-out R@3 by -3.5 (docs/evaluation.md). A request
            with ``use_draft`` decodes them (with the draft) whatever this says.
        rerank_candidates: the ``memorag`` task retrieves this many fused candidates (at least ``top_k``) and the
            memory model's calibrated attention re-ranks them (:mod:`memorag_core.retrieval.rerank`) before the
            budget is cut; 0 turns re-ranking off. A memory model without a head set is not re-ranked (logged once;
            the result then has no ``rerank`` timing).
        rerank_weight: the attention ranking's weight against the retrieval's own (1) in the no-loss score
            interpolation (``fusion.method="interpolate"``); 0 gives the retrieval's order back.
        rerank_gate: drop the attention ranking for a query whose confidence (top-1 gap over the spread) is below.
        rerank_prefix: read the candidates after the first routed unit's compressed memory (a new user turn of
            its conversation) instead of in a fresh chat.
        rerank_max_tokens: most candidate tokens the re-ranker reads (each candidate is cut to an equal share),
            which bounds its cost and keeps the reading inside the memory model's context.
        bridge_weight: > 0 adds the bridge span (issue 21): the span of highest calibrated attention inside the
            ``bridge_slots`` candidates the attention ranks first (``bridge_width`` tokens, widened to words)
            joins the question as one more retrieval query (source ``bridge``), whose ranking is interpolated at
            this weight at equal passages. 0 (default): measured no gain (docs/evaluation.md, Sessions 8 and 11).
        prf_alpha: > 0 turns on dense pseudo-relevance feedback, a control with no model: the question's vector
            moves toward its top passage's (``q + alpha * p``, renormalized) before it ranks. Any task. 0: off.
        evidence_order: the order in which the re-ranked ``top_k`` reach the generator: ``retrieval`` (default:
            the passages the re-ranking kept, in the retrieval's order before re-ranking) or ``ranked`` (best
            first). Chosen on dev (docs/evaluation.md, Session 11): the embedded 135M generator answered better
            from the retrieval's order (F1 +0.4 per question; the same evidence set, so recall is unchanged).
    """

    # pointers are opt-in until measured on a real sample (docs/evaluation.md, session 5): add "pointer" and set
    # pointer_layers to use them
    sources: tuple[str, ...] = ("span", "surrogate", "draft", "key_point")
    min_words: int = 3
    restatement_threshold: float = 0.97
    ground_spans: bool = True
    ground_min_overlap: float = 0.5
    pointer_depth: int = 3
    pointer_layers: tuple[int, ...] | None = None
    pointer_normalize: str = "mean"
    depth: int = 10
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # the memorag task's default (issue 21, docs/evaluation.md Session 10): attention re-ranking of 20 candidates
    # with the weight tuned on dev (16: the attention decides, the retrieval's scores break near-ties); text clues
    # opt-in
    text_clues: bool = False
    rerank_candidates: int = 20
    rerank_weight: float = 16.0
    rerank_gate: float = 0.0
    rerank_prefix: bool = False
    rerank_max_tokens: int = 6144
    bridge_weight: float = 0.0
    bridge_slots: int = 1
    bridge_width: int = 2
    prf_alpha: float = 0.0
    evidence_order: str = "retrieval"

    def __post_init__(self) -> None:
        bad = [s for s in self.sources if s not in ("span", "surrogate", "draft", "key_point", "pointer")]
        if bad:
            raise InvalidInputError(f"unknown clue sources {bad}")
        if not 0 < self.ground_min_overlap <= 1 or self.depth < 1 or self.pointer_depth < 0:
            raise InvalidInputError("ground_min_overlap must be in (0, 1], depth >= 1, pointer_depth >= 0")
        if self.rerank_candidates < 0 or self.rerank_weight < 0 or not 0 <= self.rerank_gate <= 1:
            raise InvalidInputError("rerank_candidates and rerank_weight must be >= 0, rerank_gate in [0, 1]")
        if self.rerank_max_tokens < 256:
            raise InvalidInputError(f"rerank_max_tokens must be >= 256, got {self.rerank_max_tokens}")
        if self.bridge_weight < 0 or self.bridge_slots < 1 or self.bridge_width < 1 or self.prf_alpha < 0:
            raise InvalidInputError("bridge_weight and prf_alpha must be >= 0, bridge_slots and bridge_width >= 1")
        if self.evidence_order not in ("ranked", "retrieval"):
            raise InvalidInputError(f"evidence_order must be 'ranked' or 'retrieval', got {self.evidence_order!r}")

    @property
    def reranks(self) -> bool:
        """Whether the memorag task re-ranks its candidates with the memory model's attention."""
        return self.rerank_candidates > 0

    def decodes_clues(self, use_draft: bool) -> bool:
        """Whether the memorag task decodes text clues: the plan asks for them, or the request wants a draft
        (the composition's clue step and the per-question evaluation follow this one rule)."""
        return self.text_clues or use_draft

    def to_dict(self) -> dict:
        """JSON-able settings (what a report records and :meth:`from_dict` reads back)."""
        import dataclasses

        d = dataclasses.asdict(self)
        d["sources"] = list(self.sources)
        d["pointer_layers"] = list(self.pointer_layers) if self.pointer_layers is not None else None
        return d

    @classmethod
    def from_dict(cls, data: "dict | PlanConfig | None") -> "PlanConfig":
        """Settings from a dict (a JSON file, a serve config's ``retriever.plan``, an evaluation config); fields
        left out keep their defaults, ``fusion`` fields too. Raises InvalidInputError naming an unknown field."""
        if isinstance(data, cls):
            return data
        data = dict(data or {})
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(data) - known)
        if bad:
            raise InvalidInputError(f"unknown retrieval plan settings {bad}; known: {sorted(known)}")
        fusion = data.pop("fusion", None)
        if fusion is not None and not isinstance(fusion, FusionConfig):
            fknown = set(FusionConfig.__dataclass_fields__)
            fbad = sorted(set(fusion) - fknown)
            if fbad:
                raise InvalidInputError(f"unknown fusion settings {fbad}; known: {sorted(fknown)}")
            weights = {**FusionConfig().weights, **dict(fusion.get("weights") or {})}
            fusion = FusionConfig(**{**fusion, "weights": weights})
        if "sources" in data:
            data["sources"] = tuple(data["sources"])
        if data.get("pointer_layers") is not None:
            data["pointer_layers"] = tuple(data["pointer_layers"])
        return cls(**data, **({"fusion": fusion} if fusion is not None else {}))


def load_plan_config(path: str | None) -> PlanConfig:
    """A :class:`PlanConfig` from a JSON file, or a JSON object given inline (None: the defaults). The CLI's
    ``--plan``, the evaluation's and the serve config's ``retriever.plan`` all read the same fields."""
    from memorag_core.errors import read_json_object

    if path is None:
        return PlanConfig()
    return PlanConfig.from_dict(read_json_object(path, f"retrieval plan settings {path}", inline=True))


@dataclass
class Plan:
    """The queries a question and its clues became, and what was dropped (for reports).

    Attributes:
        queries: (source, text) searched densely, the question first.
        grounded: (span, [(chunk key, overlap)]) for spans found in the corpus.
        dropped: (source, text, reason).
    """

    queries: list[tuple[str, str]]
    grounded: list[tuple[str, list[tuple[Hashable, float]]]]
    dropped: list[tuple[str, str, str]]


def clean_clue(text: str) -> str:
    """A clue line without the label a small model writes before it (``Question: ...``)."""
    return _LABEL.sub("", text).strip()


def _long_enough(text: str, min_words: int) -> bool:
    if re.search(r"[\u4e00-\u9fff]", text):
        return len(text) > min_words
    return len(text.split()) > min_words


def _trigrams(text: str) -> list[tuple[str, ...]]:
    words = normalize_query(text).split()
    return [tuple(words[i:i + 3]) for i in range(len(words) - 2)]


class CorpusGrounder:
    """Finds the chunks that hold a recalled span (word-trigram overlap against an inverted index).

    Args:
        texts: the chunk texts. keys: their keys (default: positions 0..n-1).
    """

    def __init__(self, texts: Sequence[str], keys: Sequence[Hashable] | None = None) -> None:
        self.keys = list(keys) if keys is not None else list(range(len(texts)))
        if len(self.keys) != len(texts):
            raise InvalidInputError(f"{len(texts)} chunk texts but {len(self.keys)} keys")
        self._index: dict[tuple[str, ...], set[int]] = defaultdict(set)
        for i, t in enumerate(texts):
            for g in _trigrams(t):
                self._index[g].add(i)

    def ground(self, span: str, min_overlap: float = 0.5) -> list[tuple[Hashable, float]]:
        """(chunk key, share of the span's distinct trigrams found in it), best first, those >= ``min_overlap``."""
        grams = set(_trigrams(span))
        if not grams:
            return []
        hits: dict[int, int] = defaultdict(int)
        for g in grams:
            for i in self._index.get(g, ()):
                hits[i] += 1
        out = [(self.keys[i], n / len(grams)) for i, n in hits.items() if n / len(grams) >= min_overlap]
        return sorted(out, key=lambda kv: -kv[1])


def plan_queries(question: str | None, clues: ClueSet, config: PlanConfig, *, embed: EmbedFn | None = None,
                 grounder: CorpusGrounder | None = None) -> tuple[Plan, np.ndarray | None]:
    """Clues -> sources -> restatements dropped -> spans grounded. Returns the plan and the embeddings of its
    dense queries ``(len(plan.queries), dim)`` (None without ``embed``)."""
    cand: list[tuple[str, str]] = []
    dropped: list[tuple[str, str, str]] = []
    lists = {"span": clues.spans, "surrogate": clues.surrogates, "key_point": clues.key_points,
             "draft": ([clues.draft] if clues.draft else []) + [d for d in clues.drafts if d]}
    for source in ("span", "surrogate", "draft", "key_point"):
        if source not in config.sources:
            continue
        for raw in lists[source]:
            text = clean_clue(raw)
            # a draft answer is often a short name: keep it; clue lines need words to retrieve with
            if source != "draft" and not _long_enough(text, config.min_words):
                dropped.append((source, raw, "too short"))
            elif text:
                cand.append((source, text))
    for source, raw in clues.extra:
        text = clean_clue(raw)
        if text:
            cand.append((source, text))
    queries = [("question", question)] if question else []
    texts = [q for _, q in queries] + [t for _, t in cand]
    if not texts:
        raise InvalidInputError("nothing to retrieve with: no question and no clues")
    vecs = embed(texts) if embed is not None else None  # (n, dim)
    qv = vecs[0] if (vecs is not None and question) else None
    rest = vecs[len(queries):] if vecs is not None else None
    keep = drop_restatements(question or "", [t for _, t in cand], question_vec=qv, query_vecs=rest,
                             threshold=config.restatement_threshold)
    kept_set = set(keep)
    dropped += [(s, t, "restates the question or an earlier clue") for i, (s, t) in enumerate(cand)
                if i not in kept_set]
    grounded: list[tuple[str, list[tuple[Hashable, float]]]] = []
    rows = list(range(len(queries)))
    for i in keep:
        source, text = cand[i]
        if source == "span" and config.ground_spans and grounder is not None:
            found = grounder.ground(text, config.ground_min_overlap)
            if found:
                grounded.append((text, found))
                continue
        queries.append((source, text))
        rows.append(len(queries) - 1 if vecs is None else len([q for q in (question,) if q]) + i)
    if vecs is not None:
        vecs = vecs[rows]  # (len(queries), dim)
    return Plan(queries, grounded, dropped), vecs


def _ranking(source: str, text: str, s_row, k_row) -> Ranking:
    pairs = [(k, float(s)) for k, s in zip(list(k_row), list(s_row)) if not (isinstance(k, (int, np.integer))
                                                                           and k < 0)]
    return Ranking(source, text, [k.item() if hasattr(k, "item") else k for k, _ in pairs], [s for _, s in pairs])


def rankings_for(plan: Plan, vecs: np.ndarray, search: SearchFn, clues: ClueSet, config: PlanConfig,
                 passage_vectors: PassageVecsFn | None = None) -> list[Ranking]:
    """Rankings of the dense queries (``search``), the grounded spans and the attention pointers.

    With ``config.prf_alpha`` > 0 the question's ranking is that of its vector moved toward its top passage's
    (``passage_vectors`` gives it; dense pseudo-relevance feedback)."""
    rankings: list[Ranking] = []
    if plan.queries:
        scores, keys = search(vecs, config.depth)  # (nq, k), (nq, k)
        for (source, text), s_row, k_row in zip(plan.queries, scores, keys):
            # a span that matched no corpus text is searched as source "span" (ungrounded): its weight decides
            rankings.append(_ranking(source, text, s_row, k_row))
        first = rankings[0]
        if config.prf_alpha > 0 and plan.queries[0][0] == "question" and len(first.keys):
            if passage_vectors is None:
                raise InvalidInputError("prf_alpha needs the passages' vectors; this retriever gives none")
            v = vecs[0] + config.prf_alpha * passage_vectors([first.keys[0]])[0]  # (dim,)
            v = (v / max(float(np.linalg.norm(v)), 1e-12)).astype(vecs.dtype, copy=False)
            s2, k2 = search(v[None, :], config.depth)  # (1, k), (1, k)
            rankings[0] = _ranking("question", first.query, s2[0], k2[0])
    for text, found in plan.grounded:
        rankings.append(Ranking("grounded", text, [k for k, _ in found], [s for _, s in found]))
    if "pointer" in config.sources and clues.pointers and config.pointer_depth:
        top = clues.pointers[: config.pointer_depth]
        rankings.append(Ranking("pointer", "(attention pointers)", [k for k, _ in top], [s for _, s in top]))
    return rankings


def fused_evidence(question: str | None, clues: ClueSet, *, embed: EmbedFn, search: SearchFn, top_k: int,
                   config: PlanConfig | None = None, grounder: CorpusGrounder | None = None,
                   passage_vectors: PassageVecsFn | None = None) -> tuple[list[Fused], Plan]:
    """The ``top_k`` fused passages for ``question`` and ``clues``, and the plan that produced them."""
    config = config or PlanConfig()
    plan, vecs = plan_queries(question, clues, config, embed=embed, grounder=grounder)
    if vecs is None:
        raise InvalidInputError("fused_evidence needs an embed function")
    rankings = rankings_for(plan, vecs, search, clues, PlanConfig(**{**config.__dict__,
                                                                    "depth": max(config.depth, top_k)}),
                            passage_vectors)
    return fuse(rankings, config.fusion, limit=top_k), plan
