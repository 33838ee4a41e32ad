"""Mechanics of the KV memories on a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from memorag_core.errors import InvalidInputError, MemoryNotReadyError
from memorag_core.memory import MemoryConfig, build_memory
from memorag_core.memory import scoring
from memorag_core.models import load_causal_lm

@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    return load_causal_lm(str(tiny_lm_dir))


@pytest.fixture(scope="module")
def book(shared_data_dir):
    return (shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")


def make(tiny, **kw):
    model, tok = tiny
    kw.setdefault("window", 128)
    return build_memory(MemoryConfig(**kw), model, tok)


def test_kept_entries_per_window_is_ceil_window_over_ratio(tiny, book):
    text = book[:1600]
    for ratio in (2, 4, 7):
        mem = make(tiny, ratio=ratio, window=100)
        mem.memorize(text)
        n = len(mem._encode(text))
        prefix = len(mem.head_ids())
        windows = [min(100, n - s) for s in range(0, n, 100)]
        expected = prefix + sum(math.ceil(w / ratio) for w in windows)
        assert mem.entries == expected
        for layer in mem.cache.layers:
            assert layer.keys.shape[2] == expected and layer.values.shape[2] == expected
        assert mem.stats.raw_tokens == n
        # compact positions: the next token sits right after the kept entries
        assert mem.next_position == expected


def test_stored_memory_shrinks_by_about_the_ratio(tiny, book):
    text = book[:4000]
    full = make(tiny, ratio=1)
    full.memorize(text)
    for ratio in (4, 8):
        mem = make(tiny, ratio=ratio)
        mem.memorize(text)
        prefix_bytes = full.stats.nbytes * len(full.head_ids()) / full.entries
        shrink = (full.stats.nbytes - prefix_bytes) / (mem.stats.nbytes - prefix_bytes)
        assert ratio * 0.85 <= shrink <= ratio * 1.01, (ratio, shrink)
        context_entries = mem.entries - len(mem.head_ids())
        assert ratio * 0.9 <= mem.stats.raw_tokens / context_entries <= ratio


def test_ratio_one_generation_equals_whole_context_in_prompt(tiny, book):
    model, tok = tiny
    text = book[:2500]
    mem = make(tiny, kind="full_kv", ratio=1, window=200)  # windows must not change anything at ratio 1
    mem.memorize(text)
    question = "Who lives at number four, Privet Drive?"
    got = mem.generate(mem.prompts.qa, question, max_new_tokens=12)[0]

    ids = mem.head_ids() + mem._encode(text) + mem.task_ids(mem.prompts.qa.format(question=question))
    inputs = torch.tensor([ids])
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=12,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    want = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert got == want
    assert len(want) > 0


def test_append_equals_memorize_of_the_concatenation_at_ratio_one(tiny, book):
    a, b = book[:1500], book[1500:3000]
    # split at a whitespace boundary so that tokenizing a and b separately equals tokenizing a + b
    cut = a.rfind(" ")
    a, b = a[:cut], a[cut:] + b
    mem_ab = make(tiny, ratio=1, window=128)
    assert mem_ab._encode(a) + mem_ab._encode(b) == mem_ab._encode(a + b)
    mem_ab.memorize(a + b)
    mem_app = make(tiny, ratio=1, window=128)
    mem_app.append(a)
    mem_app.append(b)
    assert mem_app.entries == mem_ab.entries and mem_app.stats.raw_tokens == mem_ab.stats.raw_tokens
    for la, lb in zip(mem_app.cache.layers, mem_ab.cache.layers):
        torch.testing.assert_close(la.keys, lb.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(la.values, lb.values, rtol=1e-4, atol=1e-4)
    q = "What did Mr. Dursley do?"
    assert mem_app.answer(q, 10) == mem_ab.answer(q, 10)


def test_rerotation_equals_computing_at_the_new_position(tiny):
    """Layer-0 keys depend only on the token and its position: re-rotating p -> p+d must equal prefilling at p+d."""
    model, tok = tiny
    mem = make(tiny, ratio=2)
    ids = torch.tensor([tok("The cat sat on the mat today", add_special_tokens=False)["input_ids"]])
    n = ids.shape[1]

    def layer0_keys(start):
        from transformers import DynamicCache

        cache = DynamicCache()
        model(input_ids=ids, position_ids=torch.arange(start, start + n)[None], past_key_values=cache, use_cache=True)
        return cache.layers[0].keys  # (1, kv_heads, n, d)

    k_at_100, k_at_37 = layer0_keys(100), layer0_keys(37)
    delta = torch.full((1, k_at_100.shape[1], n), -63)
    torch.testing.assert_close(mem._rerotate(k_at_100, delta), k_at_37, rtol=1e-4, atol=1e-4)


def test_captured_scores_match_eager_attention(tiny):
    """The scoring SDPA must record exactly the attention of the last obs queries (summed, GQA-averaged)."""
    model, tok = tiny
    ids = torch.tensor([tok("One two three four five six seven eight nine ten eleven twelve",
                            add_special_tokens=False)["input_ids"]])
    obs = 4
    model.set_attn_implementation(scoring.register())
    with scoring.capture_scores(obs) as scores:
        model(input_ids=ids)
    model.set_attn_implementation("eager")
    try:
        eager = model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(scoring.register())
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for i, att in enumerate(eager):  # (1, heads, n, n)
        want = att[:, :, -obs:, :].sum(2)  # (1, heads, n)
        want = want.view(1, cfg.num_key_value_heads, group, -1).mean(2)  # (1, kv_heads, n)
        torch.testing.assert_close(scores[i], want, rtol=1e-4, atol=1e-5)


def test_sampled_scores_sum_the_evenly_spread_queries(tiny):
    """``sample`` queries spread over the observed ones: exactly their eager attention, in a full row and in a
    right-padded shorter row (whose observed queries are its own real ones, each counted once)."""
    model, tok = tiny
    ids = tok("One two three four five six seven eight nine ten eleven twelve thirteen fourteen",
              add_special_tokens=False)["input_ids"]
    n, short = len(ids), len(ids) - 5
    model.set_attn_implementation("eager")
    try:
        full_att = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
        short_att = model(input_ids=torch.tensor([ids[:short]]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(scoring.register())
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads

    def want(att, rows, length):  # (1, heads, L, L) -> (kv_heads, length)
        w = att[0, :, rows, :].sum(1)  # (heads, L)
        w = torch.nn.functional.pad(w, (0, length - w.shape[-1]))
        return w.view(cfg.num_key_value_heads, group, -1).mean(1)

    with scoring.capture_scores(n, sample=4) as scores:  # all n queries observed, 4 of them sampled
        model(input_ids=torch.tensor([ids]))
    rows = [(r + 1) * n // 4 - 1 for r in range(4)]
    assert rows[-1] == n - 1 and len(set(rows)) == 4
    for i, att in enumerate(full_att):
        torch.testing.assert_close(scores[i][0], want(att, rows, n), rtol=1e-4, atol=1e-5)

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = torch.tensor([ids, ids[:short] + [pad] * (n - short)])
    with scoring.capture_scores(n, rows=torch.tensor([n, short]), sample=short + 3) as scores:
        model(input_ids=batch)  # the short row has fewer real queries than the sample: each counted once
    rows_full = sorted({(r + 1) * n // (short + 3) - 1 for r in range(short + 3)})
    for i in range(len(full_att)):
        torch.testing.assert_close(scores[i][0], want(full_att[i], rows_full, n), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scores[i][1, :, :short], want(short_att[i], list(range(short)), short),
                                   rtol=1e-4, atol=1e-5)


def test_selection_keeps_the_highest_scored_entries(tiny):
    mem = make(tiny, ratio=4, pool_kernel=1)
    # one layer with 2 kv heads, 8 window entries after 3 memory entries
    from memorag_core.memory.kv_buffer import memory_layer

    layer = memory_layer()
    keys = torch.arange(11 * 2 * 4, dtype=torch.float32).view(1, 2, 11, 4)
    layer.update(keys.clone(), keys.clone() + 1000)
    scores = torch.tensor([[[0.1, 0.9, 0.2, 0.3, 0.8, 0.0, 0.1, 0.2], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.6]]])
    mem.config.positions = "original"  # no re-rotation: compare raw values
    mem._keep_top(layer, 3, scores, keep=2)
    assert layer.keys.shape == (1, 2, 5, 4)
    torch.testing.assert_close(layer.keys[0, 0, 3:], keys[0, 0, [3 + 1, 3 + 4]])
    torch.testing.assert_close(layer.keys[0, 1, 3:], keys[0, 1, [3 + 0, 3 + 7]])
    torch.testing.assert_close(layer.values[0, :, :3], keys[0, :, :3] + 1000)


def test_original_positions_continue_after_the_raw_tokens(tiny, book):
    mem = make(tiny, ratio=4, positions="original")
    mem.memorize(book[:2000])
    assert mem.next_position == len(mem.head_ids()) + mem.stats.raw_tokens
    assert mem.entries < mem.next_position
    assert isinstance(mem.answer("Who?", 4), str)


def test_batched_clues_equal_one_by_one(tiny, book):
    mem = make(tiny, ratio=4)
    mem.memorize(book[:2000])
    q = "Where do the Dursleys live?"
    batch = mem.clue_texts(q, max_new_tokens=8, with_answer=True)
    assert batch["spans"] == mem.recall(q, 8)
    assert batch["surrogates"] == mem.rewrite(q, 8)
    assert batch["answer"] == mem.answer(q, 8)
    # generation must leave the memory untouched
    assert all(layer.keys.shape[2] == mem.entries for layer in mem.cache.layers)


def test_bad_input_errors_name_the_cause(tiny, book):
    mem = make(tiny, ratio=4, max_query_tokens=16)
    with pytest.raises(MemoryNotReadyError, match="nothing is memorized"):
        mem.recall("anything")
    with pytest.raises(InvalidInputError, match="empty"):
        mem.memorize("   \n ")
    with pytest.raises(InvalidInputError, match="UTF-8"):
        mem.memorize(b"caf\xe9 au lait")
    with pytest.raises(InvalidInputError, match="binary"):
        mem.memorize("abc\x00def")
    mem.memorize(book[:500])
    with pytest.raises(InvalidInputError, match="max_query_tokens"):
        mem.answer("why " * 40)
    for bad in (0, -2, 1.5):
        with pytest.raises(InvalidInputError, match="ratio"):
            MemoryConfig(ratio=bad)
    with pytest.raises(InvalidInputError, match="full_kv"):
        MemoryConfig(kind="full_kv", ratio=4)
    # callers with a ratio default (CLI, eval, upstream's beacon_ratio) build through for_kind: full_kv means 1
    assert MemoryConfig.for_kind(kind="full_kv", ratio=4).ratio == 1
    assert MemoryConfig.for_kind(kind="compressed_kv", ratio=4).ratio == 4
    with pytest.raises(InvalidInputError, match="positions"):
        MemoryConfig(positions="middle")


def test_save_load_round_trip_is_identical_and_corruption_is_caught(tiny, book, tmp_path):
    from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError

    mem = make(tiny, ratio=4)
    mem.memorize(book[:2500])
    info = mem.save(str(tmp_path / "m.safetensors"))
    again = make(tiny, ratio=4)
    again.load(info.url, expected_sha256=info.sha256)
    for a, b in zip(mem.cache.layers, again.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert (again.entries, again.next_position, again.stats.raw_tokens) == (
        mem.entries, mem.next_position, mem.stats.raw_tokens)
    q = "Who is Dobby?"
    assert again.answer(q, 8) == mem.answer(q, 8)
    # the same text gives byte-identical files (content only in the header)
    info2 = again.save(str(tmp_path / "m2.safetensors"))
    assert info2.sha256 == info.sha256

    with pytest.raises(ArtifactNotFoundError):
        make(tiny, ratio=4).load(str(tmp_path / "missing.safetensors"))
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError):
        make(tiny, ratio=4).load(str(tmp_path / "bad.safetensors"), expected_sha256=info.sha256)
    (tmp_path / "short.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptArtifactError):
        make(tiny, ratio=4).load(str(tmp_path / "short.safetensors"))
    # a memory made with another config is refused, not silently misused
    with pytest.raises(CorruptArtifactError, match="differs"):
        make(tiny, ratio=8).load(info.url)
