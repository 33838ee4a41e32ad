"""Which positions should a compressed memory's kept entries have: ``compact`` or ``original``?

Measure: memorize the first N tokens of a book, then score how well the model predicts the next ``--probe``
tokens of the book *through the memory* (mean negative log-likelihood per token; lower is better). A memory that
keeps the right entries at positions the model understands predicts the continuation better. Baselines in the
same run: no memory at all (the probe alone), and the full KV (ratio 1) where it fits the trained range.

    python benchmarks/bench_positions.py --lengths 4000 16000 --ratio 4

With SmolLM2 (trained range 8192), N = 16000 at ratio 4 puts ``original`` positions at 16K (twice the range) and
``compact`` ones at ~4K.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memorag_core.memory import MemoryConfig, build_memory  # noqa: E402
from memorag_core.models import load_causal_lm  # noqa: E402


@torch.no_grad()
def probe_nll(mem, probe: list[int]) -> float:
    """Mean NLL of ``probe`` tokens fed right after the memory (the memory is left unchanged)."""
    model = mem.model
    x = torch.tensor([probe], device=model.device)
    pos = torch.arange(mem.next_position, mem.next_position + len(probe), device=model.device)[None]
    n = mem.cache.get_seq_length()
    try:
        logits = model(input_ids=x, position_ids=pos, past_key_values=mem.cache, use_cache=True).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits.float(), x[0, 1:]).item()
    finally:
        mem.cache.crop(n - mem.cache.get_seq_length())


@torch.no_grad()
def no_memory_nll(model, probe: list[int]) -> float:
    x = torch.tensor([probe], device=model.device)
    logits = model(input_ids=x).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), x[0, 1:]).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4000, 16000])
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--probe", type=int, default=256)
    p.add_argument("--probes", type=int, default=3, help="probe spans after the memory (averaged)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--book", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/harry_potter.txt")
    args = p.parse_args(argv)

    model, tok = load_causal_lm(None)
    ids = tok(args.book.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    max_pos = model.config.max_position_embeddings
    print(f"model range {max_pos} positions; ratio {args.ratio}; probe {args.probes} x {args.probe} tokens\n")
    print("| memorized tokens | memory | next position | probe NLL (lower is better) | memorize s |")
    print("|---|---|---|---|---|")
    for n in args.lengths:
        context = tok.decode(ids[:n])
        probes = [ids[n + i * args.probe: n + (i + 1) * args.probe] for i in range(args.probes)]
        base = sum(no_memory_nll(model, pr) for pr in probes) / len(probes)
        print(f"| {n} | none | 0 | {base:.3f} | - |")
        configs = [("compact", args.ratio), ("original", args.ratio)]
        if n + 200 <= max_pos:
            configs.append(("original", 1))
        for positions, ratio in configs:
            kind = "full_kv" if ratio == 1 else "compressed_kv"
            mem = build_memory(MemoryConfig(kind=kind, ratio=ratio, window=args.window, positions=positions),
                               model, tok)
            start = time.perf_counter()
            mem.memorize(context)
            secs = time.perf_counter() - start
            nll = sum(probe_nll(mem, pr) for pr in probes) / len(probes)
            label = f"{kind} ratio {ratio}, {positions}"
            print(f"| {n} | {label} | {mem.next_position} | {nll:.3f} | {secs:.0f} |", flush=True)
            del mem
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
