"""``memorag_sdpa``: transformers' SDPA plus two things our KV memories need, selected by thread-local blocks.

* :func:`memorag_core.memory.scoring.capture_scores` records the attention mass of the last queries (compression).
* A window read after a memory has a mask; transformers' SDPA would then repeat the memory's K/V per query head
  (``repeat_kv``). :func:`grouped_attention` attends without that copy.
* :func:`shared_prefix` decodes a batch of prompts after one batch-1 memory without copying it. The memory's
  K/V stay (1, kv_heads, M, d); the cache passed to the model (:func:`tail_cache`) holds only the prompt and
  generated entries, (batch, kv_heads, n, d), written in place into a preallocated buffer. The attention reads
  the memory once per step for all rows and all query heads of a KV head (grouped-query attention without
  ``repeat_kv``), then merges it with the per-row tail in one softmax.

What this replaces, measured in benchmarks/bench_decode.py: transformers' DynamicCache grows by ``torch.cat``
(every step copies the whole memory), a batch of b prompts needs b copies of the memory, and SDPA with a mask
repeats K/V per query head. After a 300 MB memory, each decoded token copied about 4 GB.

Outside both blocks the function is plain SDPA, so the model behaves exactly as with ``attn_implementation="sdpa"``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

import torch

ATTN_IMPLEMENTATION = "memorag_sdpa"

_state = threading.local()


def active_prefix() -> Any:
    return getattr(_state, "prefix", None)


@contextlib.contextmanager
def shared_prefix(cache: Any) -> Iterator[Any]:
    """Within the block, ``memorag_sdpa`` attends to the memory of ``cache`` (a :func:`tail_cache`) first."""
    previous = active_prefix()
    _state.prefix = cache
    try:
        yield cache
    finally:
        _state.prefix = previous


@functools.cache
def _tail_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class TailLayer(DynamicLayer):
        """A layer whose first M entries are a shared batch-1 memory and whose rest is a preallocated buffer.

        ``update`` writes the new entries in place and returns views of the tail only; sequence lengths (which
        transformers uses to size the attention mask) count the memory too.
        """

        def __init__(self, mem_keys: torch.Tensor | None, mem_values: torch.Tensor | None, capacity: int) -> None:
            super().__init__()
            self.mem_keys, self.mem_values = mem_keys, mem_values  # (1, kv_heads, M, d) each; None: empty memory
            self.capacity, self.length = capacity, 0  # the batch size comes from the first update

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            b, heads, _, d = key_states.shape
            self.keys = torch.empty((b, heads, self.capacity, d), dtype=self.dtype, device=self.device)
            self.values = torch.empty((b, heads, self.capacity, value_states.shape[-1]), dtype=self.dtype,
                                      device=self.device)
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, t = self.length, key_states.shape[-2]
            if n + t > self.capacity:
                raise RuntimeError(f"decode cache full: {n} + {t} entries > capacity {self.capacity}")
            self.keys[:, :, n:n + t] = key_states
            self.values[:, :, n:n + t] = value_states
            self.length = n + t
            return self.keys[:, :, :self.length], self.values[:, :, :self.length]  # (b, kv_heads, n + t, d)

        @property
        def mem_length(self) -> int:
            return 0 if self.mem_keys is None else self.mem_keys.shape[-2]

        def get_seq_length(self) -> int:
            return self.mem_length + self.length

        def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
            return self.get_seq_length() + query_length, 0

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a tail cache is written once per decode; it is never cropped")

    return TailLayer


def tail_cache(memory: Any, capacity: int, num_layers: int) -> Any:
    """A transformers ``Cache`` over ``memory`` (batch 1: ``.layers[i].keys`` (1, kv_heads, M, d)) for any batch.

    Args:
        capacity: most prompt + generated entries per row (the longest prompt's width + max new tokens).
        num_layers: the model's decoder layers (an empty memory has none of its own).
    """
    from transformers.cache_utils import Cache

    layer_cls = _tail_layer_class()
    mem = [(layer.keys, layer.values) if getattr(layer, "keys", None) is not None and layer.keys.numel() else
           (None, None) for layer in memory.layers]
    mem += [(None, None)] * (num_layers - len(mem))
    return Cache(layers=[layer_cls(k, v, capacity) for k, v in mem])


def _prefix_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None, layer: Any) -> torch.Tensor:
    """Attention of ``query`` over [memory | tail]; returns (b, q, heads, d) like transformers' SDPA.

    Shapes: query (b, heads, q, d); key/value: the tail (b, kv_heads, n, d), whose last q entries are the queries'
    own; memory (1, kv_heads, M, d); attention_mask: None (causal), bool (b, 1, q, M + n) with True = attend, or an
    additive float mask of that shape.

    The memory is visible to every query (what :func:`~memorag_core.memory.kv_decode.decode_after_cache` builds);
    the mask's tail part applies. Neither path copies the memory: a prompt (q > 1) runs
    :func:`_prompt_attention`; a decode step (q == 1), per token, does one matmul per KV head over every row and
    grouped head, then one softmax with the tail (measured in benchmarks/bench_decode.py).
    """
    mem_k, mem_v = layer.mem_keys, layer.mem_values  # (1, kv_heads, M, d)
    b, heads, q_len, d = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    m = mem_k.shape[2]
    scale = scaling if scaling is not None else d ** -0.5
    if attention_mask is None:
        # causal within the tail: query i (tail index n - q_len + i) sees tail keys up to it; memory fully visible
        qi = torch.arange(n - q_len, n, device=query.device)[:, None]  # (q, 1)
        ki = torch.arange(n, device=query.device)[None, :]  # (1, n)
        attention_mask = torch.cat([torch.ones((q_len, m), dtype=torch.bool, device=query.device), ki <= qi],
                                   dim=1)[None, None]  # (1, 1, q, M + n)
    mask = attention_mask[..., -(m + n):]  # (b | 1, 1, q, M + n)
    if q_len > 1:
        return _prompt_attention(query, key, value, mask[..., m:], scale, mem_k, mem_v)
    group, dv = heads // kv_heads, value.shape[-1]
    q = query.reshape(b, kv_heads, group, d)  # (b, kv_heads, g, d)
    s_mem = torch.matmul(q.transpose(0, 1).reshape(kv_heads, b * group, d), mem_k[0].transpose(-1, -2))
    s_mem = s_mem.view(kv_heads, b, group, m).transpose(0, 1)  # (b, kv_heads, g, M)
    s_tail = torch.matmul(q, key.transpose(-1, -2))  # (b, kv_heads, g, n)
    scores = torch.cat([s_mem, s_tail], dim=-1).float() * scale  # (b, kv_heads, g, M + n)
    mask = mask[:, :, 0, None]  # (b | 1, 1, 1, M + n)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    probs = scores.softmax(dim=-1).to(value.dtype)  # (b, kv_heads, g, M + n)
    p_mem = probs[..., :m].transpose(0, 1).reshape(kv_heads, b * group, m)
    o = torch.matmul(p_mem, mem_v[0]).view(kv_heads, b, group, dv).transpose(0, 1)  # (b, kv_heads, g, dv)
    o = o + torch.matmul(probs[..., m:], value)  # (b, kv_heads, g, dv)
    return o.reshape(b, 1, heads, dv)  # (b, q=1, heads, dv)


_CHUNK_ELEMENTS = 1 << 24  # float32 scores per chunk of memory entries in a prompt pass (64 MB): few launches
_CPU_CHUNK_ELEMENTS = 1 << 18  # on the CPU a 1 MB block stays in cache (measured: as fast as the fused kernel)
_MIN_CHUNK = 256


def _online_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, state: tuple | None,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of an online softmax: fold keys ``k`` (B, kv_heads, c, d) / values ``v`` (B, kv_heads, c, dv) into
    the running (max, sum, unnormalized output) of queries ``q`` (B, kv_heads, R, d) float32.

    ``state``: (max (B, kv_heads, R), sum (B, kv_heads, R), out (B, kv_heads, R, dv)), all float32, or None.
    ``bias``: additive float32 mask broadcastable to the scores (B, kv_heads, R, c), -inf where a key is hidden.
    """
    s = torch.matmul(q, k.transpose(-1, -2).float()).mul_(scale)  # (B, kv_heads, R, c) float32
    if bias is not None:
        s.add_(bias)
    top = s.amax(dim=-1)  # (B, kv_heads, R)
    if state is not None:
        top = torch.maximum(top, state[0])
    safe = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # a row that sees nothing yet stays at 0
    p = s.sub_(safe[..., None]).exp_()  # (B, kv_heads, R, c), in place: one score block alive
    out = torch.matmul(p, v.float())  # (B, kv_heads, R, dv)
    total = p.sum(dim=-1)  # (B, kv_heads, R)
    if state is not None:
        alpha = (state[0] - safe).exp()  # (B, kv_heads, R), rescales what was summed under the old max
        total = total + state[1] * alpha
        out = out + state[2] * alpha[..., None]
    return top, total, out


def _prompt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tail_mask: torch.Tensor,
                      scale: float, mem_k: torch.Tensor, mem_v: torch.Tensor) -> torch.Tensor:
    """Prompts of b rows after one shared memory, without copying the memory: (b, q, heads, dv).

    Shapes: query (b, heads, q, d); key/value, the tail (b, kv_heads, n, d); tail_mask (b | 1, 1, q, n), bool
    (True = attend) or additive float; memory (1, kv_heads, M, d), visible to every query.

    An online softmax (flash attention written with matmuls): the queries of every row and every query head of a
    KV head are stacked, (1, kv_heads, b * group * q, d), and read the memory as stored, in chunks of memory
    entries (a float32 score block of at most ``_CHUNK_ELEMENTS``); the per-row tail is the last block. Nothing
    is copied per row or per KV group, and no (q, M) score matrix exists whole.
    """
    b, heads, q_len, d = query.shape
    kv_heads, n, dv = key.shape[1], key.shape[2], value.shape[-1]
    group, m = heads // kv_heads, mem_k.shape[2]
    rows = b * group * q_len
    q = query.float().reshape(b, kv_heads, group * q_len, d)  # (b, kv_heads, g*q, d)
    state = None
    if m:
        q_all = q.transpose(0, 1).reshape(1, kv_heads, rows, d)  # (1, kv_heads, b*g*q, d)
        elements = min(_CHUNK_ELEMENTS, _CPU_CHUNK_ELEMENTS) if query.device.type == "cpu" else _CHUNK_ELEMENTS
        chunk = max(_MIN_CHUNK, elements // max(1, kv_heads * rows))
        for c0 in range(0, m, chunk):
            state = _online_softmax(q_all, mem_k[:, :, c0:c0 + chunk], mem_v[:, :, c0:c0 + chunk], scale, state)
        state = tuple(t.view(kv_heads, b, group * q_len, *t.shape[3:]).transpose(0, 1) for t in state)
        # each (b, kv_heads, g*q[, dv])
    if tail_mask.dtype == torch.bool:
        bias = torch.zeros(tail_mask.shape, device=query.device).masked_fill(~tail_mask, float("-inf"))
    else:
        bias = tail_mask.float()  # (b | 1, 1, q, n)
    rb = bias.shape[0]
    bias = bias[:, :, None].expand(rb, 1, group, q_len, n).reshape(rb, 1, group * q_len, n)  # (b | 1, 1, g*q, n)
    _, total, out = _online_softmax(q, key, value, scale, state, bias)
    out = out / total[..., None]  # (b, kv_heads, g*q, dv)
    return out.view(b, heads, q_len, dv).transpose(1, 2).to(query.dtype)  # (b, q, heads, dv)


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """Masked grouped-query attention without repeating K/V per query head: (b, q, heads, dv).

    Shapes: query (b, heads, q, d); key/value (b, kv_heads, k, d); mask (b | 1, 1, q, k) bool or additive.
    Where the fused kernel takes a mask and unequal head counts (:func:`masked_gqa_is_fused`) one call does it;
    elsewhere (CUDA) one SDPA call per position in the group, each with kv_heads query heads: equal head counts,
    so the memory-efficient kernel runs with the mask and reads the keys as stored.
    """
    b, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    if masked_gqa_is_fused(query.device):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                                               enable_gqa=True)  # (b, heads, q, dv)
        return out.transpose(1, 2)
    group = heads // kv_heads
    grouped = query.view(b, kv_heads, group, q_len, d)  # heads are kv-major
    out = query.new_empty((b, q_len, kv_heads, group, value.shape[-1]))  # (b, q, kv_heads, g, dv)
    for g in range(group):
        o = torch.nn.functional.scaled_dot_product_attention(grouped[:, :, g], key, value, attn_mask=mask,
                                                             scale=scale)  # (b, kv_heads, q, dv)
        out[:, :, :, g] = o.transpose(1, 2)
    return out.view(b, q_len, heads, value.shape[-1])


def masked_gqa_is_fused(device: torch.device) -> bool:
    """Whether SDPA runs a fused kernel for grouped-query attention *with a mask* on ``device``.

    CPU: yes (the flash kernel takes both; measured: 146 ms vs a 538 ms hand-written score matrix for a
    3 x 104-token prompt after 6,737 entries). CUDA: no; flash rejects masks and memory-efficient attention
    rejects unequal head counts, so SDPA falls back to the math kernel and materializes the score matrix
    (pytorch/pytorch#139586, huggingface/transformers#45636); one call per position in the group, with equal
    head counts, keeps a fused kernel without repeating K/V (:func:`grouped_attention`).
    """
    return device.type == "cpu"


def _plain(kwargs: dict) -> bool:
    """No softcapping, sinks or position bias: attention is exactly softmax(q k^T * scale + mask) v."""
    return kwargs.get("softcap") is None and kwargs.get("s_aux") is None and kwargs.get("position_bias") is None


def _supported(module: Any, kwargs: dict) -> bool:
    """The prefix path covers plain causal attention; softcapping, sinks or sliding windows fall back."""
    return (getattr(module, "sliding_window", None) is None and kwargs.get("softcap") is None
            and kwargs.get("s_aux") is None and kwargs.get("position_bias") is None)


def memorag_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention function (see the module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from memorag_core.memory import scoring

    scoring.record(module, query, key, scaling)
    prefix = active_prefix()
    layer = prefix.layers[module.layer_idx] if prefix is not None else None
    if layer is not None and layer.mem_keys is not None:
        if _supported(module, kwargs):
            return _prefix_attention(module, query, key, value, attention_mask, scaling, layer), None
        # Correct but copying: the whole memory in front of the tail, then the stock kernel.
        b = key.shape[0]
        key = torch.cat([layer.mem_keys.expand(b, -1, -1, -1), key], dim=2)
        value = torch.cat([layer.mem_values.expand(b, -1, -1, -1), value], dim=2)
    elif (attention_mask is not None and getattr(module, "num_key_value_groups", 1) > 1 and _plain(kwargs)
          and not (dropout and module.training) and query.device.type in ("cpu", "cuda")):
        # A window read after a memory has a mask; transformers' SDPA would then repeat the whole memory's K/V
        # per query head (repeat_kv) on CPU and CUDA: group x the memory, per layer, per window.
        return grouped_attention(query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> str:
    """Register ``memorag_sdpa`` (attention and mask functions) with transformers; idempotent. Returns the name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, memorag_sdpa)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
