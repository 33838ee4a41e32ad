import json
import struct

import pytest
import torch
from safetensors.torch import save

from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError, InvalidInputError, SchemaVersionError
from memorag_core.store import fs as sfs
from memorag_core.store.memory_file import MemoryTensors, load_memory, save_memory
from memorag_core.store.schemas import SCHEMA_VERSION
from tests.memorag_core.store.conftest import make_memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_keeps_dtype_shapes_header_and_extra(backend, dtype):
    m = make_memory(dtype=dtype)
    url = backend.url("m.safetensors")
    info = save_memory(m, url, storage_options=backend.storage_options)
    assert info.storage_dtype == "keep" and len(info.sha256) == 64
    r = load_memory(url, expected_sha256=info.sha256, storage_options=backend.storage_options)
    assert [k.shape[1] for k in r.keys] == [7, 9, 11]
    for a, b in zip(m.keys + m.values, r.keys + r.values):
        assert b.dtype == dtype and torch.equal(a, b)
    assert r.header == m.header
    assert r.extra["token_ids"].dtype == torch.int64 and torch.equal(r.extra["token_ids"], m.extra["token_ids"])


@pytest.mark.parametrize("key_scales", ["channel", "token"])
@pytest.mark.parametrize("storage,tol", [("int8", 0.5 / 127), ("fp8", 0.07)])
def test_8bit_storage_dequantizes_within_bound(backend, storage, tol, key_scales):
    m = make_memory(dtype=torch.bfloat16, entries=(40, 40, 40), dim=64)
    url = backend.url(f"m-{storage}.safetensors")
    info = save_memory(m, url, storage_dtype=storage, storage_options=backend.storage_options, key_scales=key_scales)
    full = save_memory(m, backend.url("full.safetensors"), storage_options=backend.storage_options)
    assert info.nbytes < 0.6 * full.nbytes  # 8 bits + fp32 scale per (head, entry) vs 16 bits
    r = load_memory(url, expected_sha256=info.sha256, storage_options=backend.storage_options)
    assert r.keys[0].dtype == torch.bfloat16  # the original dtype from the header
    for i, (a, b) in enumerate(zip(m.keys + m.values, r.keys + r.values)):
        a32, b32 = a.float(), b.float()
        if i < len(m.keys) and key_scales == "channel":
            # keys: each channel divided by its absmax c over the entries, then per-row absmax of the result
            c = a32.abs().amax(dim=1, keepdim=True)  # (heads, 1, dim)
            bound = (a32 / c).abs().amax(dim=-1, keepdim=True) * c  # (heads, entries, dim)
        else:
            bound = a32.abs().amax(dim=-1, keepdim=True)  # (heads, entries, 1)
        # relative to each row's absmax: int8 rounds to 1/254, e4m3 keeps 3 mantissa bits (+ bf16 output rounding)
        assert ((a32 - b32).abs() / bound).max() <= tol + 2 ** -8
    r32 = load_memory(url, dtype=torch.float32, storage_options=backend.storage_options)
    assert r32.values[2].dtype == torch.float32


def test_per_token_key_files_keep_the_old_layout_and_load(tmp_path):
    from safetensors import safe_open

    m = make_memory(dtype=torch.float32, entries=(40, 40, 40), dim=64)
    m.keys[0][:, :, 3] *= 30.0  # an outlier channel, as rotated keys have
    errs = {}
    for scheme in ("token", "channel"):
        url = str(tmp_path / f"{scheme}.safetensors")
        save_memory(m, url, storage_dtype="int8", key_scales=scheme)
        with safe_open(url, "pt") as f:
            assert ("layers.0.key_channel_scale" in f.keys()) == (scheme == "channel")
        r = load_memory(url)
        errs[scheme] = float((r.keys[0] - m.keys[0]).norm() / m.keys[0].norm())
    assert errs["channel"] < errs["token"]


def test_local_load_is_memory_mapped_copy_on_write(tmp_path):
    m = make_memory()
    url = str(tmp_path / "m.safetensors")
    info = save_memory(m, url)
    r = load_memory(url, expected_sha256=info.sha256)
    # all tensors are views into one mapped buffer, not per-tensor copies
    ptrs = {t.untyped_storage().data_ptr() for t in r.keys + r.values}
    assert len(ptrs) == 1
    r.keys[0].zero_()  # writable, but the file is never modified
    assert sfs.sha256_hex((tmp_path / "m.safetensors").read_bytes()) == info.sha256


def test_save_replaces_atomically_and_rejects_bad_input(tmp_path):
    url = str(tmp_path / "m.safetensors")
    first = save_memory(make_memory(seed=1), url)
    bad = make_memory()
    bad.values[1] = bad.values[1][:, :3]
    with pytest.raises(InvalidInputError, match="layer 1"):
        save_memory(bad, url)
    with pytest.raises(InvalidInputError, match="storage_dtype"):
        save_memory(make_memory(), url, storage_dtype="int4")
    with pytest.raises(InvalidInputError, match="not JSON-serializable"):
        save_memory(MemoryTensors(keys=make_memory().keys, values=make_memory().values, header={"x": object()}), url)
    with pytest.raises(InvalidInputError, match="dtype"):
        save_memory(MemoryTensors(keys=[torch.zeros(1, 2, 3, dtype=torch.int32)],
                                  values=[torch.zeros(1, 2, 3, dtype=torch.int32)], header={}), url)
    # the failed saves left the first file whole
    assert load_memory(url, expected_sha256=first.sha256).header["model"] == "tiny"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_missing_truncated_and_mismatched_files_name_the_url(backend):
    opts = backend.storage_options
    url = backend.url("m.safetensors")
    with pytest.raises(ArtifactNotFoundError, match="m.safetensors"):
        load_memory(url, storage_options=opts)
    info = save_memory(make_memory(), url, storage_options=opts)
    fs, path = sfs.open_url(url, opts)
    data = fs.cat_file(path)
    fs.pipe_file(path, data[: len(data) - 100])  # truncated
    with pytest.raises(CorruptArtifactError, match="truncated") as ei:
        load_memory(url, storage_options=opts)
    assert "m.safetensors" in str(ei.value)
    with pytest.raises(CorruptArtifactError, match="sha256"):
        load_memory(url, expected_sha256=info.sha256, storage_options=opts)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # same size, one byte of tensor data changed
    fs.pipe_file(path, bytes(flipped))
    with pytest.raises(CorruptArtifactError, match="does not match the recorded"):
        load_memory(url, expected_sha256=info.sha256, storage_options=opts)
    fs.pipe_file(path, b"\x10\x00")
    with pytest.raises(CorruptArtifactError, match="too short"):
        load_memory(url, storage_options=opts)


def test_foreign_or_newer_files_fail_clearly(tmp_path):
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(save({"w": torch.zeros(2)}))
    with pytest.raises(CorruptArtifactError, match="without a memorag header"):
        load_memory(str(plain))
    newer = tmp_path / "newer.safetensors"
    head = {"format": "memorag.memory", "schema_version": SCHEMA_VERSION + 1, "layers": 1, "dtype": "float32"}
    newer.write_bytes(save({"layers.0.key": torch.zeros(1, 1, 1), "layers.0.value": torch.zeros(1, 1, 1)},
                           metadata={"memorag": json.dumps(head)}))
    with pytest.raises(SchemaVersionError, match="newer.safetensors"):
        load_memory(str(newer))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CorruptArtifactError, match="header length"):
        load_memory(str(junk))
