import pyarrow as pa
import pytest
import torch

from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError, InvalidInputError
from memorag_core.store import fs as sfs
from memorag_core.store.bundle import Bundle
from tests.memorag_core.store.conftest import make_memory


def _write(url, opts, seed, text):
    b = Bundle(url, opts)
    b.write_bytes("index.faiss", text.encode())
    b.write_table("chunks.parquet", pa.table({"text": [text, text + "!"]}))
    info = b.write_memory("memory.safetensors", make_memory(seed=seed), storage_dtype="int8")
    return b, info


def test_commit_and_read_back_verified(backend):
    url = backend.url("bundle")
    b, info = _write(url, backend.storage_options, 1, "first")
    manifest = b.commit({"config": {"ratio": 4}, "stats": {"tokens": 123}})
    assert manifest["files"]["memory.safetensors"]["nbytes"] == info.nbytes
    assert manifest["files"]["memory.safetensors"]["storage_dtype"] == "int8"
    r = Bundle(url, backend.storage_options)
    got = r.read_manifest()
    assert got["config"] == {"ratio": 4} and got["files"] == manifest["files"]
    assert r.read_bytes("index.faiss") == b"first"
    assert r.read_table("chunks.parquet").column("text").to_pylist() == ["first", "first!"]
    mem = r.read_memory("memory.safetensors")
    assert mem.header["kind"] == "compressed_kv" and mem.keys[0].dtype == torch.float32
    with pytest.raises(ArtifactNotFoundError, match="no file 'nope'"):
        r.read_bytes("nope")


def test_no_bundle_and_bad_input(backend):
    with pytest.raises(ArtifactNotFoundError, match="no bundle at"):
        Bundle(backend.url("empty"), backend.storage_options).read_manifest()
    b = Bundle(backend.url("x"), backend.storage_options)
    with pytest.raises(InvalidInputError, match="nothing written"):
        b.commit({})
    with pytest.raises(InvalidInputError, match="must be a relative path"):
        b.write_bytes("../escape", b"x")
    b.write_bytes("a", b"x")
    with pytest.raises(InvalidInputError, match="reserved keys"):
        b.commit({"files": {}})


def test_interrupted_rewrite_leaves_old_bundle_loadable(backend):
    url, opts = backend.url("bundle"), backend.storage_options
    _write(url, opts, 1, "old")[0].commit({"n": 1})
    # a rewrite that crashes before commit: new files written, manifest never swapped
    _write(url, opts, 2, "new")
    r = Bundle(url, opts)
    assert r.read_manifest()["n"] == 1 and r.read_bytes("index.faiss") == b"old"
    r.read_memory("memory.safetensors")
    # a completed rewrite replaces it and removes the old generations (also the crashed one)
    b, _ = _write(url, opts, 3, "newer")
    b.commit({"n": 3})
    r = Bundle(url, opts)
    assert r.read_manifest()["n"] == 3 and r.read_bytes("index.faiss") == b"newer"
    fs, path = sfs.open_url(url, opts)
    gens = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("g-")]
    assert gens == [f"g-{b.generation}"]


def test_corrupted_file_is_detected_on_read(backend):
    url, opts = backend.url("bundle"), backend.storage_options
    b, _ = _write(url, opts, 1, "payload")
    manifest = b.commit({})
    fs, path = sfs.open_url(url, opts)
    target = f"{path}/{manifest['files']['chunks.parquet']['path']}"
    data = fs.cat_file(target)
    fs.pipe_file(target, data[:-10])
    with pytest.raises(CorruptArtifactError, match="chunks.parquet.*truncated"):
        Bundle(url, opts).read_table("chunks.parquet")
    mem = f"{path}/{manifest['files']['memory.safetensors']['path']}"
    raw = bytearray(fs.cat_file(mem))
    raw[-1] ^= 1
    fs.pipe_file(mem, bytes(raw))
    with pytest.raises(CorruptArtifactError, match="memory.safetensors.*sha256"):
        Bundle(url, opts).read_memory("memory.safetensors")
