"""Decoding after a large KV memory: the shared-prefix path against the concatenating path it replaced.

The clue stage decodes 3 prompts (spans, surrogate questions, draft answer) after the memory. The old path gave
the batch a DynamicCache holding 3 copies of the memory, grown by ``torch.cat`` every step, and SDPA with a mask
repeated K/V per query head; the new one (memorag_core/memory/attention.py) keeps the memory batch-1, writes the
tail in place and reads the memory once per step. Both run here, alternating, on the same model, memory and
prompts, with a fixed number of decoded tokens (EOS ignored) so the work is identical::

    python benchmarks/bench_decode.py --entries 1000 6737 --batch 3 --new-tokens 48

``--entries`` is the memory size per layer and KV head (the pooled HotpotQA memory has 6,737). The memory is real:
the book memorized at ratio 4, tiled to the requested size (keys keep their rotary phases; values are what the
model wrote). The table gives median seconds per clue call, per decoded token, the speed-up, and whether the two
paths produced the same tokens. ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memorag_core.memory import MemoryConfig, build_memory  # noqa: E402
from memorag_core.memory.kv_decode import _pick, decode_after_cache  # noqa: E402
from memorag_core.models import load_causal_lm  # noqa: E402


@torch.no_grad()
def concat_decode(model, cache, next_position: int, prompts: list[list[int]], max_new_tokens: int,
                  pad_id: int) -> list[list[int]]:
    """The replaced path (greedy, no EOS): b copies of the memory in a DynamicCache that grows by torch.cat."""
    from transformers import DynamicCache

    batch, mem_len = len(prompts), cache.get_seq_length()
    width = max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    qmask = torch.zeros((batch, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        qmask[i, width - len(p):] = 1
    positions = next_position + (qmask.cumsum(dim=1) - 1).clamp(min=0)
    attn = torch.cat([torch.ones((batch, mem_len), dtype=torch.long), qmask], dim=1)
    work = DynamicCache()
    for i, layer in enumerate(cache.layers):
        work.update(layer.keys.expand(batch, -1, -1, -1).contiguous(),
                    layer.values.expand(batch, -1, -1, -1).contiguous(), i)
    out: list[list[int]] = [[] for _ in range(batch)]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, past_key_values=work,
                   use_cache=True, logits_to_keep=1).logits[:, -1].float()
    cur = positions[:, -1] + 1
    for _ in range(max_new_tokens):
        nxt = _pick(logits, 0.0, None, None)
        for i in range(batch):
            out[i].append(int(nxt[i]))
        attn = torch.cat([attn, torch.ones((batch, 1), dtype=torch.long)], dim=1)
        logits = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=cur[:, None],
                       past_key_values=work, use_cache=True).logits[:, -1].float()
        cur = cur + 1
    return out


def tiled_memory(mem, entries: int):
    """A DynamicCache of ``entries`` per layer, the memory's own entries repeated (first ``entries`` kept)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, layer in enumerate(mem.cache.layers):
        reps = -(-entries // layer.keys.shape[2])
        cache.update(layer.keys.repeat(1, 1, reps, 1)[:, :, :entries].contiguous(),
                     layer.values.repeat(1, 1, reps, 1)[:, :, :entries].contiguous(), i)
    return cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, nargs="+", default=[1000, 6737])
    p.add_argument("--batch", type=int, default=3, help="prompts decoded together (the clue stage: 3)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--book", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/harry_potter.txt")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    model, tok = load_causal_lm(None)
    mem = build_memory(MemoryConfig(ratio=4, window=512), model, tok)
    mem.memorize(args.book.read_text(encoding="utf-8")[:12000])
    query = "Why does Harry live in the cupboard under the stairs?"
    insts = [mem.prompts.span, mem.prompts.surrogate, mem.prompts.qa] * args.batch
    prompts = [mem.task_ids(inst.format(question=query)) for inst in insts[:args.batch]]
    print(f"model {mem.config.model or 'embedded'}; threads {torch.get_num_threads()}; batch {args.batch}; "
          f"{args.new_tokens} tokens; prompt widths {[len(x) for x in prompts]}", flush=True)
    rows = []
    for entries in args.entries:
        cache = tiled_memory(mem, entries)
        pos = mem.next_position
        times = {"concat": [], "shared": []}
        outs = {}
        for _ in range(args.repeats):
            start = time.perf_counter()
            outs["concat"] = concat_decode(model, cache, pos, prompts, args.new_tokens, tok.pad_token_id)
            times["concat"].append(time.perf_counter() - start)
            start = time.perf_counter()
            outs["shared"] = decode_after_cache(model, cache, pos, prompts, max_new_tokens=args.new_tokens,
                                                eos_ids=set(), pad_id=tok.pad_token_id)
            times["shared"].append(time.perf_counter() - start)
        same = sum(a == b for x, y in zip(outs["concat"], outs["shared"]) for a, b in zip(x, y))
        total = sum(len(x) for x in outs["concat"])
        kv_mb = sum(layer.keys.numel() * 2 * layer.keys.element_size() for layer in cache.layers) / 1e6
        row = dict(entries=entries, memory_mb=round(kv_mb, 1),
                   concat_s=statistics.median(times["concat"]), shared_s=statistics.median(times["shared"]),
                   same_tokens=f"{same}/{total}")
        row["speedup"] = row["concat_s"] / row["shared_s"]
        rows.append(row)
        print(row, flush=True)
    print("\n| entries | memory MB | concat s/call | shared s/call | concat ms/token | shared ms/token | speed-up "
          "| same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['entries']} | {r['memory_mb']} | {r['concat_s']:.2f} | {r['shared_s']:.2f} | "
              f"{1000 * r['concat_s'] / args.new_tokens:.0f} | {1000 * r['shared_s'] / args.new_tokens:.0f} | "
              f"{r['speedup']:.2f}x | {r['same_tokens']} |")
    if args.json:
        args.json.write_text(json.dumps(dict(args=vars(args) | {"book": str(args.book), "json": str(args.json)},
                                             rows=rows), indent=2))


if __name__ == "__main__":
    main()
