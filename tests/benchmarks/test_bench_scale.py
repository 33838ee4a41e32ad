"""benchmarks/bench_scale.py end to end at a tiny size: the whole job on a local Ray, one JSON line out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # the whole job on a fresh Ray, ~2 min; the job's code paths run in tests/jobs/test_memorize_job.py
def test_bench_scale_tiny_corpus(tmp_path, shared_data_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO), MEMORAG_SHARED_DATA=str(shared_data_dir))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_scale.py"), "--tokens", "30000",
                          "--work", str(tmp_path), "--unit-tokens", "2048", "--shards", "2", "--keep"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + _log_tail(tmp_path)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert 20_000 < res["tokens"] < 60_000 and res["seconds"] > 0 and res["driver_peak_rss_mb"] > 50
    assert {"setup", "read+validate", "pack", "memorize+embed", "index", "router+publish"} <= set(res["stage_seconds"])
    assert res["units"] >= 10 and res["chunks"] >= res["units"] and res["index_build_seconds"] is not None
    assert res["store_bytes"]["units"] > 0 and res["store_bytes"]["collections"] > 0
    assert 0 < res["non_model_max_share"] < 1 and res["object_store_peak_mb"] >= 0
    # the published version is whole and searchable by the query engine's loader
    from memorag_core.query.catalog import CollectionView
    from memorag_core.store import CollectionStore

    view = CollectionView(CollectionStore(str(tmp_path / "store-30000")).open_version("scale"))
    assert view.chunks.num_rows == res["chunks"] and len(view.shards) == 2


def _log_tail(work: Path) -> str:
    logs = sorted(work.glob("driver-*.log"))
    return logs[-1].read_text()[-3000:] if logs else ""
