"""8-bit keys: per-entry (token) scales against per-channel-then-per-entry scales, on the embedded SmolLM2.

Memorizes an excerpt of the book (compact positions, so keys are re-rotated), stores it as int8 with each key
scheme, and reports the keys' relative reconstruction error ``||K - K^||_F / ||K||_F`` (all layers), the worst
per-channel error, and whether greedy answers after the dequantized memory equal those after the original one::

    python benchmarks/bench_int8_keys.py --tokens 2000 --questions 4 --new-tokens 24

Prints one JSON line per scheme.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memorag_core.memory import MemoryConfig, build_memory  # noqa: E402
from memorag_core.models import load_causal_lm  # noqa: E402
from memorag_core.store.memory_file import decode_memory, encode_memory  # noqa: E402

QUESTIONS = ["Where do the Dursleys live?", "What does Mr. Dursley's firm make?", "Who is Dudley?",
             "What did Mrs. Dursley's sister do?", "What happened on the dull, grey Tuesday?",
             "What did Mr. Dursley see on the corner of the street?"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--storage", default="int8", choices=["int8", "fp8"])
    p.add_argument("--book", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/harry_potter.txt")
    args = p.parse_args(argv)
    model, tok = load_causal_lm(None)
    cfg = MemoryConfig(ratio=args.ratio, window=512)
    mem = build_memory(cfg, model, tok)
    text = args.book.read_text(encoding="utf-8")
    ids = tok(text[: args.tokens * 8], add_special_tokens=False)["input_ids"][: args.tokens]
    mem.memorize(tok.decode(ids))
    original = mem.export()
    qs = QUESTIONS[: args.questions]
    want = [mem._generate([mem.task_ids(mem.prompts.qa.format(question=q))], args.new_tokens)[0] for q in qs]
    for scheme in ("token", "channel"):
        t0 = time.perf_counter()
        data = encode_memory(original, args.storage, key_scales=scheme)
        r = decode_memory(torch.frombuffer(bytearray(data), dtype=torch.uint8), "bench", dtype=torch.float32)
        num = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(original.keys, r.keys))
        den = sum(float(a.float().pow(2).sum()) for a in original.keys)
        vnum = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(original.values, r.values))
        vden = sum(float(a.float().pow(2).sum()) for a in original.values)
        # worst channel: error relative to that channel's own magnitude (small channels suffer under row scales)
        worst = max(float(((a.float() - b.float()).pow(2).mean(1) / a.float().pow(2).mean(1).clamp_min(1e-12))
                          .sqrt().max()) for a, b in zip(original.keys, r.keys))
        other = build_memory(cfg, model, tok)
        other.import_tensors(r)
        got = [other._generate([other.task_ids(other.prompts.qa.format(question=q))], args.new_tokens)[0]
               for q in qs]
        same_tokens = sum(int(a == b) for g, w in zip(got, want) for a, b in zip(g, w))
        print(json.dumps(dict(scheme=scheme, storage=args.storage, tokens=args.tokens, entries=mem.entries,
                              bytes=len(data), key_rel_error=round((num / den) ** 0.5, 5),
                              key_worst_channel_rel_error=round(worst, 4),
                              value_rel_error=round((vnum / vden) ** 0.5, 5),
                              answers_equal=f"{sum(g == w for g, w in zip(got, want))}/{len(qs)}",
                              tokens_equal=f"{same_tokens}/{sum(len(w) for w in want)}",
                              seconds=round(time.perf_counter() - t0, 1))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
