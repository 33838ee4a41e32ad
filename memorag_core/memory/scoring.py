"""Attention scores for KV selection, captured inside the model's own attention call.

Compressed memories keep, per layer and KV head, the window entries that the window's last tokens attend to most
(the observation window of SnapKV). To score entries we need the *final* query states of those last tokens: after
the projection, any q-norm, and the rotary embedding. Instead of re-deriving them per architecture (which
differs between Llama, Qwen2, Qwen3, Mistral...), the attention implementation ``memorag_sdpa``
(memorag_core/memory/attention.py) calls :func:`record`, which, while a :func:`capture_scores` block is active, does
one small extra matmul of the last ``obs`` queries against all keys. Works for any model that routes attention
through transformers' ``AttentionInterface`` (all current decoder-only LMs).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from memorag_core.memory.attention import ATTN_IMPLEMENTATION, register  # noqa: F401  (the public names)

_state = threading.local()


def _active() -> dict | None:
    return getattr(_state, "capture", None)


def record(module, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
    """Inside :func:`capture_scores`, store the layer's attention mass of the last ``obs`` queries; else nothing.

    Shapes: query (b, heads, q_len, d); key (b, kv_heads, k_len, d) (memory + window, already rotated).
    Records ``scores[layer_idx]`` of shape (b, kv_heads, k_len): softmax attention of the last ``obs`` queries,
    summed over those queries and averaged over the query heads that share each KV head.
    """
    capture = _active()
    if capture is None:
        return
    obs = min(capture["obs"], query.shape[2])
    b, heads, q_len, d = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    q = query[:, :, -obs:, :].float()  # (b, heads, obs, d)
    k = key.float().repeat_interleave(group, dim=1)  # (b, heads, k_len, d)
    scale = scaling if scaling is not None else d**-0.5
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # (b, heads, obs, k_len)
    # Causality among the observed queries: query r (r-th of the last obs) sees keys <= k_len - obs + r.
    rows = torch.arange(obs, device=key.device)[:, None]  # (obs, 1)
    cols = torch.arange(k_len, device=key.device)[None, :]  # (1, k_len)
    future = cols > (k_len - obs + rows)  # (obs, k_len)
    logits = logits.masked_fill(future, float("-inf"))
    probs = logits.softmax(dim=-1)  # (b, heads, obs, k_len)
    mass = probs.sum(dim=2)  # (b, heads, k_len)
    capture["scores"][module.layer_idx] = mass.view(b, kv_heads, group, k_len).mean(dim=2)  # (b, kv_heads, k_len)


@contextlib.contextmanager
def capture_scores(obs: int) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every ``memorag_sdpa`` call stores its layer's scores into the yielded dict.

    Args:
        obs: number of last query positions whose attention is summed (the observation window).
    """
    scores: dict[int, torch.Tensor] = {}
    _state.capture = {"obs": obs, "scores": scores}
    try:
        yield scores
    finally:
        _state.capture = None
