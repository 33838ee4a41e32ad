"""Batched decoding after a KV memory whose length differs from the number of tokens it stands for.

``model.generate`` assumes the cache holds exactly the tokens before ``input_ids``. A compressed memory holds M
entries for T >> M tokens and its next position may be M (compact) or T (original), so we run the small loop
ourselves: left-padded prompts, a 2-D attention mask of ``[memory ones | prompt mask | generated ones]`` and
explicit position ids per row. Masks come from the cache length (transformers builds the causal part from it),
positions only feed the rotary embedding.

The memory is never copied or modified: the model gets a :func:`~memorag_core.memory.attention.tail_cache` that
holds only the prompt and generated entries (preallocated, written in place), and the ``memorag_sdpa`` attention
reads the batch-1 memory once per step for every row (memorag_core/memory/attention.py).
"""

from __future__ import annotations

from typing import Any

import torch

from memorag_core.memory import attention


def _pick(logits: torch.Tensor, temperature: float, top_p: float | None, generator: torch.Generator | None):
    """Next tokens from logits (b, vocab): greedy when temperature == 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)  # (b,)
    probs = (logits / temperature).softmax(dim=-1)  # (b, vocab)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (b,)


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty on every row at once: logits (b, vocab), seen (b, vocab) bool."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


@torch.no_grad()
def decode_after_cache(model: Any, cache: Any, next_position: int, prompts: list[list[int]], *,
                       max_new_tokens: int, eos_ids: set[int], pad_id: int, temperature: float = 0.0,
                       top_p: float | None = None, repetition_penalty: float | None = None,
                       seed: int | None = None, stop_check_every: int | None = None) -> list[list[int]]:
    """Generate for each prompt after the memory in ``cache``; the cache is left as it was.

    The loop keeps everything on the model's device: generated tokens go into a preallocated (b, max_new_tokens)
    tensor, the finished flags stay a device tensor, the attention mask is preallocated at its final width and
    passed as a growing view (4-D, so transformers builds nothing per step), and the repetition penalty is a
    (b, vocab) mask. The host reads the device only to stop early (every ``stop_check_every`` steps: 1 on CPU,
    where reading is free, 8 on accelerators) and once at the end.

    Args:
        model: a Hugging Face causal LM whose attention implementation is ``memorag_sdpa``
            (:func:`memorag_core.memory.attention.register`).
        cache: a batch-1 cache with M entries per layer, each ``.layers[i].keys`` (1, kv_heads, M, head_dim).
        next_position: rotary position of the first prompt token.
        prompts: token ids per prompt (any lengths; left-padded into one batch).
        max_new_tokens: most tokens generated per prompt; decoding stops early once every row hit an EOS id.
        repetition_penalty: >1 divides positive logits (multiplies negative ones) of tokens already in the row.

    Returns:
        the generated ids of each prompt, EOS excluded.
    """
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != attention.ATTN_IMPLEMENTATION:
        raise ValueError(f"decode_after_cache needs the model's attention implementation to be "
                         f"{attention.ATTN_IMPLEMENTATION!r} (model.set_attn_implementation(attention.register())); "
                         f"it is {impl!r}")
    device = model.device
    batch = len(prompts)
    mem_len = cache.get_seq_length()
    width = max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)  # (b, L)
    qmask = torch.zeros((batch, width), dtype=torch.long)  # (b, L)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        qmask[i, width - len(p):] = 1
    ids, qmask = ids.to(device), qmask.to(device)
    positions = next_position + (qmask.cumsum(dim=1) - 1).clamp(min=0)  # (b, L)
    attn = torch.ones((batch, mem_len + width + max_new_tokens), dtype=torch.long, device=device)  # (b, M+L+N)
    attn[:, mem_len:mem_len + width] = qmask
    # decode steps get the 4-D mask itself (b, 1, 1, M+L+N), True = attend, passed as a growing view: transformers
    # uses a 4-D mask as given, where from a 2-D one it would check per step whether any entry is padded (a read
    # of the device, i.e. a host sync per token on a GPU)
    step_mask = attn.bool()[:, None, None, :]  # (b, 1, 1, M+L+N)
    work = attention.tail_cache(cache, capacity=width + max_new_tokens,
                                num_layers=model.config.get_text_config().num_hidden_layers)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    penalize = bool(repetition_penalty) and repetition_penalty != 1.0
    seen = None
    if penalize:
        vocab = model.get_output_embeddings().weight.shape[0]
        seen = torch.zeros((batch, vocab), dtype=torch.long, device=device).scatter_add_(1, ids, qmask) > 0
        # (b, vocab) bool: the prompt's own tokens (padding not counted)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)  # (n_eos,)
    out = torch.full((batch, max(max_new_tokens, 1)), pad_id, dtype=torch.long, device=device)  # (b, N)
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # (b,)
    every = stop_check_every or (1 if device.type == "cpu" else 8)
    steps = 0
    with attention.shared_prefix(work):
        logits = model(input_ids=ids, attention_mask=attn[:, :mem_len + width], position_ids=positions,
                       past_key_values=work, use_cache=True, logits_to_keep=1).logits[:, -1].float()  # (b, vocab)
        cur = positions[:, -1] + 1  # (b,)
        for step in range(max_new_tokens):
            if penalize:
                logits = _penalize(logits, seen, repetition_penalty)
            nxt = _pick(logits, temperature, top_p, gen)  # (b,)
            nxt = torch.where(done, pad_id, nxt)  # finished rows feed padding
            out[:, step] = nxt
            done = done | torch.isin(nxt, eos)
            steps = step + 1
            if penalize:
                seen.scatter_(1, nxt[:, None], True)
            if steps == max_new_tokens or (steps % every == 0 and bool(done.all())):
                break
            logits = model(input_ids=nxt[:, None], attention_mask=step_mask[..., :mem_len + width + steps],
                           position_ids=cur[:, None], past_key_values=work, use_cache=True).logits[:, -1].float()
            cur = cur + 1
    rows = out[:, :steps].tolist()  # the one read of the generated tokens
    result = []
    for row in rows:
        cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
        result.append(row[:cut])
    return result
