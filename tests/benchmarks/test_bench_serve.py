"""The Serve load-and-fault script end to end, briefly (its own local Ray; slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_bench_serve_survives_a_killed_memory_worker(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for k in ("RAY_ADDRESS", "RAY_TMPDIR", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        env.pop(k, None)
    cmd = [sys.executable, "benchmarks/bench_serve.py", "--store", str(tmp_path / "store"), "--clients", "1", "4",
           "--duration", "15", "--kill-at", "5", "--fault-duration", "60", "--max-new-tokens", "4",
           "--clue-tokens", "4", "--num-cpus", "2", "--json", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [lv["clients"] for lv in r["levels"]] == [1, 4] and all(lv["answered"] > 0 for lv in r["levels"])
    assert all(lv["server_errors"] == 0 for lv in r["levels"])
    f = r["fault"]["fault"]  # the fault phase's level, and in it what the kill did
    assert f["killed_pids"] and f["recovered"] and f["answered_sent_after_kill"] > 0
