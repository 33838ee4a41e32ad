"""memorize_many: several texts per model forward give each text the memory it would get alone."""

from __future__ import annotations

import pytest
import torch

from memorag_core.memory import MemoryConfig, build_memory
from memorag_core.models import load_causal_lm


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    return load_causal_lm(str(tiny_lm_dir))


@pytest.fixture(scope="module")
def texts(shared_data_dir):
    en = (shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")
    zh = (shared_data_dir / "fortress_besieged.txt").read_text(encoding="utf-8")
    # unequal lengths (ragged last windows, rows leaving the batch early) and another language (another prompt
    # head length: memories of unequal length side by side)
    return [en[:1500], en[3000:3700], zh[2000:2600], en[5000:6400]]


@pytest.mark.parametrize("ratio", [4, 1])
def test_batched_memories_equal_memorizing_each_alone(tiny, texts, ratio):
    model, tok = tiny
    cfg = MemoryConfig(ratio=ratio, window=96, kind="compressed_kv" if ratio > 1 else "full_kv")
    mem = build_memory(cfg, model, tok)
    batched = mem.memorize_many(texts)
    assert len(batched) == len(texts)
    for text, got in zip(texts, batched):
        alone = build_memory(cfg, model, tok)
        alone.memorize(text)
        want = alone.export()
        for key in ("entries", "next_position", "raw_tokens", "stats", "language", "fingerprint"):
            assert got.header[key] == want.header[key], key
        for a, b in zip(got.keys + got.values, want.keys + want.values):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert sorted(got.extra) == sorted(want.extra)
        for name in want.extra:
            assert torch.equal(got.extra[name], want.extra[name]), name
    # the memory now holds the last text and answers from it like a fresh one
    last = build_memory(cfg, model, tok)
    last.memorize(texts[-1])
    assert mem.answer("Who?", 6) == last.answer("Who?", 6)
