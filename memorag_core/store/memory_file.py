"""Memory files: per-layer K and V tensors of one memory as safetensors, with a JSON header. Never pickle.

Layout (see :class:`~memorag_core.store.schemas.MemoryFileHeader`): ``layers.<i>.key`` and ``layers.<i>.value``
each ``(kv_heads, entries, head_dim)``; layers may hold different entry counts. The dtype is kept (bf16, fp16,
fp32) unless 8-bit storage is chosen:

* ``int8``: symmetric absmax quantization over head_dim, one float32 scale per (head, entry):
  ``q = round(x / s)``, ``s = max|x| / 127``. Error <= s/2 per element.
* ``fp8``: ``float8_e4m3fn`` of ``x / s`` with ``s = max|x| / 448`` (e4m3's largest finite value), same scales.

Both dequantize on load to the original dtype recorded in the header (or ``dtype=``). Scales cost 4 bytes per
(head, entry), i.e. 1/16 of a head_dim-64 row stored in 8 bits.

Keys (``key_scales``): rotated keys have outlier channels (a few rotary frequencies carry most of the magnitude),
so one absmax per row spends the 8 bits on them. ``"channel"`` first divides each key channel by its absmax over
the layer's entries, per head (``layers.<i>.key_channel_scale``, (kv_heads, 1, head_dim) float32), then quantizes
per (head, entry) as above: ``x ~= q * s_entry * c_channel``. ``"token"`` is the per-(head, entry) scheme alone
(files written before this option). Values are always per (head, entry). Loading handles both (a file without
channel scales is a per-token file). Measured in benchmarks/bench_int8_keys.py (docs/memory.md).

Saving is atomic (temporary file + rename locally, a single S3 object otherwise) and returns the sha256 and
size, which callers record in a manifest; loading verifies them when given. Local files are memory-mapped
(copy-on-write, so the tensors are writable and the file is never modified): loading a memory costs page-ins,
not a copy. Remote files are read with concurrent ranged GETs into one buffer that the tensors then share.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from memorag_core.errors import CorruptArtifactError, InvalidInputError
from memorag_core.store import fs as sfs
from memorag_core.store.schemas import STORAGE_DTYPES, MemoryFileHeader

logger = logging.getLogger(__name__)

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_QMAX = {"int8": 127.0, "fp8": 448.0}
_QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_MAX_HEADER = 100 * 2**20


@dataclass
class MemoryTensors:
    """The tensors of one memory, as stored.

    ``keys[i]`` and ``values[i]`` are layer i's ``(kv_heads, entries_i, head_dim)`` tensors, all of one floating
    dtype (float32, bfloat16 or float16); K and V of a layer have the same heads and entries. ``header`` is the
    memory's JSON-serializable description (model, model_revision, kind, ratio, window, raw_tokens, entries,
    positions mode, next_position, dtype, language, ...), filled by the memory module. ``extra`` holds optional
    named tensors of any dtype (e.g. int64 token ids).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    header: dict
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held by K, V and extra tensors in memory."""
        tensors = [*self.keys, *self.values, *self.extra.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class MemoryFileInfo:
    """Where a memory file was written and what to record in a manifest."""

    url: str
    """URL of the file (``s3://...`` or a local path)."""
    sha256: str
    """Hex sha256 of the whole file."""
    nbytes: int
    """File size in bytes."""
    storage_dtype: str
    """``keep``, ``int8`` or ``fp8``."""

    def to_dict(self) -> dict:
        """The manifest entry ``{sha256, nbytes, storage_dtype}``."""
        return {"sha256": self.sha256, "nbytes": self.nbytes, "storage_dtype": self.storage_dtype}


def _validate(m: MemoryTensors) -> torch.dtype:
    if not isinstance(m, MemoryTensors):
        raise InvalidInputError(f"expected MemoryTensors, got {type(m).__name__}")
    if not m.keys or len(m.keys) != len(m.values):
        raise InvalidInputError(f"memory needs >= 1 layer and as many values as keys "
                                f"(got {len(m.keys)} keys, {len(m.values)} values)")
    dtype = m.keys[0].dtype
    if dtype not in _KV_DTYPES.values():
        raise InvalidInputError(f"memory K/V dtype {dtype} is not one of {sorted(_KV_DTYPES)}")
    for i, (k, v) in enumerate(zip(m.keys, m.values)):
        if k.dim() != 3 or v.dim() != 3:
            raise InvalidInputError(f"layer {i}: K and V must be (kv_heads, entries, head_dim), got "
                                    f"{tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[:2] != v.shape[:2]:
            raise InvalidInputError(f"layer {i}: K {tuple(k.shape)} and V {tuple(v.shape)} differ in heads/entries")
        if k.dtype != dtype or v.dtype != dtype:
            raise InvalidInputError(f"layer {i}: dtype {k.dtype}/{v.dtype} differs from layer 0's {dtype}")
    for name, t in m.extra.items():
        if not isinstance(t, torch.Tensor) or not name or "/" in name:
            raise InvalidInputError(f"extra tensor {name!r} must be a torch.Tensor with a plain name")
    return dtype


KEY_SCALES = ("channel", "token")
DEFAULT_KEY_SCALES = "channel"  # measured: keys 2.7x closer, worst channel 10x (docs/memory.md)


def _channel_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-(head, channel) absmax of x (heads, entries, dim) over the entries: (heads, 1, dim) float32."""
    return x.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12)


def _quantize(x: torch.Tensor, storage: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (heads, entries, dim) -> (q same shape in 8 bits, scale (heads, entries, 1) float32)."""
    xf = x.float()  # (heads, entries, dim)
    scale = (xf.abs().amax(dim=-1, keepdim=True) / _QMAX[storage]).clamp_min(1e-12)  # (heads, entries, 1)
    y = xf / scale  # (heads, entries, dim), |y| <= qmax
    if storage == "int8":
        return y.round().clamp_(-127, 127).to(torch.int8), scale
    return y.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def encode_memory(m: MemoryTensors, storage_dtype: str | None = None, key_scales: str | None = None) -> bytes:
    """Serialize a memory to safetensors bytes (see the module docstring for the layout).

    Args:
        key_scales: 8-bit storage of keys: ``"channel"`` (per-channel then per-entry scales) or ``"token"``
            (per-entry scales only); None = ``DEFAULT_KEY_SCALES``. Ignored when the dtype is kept.

    Raises:
        InvalidInputError: bad shapes/dtypes, an unknown storage_dtype or key_scales, or a header that is not JSON.
    """
    from safetensors.torch import save

    storage = storage_dtype or "keep"
    if storage not in STORAGE_DTYPES:
        raise InvalidInputError(f"storage_dtype {storage_dtype!r} is not one of None, 'int8', 'fp8'")
    key_scales = key_scales or DEFAULT_KEY_SCALES
    if key_scales not in KEY_SCALES:
        raise InvalidInputError(f"key_scales {key_scales!r} is not one of {KEY_SCALES}")
    dtype = _validate(m)
    tensors: dict[str, torch.Tensor] = {}
    for i, (k, v) in enumerate(zip(m.keys, m.values)):
        for part, t in (("key", k), ("value", v)):
            t = t.detach().to("cpu")
            if storage == "keep":
                tensors[f"layers.{i}.{part}"] = t.contiguous()  # (kv_heads, entries, head_dim)
            else:
                if part == "key" and key_scales == "channel" and t.shape[1]:
                    channel = _channel_scale(t)  # (kv_heads, 1, head_dim)
                    tensors[f"layers.{i}.key_channel_scale"] = channel.contiguous()
                    t = t.float() / channel  # every channel in [-1, 1]: outliers no longer set the row scale
                q, scale = _quantize(t, storage)
                tensors[f"layers.{i}.{part}"] = q.contiguous()  # (kv_heads, entries, head_dim) 8-bit
                tensors[f"layers.{i}.{part}_scale"] = scale.contiguous()  # (kv_heads, entries, 1)
    for name, t in m.extra.items():
        tensors[f"extra.{name}"] = t.detach().to("cpu").contiguous()
    dtype_name = next(n for n, d in _KV_DTYPES.items() if d == dtype)
    header = MemoryFileHeader(layers=len(m.keys), dtype=dtype_name, storage_dtype=storage,
                              extra=sorted(m.extra), header=dict(m.header))
    return save(tensors, metadata={"memorag": header.to_json()})


def decode_memory(buf: torch.Tensor, what: str, *, dtype: torch.dtype | None = None,
                  device: str = "cpu") -> MemoryTensors:
    """Parse safetensors bytes held in a uint8 tensor ``buf`` (shared, not copied, where alignment allows).

    Raises:
        CorruptArtifactError: truncated file, bad safetensors header, missing tensors; names ``what``.
        SchemaVersionError: a newer memory file schema than this code knows.
    """
    size = buf.numel()
    if size < 8:
        raise CorruptArtifactError(f"{what}: {size} bytes, too short for a safetensors file (truncated)")
    (hlen,) = struct.unpack("<Q", bytes(buf[:8].tolist()))
    if hlen > min(_MAX_HEADER, size - 8):
        raise CorruptArtifactError(f"{what}: safetensors header length {hlen} exceeds the file ({size} bytes); "
                                   "truncated or not a safetensors file")
    try:
        meta = json.loads(bytes(buf[8:8 + hlen].numpy()))
    except ValueError as exc:
        raise CorruptArtifactError(f"{what}: safetensors header is not valid JSON ({exc})") from exc
    head = MemoryFileHeader.from_json((meta.pop("__metadata__", None) or {}).get("memorag"), what)
    data_start = 8 + hlen
    data_len = size - data_start
    ends = [info["data_offsets"][1] for info in meta.values()] or [0]
    if max(ends) != data_len:
        raise CorruptArtifactError(f"{what}: tensor data needs {max(ends)} bytes but the file holds {data_len} "
                                   "(truncated or padded)")

    def tensor(name: str) -> torch.Tensor:
        info = meta.get(name)
        if info is None:
            raise CorruptArtifactError(f"{what}: tensor {name!r} missing")
        st_dtype = _ST_DTYPES.get(info.get("dtype"))
        begin, end = info["data_offsets"]
        if st_dtype is None or not 0 <= begin <= end:
            raise CorruptArtifactError(f"{what}: tensor {name!r} has a bad dtype or offsets")
        raw = buf[data_start + begin:data_start + end]  # (nbytes,) uint8
        itemsize = torch.empty((), dtype=st_dtype).element_size()
        if raw.numel() != int(np.prod(info["shape"], dtype=np.int64)) * itemsize:
            raise CorruptArtifactError(f"{what}: tensor {name!r} size does not match its shape {info['shape']}")
        if raw.storage_offset() % itemsize:
            raw = raw.clone()  # misaligned (not written by safetensors): copy to realign
        return raw.view(st_dtype).view(info["shape"])

    out_dtype = dtype or _KV_DTYPES.get(head.dtype)
    if out_dtype is None:
        raise CorruptArtifactError(f"{what}: unknown K/V dtype {head.dtype!r}")
    keys, values = [], []
    for i in range(head.layers):
        for part, dest in (("key", keys), ("value", values)):
            t = tensor(f"layers.{i}.{part}")  # (kv_heads, entries, head_dim)
            if head.storage_dtype != "keep":
                scale = tensor(f"layers.{i}.{part}_scale")  # (kv_heads, entries, 1) float32
                t = t.float() * scale  # (kv_heads, entries, head_dim)
                if part == "key" and f"layers.{i}.key_channel_scale" in meta:
                    t = t * tensor(f"layers.{i}.key_channel_scale")  # (kv_heads, 1, head_dim) float32
                t = t.to(out_dtype)
            elif t.dtype != out_dtype:
                t = t.to(out_dtype)
            dest.append(t.to(device) if device != "cpu" else t)
    extra = {n: tensor(f"extra.{n}").to(device) if device != "cpu" else tensor(f"extra.{n}") for n in head.extra}
    return MemoryTensors(keys=keys, values=values, header=head.header, extra=extra)


def save_memory(m: MemoryTensors, url: str, *, storage_dtype: str | None = None,
                storage_options: dict | None = None, key_scales: str | None = None) -> MemoryFileInfo:
    """Write a memory file atomically (readers never see a half-written file) and return its sha256 and size.

    Args:
        m: the memory. url: local path or ``s3://...`` of the ``.safetensors`` file.
        storage_dtype: None keeps the dtype; ``"int8"`` or ``"fp8"`` store 8 bits plus per-(head, entry) scales.

    Raises:
        InvalidInputError: bad tensors/header/storage_dtype. StoreAccessError / StoreUnavailableError /
        ArtifactNotFoundError (missing bucket): the write failed, naming the url; nothing was replaced.
    """
    data = encode_memory(m, storage_dtype, key_scales)
    fs, path = sfs.open_url(url, storage_options)
    sfs.write_atomic(fs, path, data)
    info = MemoryFileInfo(url=sfs.url_of(fs, path), sha256=sfs.sha256_hex(data), nbytes=len(data),
                          storage_dtype=storage_dtype or "keep")
    logger.debug("saved memory %s (%d bytes, %s)", info.url, info.nbytes, info.storage_dtype)
    return info


def _map_local(path: str) -> torch.Tensor:
    """Memory-map a local file copy-on-write as a (nbytes,) uint8 tensor."""
    arr = np.memmap(path, dtype=np.uint8, mode="c")
    return torch.from_numpy(arr)


def load_memory(url: str, *, expected_sha256: str | None = None, dtype: torch.dtype | None = None,
                device: str = "cpu", storage_options: dict | None = None) -> MemoryTensors:
    """Load a memory file written by :func:`save_memory`.

    Args:
        url: local path or ``s3://...``. expected_sha256: verified over the whole file when given (the manifest's).
        dtype: K/V dtype of the result (default: the header's original dtype; 8-bit storage dequantizes to it).
        device: where the tensors go (``cpu`` keeps the memory map / download buffer, no copy).

    Raises:
        ArtifactNotFoundError: no such file or bucket. CorruptArtifactError: truncated, checksum mismatch, bad
        header. SchemaVersionError: newer file schema. StoreAccessError / StoreUnavailableError: see fs.
        All name the url.
    """
    fs, path = sfs.open_url(url, storage_options)
    what = sfs.url_of(fs, path)
    if sfs.is_local(fs):
        sfs.with_retries(lambda: fs.info(path), what=f"stat {what}", attempts=1)
        buf = _map_local(path) if fs.size(path) else torch.empty(0, dtype=torch.uint8)  # (nbytes,) uint8
    else:
        buf = torch.frombuffer(sfs.read_all(fs, path), dtype=torch.uint8)  # (nbytes,) uint8, shares the buffer
    if expected_sha256 is not None:
        digest = hashlib.sha256(buf.numpy()).hexdigest()
        if digest != expected_sha256:
            raise CorruptArtifactError(f"{what}: sha256 {digest} does not match the recorded {expected_sha256}")
    return decode_memory(buf, what, dtype=dtype, device=device)
