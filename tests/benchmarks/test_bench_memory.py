"""The GPU benchmark's code path (Mistral-7B-shaped model) runs on the CPU with one layer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.mark.slow
def test_gpu_mistral_path_runs_on_cpu_with_one_layer(tmp_path):
    from bench_memory import main

    out = tmp_path / "r.json"
    assert main(["--gpu-mistral", "--device", "cpu", "--mistral-layers", "1", "--tokens", "160", "--ratios", "1",
                 "4", "--window", "64", "--scoring", "0:128", "32:0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows[1:4]] == ["full_kv", "compressed_kv", "compressed_kv"]
    assert [r["scoring"] for r in rows[1:4]] == ["", "0:128", "32:0"]  # full_kv once: nothing is scored at ratio 1
    assert rows[2]["entries"] == rows[3]["entries"] < rows[1]["entries"]


@pytest.mark.slow
def test_copies_check_runs_on_cpu_through_the_cuda_path(tmp_path):
    from bench_memory import main

    from memorag_core.memory import attention

    fused = attention.masked_gqa_is_fused
    out = tmp_path / "c.json"
    assert main(["--copies", "--gpu-mistral", "--device", "cpu", "--mistral-layers", "1", "--copies-entries", "32768",
                 "--window", "32", "--copies-rows", "2", "--cuda-path", "--json", str(out)]) == 0
    assert attention.masked_gqa_is_fused is fused  # restored
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3
    for r in rows:  # far below one copy of the memory per KV group (and per row)
        assert r["peak_extra_MB"] < r["repeat_kv_MB"], r
