"""Attention pointers: the question, read over a compressed memory, points at the source text it attends to.

A compressed memory keeps, per layer and KV head, the entries its windows attended to most, and (since pointers)
the source token offset of each kept entry (``CompressedKVMemory.offsets``, stored in the memory file as
``extra["offsets.<layer>"]``). At query time the question is read after the memory in one forward pass (no
decoding); the attention that its tokens pay to each memory entry is summed per source span (a retrieval chunk,
a passage) through the entries' offsets. Spans the question attends to most are *pointed at*, a retrieval signal
that costs one short prefill and needs no generated text.

Which layers and heads point well is a measurement (benchmarks/ablation.py chooses them on a development slice);
:func:`span_scores` takes them as arguments.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from memorag_core.errors import InvalidInputError, MemoryNotReadyError


@torch.no_grad()
def entry_attention(memory, prompt_ids: list[int], obs: int | None = None) -> torch.Tensor:
    """Attention mass that the last ``obs`` tokens of ``prompt_ids`` pay to each memory entry.

    The prompt is prefilled after the memory (the cache is cropped back afterwards, so the memory is unchanged).

    Returns:
        (layers, kv_heads, entries) float32: softmax mass summed over the observed tokens, averaged over the query
        heads of each KV head. Entries of the uncompressed prompt head are included (their offset is -1).

    Raises:
        MemoryNotReadyError: nothing memorized. InvalidInputError: an empty prompt, or a memory without a KV cache.
    """
    from memorag_core.memory import scoring

    if memory.is_empty:
        raise MemoryNotReadyError("nothing is memorized: pointers need a memory")
    if not prompt_ids:
        raise InvalidInputError("pointer prompt is empty")
    cache = getattr(memory, "cache", None)
    if cache is None:
        raise InvalidInputError(f"a {memory.kind} memory has no KV cache to point with")
    entries = memory.entries
    device = memory.model.device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, n)
    positions = torch.arange(memory.next_position, memory.next_position + len(prompt_ids), device=device)[None]
    try:
        with scoring.capture_scores(obs or len(prompt_ids)) as scores:
            memory.model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
    finally:
        crop_to(cache, entries)
    return torch.stack([scores[i][0, :, :entries].float().cpu() for i in range(len(scores))])  # (L, H, entries)


def crop_to(cache, entries: int) -> None:
    """Drop the cache entries after the first ``entries`` (the prompt just read), in every layer."""
    extra = cache.get_seq_length() - entries
    if extra > 0:
        cache.crop(-extra)  # a negative length removes that many entries (transformers >= 4.x and 5.x)


def question_attention(memory, question: str) -> torch.Tensor:
    """:func:`entry_attention` of ``question`` asked as a new user turn after the memory (the tokens of the
    question and the assistant header observed; the turn's opening tokens are not)."""
    if memory.prompts is None:
        raise MemoryNotReadyError("nothing is memorized: pointers need a memory")
    prompt = memory.task_ids(question)
    middle = memory._encode(memory._render(memory.prompts)[1])
    return entry_attention(memory, prompt, obs=max(1, len(prompt) - len(middle)))


def token_char_starts(tokenizer, text: str) -> np.ndarray:
    """Character offset where each token of ``text`` starts (the memory's tokenization, no special tokens)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)  # (tokens,)


def span_scores(mass: torch.Tensor, offsets: Sequence[torch.Tensor], token_span: np.ndarray, n_spans: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Pointer mass and kept-entry count per source span, per layer and KV head.

    Args:
        mass: (layers, kv_heads, entries) from :func:`entry_attention`.
        offsets: per layer (1, kv_heads, entries) int32 source token offsets (-1: not source text).
        token_span: (raw_tokens,) int, the span (chunk or passage index) of each source token, -1 for none.
        n_spans: number of spans.

    Returns:
        (mass_sum, entry_count), each (layers, kv_heads, n_spans) float32.
    """
    if len(offsets) != mass.shape[0]:
        raise InvalidInputError("this memory holds no source offsets (written before pointers): re-memorize it")
    token_span = torch.as_tensor(np.asarray(token_span), dtype=torch.long)  # (T,)
    layers, heads, _ = mass.shape
    total = torch.zeros(layers, heads, n_spans + 1)  # last bin: entries outside any span
    count = torch.zeros(layers, heads, n_spans + 1)
    for li in range(layers):
        off = offsets[li][0].long()  # (kv_heads, entries)
        valid = (off >= 0) & (off < token_span.numel())
        span = torch.where(valid, token_span[off.clamp(0, max(token_span.numel() - 1, 0))], -1)  # (H, entries)
        span = torch.where(span >= 0, span, n_spans)
        total[li].scatter_add_(1, span, mass[li])
        count[li].scatter_add_(1, span, torch.ones_like(mass[li]))
    return total[:, :, :n_spans].numpy(), count[:, :, :n_spans].numpy()


def char_spans_to_tokens(char_starts: np.ndarray, span_starts: Sequence[int]) -> np.ndarray:
    """(tokens,) span index of each token, given the sorted character start of each span (the span holding the
    token's first character)."""
    starts = list(span_starts)
    return np.asarray([bisect.bisect_right(starts, int(c)) - 1 for c in char_starts], dtype=np.int64)


def point(mass_sum: np.ndarray, entry_count: np.ndarray, layers: Sequence[int] | None = None,
          heads: Sequence[int] | None = None, normalize: str = "mean") -> np.ndarray:
    """One pointer score per span from the per-(layer, head) sums: the chosen layers and heads averaged.

    ``normalize``: ``sum`` (total mass: favours long spans), ``mean`` (mass per kept entry) or ``sqrt`` (mass over
    the square root of the entry count, between the two).
    """
    m = mass_sum if layers is None else mass_sum[list(layers)]  # (L', H, S)
    c = entry_count if layers is None else entry_count[list(layers)]
    if heads is not None:
        m, c = m[:, list(heads)], c[:, list(heads)]
    if normalize == "mean":
        m = m / np.maximum(c, 1.0)
    elif normalize == "sqrt":
        m = m / np.sqrt(np.maximum(c, 1.0))
    elif normalize != "sum":
        raise InvalidInputError(f"normalize must be sum, mean or sqrt, got {normalize!r}")
    # each (layer, head) as a distribution over spans, so a layer with a large total does not dominate
    m = m / np.maximum(m.sum(axis=-1, keepdims=True), 1e-12)
    return m.reshape(-1, m.shape[-1]).mean(axis=0)  # (S,)
