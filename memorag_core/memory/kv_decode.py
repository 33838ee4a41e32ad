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


@torch.no_grad()
def decode_after_cache(model: Any, cache: Any, next_position: int, prompts: list[list[int]], *,
                       max_new_tokens: int, eos_ids: set[int], pad_id: int, temperature: float = 0.0,
                       top_p: float | None = None, repetition_penalty: float | None = None,
                       seed: int | None = None) -> list[list[int]]:
    """Generate for each prompt after the memory in ``cache``; the cache is left as it was.

    Args:
        model: a Hugging Face causal LM whose attention implementation is ``memorag_sdpa``
            (:func:`memorag_core.memory.attention.register`).
        cache: a batch-1 DynamicCache with M entries per layer, each (1, kv_heads, M, head_dim).
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
    attn = torch.cat([torch.ones((batch, mem_len), dtype=torch.long, device=device), qmask], dim=1)  # (b, M+L)
    work = attention.tail_cache(cache, capacity=width + max_new_tokens,
                                num_layers=model.config.get_text_config().num_hidden_layers)
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    seen = [set(p) for p in prompts] if repetition_penalty and repetition_penalty != 1.0 else None
    with attention.shared_prefix(work):
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, past_key_values=work,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()  # (b, vocab)
        cur = positions[:, -1] + 1  # (b,)
        for _ in range(max_new_tokens):
            if seen is not None:
                for i, toks in enumerate(seen):
                    if toks:
                        idx = torch.tensor(sorted(toks), device=logits.device)
                        row = logits[i, idx]
                        logits[i, idx] = torch.where(row > 0, row / repetition_penalty, row * repetition_penalty)
            nxt = _pick(logits, temperature, top_p, gen).cpu()  # (b,)
            for i in range(batch):
                if done[i]:
                    continue
                tok = int(nxt[i])
                if tok in eos_ids:
                    done[i] = True
                else:
                    out[i].append(tok)
                    if seen is not None:
                        seen[i].add(tok)
            if bool(done.all()):
                break
            nxt = torch.where(done, torch.tensor(pad_id), nxt).to(device)
            attn = torch.cat([attn, torch.ones((batch, 1), dtype=torch.long, device=device)], dim=1)  # (b, +1)
            logits = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=cur[:, None],
                           past_key_values=work, use_cache=True).logits[:, -1].float()  # (b, vocab)
            cur = cur + 1
    return out
