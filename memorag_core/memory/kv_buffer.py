"""Preallocated per-layer KV buffers for memories: written in place, never concatenated.

A memory reads text window by window: the model appends a window's K/V after the memory, then the memory keeps
the best entries of that window and forgets the rest. With transformers' ``DynamicCache`` each append is a
``torch.cat`` (the whole memory copied) and each selection another copy (the memory cut and re-joined). Here each
layer owns buffers with spare capacity:

* ``k_buf``, ``v_buf``: (rows, kv_heads, capacity, head_dim), ``off_buf``: (rows, kv_heads, capacity) int32, the
  source-token offset of each entry (attention pointers; -1 for the prompt head; ``None`` when unknown, e.g. a
  file written before pointers).
* ``length``: entries in use (the same for every row; rows with fewer entries are padded and masked by the caller).

``update`` writes new entries at ``length`` (growing the capacity geometrically only when full, or never when the
caller reserved it), ``keys``/``values`` are views of the used part, and the kept entries of a window are written
back in place over it. One memory is one row; :meth:`CompressedKVMemory.memorize_many` stacks several.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def _layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class MemoryLayer(DynamicLayer):
        """One layer's memory buffers (see the module docstring). ``keys``/``values`` are (rows, kv_heads, length,
        d) views; ``offsets`` is the (rows, kv_heads, length) int32 view or ``None``."""

        def __init__(self) -> None:
            super().__init__()
            self.length = 0
            self.k_buf: torch.Tensor | None = None  # (rows, kv_heads, capacity, dk)
            self.v_buf: torch.Tensor | None = None  # (rows, kv_heads, capacity, dv)
            self.off_buf: torch.Tensor | None = None  # (rows, kv_heads, capacity) int32
            self.track_offsets = True

        # -- buffers ------------------------------------------------------------------------------------------
        @property
        def capacity(self) -> int:
            return 0 if self.k_buf is None else self.k_buf.shape[2]

        def _sync(self) -> None:
            if self.k_buf is None:
                self.keys = self.values = None
                return
            self.keys = self.k_buf[:, :, :self.length]  # (rows, kv_heads, length, dk)
            self.values = self.v_buf[:, :, :self.length]  # (rows, kv_heads, length, dv)

        @property
        def offsets(self) -> torch.Tensor | None:
            return None if self.off_buf is None else self.off_buf[:, :, :self.length]  # (rows, kv_heads, length)

        def reserve(self, capacity: int, like_k: torch.Tensor | None = None, like_v: torch.Tensor | None = None
                    ) -> None:
            """Make room for ``capacity`` entries (one copy of the used part if the buffers move)."""
            if capacity <= self.capacity:
                return
            like_k = self.k_buf if like_k is None else like_k
            like_v = self.v_buf if like_v is None else like_v
            rows, heads = like_k.shape[:2]
            k = torch.empty((rows, heads, capacity, like_k.shape[-1]), dtype=like_k.dtype, device=like_k.device)
            v = torch.empty((rows, heads, capacity, like_v.shape[-1]), dtype=like_v.dtype, device=like_v.device)
            off = None
            if self.track_offsets:
                off = torch.full((rows, heads, capacity), -1, dtype=torch.int32, device=like_k.device)
            if self.length:
                k[:, :, :self.length] = self.k_buf[:, :, :self.length]
                v[:, :, :self.length] = self.v_buf[:, :, :self.length]
                if off is not None and self.off_buf is not None:
                    off[:, :, :self.length] = self.off_buf[:, :, :self.length]
                elif self.off_buf is None:
                    off = None  # entries of unknown source: offsets stay unavailable
                    self.track_offsets = False
            self.k_buf, self.v_buf, self.off_buf = k, v, off
            self.dtype, self.device, self.is_initialized = k.dtype, k.device, True
            self._sync()

        def adopt(self, keys: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor | None) -> None:
            """Use existing tensors (rows, kv_heads, n, d) as the full buffers, without a copy (e.g. a
            memory-mapped file); ``offsets`` (rows, kv_heads, n) int32 or ``None`` (unknown)."""
            self.k_buf, self.v_buf, self.off_buf = keys, values, offsets
            self.track_offsets = offsets is not None
            self.length = keys.shape[2]
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self._sync()

        def set_length(self, n: int) -> None:
            self.length = n
            self._sync()

        def select_rows(self, rows: torch.Tensor) -> None:
            """Keep only ``rows`` (a long tensor of row indices) of every buffer (one copy)."""
            self.k_buf, self.v_buf = self.k_buf[rows], self.v_buf[rows]
            self.off_buf = None if self.off_buf is None else self.off_buf[rows]
            self._sync()

        # -- the transformers cache-layer interface ---------------------------------------------------------
        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            """Write (rows, kv_heads, t, d) new entries at ``length`` in place; return the used views."""
            n, t = self.length, key_states.shape[-2]
            if n + t > self.capacity:
                self.reserve(max(n + t, 2 * self.capacity), key_states, value_states)
            self.k_buf[:, :, n:n + t] = key_states
            self.v_buf[:, :, n:n + t] = value_states
            self.length = n + t
            self._sync()
            return self.keys, self.values  # (rows, kv_heads, n + t, d)

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            self.length = 0
            self.k_buf = self.v_buf = self.off_buf = None
            self.track_offsets = True
            self.is_initialized = False
            self._sync()

        def crop(self, tokens_to_remove: int) -> None:
            """Negative: drop that many entries from the end; positive (legacy): keep that many."""
            if tokens_to_remove < 0:
                self.set_length(max(0, self.length + tokens_to_remove))
            elif 0 < tokens_to_remove < self.length:
                self.set_length(tokens_to_remove)

    return MemoryLayer


def memory_layer() -> Any:
    """A new empty :class:`MemoryLayer`."""
    return _layer_class()()


def memory_cache(num_layers: int) -> Any:
    """A transformers ``Cache`` of ``num_layers`` empty :class:`MemoryLayer` s."""
    from transformers.cache_utils import Cache

    return Cache(layers=[memory_layer() for _ in range(num_layers)])
