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
