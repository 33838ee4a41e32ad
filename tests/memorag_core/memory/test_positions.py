"""Exact positions after compression, and exact scores after a memory prefix over several log-sum-exp chunks.

A layer-0 key depends only on its token and its rotary position (the layer's input is the token's embedding), so
every stored layer-0 key can be recomputed from scratch: the token its entry stands for (the attention pointer,
``offsets``) at the position the entry must have (compact: its rank in the memory; original: the token's own).
A wrong delta index or sign in ``_keep_top`` / ``_keep_rows`` moves a key to another position and fails here.
"""

from __future__ import annotations

import pytest
import torch

from memorag_core.memory import MemoryConfig, build_memory, scoring
from tests.memorag_core.memory.test_families import TEXT, tiny


def _layer0_keys(model, tokens: list[int], positions: list[int]) -> torch.Tensor:
    """(kv_heads, n, d) layer-0 keys of ``tokens`` at ``positions``, computed by the model."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([tokens]), position_ids=torch.tensor([positions]), past_key_values=cache,
              use_cache=True)
    return cache.layers[0].keys[0]


def _assert_layer0_exact(model, mem, keys: torch.Tensor, offsets: torch.Tensor, text: str) -> None:
    """keys (kv_heads, entries, d) and offsets (kv_heads, entries) of one exported memory of ``text``."""
    head, body = mem.head_ids(), mem._encode(text)
    compact = mem.config.positions == "compact"
    kv_heads, entries = offsets.shape
    assert entries > len(head) + 5  # entries were kept from more than one window
    for h in range(kv_heads):
        offs = offsets[h].tolist()
        assert offs[:len(head)] == [-1] * len(head) and min(offs[len(head):]) >= 0
        tokens = [head[j] if o < 0 else body[o] for j, o in enumerate(offs)]
        positions = [j if (compact or o < 0) else len(head) + o for j, o in enumerate(offs)]
        want = _layer0_keys(model, tokens, positions)[h]  # (entries, d)
        torch.testing.assert_close(keys[h], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "glm-interleaved-partial"])
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_kept_keys_sit_exactly_at_their_positions(name, positions):
    model, tok = tiny(name)
    mem = build_memory(MemoryConfig(ratio=4, window=32, positions=positions), model, tok)
    mem.memorize(TEXT)
    m = mem.export()
    _assert_layer0_exact(model, mem, m.keys[0], m.extra["offsets.0"], TEXT)
    n = len(mem.head_ids()) + (mem.entries - len(mem.head_ids()) if positions == "compact" else len(mem._encode(TEXT)))
    assert mem.next_position == n


def test_kept_keys_of_batched_rows_of_unequal_length_sit_exactly_at_their_positions():
    """memorize_many with texts of different lengths takes the row-by-row path (``_keep_rows``)."""
    model, tok = tiny("llama")
    mem = build_memory(MemoryConfig(ratio=4, window=32), model, tok)
    texts = [TEXT, TEXT[:150], TEXT[40:]]
    for text, m in zip(texts, mem.memorize_many(texts)):
        _assert_layer0_exact(model, mem, m.keys[0], m.extra["offsets.0"], text)
        assert m.header["next_position"] == m.header["entries"]


class _Layer(torch.nn.Module):
    layer_idx = 0


def _reference_scores(query, key, start, obs, scale, sample=0):
    """Dense reference: softmax over all keys of the last ``obs`` queries (causal), columns from ``start`` summed over
    the (sampled) queries and averaged over each KV head's query heads. Shapes as :func:`scoring.record`."""
    b, heads, q_len, d = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    k = key.repeat_interleave(group, dim=1)  # (b, heads, k_len, d)
    logits = torch.matmul(query.double(), k.double().transpose(-1, -2)) * scale  # (b, heads, q, k)
    past = k_len - q_len
    causal = torch.arange(k_len)[None, :] > past + torch.arange(q_len)[:, None]  # (q, k)
    probs = logits.masked_fill(causal, float("-inf")).softmax(dim=-1)[:, :, q_len - obs:, start:]
    if sample:
        picked = [((r + 1) * obs) // sample - 1 for r in range(sample)]
        probs = probs[:, :, picked]
    return probs.sum(dim=2).view(b, kv_heads, group, k_len - start).mean(dim=2).float()


@pytest.mark.parametrize("sample", [0, 5])
def test_scores_after_a_memory_prefix_over_several_logsumexp_chunks_are_exact(monkeypatch, sample):
    torch.manual_seed(0)
    b, heads, kv_heads, d, mem, w = 2, 4, 2, 8, 70, 20
    query = torch.randn(b, heads, w, d) * 2
    key = torch.randn(b, kv_heads, mem + w, d) * 2  # memory of 70 entries, then the window's own keys
    monkeypatch.setattr(scoring, "_CHUNK_ELEMENTS", 1)  # chunks of _MIN_CHUNK keys: several over the memory
    monkeypatch.setattr(scoring, "_MIN_CHUNK", 16)
    for obs in (w, 7):
        with scoring.capture_scores(obs, start=mem, sample=sample) as got:
            scoring.record(_Layer(), query, key, 0.3)
        want = _reference_scores(query, key, mem, obs, 0.3, sample if 0 < sample < obs else 0)
        torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-6)
