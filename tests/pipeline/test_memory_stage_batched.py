"""The memory stage reading several units per forward writes the same memories as one at a time (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import torch

from memorag_core.memory import MemoryConfig
from pipeline.config import MemoryStageConfig, RouterConfig
from pipeline.memory_stage import MemoryStage


def _rows(shared_data_dir):
    book = (shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")
    texts = [book[:900], book[2000:2500], book[4000:5100]]
    return pa.Table.from_pylist([{"pack_key": f"k{i}", "text": t, "n_tokens": len(t) // 4, "members": "[]",
                                  "doc_ids": [f"d{i}"]} for i, t in enumerate(texts)])


def test_units_per_forward_writes_the_same_memories(tmp_path, tiny_lm_dir, shared_data_dir):
    batch = _rows(shared_data_dir)
    out = {}
    for k in (1, 3):
        cfg = MemoryStageConfig(memory=MemoryConfig(model=str(tiny_lm_dir), ratio=4, window=64), batch_size=3,
                                units_per_forward=k)
        stage = MemoryStage(cfg, RouterConfig(gist="summary", gist_max_new_tokens=6), str(tmp_path / f"s{k}"))
        out[k] = (stage, stage(batch).to_pylist())
    (s1, rows1), (s3, rows3) = out[1], out[3]
    for a, b in zip(rows1, rows3):
        assert a["unit_id"] == b["unit_id"] and a["memorized"] and b["memorized"]
        assert (a["raw_tokens"], a["entries"], a["gist"]) == (b["raw_tokens"], b["entries"], b["gist"])
        ma, mb = s1.store.read_unit_memory(a["unit_id"]), s3.store.read_unit_memory(b["unit_id"])
        assert ma.header == mb.header
        for x, y in zip(ma.keys + ma.values, mb.keys + mb.values):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    # a rerun finds every unit in the store
    again = s3(batch).to_pylist()
    assert not any(r["memorized"] for r in again) and [r["gist"] for r in again] == [r["gist"] for r in rows3]
