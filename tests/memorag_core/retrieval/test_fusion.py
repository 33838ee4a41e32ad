"""Rank fusion: the question's own ranking counts most; restatements are dropped."""

import numpy as np
import pytest

from memorag_core.errors import InvalidInputError
from memorag_core.retrieval.fusion import FusionConfig, Ranking, drop_restatements, fuse


def test_hallucinated_span_cannot_outrank_the_questions_best_hit():
    # The span's hit has a higher raw cosine (it reads like a passage) than the question's gold hit; fusing by raw
    # maximum score (the old rule) puts it first. Weighted RRF keeps the question's gold first.
    question = Ranking("question", "q", ["gold", "b", "c"], [0.55, 0.50, 0.45])
    span = Ranking("span", "a confident but wrong span", ["fake", "c"], [0.92, 0.40])
    by_raw_max = sorted({"gold": 0.55, "b": 0.50, "c": 0.45, "fake": 0.92}.items(), key=lambda kv: -kv[1])
    assert by_raw_max[0][0] == "fake"
    fused = fuse([question, span], limit=3)
    order = [f.key for f in fused]
    full = [f.key for f in fuse([question, span])]
    assert full.index("gold") < full.index("fake") and "fake" not in order
    assert "gold" in order[:2]
    # 'c' is found by both the question and the span: the memory's agreement lifts it above 'b'
    assert full.index("c") < full.index("b")
    assert set(next(f for f in fused if f.key == "c").sources) == {"question", "span"}
    assert next(f for f in fused if f.key == "gold").sources == ["question"]


def test_many_clue_lines_share_one_source_weight():
    # Ten spans agreeing on 'x' weigh what one span source weighs, not ten times the question.
    question = Ranking("question", "q", ["gold"], [0.5])
    spans = [Ranking("span", f"s{i}", ["x"], [0.9]) for i in range(10)]
    fused = fuse([question] + spans)
    assert fused[0].key == "gold"


def test_question_floor_keeps_the_questions_top_hit_within_the_budget():
    cfg = FusionConfig(weights={"question": 0.1, "span": 1.0}, question_floor=1)
    question = Ranking("question", "q", ["q1", "q2"], [0.5, 0.4])
    spans = [Ranking("span", "s", ["a", "b", "c"], [0.9, 0.8, 0.7])]
    top = fuse([question] + spans, cfg, limit=2)
    assert "q1" in [f.key for f in top] and len(top) == 2
    no_floor = fuse([question] + spans, FusionConfig(weights={"question": 0.1, "span": 1.0}, question_floor=0),
                    limit=2)
    assert "q1" not in [f.key for f in no_floor]


def test_fuse_rejects_bad_input():
    with pytest.raises(InvalidInputError, match="keys but"):
        fuse([Ranking("question", "q", ["a", "b"], [0.1])])
    with pytest.raises(InvalidInputError, match="limit"):
        fuse([], limit=0)
    with pytest.raises(InvalidInputError, match="weights"):
        FusionConfig(weights={"span": -1})
    assert fuse([]) == []


def test_drop_restatements_by_words_and_by_embedding():
    q = "Who built the lighthouse?"
    queries = ["who built the LIGHTHOUSE", "The lighthouse keeper rowed supplies", "Who constructed the lighthouse?",
               "The lighthouse keeper rowed supplies."]
    assert drop_restatements(q, queries) == [1, 2]
    qv = np.array([1.0, 0.0], np.float32)
    vecs = np.array([[1, 0], [0, 1], [0.999, 0.04], [0, 1]], np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    assert drop_restatements(q, queries, question_vec=qv, query_vecs=vecs) == [1]


def test_interpolation_with_weight_zero_is_the_questions_ranking():
    # The attention ranking disagrees completely; at weight 0 it is left out, so the order is the question's own.
    question = Ranking("question", "q", ["a", "b", "c", "d"], [0.9, 0.7, 0.6, 0.1])
    attention = Ranking("attention", "q", ["d", "c", "b", "a"], [5.0, 4.0, 1.0, -2.0])
    cfg = FusionConfig(method="interpolate", weights={"question": 1.0, "attention": 0.0}, question_floor=0)
    assert [f.key for f in fuse([question, attention], cfg)] == ["a", "b", "c", "d"]
    assert [f.key for f in fuse([question, attention], cfg, limit=2)] == ["a", "b"]


def test_interpolation_sums_normalized_scores_with_the_source_weights():
    # normalized question: a 1, b 0.75, c 0; attention: c 1, b 0.5, a 0. Weight 1: b 1.25 > a 1 = c 1.
    question = Ranking("question", "q", ["a", "b", "c"], [0.9, 0.8, 0.5])
    attention = Ranking("attention", "q", ["c", "b", "a"], [3.0, 2.0, 1.0])
    cfg = FusionConfig(method="interpolate", weights={"question": 1.0, "attention": 1.0}, question_floor=0)
    fused = fuse([question, attention], cfg)
    assert fused[0].key == "b" and fused[0].score == pytest.approx(1.25)
    # RRF of the same two rankings sees only ranks: b (2nd twice) falls just behind a and c
    assert [f.key for f in fuse([question, attention], FusionConfig(weights=cfg.weights, question_floor=0))][2] == "b"
    # a strong attention weight follows the attention's order
    strong = FusionConfig(method="interpolate", weights={"question": 1.0, "attention": 3.0}, question_floor=0)
    assert [f.key for f in fuse([question, attention], strong)] == ["c", "b", "a"]


def test_confidence_gate_drops_an_unsure_ranking_but_never_the_question():
    question = Ranking("question", "q", ["a", "b"], [0.9, 0.8])
    unsure = Ranking("attention", "q", ["b", "a"], [2.0, 1.0], confidence=0.2)
    sure = Ranking("attention", "q", ["b", "a"], [2.0, 1.0], confidence=0.8)
    cfg = FusionConfig(method="interpolate", weights={"question": 1.0, "attention": 3.0}, gate=0.5,
                       question_floor=0)
    assert [f.key for f in fuse([question, unsure], cfg)] == ["a", "b"]
    assert [f.key for f in fuse([question, sure], cfg)] == ["b", "a"]
    gated_question = Ranking("question", "q", ["a", "b"], [0.9, 0.8], confidence=0.0)
    assert [f.key for f in fuse([gated_question], cfg)] == ["a", "b"]
    # the gate holds for RRF too
    rrf = FusionConfig(weights={"question": 1.0, "attention": 3.0}, gate=0.5, question_floor=0)
    assert [f.key for f in fuse([question, unsure], rrf)] == ["a", "b"]
    assert [f.key for f in fuse([question, sure], rrf)] == ["b", "a"]


def test_fusion_method_and_gate_are_validated():
    with pytest.raises(InvalidInputError, match="method"):
        FusionConfig(method="max")
    with pytest.raises(InvalidInputError, match="gate"):
        FusionConfig(gate=1.5)
