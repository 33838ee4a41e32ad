"""Unit memory sidecars (``units/<id>/memory.json``): resume reads them instead of the memory file."""

from __future__ import annotations

import json

from memorag_core.store import CollectionStore
from memorag_core.store import fs as sfs
from tests.memorag_core.store.conftest import make_memory


def test_sidecar_written_beside_memory_and_read_back(backend):
    store = CollectionStore(backend.root_url, backend.storage_options)
    m = make_memory()
    info = store.write_unit_memory("u1", m, storage_dtype="int8")
    side = store.unit_memory_info("u1")
    assert side == {"sha256": info.sha256, "nbytes": info.nbytes, "storage_dtype": "int8", "header": m.header}
    # the sidecar agrees with the memory file it describes
    data = sfs.read_all(store.fs, sfs.join(store.root, "units", "u1", "memory.safetensors"))
    assert sfs.sha256_hex(data) == side["sha256"] and len(data) == side["nbytes"]
    assert store.unit_memory_info("missing") is None


def test_memory_without_sidecar_or_with_a_stale_one_is_not_trusted(backend):
    store = CollectionStore(backend.root_url, backend.storage_options)
    store.write_unit_memory("u1", make_memory())
    side_path = sfs.join(store.root, "units", "u1", "memory.json")
    body = json.loads(store.fs.cat_file(side_path))
    body["nbytes"] += 1  # a memory rewritten under another storage dtype, or a torn write
    sfs.write_atomic(store.fs, side_path, json.dumps(body).encode())
    assert store.unit_memory_info("u1") is None
    sfs.write_atomic(store.fs, side_path, b"{not json")
    assert store.unit_memory_info("u1") is None
    store.fs.rm(side_path)  # an older store: memory files only
    assert store.has_unit("u1") and store.unit_memory_info("u1") is None


def test_memory_stage_resume_reads_the_sidecar_not_the_memory(tmp_path, monkeypatch):
    """MemoryStage._cached takes a finished unit's facts from the sidecar (no read of the memory file); without a
    sidecar it reads the memory once and writes the sidecar."""
    from pipeline.memory_stage import MemoryStage

    store = CollectionStore(str(tmp_path / "store"))
    m = make_memory()
    m.header["gist"] = "the gist"
    info = store.write_unit_memory("u1", m)
    stage = MemoryStage.__new__(MemoryStage)  # no model needed for _cached
    stage.store = store
    reads = []
    real_read_all = sfs.read_all
    monkeypatch.setattr(sfs, "read_all", lambda fs, path, **kw: reads.append(path) or real_read_all(fs, path, **kw))
    assert stage._cached("u1") == (info.sha256, info.nbytes, "the gist", m.header)
    assert not [p for p in reads if p.endswith(".safetensors")]
    store.fs.rm(sfs.join(store.root, "units", "u1", "memory.json"))
    assert stage._cached("u1") == (info.sha256, info.nbytes, "the gist", m.header)
    assert [p for p in reads if p.endswith(".safetensors")]
    assert store.unit_memory_info("u1")["sha256"] == info.sha256  # backfilled


def test_a_memory_replaced_by_bytes_of_the_same_size_gets_its_own_sha256_on_resume(backend):
    """Batched and one-at-a-time memorizing give allclose, not byte-identical, files for one unit id: a sidecar
    left by one writer is not trusted for the other's file, although the sizes agree."""
    import torch

    from memorag_core.store.memory_file import encode_memory
    from pipeline.memory_stage import MemoryStage

    store = CollectionStore(backend.root_url, backend.storage_options)
    first = make_memory()
    info = store.write_unit_memory("u1", first)
    other = make_memory()
    other.keys = [k + 1e-3 * torch.ones_like(k) for k in other.keys]  # allclose, other bytes
    data = encode_memory(other)
    assert len(data) == info.nbytes and sfs.sha256_hex(data) != info.sha256
    sfs.write_atomic(store.fs, sfs.join(store.root, "units", "u1", "memory.safetensors"), data)  # its sidecar lost
    assert store.unit_memory_info("u1") is None
    stage = MemoryStage.__new__(MemoryStage)  # no model needed for _cached
    stage.store = store
    assert stage._cached("u1")[:2] == (sfs.sha256_hex(data), len(data))
    assert store.unit_memory_info("u1")["sha256"] == sfs.sha256_hex(data)  # the sidecar now names these bytes
