"""The shared-prefix attention and the in-place decode cache (memorag_core/memory/attention.py, kv_decode.py)."""

from __future__ import annotations

import types

import pytest
import torch

from memorag_core.memory import MemoryConfig, attention, build_memory
from memorag_core.memory.kv_decode import decode_after_cache
from memorag_core.models import load_causal_lm


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    return load_causal_lm(str(tiny_lm_dir))


def _reference(query, mem_k, mem_v, key, value, mask, scale):
    """Plain attention over [memory | tail] with K/V repeated per query head: (b, q, heads, d)."""
    b, heads = query.shape[:2]
    group = heads // key.shape[1]
    k = torch.cat([mem_k.expand(b, -1, -1, -1), key], dim=2).repeat_interleave(group, dim=1)
    v = torch.cat([mem_v.expand(b, -1, -1, -1), value], dim=2).repeat_interleave(group, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _layer(mem_k, mem_v):
    return types.SimpleNamespace(mem_keys=mem_k, mem_values=mem_v)


@pytest.mark.parametrize("q_len", [1, 5])  # a decode step, a prompt
@pytest.mark.parametrize("fused_gqa", [True, False])  # False: the CUDA branch (same path since the online softmax)
def test_prefix_attention_equals_attention_over_the_concatenation(q_len, fused_gqa, monkeypatch):
    monkeypatch.setattr(attention, "masked_gqa_is_fused", lambda device: fused_gqa)
    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, m, n, d = 3, 6, 2, 11, 7, 8
    query = torch.randn(b, heads, q_len, d, generator=g)
    mem_k, mem_v = torch.randn(1, kv_heads, m, d, generator=g), torch.randn(1, kv_heads, m, d, generator=g)
    key, value = torch.randn(b, kv_heads, n, d, generator=g), torch.randn(b, kv_heads, n, d, generator=g)
    # left padding: row 1 has 2 pad entries at the start of its tail, row 2 has 4; causal among the last q_len
    allowed = torch.ones(b, 1, q_len, m + n, dtype=torch.bool)
    allowed[1, :, :, m:m + 2] = False
    allowed[2, :, :, m:m + 4] = False
    for i in range(q_len):
        allowed[:, :, i, m + n - q_len + i + 1:] = False
    got = attention._prefix_attention(None, query, key, value, allowed, 0.3, _layer(mem_k, mem_v))
    want = _reference(query, mem_k, mem_v, key, value, allowed, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # an additive float mask means the same
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    got_f = attention._prefix_attention(None, query, key, value, additive, 0.3, _layer(mem_k, mem_v))
    torch.testing.assert_close(got_f, want, rtol=1e-5, atol=1e-5)
    # no mask: causal within the tail, memory fully visible
    causal = torch.ones(1, 1, q_len, m + n, dtype=torch.bool)
    for i in range(q_len):
        causal[:, :, i, m + n - q_len + i + 1:] = False
    got_c = attention._prefix_attention(None, query, key, value, None, 0.3, _layer(mem_k, mem_v))
    torch.testing.assert_close(got_c, _reference(query, mem_k, mem_v, key, value, causal, 0.3),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_gqa", [True, False])  # False: the CUDA branch (one SDPA call per group position)
def test_grouped_attention_equals_attention_with_kv_repeated(fused_gqa, monkeypatch):
    monkeypatch.setattr(attention, "masked_gqa_is_fused", lambda device: fused_gqa)
    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, q_len, k_len, d = 2, 8, 2, 5, 13, 8
    query = torch.randn(b, heads, q_len, d, generator=g).transpose(1, 2).contiguous().transpose(1, 2)  # as models
    key, value = torch.randn(b, kv_heads, k_len, d, generator=g), torch.randn(b, kv_heads, k_len, d, generator=g)
    allowed = torch.ones(b, 1, q_len, k_len, dtype=torch.bool)
    allowed[1, :, :, :3] = False  # a padded memory row
    for i in range(q_len):
        allowed[:, :, i, k_len - q_len + i + 1:] = False
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(4, dim=1), value.repeat_interleave(4, dim=1), attn_mask=allowed, scale=0.3)
    got = attention.grouped_attention(query, key, value, allowed, 0.3)  # (b, q, heads, d)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_tail_cache_writes_in_place_and_refuses_overflow():
    mem = types.SimpleNamespace(layers=[types.SimpleNamespace(keys=torch.zeros(1, 2, 5, 4),
                                                              values=torch.zeros(1, 2, 5, 4))])
    cache = attention.tail_cache(mem, capacity=4, num_layers=2)
    layer = cache.layers[0]
    k, _ = layer.update(torch.ones(3, 2, 3, 4), torch.ones(3, 2, 3, 4))
    assert k.shape == (3, 2, 3, 4) and cache.get_seq_length() == 5 + 3
    buffer = layer.keys.data_ptr()
    k, _ = layer.update(torch.full((3, 2, 1, 4), 2.0), torch.full((3, 2, 1, 4), 2.0))
    assert layer.keys.data_ptr() == buffer and k.shape[2] == 4 and float(k[0, 0, 3, 0]) == 2.0
    with pytest.raises(RuntimeError, match="capacity 4"):
        layer.update(torch.ones(3, 2, 1, 4), torch.ones(3, 2, 1, 4))
    # the second layer had no memory of its own (an empty memory): it counts only its tail
    assert cache.layers[1].get_seq_length() == 0


def test_decode_leaves_the_memory_untouched_and_repeats_exactly(tiny, shared_data_dir):
    model, tok = tiny
    book = (shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")
    mem = build_memory(MemoryConfig(ratio=4, window=128), model, tok)
    mem.memorize(book[:1500])
    before = [(layer.keys.data_ptr(), layer.keys.clone(), layer.values.clone()) for layer in mem.cache.layers]
    first = mem.clue_texts("Who is Dudley?", max_new_tokens=6, with_answer=True)
    second = mem.clue_texts("Who is Dudley?", max_new_tokens=6, with_answer=True)
    assert first == second
    for layer, (ptr, k, v) in zip(mem.cache.layers, before):
        assert layer.keys.data_ptr() == ptr
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_decode_after_an_empty_memory_equals_generate(tiny):
    from transformers import DynamicCache

    model, tok = tiny
    model.set_attn_implementation(attention.register())
    prompt = tok("The cupboard under the stairs", add_special_tokens=False).input_ids
    got = decode_after_cache(model, DynamicCache(), 0, [prompt], max_new_tokens=6, eos_ids=set(),
                             pad_id=tok.pad_token_id)
    ids = torch.tensor([prompt])
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          min_new_tokens=6, pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    assert got == [want]


def test_decode_names_a_wrong_attention_implementation(tiny):
    from transformers import DynamicCache

    model, tok = tiny
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(ValueError, match="memorag_sdpa.*'sdpa'"):
            decode_after_cache(model, DynamicCache(), 0, [[1, 2]], max_new_tokens=2, eos_ids=set(), pad_id=0)
    finally:
        model.set_attn_implementation(attention.register())


def test_vectorized_repetition_penalty_equals_generate(tiny):
    from transformers import DynamicCache

    model, tok = tiny
    model.set_attn_implementation(attention.register())
    prompt = tok("The cupboard under the stairs was dark", add_special_tokens=False).input_ids
    got = decode_after_cache(model, DynamicCache(), 0, [prompt], max_new_tokens=10, eos_ids=set(),
                             pad_id=tok.pad_token_id, repetition_penalty=1.8)
    ids = torch.tensor([prompt])
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          min_new_tokens=10, repetition_penalty=1.8,
                          pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    assert got == [want]


def test_checking_for_eos_every_k_steps_gives_the_same_tokens(tiny, shared_data_dir):
    model, tok = tiny
    book = (shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")
    mem = build_memory(MemoryConfig(ratio=4, window=128), model, tok)
    mem.memorize(book[:1500])
    prompts = [mem.task_ids(p.format(question="Who is Dudley?")) for p in (mem.prompts.qa, mem.prompts.span)]
    free = decode_after_cache(model, mem.cache, mem.next_position, prompts, max_new_tokens=12, eos_ids=set(),
                              pad_id=tok.pad_token_id)
    eos = {free[0][3], free[1][6]}  # rows stop at different steps
    one = decode_after_cache(model, mem.cache, mem.next_position, prompts, max_new_tokens=12, eos_ids=eos,
                             pad_id=tok.pad_token_id, stop_check_every=1)
    four = decode_after_cache(model, mem.cache, mem.next_position, prompts, max_new_tokens=12, eos_ids=eos,
                              pad_id=tok.pad_token_id, stop_check_every=4)
    assert one == four
    for row, ref in zip(one, free):
        cut = next(j for j, t in enumerate(ref) if t in eos)
        assert row == ref[:cut]


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values by the host (each one a device sync on a GPU)."""

    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_decode_steps_read_nothing_back_from_the_device(tiny, shared_data_dir):
    """Host reads in a decode do not grow with the steps (the 2-D mask path checked the mask on every step)."""
    model, tok = tiny
    mem = build_memory(MemoryConfig(ratio=4, window=128), model, tok)
    mem.memorize((shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")[:600])
    prompts = [tok("Who is Dudley?")["input_ids"], tok("Where do they live, the Dursleys?")["input_ids"]]
    counts = []
    for steps in (3, 11):
        with _HostReads() as reads:
            decode_after_cache(model, mem.cache, mem.next_position, prompts, max_new_tokens=steps, eos_ids=set(),
                               pad_id=tok.pad_token_id, stop_check_every=1000)
        counts.append(reads.count)
    assert counts[0] == counts[1], counts
