"""``memorag_sdpa``: transformers' SDPA plus two things our KV memories need, selected by thread-local blocks.

* :func:`memorag_core.memory.scoring.capture_scores` records the attention mass of the last queries (compression).
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

    A prompt (q > 1) runs once per call: the memory is put in front of the tail for the fused SDPA kernel (one
    copy, no score matrix). A decode step (q == 1) runs per token and must not copy the memory: one matmul per KV
    head over every row and grouped head, then one softmax with the tail (measured in benchmarks/bench_decode.py).
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
        k = torch.cat([mem_k.expand(b, -1, -1, -1), key], dim=2)  # (b, kv_heads, M + n, d)
        v = torch.cat([mem_v.expand(b, -1, -1, -1), value], dim=2)
        gqa = heads != kv_heads
        if gqa and not masked_gqa_is_fused(query.device):
            from transformers.integrations.sdpa_attention import repeat_kv

            k, v = repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads)  # (b, heads, M + n, d)
            gqa = False
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale,
                                                               enable_gqa=gqa)
        return out.transpose(1, 2)  # (b, q, heads, dv)
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


def masked_gqa_is_fused(device: torch.device) -> bool:
    """Whether SDPA runs a fused kernel for grouped-query attention *with a mask* on ``device``.

    CPU: yes (the flash kernel takes both; measured: 146 ms vs a 538 ms hand-written score matrix for a
    3 x 104-token prompt after 6,737 entries). CUDA: no; flash rejects masks and memory-efficient attention
    rejects unequal head counts, so SDPA falls back to the math kernel and materializes the score matrix
    (pytorch/pytorch#139586, huggingface/transformers#45636); repeating K/V per head keeps a fused kernel.
    """
    return device.type == "cpu"


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
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> str:
    """Register ``memorag_sdpa`` (attention and mask functions) with transformers; idempotent. Returns the name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, memorag_sdpa)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
