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

_CHUNK_ELEMENTS = 1 << 24  # float32 logits per chunk of keys (64 MB), whatever the memory's or window's length
_MIN_CHUNK = 256  # keys per chunk at least (few queries: fewer, larger matmuls)


def _active() -> dict | None:
    return getattr(_state, "capture", None)


def record(module, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
    """Inside :func:`capture_scores`, store the layer's attention mass of the last ``obs`` queries; else nothing.

    Shapes: query (b, heads, q_len, d); key (b, kv_heads, k_len, d) (memory + window, already rotated).
    Records ``scores[layer_idx]`` of shape (b, kv_heads, k_len - start): softmax attention of the last ``obs``
    queries to the keys from ``start`` on, summed over those queries and averaged over the query heads that share
    each KV head. Keys before ``start`` (the memory, when a window is scored) enter only the softmax normalizer.

    No copy of the keys: the queries are grouped per KV head, (b, kv_heads, group * obs, d), and multiplied with
    the keys as stored, in chunks of keys (a bounded float32 temporary even for bf16 keys, memories of millions
    of entries, and every query of a long window scoring it: ``obs_sample=0``), keeping a running log-sum-exp;
    the scored keys' probabilities are then summed chunk by chunk.

    Batched rows (``rows`` given to the capture): row i has ``rows[i]`` real queries, right-padded, and
    ``mem_lens[i]`` valid memory entries before the window (the rest up to the window is padding, masked).
    """
    capture = _active()
    if capture is None:
        return
    b, heads, q_len, d = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    past = k_len - q_len  # keys before this call's queries
    start = min(capture["start"], k_len)
    obs = min(capture["obs"], q_len)
    device = query.device
    lens = capture.get("rows")  # (b,) real queries per row, or None: all q_len
    weight = None
    sample = capture.get("sample") or 0
    if lens is None and not 0 < sample < obs:  # every row full, every observed query: a slice
        qpos = (q_len - obs + torch.arange(obs, device=device)).expand(b, obs)  # (b, obs) window slot of each
        q = query[:, :, -obs:, :]  # (b, heads, obs, d)
    else:
        # ``m`` queries spread evenly over each row's observed ones (its last min(obs, real queries)); m = obs
        # without sampling. A row with fewer observed queries than m would repeat some: each counts once.
        m = sample if 0 < sample < obs else obs
        end = lens.to(device) if lens is not None else torch.full((b,), q_len, device=device)  # (b,) real queries
        n = end.clamp(max=obs)[:, None]  # (b, 1) observed queries of each row
        r = torch.arange(m, device=device)[None]  # (1, m)
        qpos = end[:, None] - n + ((r + 1) * n) // m - 1  # (b, m), the last one is end - 1
        weight = (qpos >= end[:, None] - n).float()
        weight[:, 1:] *= (qpos[:, 1:] != qpos[:, :-1]).float()
        qpos = qpos.clamp(min=0)
        obs = m
        q = query.gather(2, qpos[:, None, :, None].expand(b, heads, obs, d))  # (b, heads, obs, d)
    q = q.float().reshape(b, kv_heads, group * obs, d)  # (b, kv_heads, g*obs, d), heads are kv-major
    scale = scaling if scaling is not None else d**-0.5
    mem_lens = capture.get("mem_lens")  # (b,) valid entries before the window, or None: all valid
    future_base = (past + qpos)[:, None, :].expand(b, group, obs).reshape(b, 1, group * obs, 1)  # (b,1,g*obs,1)

    def logits(c0: int, c1: int) -> torch.Tensor:
        """(b, kv_heads, g*obs, c1 - c0) masked attention logits of the observed queries to keys [c0, c1)."""
        kc = key[:, :, c0:c1]  # (b, kv_heads, n, d), a view
        lg = torch.matmul(q, kc.transpose(-1, -2).to(q.dtype)) * scale  # (b, kv_heads, g*obs, n)
        cols = torch.arange(c0, c1, device=device)  # (n,)
        if mem_lens is not None and c0 < past:
            pad = (cols[None, :] >= mem_lens.to(device)[:, None]) & (cols[None, :] < past)  # (b, n)
            lg = lg.masked_fill(pad[:, None, None, :], float("-inf"))
        if c1 > past:  # causality: query at slot t sees keys up to past + t
            lg = lg.masked_fill(cols[None, None, None, :] > future_base, float("-inf"))
        return lg

    # Keys are read in chunks of ``chunk`` (a bounded float32 temporary (b, kv_heads, g*obs, chunk)): a running
    # log-sum-exp over every key first, then the probabilities of the scored keys (the window's) chunk by chunk.
    # When the window's keys fit in one chunk their logits are computed once and kept between the two passes.
    chunk = max(_MIN_CHUNK, _CHUNK_ELEMENTS // max(1, b * heads * obs))
    lse, kept = None, None
    bounds = [(c0, min(start, c0 + chunk)) for c0 in range(0, start, chunk)]
    bounds += [(c0, min(k_len, c0 + chunk)) for c0 in range(start, k_len, chunk)]
    for c0, c1 in bounds:
        lg = logits(c0, c1)  # (b, kv_heads, g*obs, c1 - c0)
        if c0 == start and c1 == k_len:
            kept = lg
        part = lg.logsumexp(dim=-1)  # (b, kv_heads, g*obs)
        lse = part if lse is None else torch.logaddexp(lse, part)
    per_head = bool(capture.get("per_head"))  # re-ranking: one score row per query head
    out = torch.empty((b, heads if per_head else kv_heads, k_len - start), dtype=torch.float32, device=device)
    for c0 in range(start, k_len, chunk):
        c1 = min(k_len, c0 + chunk)
        lg = kept if kept is not None else logits(c0, c1)
        probs = (lg - lse[..., None]).exp().view(b, kv_heads, group, obs, c1 - c0)
        if weight is not None:
            probs = probs * weight[:, None, None, :, None]
        if per_head:  # query head h reads KV head h // group (kv-major, as transformers' repeat_kv)
            out[..., c0 - start:c1 - start] = probs.sum(dim=3).reshape(b, heads, c1 - c0)  # (b, heads, c1 - c0)
        else:
            out[..., c0 - start:c1 - start] = probs.sum(dim=3).mean(dim=2)  # (b, kv_heads, c1 - c0)
    capture["scores"][module.layer_idx] = out  # (b, kv_heads or heads, k_len - start)


@contextlib.contextmanager
def capture_scores(obs: int, start: int = 0, rows: torch.Tensor | None = None,
                   mem_lens: torch.Tensor | None = None, sample: int = 0,
                   per_head: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every ``memorag_sdpa`` call stores its layer's scores into the yielded dict.

    Args:
        obs: number of last query positions whose attention is summed (the observation window).
        start: score only keys from this index on (the window after a memory); earlier keys only normalize.
        rows: (b,) real query tokens per row of a right-padded batch (None: every row is full).
        mem_lens: (b,) valid memory entries per row before the window (None: all; the rest is padding).
        sample: when 0 < sample < obs, only ``sample`` of the observed queries, spread evenly over them, are
            summed (the cost of ``sample`` queries with the coverage of ``obs``).
        per_head: record each query head, (b, heads, k), instead of the mean over the query heads of each KV
            head, (b, kv_heads, k) (attention re-ranking reads single heads).
    """
    scores: dict[int, torch.Tensor] = {}
    _state.capture = {"obs": obs, "scores": scores, "start": start, "rows": rows, "mem_lens": mem_lens,
                      "sample": sample, "per_head": per_head}
    try:
        yield scores
    finally:
        _state.capture = None
