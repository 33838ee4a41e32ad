"""The local Ray that a job starts runs its workers at the job's own priority (Ray's default is nice 15)."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.ray_env import REPO_ROOT

PROBE = """
import os, ray
from pipeline.ray_env import init_ray
init_ray(num_cpus=1)
@ray.remote
def niceness():
    return os.nice(0)
print("worker niceness", ray.get(niceness.remote()), os.environ.get("TOKENIZERS_PARALLELISM"))
ray.shutdown()
"""


def run_probe(**env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    full.update(env, TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, timeout=240,
                         cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_a_local_ray_runs_its_workers_at_the_jobs_priority_unless_the_caller_says_otherwise():
    assert "worker niceness 0 false" in run_probe()
    assert "worker niceness 7 false" in run_probe(RAY_worker_niceness="7")
