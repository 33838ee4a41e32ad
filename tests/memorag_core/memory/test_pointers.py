"""Attention pointers: kept entries remember their source token; the question's attention scores source spans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memorag_core.memory import MemoryConfig, build_memory
from memorag_core.memory import pointers as ptr

TEXT = " ".join(f"Paragraph {i}: the river {i} flows past the mill number {i * 7} near the old town." for i in range(30))


@pytest.fixture(scope="module")
def memory(tiny_lm_dir):
    m = build_memory(MemoryConfig(model=str(tiny_lm_dir), ratio=4, window=64))
    m.memorize(TEXT)
    return m


def test_kept_entries_keep_their_source_offsets(memory):
    layers = memory.model.config.num_hidden_layers
    assert len(memory.offsets) == layers
    n_head = len(memory.head_ids())
    for off in memory.offsets:
        assert off.dtype == torch.int32 and off.shape[0] == 1 and off.shape[2] == memory.entries
        o = off[0]  # (kv_heads, entries)
        assert (o[:, :n_head] == -1).all()  # the prompt head is not source text
        body = o[:, n_head:]
        assert body.min() >= 0 and body.max() < memory.stats.raw_tokens
        assert (body[:, 1:] > body[:, :-1]).all()  # kept in source order, no repeats


def test_offsets_are_saved_and_old_files_still_load(memory, tmp_path, tiny_lm_dir):
    from memorag_core.store.memory_file import load_memory, save_memory

    url = str(tmp_path / "m.safetensors")
    memory.save(url)
    other = build_memory(MemoryConfig(model=str(tiny_lm_dir), ratio=4, window=64), model=memory.model,
                         tokenizer=memory.tokenizer)
    other.load(url)
    assert all(torch.equal(a, b) for a, b in zip(other.offsets, memory.offsets))
    old = load_memory(url)
    old.extra = {}  # a file written before pointers
    save_memory(old, str(tmp_path / "old.safetensors"))
    other.load(str(tmp_path / "old.safetensors"))
    assert other.offsets == [] and other.entries == memory.entries


def test_question_attention_scores_spans_without_changing_the_memory(memory):
    before = [layer.keys.clone() for layer in memory.cache.layers]
    mass = ptr.question_attention(memory, "Which river flows past mill number 70?")
    assert mass.shape == (memory.model.config.num_hidden_layers, memory.offsets[0].shape[1], memory.entries)
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, memory.cache.layers))
    starts = ptr.token_char_starts(memory.tokenizer, TEXT)
    assert len(starts) == memory.stats.raw_tokens
    para_starts = [TEXT.index(f"Paragraph {i}:") for i in range(30)]
    tok_span = ptr.char_spans_to_tokens(starts, para_starts)
    total, count = ptr.span_scores(mass, memory.offsets, tok_span, 30)
    assert total.shape == count.shape == (mass.shape[0], mass.shape[1], 30)
    n_head = len(memory.head_ids())
    assert count.sum(axis=-1).max() == memory.entries - n_head  # every source entry lands in one paragraph
    s = ptr.point(total, count, layers=[0], normalize="mean")
    assert s.shape == (30,) and np.isclose(s.sum(), 1.0)


def test_point_normalizations():
    total = np.array([[[4.0, 1.0]]])  # (1 layer, 1 head, 2 spans)
    count = np.array([[[4.0, 1.0]]])
    assert np.allclose(ptr.point(total, count, normalize="sum"), [0.8, 0.2])
    assert np.allclose(ptr.point(total, count, normalize="mean"), [0.5, 0.5])
    with pytest.raises(Exception):
        ptr.point(total, count, normalize="max")
