"""Batched memory actors: several units per model forward (``memorize_many``) against one unit at a time.

Both run in one process on the same model and units, alternating, so the ratio is comparable on a noisy shared
machine. Units are consecutive excerpts of the book of ``--unit-tokens`` tokens each::

    python benchmarks/bench_memorize_batched.py --units 4 --unit-tokens 600 --window 256 --repeats 2
    python benchmarks/bench_memorize_batched.py --tiny   # a tiny random Llama: the mechanics only, seconds

Prints one JSON line: tokens/s of each way, the ratio, and whether the memories are equal (allclose).
On a CPU the forward is already compute-bound, so batching gains little; on a GPU a 1024-token window of a
135M model leaves most of the device idle, which is what stacking units recovers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memorag_core.memory import MemoryConfig, build_memory  # noqa: E402
from memorag_core.models import load_causal_lm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=4)
    p.add_argument("--unit-tokens", type=int, default=600)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a 2-layer random Llama instead of the embedded SmolLM2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--book", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/harry_potter.txt")
    args = p.parse_args(argv)
    if args.tiny:
        from tests.fixtures.models import build_tiny_lm

        model, tok = load_causal_lm(str(build_tiny_lm(Path(tempfile.mkdtemp()) / "tiny")))
    else:
        model, tok = load_causal_lm(None)
    model = model.to(args.device)
    ids = tok(args.book.read_text(encoding="utf-8")[: args.units * args.unit_tokens * 8],
              add_special_tokens=False)["input_ids"]
    texts = [tok.decode(ids[i * args.unit_tokens:(i + 1) * args.unit_tokens]) for i in range(args.units)]
    cfg = MemoryConfig(ratio=args.ratio, window=args.window)
    mem = build_memory(cfg, model, tok)
    mem.memorize(texts[0][:2000])  # warm-up
    times: dict[str, list[float]] = {"single": [], "batched": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        single = []
        for t in texts:
            mem.memorize(t)
            single.append(mem.export())
        times["single"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batched = mem.memorize_many(texts)
        times["batched"].append(time.perf_counter() - t0)
    tokens = sum(int(m.header["raw_tokens"]) for m in single)
    equal = all(torch.allclose(a, b, rtol=1e-3, atol=1e-3) for s, b_ in zip(single, batched)
                for a, b in zip(s.keys + s.values, b_.keys + b_.values))
    single_tps = tokens / statistics.median(times["single"])
    batched_tps = tokens / statistics.median(times["batched"])
    print(json.dumps(dict(model="tiny-llama" if args.tiny else "SmolLM2-135M", device=args.device,
                          threads=torch.get_num_threads(), units=args.units, tokens=tokens, window=args.window,
                          ratio=args.ratio, single_tokens_per_s=round(single_tps, 1),
                          batched_tokens_per_s=round(batched_tps, 1), ratio_batched_over_single=round(
                              batched_tps / single_tps, 2), memories_allclose=equal)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
