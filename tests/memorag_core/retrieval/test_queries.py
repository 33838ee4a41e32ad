"""The shared retrieval path: clues -> sources -> restatements dropped -> grounding -> rankings -> fusion."""

from __future__ import annotations

import numpy as np
import pytest

from memorag_core.errors import InvalidInputError
from memorag_core.retrieval.fusion import FusionConfig
from memorag_core.retrieval.queries import (
    ClueSet,
    CorpusGrounder,
    PlanConfig,
    clean_clue,
    fused_evidence,
    plan_queries,
)

CHUNKS = [
    "Tinted Windows (band): Tinted Windows was an American rock supergroup. Their first show was in Tulsa.",
    "Tinted Windows (album): Tinted Windows is the debut album by the band Tinted Windows, released in 2009.",
    "The Delta Machine Tour: a concert tour by Depeche Mode in support of their thirteenth album.",
    "Ants Marching: a song by the Dave Matthews Band, released as the second single of their album.",
]


class FakeIndex:
    """Embeds a text as a bag of its words (hashed), normalized; searches by inner product."""

    dim = 256

    def embed(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace(":", " ").replace(".", " ").replace("?", " ").split():
                out[i, hash(w) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def __init__(self, chunks):
        self.vecs = self.embed(chunks)

    def search(self, q, depth):
        sims = q @ self.vecs.T  # (nq, n)
        order = np.argsort(-sims, axis=1)[:, :depth]
        return np.take_along_axis(sims, order, axis=1), order


@pytest.fixture()
def index():
    return FakeIndex(CHUNKS)


def test_a_hallucinated_span_does_not_push_out_the_questions_best_hit(index):
    # The span reads like passage 2 (raw cosine higher than any of the question's hits); the union-by-max rule
    # used before ranked it first. Fusion keeps the question's own best hit on top.
    q = "Where did the band Tinted Windows play their first show?"
    span = "The Delta Machine Tour: a concert tour by Depeche Mode in support of their thirteenth album"
    fused, plan = fused_evidence(q, ClueSet(spans=[span]), embed=index.embed, search=index.search, top_k=1,
                                 config=PlanConfig(ground_spans=False))
    assert fused[0].key == index.search(index.embed([q]), 1)[1][0, 0]
    assert "question" in fused[0].sources


def test_restatements_of_the_question_are_dropped(index):
    q = "Where did Tinted Windows play first?"
    clues = ClueSet(surrogates=["Question: where did Tinted Windows play first", "Which city hosted the first show "
                                "of the supergroup?"])
    plan, vecs = plan_queries(q, clues, PlanConfig(), embed=index.embed)
    assert [s for s, _ in plan.queries] == ["question", "surrogate"]
    assert plan.queries[1][1].startswith("Which city")
    assert any("restates" in reason for _, _, reason in plan.dropped)
    assert vecs.shape == (2, index.dim)


def test_a_span_found_in_the_corpus_points_at_its_chunk(index):
    grounder = CorpusGrounder(CHUNKS)
    span = "Tinted Windows was an American rock supergroup. Their first show was in Tulsa"
    plan, _ = plan_queries("Where was the first show?", ClueSet(spans=[span, "Completely made up words about "
                                                                     "nothing in the corpus"]),
                           PlanConfig(), embed=index.embed, grounder=grounder)
    assert [g[1][0][0] for g in plan.grounded] == [0]
    assert [s for s, _ in plan.queries] == ["question", "span"]  # the ungrounded span is searched, down-weighted
    fused, _ = fused_evidence("Where was the first show?", ClueSet(spans=[span]), embed=index.embed,
                              search=index.search, top_k=2, grounder=grounder)
    assert 0 in [f.key for f in fused]
    assert any("grounded" in f.sources for f in fused)


def test_an_ungrounded_span_of_weight_zero_adds_nothing(index):
    q = "Which album did Depeche Mode tour?"
    only_q, _ = fused_evidence(q, ClueSet(), embed=index.embed, search=index.search, top_k=4)
    cfg = PlanConfig(fusion=FusionConfig(weights={**FusionConfig().weights, "span": 0.0}))
    with_span, _ = fused_evidence(q, ClueSet(spans=["Ants song single album released by a famous band"]),
                                  embed=index.embed, search=index.search, top_k=4, config=cfg,
                                  grounder=CorpusGrounder(CHUNKS))
    assert [f.key for f in with_span] == [f.key for f in only_q]


def test_pointers_join_the_fusion_and_labels_are_cleaned(index):
    clues = ClueSet(pointers=[(3, 0.9), (1, 0.1)])
    off, _ = fused_evidence("Tell me about a song.", clues, embed=index.embed, search=index.search, top_k=4)
    assert not any("pointer" in f.sources for f in off)  # opt-in until measured
    fused, _ = fused_evidence("Tell me about a song.", clues, embed=index.embed, search=index.search, top_k=4,
                              config=PlanConfig(sources=("span", "pointer")))
    assert any("pointer" in f.sources for f in fused if f.key == 3)
    assert clean_clue("Question: who?") == "who?"
    assert clean_clue("Answer 2: Tulsa") == "Tulsa"
    with pytest.raises(InvalidInputError):
        PlanConfig(sources=("nonsense",))


def test_prf_moves_the_questions_vector_toward_its_top_passage(index):
    """Dense pseudo-relevance feedback (a control with no model): the question's ranking is that of
    q + alpha * (its top passage's vector), renormalized; alpha 0 is the question's own ranking."""
    q = "Tinted Windows first show"
    plain, _ = fused_evidence(q, ClueSet(), embed=index.embed, search=index.search, top_k=4)
    cfg = PlanConfig(prf_alpha=2.0)
    fused, _ = fused_evidence(q, ClueSet(), embed=index.embed, search=index.search, top_k=4, config=cfg,
                              passage_vectors=lambda keys: index.vecs[list(keys)])
    v = index.embed([q])[0] + 2.0 * index.vecs[plain[0].key]
    expected = np.argsort(-(index.vecs @ (v / np.linalg.norm(v))))[:4].tolist()
    assert [f.key for f in fused] == expected and fused[0].sources == ["question"]
    with pytest.raises(InvalidInputError, match="prf_alpha needs the passages"):
        fused_evidence(q, ClueSet(), embed=index.embed, search=index.search, top_k=4, config=cfg)
