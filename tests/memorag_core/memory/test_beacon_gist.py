"""Beacon memory (contract-tested against a checkpoint with its own remote code) and gist memory (Lite mode)."""

from __future__ import annotations

import pytest
import torch

from memorag_core.errors import CorruptArtifactError
from memorag_core.facade import Memory as UpstreamMemory
from memorag_core.memory import BeaconMemory, GistMemory, MemoryConfig, build_memory


def test_beacon_memory_drives_the_checkpoint_contract(beacon_stub_dir, shared_data_dir, tmp_path):
    text = (shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")[:1500]
    # the kind is detected from the checkpoint's config (it declares beacon_ratio), not from its name
    mem = UpstreamMemory(str(beacon_stub_dir), beacon_ratio=8)
    assert isinstance(mem, BeaconMemory)
    assert mem.model.config.beacon_ratio == [8]  # beacon_ratio passed through to the remote code
    stats = mem.memorize(text)
    n = len(mem.head_ids()) + stats.raw_tokens
    assert mem.state["n_tokens"] == n
    assert stats.entries == len(mem.head_ids()) // 8 + stats.raw_tokens // 8  # the stub keeps every 8th token
    assert int(mem.state["read_calls"]) == 2  # head, then text: one read each, never re-read
    answer = mem.answer("Who is Harry?", max_new_tokens=6)
    assert isinstance(answer, str)
    # append continues the same memory without re-reading
    mem.append(" And then the owl arrived at the window.")
    assert int(mem.state["read_calls"]) == 3
    # save -> load: identical state and identical greedy output
    info = mem.save(str(tmp_path / "beacon.safetensors"))
    again = UpstreamMemory(str(beacon_stub_dir), beacon_ratio=8)
    again.load(info.url, expected_sha256=info.sha256)
    for (k1, v1), (k2, v2) in zip(mem.state["beacon_activations"], again.state["beacon_activations"]):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert again.state["n_tokens"] == mem.state["n_tokens"]
    assert again.answer("Who is Harry?", 6) == mem.answer("Who is Harry?", 6)


def test_beacon_kind_on_a_plain_model_fails_clearly(tiny_lm_dir):
    with pytest.raises(Exception, match="not a beacon checkpoint"):
        build_memory(MemoryConfig(kind="beacon", model=str(tiny_lm_dir)))


def test_gist_memory_holds_the_gists(tiny_lm_dir, shared_data_dir, tmp_path):
    from memorag_core.models import load_causal_lm

    model, tok = load_causal_lm(str(tiny_lm_dir))
    text = (shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")[:3000]
    cfg = MemoryConfig(kind="gist", model=str(tiny_lm_dir), ratio=1, gist_chunk_tokens=300, gist_max_new_tokens=8)
    mem = build_memory(cfg, model, tok)
    assert isinstance(mem, GistMemory)
    stats = mem.memorize(text)
    assert len(mem.gists) >= 2  # one gist per ~300-token chunk
    gist_tokens = len(mem._encode("\n".join(mem.gists) + "\n"))
    assert mem.entries == len(mem.head_ids()) + gist_tokens  # the memory is the KV of the gists, not the text
    assert stats.raw_tokens == len(mem._encode(text))  # stats count the source text
    info = mem.save(str(tmp_path / "gist.safetensors"))
    again = build_memory(cfg, model, tok)
    again.load(info.url)
    assert again.gists == mem.gists
    assert again.answer("Who?", 5) == mem.answer("Who?", 5)
    # a memory saved by one kind cannot be loaded as another
    other = build_memory(MemoryConfig(kind="compressed_kv", model=str(tiny_lm_dir)), model, tok)
    with pytest.raises(CorruptArtifactError, match="gist"):
        other.load(info.url)
