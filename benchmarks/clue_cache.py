"""Decode MemoRAG's clues once per question and setting, and cache them with the attention pointers.

Clue decoding is the expensive part of an evaluation (~15-60 s per question with SmolLM2-135M on one shared CPU
core); retrieval and fusion are cheap. This script memorizes each question's context (``per_question``) or the
pooled context of the first ``--pool`` questions (``pooled``, memorized once and saved), then for every question
stores: the recall / rewrite / draft outputs (raw text, one batched decode), the seconds each stage took, and the
attention pointers (``memorag_core.memory.pointers``): per layer, KV head and passage, the attention mass the
question pays to the passage's kept entries and their count. ``benchmarks/ablation.py`` computes every ablation
row from this cache.

Resumable: records are appended to ``<out>/clues.jsonl`` (one per question) and arrays written to
``<out>/pointers/<id>.npz``; a rerun skips questions already there.

    OMP_NUM_THREADS=1 python benchmarks/clue_cache.py --setting per_question --start 0 --stop 100 \
        --out runs/cache_pq_dev
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("clue_cache")


def passage_starts(passages) -> list[int]:
    """Character start of each passage in ``join_passages(passages)`` (joined by blank lines)."""
    starts, pos = [], 0
    for p in passages:
        starts.append(pos)
        pos += len(p.text) + 2
    return starts


def build_memory(ratio: int, window: int, model=None, tokenizer=None):
    from memorag_core.memory import MemoryConfig, build_memory as build

    return build(MemoryConfig.for_kind(kind="compressed_kv", model=None, ratio=ratio, window=window,
                                       positions="compact"), model=model, tokenizer=tokenizer)


def cache_question(memory, ex, passages, tok_span, out: Path, clue_tokens: int, extra: dict) -> dict:
    """Clues and pointers of one question after ``memory``; writes the npz, returns the JSON record."""
    from memorag_core.memory.pointers import question_attention, span_scores

    t = time.perf_counter()
    mass = question_attention(memory, ex.question)  # (L, H, entries)
    mass_sum, count = span_scores(mass, memory.offsets, tok_span, len(passages))
    t_point = time.perf_counter() - t
    t = time.perf_counter()
    texts = memory.clue_texts(ex.question, clue_tokens, with_answer=True)
    t_clues = time.perf_counter() - t
    np.savez_compressed(out / "pointers" / f"{ex.id}.npz", mass=mass_sum.astype(np.float32),
                        count=count.astype(np.float32))
    return {"id": ex.id, "question": ex.question, "spans": texts["spans"], "surrogates": texts["surrogates"],
            "answer": texts.get("answer", ""), "seconds": {"clues": t_clues, "pointers": t_point, **extra},
            "titles": [p.title for p in passages]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="../shared/data/hotpotqa_dev_300.jsonl")
    ap.add_argument("--setting", choices=("per_question", "pooled"), required=True)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=100)
    ap.add_argument("--pool", type=int, default=100, help="pooled: the passages of N questions from --pool-start")
    ap.add_argument("--pool-start", type=int, default=0, help="pooled: first question of the pool (100 = held-out)")
    ap.add_argument("--ratio", type=int, default=None, help="default 4 per question, 32 pooled")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--clue-tokens", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from memorag_core.eval.datasets import join_passages, load_examples, pooled_passages
    from memorag_core.memory.pointers import char_spans_to_tokens, token_char_starts

    out = Path(args.out)
    (out / "pointers").mkdir(parents=True, exist_ok=True)
    records = out / "clues.jsonl"
    done = set()
    if records.exists():
        done = {json.loads(line)["id"] for line in records.read_text().splitlines() if line.strip()}
    examples = load_examples(args.dataset)
    if args.setting == "pooled" and not (args.pool_start <= args.start and args.stop <= args.pool_start + args.pool):
        raise SystemExit(f"pooled: questions {args.start}-{args.stop} lie outside the pool "
                         f"{args.pool_start}-{args.pool_start + args.pool}; their passages would not be memorized")
    ratio = args.ratio or (4 if args.setting == "per_question" else 32)
    memory = build_memory(ratio, args.window)
    (out / "config.json").write_text(json.dumps({**vars(args), "ratio": ratio}, indent=1))
    if args.setting == "pooled":
        passages = pooled_passages(examples[args.pool_start:args.pool_start + args.pool])
        context = join_passages(passages)
        path = out / "pooled_memory.safetensors"
        t = time.perf_counter()
        if path.exists():
            memory.load(str(path))
        else:
            memory.show_progress = True
            memory.memorize(context)
            memory.save(str(path))
            (out / "pooled_memory.json").write_text(json.dumps({"seconds": time.perf_counter() - t,
                                                                "stats": memory.stats.to_dict()}))
        tok_span = char_spans_to_tokens(token_char_starts(memory.tokenizer, context), passage_starts(passages))
        assert len(tok_span) == memory.stats.raw_tokens, (len(tok_span), memory.stats.raw_tokens)
    for ex in examples[args.start:args.stop]:
        if ex.id in done:
            continue
        extra = {}
        if args.setting == "per_question":
            passages = list(ex.passages)
            context = join_passages(passages)
            t = time.perf_counter()
            memory.memorize(context)
            extra["memorize"] = time.perf_counter() - t
            tok_span = char_spans_to_tokens(token_char_starts(memory.tokenizer, context), passage_starts(passages))
        rec = cache_question(memory, ex, passages, tok_span, out, args.clue_tokens, extra)
        with records.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        logger.info("%s %s", ex.id, {k: round(v, 1) for k, v in rec["seconds"].items()})


if __name__ == "__main__":
    main()
