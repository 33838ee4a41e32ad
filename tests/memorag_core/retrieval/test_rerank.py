"""Attention re-ranking: calibrated attention per head and candidate, head sets, head selection, bridge spans."""

from __future__ import annotations

import numpy as np
import pytest

from memorag_core.errors import HeadSetMismatchError, InvalidInputError
from memorag_core.retrieval.rerank import (
    AttentionReranker,
    HeadSet,
    RerankConfig,
    attention_confidence,
    choose_head_count,
    default_heads,
    model_fingerprint,
    passage_line,
    reading_order,
    recall_at,
    select_heads,
)

LINES = [
    passage_line("Tulsa", "Tulsa: Tulsa is the second-largest city in the state of Oklahoma."),
    passage_line("Tinted Windows", "Tinted Windows: Tinted Windows was an American power pop supergroup."),
    passage_line("Ants Marching", "Ants Marching: Ants Marching is a song by the Dave Matthews Band."),
]
QUESTION = "Where did the band Tinted Windows first perform?"


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    from memorag_core.models import LoadOptions, load_causal_lm

    return load_causal_lm(str(tiny_lm_dir), LoadOptions(device="cpu", dtype="float32"))


def every_head(model) -> HeadSet:
    c = model.config
    return HeadSet(tuple((a, b) for a in range(c.num_hidden_layers) for b in range(c.num_attention_heads)),
                   model_fingerprint(model), "tiny")


def test_reading_has_one_calibrated_score_per_head_and_candidate(tiny):
    model, tok = tiny
    rr = AttentionReranker(model, tok, every_head(model))
    r = rr.read(QUESTION, LINES)
    heads = model.config.num_hidden_layers * model.config.num_attention_heads  # 2 x 4
    assert r.head_scores.shape == (heads, 3)
    tokens = len(r.token_candidate)
    assert r.token_scores.shape == (heads, tokens) and r.token_chars.shape == (tokens, 2)
    assert sorted(set(r.token_candidate.tolist())) == [0, 1, 2]
    # a candidate's score is the sum of its tokens' calibrated attention
    for i in range(3):
        np.testing.assert_allclose(r.head_scores[:, i], r.token_scores[:, r.token_candidate == i].sum(axis=1),
                                   rtol=1e-5, atol=1e-7)
    assert rr.scores(QUESTION, LINES).shape == (3,)
    assert np.abs(r.head_scores).max() > 0


def test_the_null_query_is_subtracted(tiny):
    model, tok = tiny
    plain = AttentionReranker(model, tok, every_head(model))
    same = AttentionReranker(model, tok, every_head(model), RerankConfig(null_query=QUESTION))
    # asking the null query itself: the calibrated attention is exactly zero everywhere
    assert np.abs(same.read(QUESTION, LINES).token_scores).max() == 0.0
    assert np.abs(plain.read(QUESTION, LINES).token_scores).max() > 0.0


def test_reading_fewer_layers_gives_the_same_rows_and_zeros_after(tiny):
    model, tok = tiny
    rr = AttentionReranker(model, tok, every_head(model))
    full, first = rr.read(QUESTION, LINES), rr.read(QUESTION, LINES, layers=1)
    h = model.config.num_attention_heads
    np.testing.assert_allclose(first.head_scores[:h], full.head_scores[:h], rtol=1e-5, atol=1e-7)
    assert np.abs(first.head_scores[h:]).max() == 0.0
    only_layer0 = AttentionReranker(model, tok, HeadSet(((0, 1), (0, 3)), model_fingerprint(model)))
    assert only_layer0.needed_layers() == 1
    np.testing.assert_allclose(only_layer0.scores(QUESTION, LINES), full.head_scores[[1, 3]].sum(axis=0),
                               rtol=1e-5, atol=1e-7)


def test_rerank_reads_weakest_first_and_returns_every_key(tiny):
    model, tok = tiny
    rr = AttentionReranker(model, tok, every_head(model))
    dense = [0.2, 0.9, 0.5]
    assert reading_order(dense).tolist() == [0, 2, 1]  # strongest read last, nearest the query
    ranked = rr.rerank(QUESTION, ["t", "w", "a"], LINES, dense)
    assert sorted(k for k, _ in ranked) == ["a", "t", "w"]
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    # the scores are those of reading the lines in that order
    direct = rr.scores(QUESTION, [LINES[0], LINES[2], LINES[1]])
    got = dict(ranked)
    np.testing.assert_allclose([got["t"], got["a"], got["w"]], direct, rtol=1e-5, atol=1e-7)
    with pytest.raises(InvalidInputError, match="must match"):
        rr.rerank(QUESTION, ["t"], LINES, dense)
    with pytest.raises(InvalidInputError, match="no candidates"):
        rr.read(QUESTION, [])


def test_a_prefix_memory_is_read_first_and_left_unchanged(tiny):
    from memorag_core.memory import MemoryConfig, build_memory

    model, tok = tiny
    rr = AttentionReranker(model, tok, every_head(model))
    memory = build_memory(MemoryConfig(ratio=2, window=64), model=model, tokenizer=tok)
    memory.memorize(" ".join(LINES) * 3)
    keys = [layer.keys.clone() for layer in memory.cache.layers]
    entries = memory.entries
    with_memory = rr.read(QUESTION, LINES, memory)
    assert memory.entries == entries
    assert all(layer.keys.shape == k.shape and bool((layer.keys == k).all())
               for layer, k in zip(memory.cache.layers, keys))
    assert not np.allclose(with_memory.head_scores, rr.read(QUESTION, LINES).head_scores)
    np.testing.assert_allclose(rr.read(QUESTION, LINES, memory).head_scores, with_memory.head_scores, rtol=1e-5,
                               atol=1e-7)


def test_head_set_json_round_trip_and_fingerprint_check(tiny, tiny_qwen_dir, tmp_path):
    from memorag_core.models import LoadOptions, load_causal_lm

    model, tok = tiny
    hs = HeadSet(((1, 2), (0, 3)), model_fingerprint(model), "tiny", {"questions": "1-100"})
    hs.save(tmp_path / "h.json")
    back = HeadSet.load(tmp_path / "h.json")
    assert back == hs and back.top(1).heads == ((1, 2),)
    back.check(model)
    other, _ = load_causal_lm(str(tiny_qwen_dir), LoadOptions(device="cpu", dtype="float32"))
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(HeadSetMismatchError, match="select_heads"):
        back.check(other)
    with pytest.raises(HeadSetMismatchError, match="do not exist"):
        HeadSet(((5, 0),), model_fingerprint(model)).check(model)
    with pytest.raises(HeadSetMismatchError, match="no packaged head set"):
        default_heads(model)  # nothing ships for a random tiny model
    with pytest.raises(HeadSetMismatchError):
        AttentionReranker(other, tok, hs)
    (tmp_path / "bad.json").write_text('{"heads": [[0]]}')
    with pytest.raises(InvalidInputError, match="cannot read"):
        HeadSet.load(tmp_path / "bad.json")


def test_head_selection_finds_the_informative_heads():
    rng = np.random.default_rng(0)
    scores, golds = [], []
    for _ in range(40):
        gold = np.zeros(10, dtype=bool)
        gold[rng.choice(10, 2, replace=False)] = True
        s = rng.normal(size=(6, 10))  # 6 heads of noise...
        s[4] += 3.0 * gold  # ...but head 4 points at the gold passages, head 1 a little
        s[1] += 1.0 * gold
        scores.append(s)
        golds.append(gold)
    assert recall_at(scores[0][4], golds[0], 3) == 1.0
    assert recall_at(np.array([[0.0, 1.0, 2.0]]), np.array([True, False, False]), 1, n_gold=2).tolist() == [0.0]
    count, cv = choose_head_count(scores, golds, counts=(1, 2, 4, 6))
    assert count in (1, 2) and cv[count] > cv[6]
    hs = select_heads(scores, golds, heads_per_layer=3, fingerprint="fp", count=2)
    assert hs.heads == ((1, 1), (0, 1))  # rows 4 and 1 as (layer, head) with 3 heads per layer
    assert hs.meta["recall_alone"][0] > 0.9 and hs.meta["questions"] == 40


def test_bridge_span_comes_from_the_passage_body(tiny):
    model, tok = tiny
    rr = AttentionReranker(model, tok, every_head(model))
    r = rr.read(QUESTION, LINES)
    span = rr.bridge_span(r, LINES, [1], width=2)
    body = LINES[1][LINES[1].index("] ") + 2:]
    assert span and span in body
    # the chosen heads' attention decides: putting all weight on the second passage's last token picks it
    r.token_scores[:] = 0.0
    last = np.flatnonzero(r.token_candidate == 1)[-3]
    r.token_scores[:, last] = 1.0
    a, b = r.token_chars[last]
    assert LINES[1][a:b].strip(" .") in rr.bridge_span(r, LINES, [0, 1], width=1)


def test_attention_confidence():
    assert attention_confidence([1.0, 0.0, 0.0]) == 1.0
    assert attention_confidence([1.0, 1.0, 0.0]) == 0.0
    assert attention_confidence([3.0, 2.0, 1.0]) == pytest.approx(0.5)
    assert attention_confidence([2.0]) == 0.0


@pytest.mark.slow
def test_packaged_heads_rerank_hotpotqa_with_the_embedded_model(embedded_lm_dir, shared_data_dir, minilm_embedder):
    """The shipped head set loads for the embedded SmolLM2 without naming it, and its calibrated attention puts
    gold paragraphs in the top 3 far above chance (3 in 10) on dev questions (its calibration slice)."""
    from memorag_core.eval.datasets import load_examples
    from memorag_core.models import LoadOptions, load_causal_lm

    model, tok = load_causal_lm(str(embedded_lm_dir), LoadOptions(device="cpu", dtype="bfloat16"))
    rr = AttentionReranker(model, tok)  # default_heads: the packaged JSON
    assert rr.heads.fingerprint == model_fingerprint(model) and "dev" in rr.heads.meta["calibration"]
    assert rr.needed_layers() < model.config.num_hidden_layers + 1
    recalls = []
    for ex in load_examples(shared_data_dir / "hotpotqa_dev_300.jsonl")[:8]:
        passages = list(ex.passages)
        dense = minilm_embedder.encode([p.text for p in passages]) @ minilm_embedder.encode([ex.question],
                                                                                           is_query=True)[0]
        ranked = rr.rerank(ex.question, list(range(len(passages))), [passage_line(p.title, p.text) for p in passages],
                           dense)
        gold = np.array([p.title in ex.supporting_titles for p in passages])
        recalls.append(gold[[k for k, _ in ranked[:3]]].sum() / gold.sum())
    assert np.mean(recalls) >= 0.55


def test_attention_fusion_at_weight_zero_is_plain_rag_and_otherwise_follows_attention():
    from memorag_core.retrieval.fusion import Ranking, fuse
    from memorag_core.retrieval.rerank import attention_fusion, attention_ranking

    dense = Ranking("question", "q", ["a", "b", "c"], [0.9, 0.5, 0.4])
    att = attention_ranking("q", [("c", 2.0), ("b", 0.1), ("a", 0.0)])
    assert att.confidence == pytest.approx(0.95)
    assert [f.key for f in fuse([dense, att], attention_fusion(0.0, 0.0, 0.0))] == ["a", "b", "c"]
    assert [f.key for f in fuse([dense, att], attention_fusion(4.0, 0.0, 0.0))][0] == "c"
    assert [f.key for f in fuse([dense, att], attention_fusion(4.0, 0.99, 0.0))][0] == "a"  # gated out


def test_per_head_capture_averages_to_the_kv_head_capture(tiny):
    import torch

    from memorag_core.memory import scoring

    model, tok = tiny
    AttentionReranker(model, tok, every_head(model))  # switches the model to memorag_sdpa
    ids = torch.tensor([tok(QUESTION, add_special_tokens=False)["input_ids"]])  # (1, n)
    with torch.no_grad():
        with scoring.capture_scores(4, per_head=True) as per_head:
            model(input_ids=ids)
        with scoring.capture_scores(4) as per_kv:
            model(input_ids=ids)
    c = model.config
    group = c.num_attention_heads // c.num_key_value_heads
    for layer in range(c.num_hidden_layers):
        assert per_head[layer].shape == (1, c.num_attention_heads, ids.shape[1])
        grouped = per_head[layer].view(1, c.num_key_value_heads, group, -1).mean(dim=2)  # query head h -> h // group
        torch.testing.assert_close(grouped, per_kv[layer])


def test_task_frame_is_what_task_ids_encodes(tiny):
    from memorag_core.memory import MemoryConfig, build_memory

    model, tok = tiny
    memory = build_memory(MemoryConfig(ratio=2, window=64), model=model, tokenizer=tok)
    memory.memorize(LINES[0])
    before, after = memory.task_frame()
    assert memory.task_ids("TASK") == tok(before + "TASK" + after, add_special_tokens=False)["input_ids"]
