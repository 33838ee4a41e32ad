"""No hidden copies of the memory: peak extra allocation of the memory's forwards, measured with torch.profiler.

A Mistral-shaped tiny model (8 query heads on 2 KV heads: 4 per KV head, head_dim 64) holds a memory of
``M`` entries per layer. With the score chunks made small, what a window read, a decode prompt pass over b rows,
and every-query scoring (``obs_sample=0``) may allocate beyond the memory itself is the attention mask (bools,
window x memory) and bounded temporaries; a copy of one layer's memory per KV group (transformers' ``repeat_kv``
when a mask is present) or per batch row (the memory concatenated in front of each prompt) is several times
larger and fails the bound. ``masked_gqa_is_fused`` is forced off so that the CPU takes the path CUDA takes.
"""

from __future__ import annotations

import pytest
import torch

from memorag_core.memory import MemoryConfig, attention, build_memory, scoring
from memorag_core.memory.kv_decode import decode_after_cache
from memorag_core.memory.profiling import peak_extra_bytes
from tests.memorag_core.memory.test_families import TEXT, _tokenizer

M = 4096  # memory entries per layer
KV_HEADS, HEAD_DIM = 2, 64
LAYER_BYTES = 2 * KV_HEADS * M * HEAD_DIM * 4  # one layer's K + V, float32


@pytest.fixture(scope="module")
def mistral():
    from transformers import AutoModelForCausalLM, MistralConfig

    tok = _tokenizer()
    cfg = MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, sliding_window=None,
                        max_position_embeddings=32768, vocab_size=len(tok), tie_word_embeddings=True,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), tok


def _memory_of_m_entries(model, tok, window: int, **config):
    """A compressed memory holding M random entries per layer, with spare capacity for the window."""
    from memorag_core.store.memory_file import MemoryTensors

    mem = build_memory(MemoryConfig(ratio=4, window=window, **config), model, tok)
    mem.memorize(TEXT)
    m = mem.export()
    g = torch.Generator().manual_seed(1)
    keys = [torch.randn(KV_HEADS, M, HEAD_DIM, generator=g) for _ in m.keys]
    values = [torch.randn(KV_HEADS, M, HEAD_DIM, generator=g) for _ in m.values]
    offsets = {f"offsets.{i}": torch.arange(M, dtype=torch.int32).expand(KV_HEADS, M).clone() for i in range(2)}
    mem.import_tensors(MemoryTensors(keys=keys, values=values, header={**m.header, "entries": M, "next_position": M},
                                     extra=offsets))
    for layer in mem.cache.layers:
        layer.reserve(M + 2 * window)  # what memorize reserves up front: no growth copy inside the measurement
    return mem


@pytest.fixture
def cuda_path(monkeypatch):
    monkeypatch.setattr(attention, "masked_gqa_is_fused", lambda device: False)
    for module in (scoring, attention):  # score blocks of 64 keys
        monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(module, "_MIN_CHUNK", 64)


HEADS, CHUNK = 8, 64


def _mask_bytes(rows: int, q: int, keys: int) -> int:
    """transformers' bool mask (rows, 1, q, keys) and the float copy the SDPA kernel makes of it."""
    return 5 * rows * q * keys


def _text(tok, n: int) -> str:
    ids = tok((TEXT + " ") * 8, add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids)


@pytest.mark.parametrize("window,obs_sample", [(32, 128), (1024, 0)])
def test_a_window_read_after_a_memory_copies_nothing_per_kv_group(mistral, cuda_path, window, obs_sample):
    model, tok = mistral
    mem = _memory_of_m_entries(model, tok, window, obs_sample=obs_sample, obs_window=0)
    text = _text(tok, window)
    peak = peak_extra_bytes(lambda: mem.append(text))
    obs = min(window, 128) if obs_sample else window
    bound = _mask_bytes(1, window, M + window) + 3 * HEADS * obs * CHUNK * 4 + LAYER_BYTES // 2
    # repeat_kv of one layer: 4 x LAYER_BYTES; every query's scores over the window at once: 8 x w x w x 4 bytes
    assert peak < bound, (peak, bound, LAYER_BYTES)


def test_the_decode_prompt_pass_copies_nothing_per_row_or_kv_group(mistral, cuda_path):
    model, tok = mistral
    mem = _memory_of_m_entries(model, tok, 32)
    prompts = [tok(q, add_special_tokens=False)["input_ids"] for q in
               ["Who lives on Privet Drive?", "What did Grunnings make?", "Who is the director of the firm?",
                "Was Mr. Dursley thin?"]]
    b, width = len(prompts), max(len(p) for p in prompts)

    def run():
        decode_after_cache(model, mem.cache, mem.next_position, prompts, max_new_tokens=1, eos_ids=set(),
                           pad_id=tok.pad_token_id)

    peak = peak_extra_bytes(run)
    bound = _mask_bytes(b, width, M + width) + 3 * HEADS * b * width * CHUNK * 4 + LAYER_BYTES // 2
    # the memory concatenated in front of each row: b x LAYER_BYTES; then repeated per KV group (CUDA): 4 x that
    assert peak < bound, (peak, bound, LAYER_BYTES)
