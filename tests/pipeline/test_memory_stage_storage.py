"""The memory stage writes unit memories in the configured storage dtype (8-bit by default), no Ray."""

from __future__ import annotations

import json
import struct

import pyarrow as pa
import pytest

from memorag_core.errors import InvalidInputError
from memorag_core.memory import MemoryConfig
from pipeline.config import MemoryStageConfig, RouterConfig
from pipeline.memory_stage import MemoryStage


def _tensor_dtypes(path) -> dict[str, str]:
    """Tensor name -> safetensors dtype of a file, from its JSON header."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return {k: v["dtype"] for k, v in json.loads(data[8:8 + n]).items() if k != "__metadata__"}


def test_storage_dtype_of_unit_files(tmp_path, tiny_lm_dir, shared_data_dir):
    book = (shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")
    batch = pa.Table.from_pylist([{"pack_key": "k0", "text": book[:1200], "n_tokens": 300, "members": "[]",
                                   "doc_ids": ["d0"]}])
    assert MemoryStageConfig().storage_dtype == "int8"  # the job's default
    rows, stages = {}, {}
    for dtype in ("keep", "int8", "fp8"):
        cfg = MemoryStageConfig(memory=MemoryConfig(model=str(tiny_lm_dir), ratio=4, window=64),
                                storage_dtype=dtype)
        stages[dtype] = MemoryStage(cfg, RouterConfig(gist="cheap"), str(tmp_path / "store"))
        rows[dtype] = stages[dtype](batch).to_pylist()[0]
        assert rows[dtype]["memorized"] and rows[dtype]["storage_dtype"] == dtype
    # another storage dtype is another unit (its bytes differ), never a reuse of the kept-dtype file
    assert len({r["unit_id"] for r in rows.values()}) == 3
    store = stages["keep"].store
    files = {d: tmp_path / "store" / "units" / r["unit_id"] / "memory.safetensors" for d, r in rows.items()}
    expect = {"keep": "F32", "int8": "I8", "fp8": "F8_E4M3"}
    for d, f in files.items():
        kv = {v for k, v in _tensor_dtypes(f).items() if k.endswith((".key", ".value"))}
        assert kv == {expect[d]}, (d, kv)
        assert store.unit_memory_info(rows[d]["unit_id"])["storage_dtype"] == d
        assert f.stat().st_size == rows[d]["memory_nbytes"]
    # fp32 -> 8 bits + scales (and the same JSON header and extras, which weigh on a tiny memory)
    assert rows["int8"]["memory_nbytes"] < 0.4 * rows["keep"]["memory_nbytes"]
    # 8-bit memories load (dequantized) close to the kept one
    ref = store.read_unit_memory(rows["keep"]["unit_id"])
    for d in ("int8", "fp8"):
        m = store.read_unit_memory(rows[d]["unit_id"], expected_sha256=rows[d]["memory_sha256"])
        assert m.header == ref.header
        for x, y in zip(m.keys + m.values, ref.keys + ref.values):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert (x - y).norm() / y.norm() < (0.02 if d == "int8" else 0.05)
    # a rerun finds the 8-bit unit
    again = stages["int8"](batch).to_pylist()[0]
    assert not again["memorized"] and again["unit_id"] == rows["int8"]["unit_id"]
    assert again["storage_dtype"] == "int8"
    with pytest.raises(InvalidInputError, match="storage_dtype 'int4'"):
        MemoryStage(MemoryStageConfig(memory=MemoryConfig(model=str(tiny_lm_dir))), RouterConfig(gist="cheap"),
                    str(tmp_path / "store"), storage_dtype="int4")
