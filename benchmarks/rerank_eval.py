"""Attention re-ranking (issue 21): cache the model's calibrated attention per question, then score every row.

Two phases, so the expensive part runs once and every tuning choice is cheap:

``cache``: for each question, the dense scores (all-MiniLM-L6-v2, question vs passage) of its candidates (per
question: its 10 HotpotQA paragraphs; pooled: the dense top ``--candidates`` of the pool's paragraphs), and the
re-ranker's reading of them (``memorag_core.retrieval.rerank``): calibrated attention per (layer, head) and
candidate, and per candidate token (float16), for every head, so head selection and the bridge span can be tuned
afterwards. ``--prefix-memory`` reads the candidates after the question's compressed memory (ratio 4, as in
Session 7). Resumable: one JSON line per question in ``<out>/records.jsonl``, arrays in ``<out>/q/<id>.npz``.

``report``: head selection on the dev cache (per-head R@3, top-k chosen by 2-fold cross-validation inside dev),
fusion weights and gate tuned on dev, then every row on dev and on the held-out cache (``--held``, read once):
plain RAG, dense pseudo-relevance feedback, attention alone (top-k heads, all heads), interpolation, gated
interpolation, bridge spans. Writes ``<out>/report.json`` and ``report.md``.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/rerank_eval.py cache --start 0 --stop 100 \
        --out /work/runs/rerank/pq_dev
    python benchmarks/rerank_eval.py report --dev /work/runs/rerank/pq_dev [--held /work/runs/rerank/pq_held] \
        --out /work/runs/rerank/report
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("rerank_eval")
DATA = "/work/shared/data/hotpotqa_dev_300.jsonl"


# -- cache ---------------------------------------------------------------------------------------------------------
def cache(args) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from memorag_core.eval.datasets import join_passages, load_examples, pooled_passages
    from memorag_core.models import LoadOptions, load_causal_lm
    from memorag_core.retrieval.embedders import load_embedder
    from memorag_core.retrieval.rerank import AttentionReranker, HeadSet, model_fingerprint, passage_line, reading_order

    out = Path(args.out)
    (out / "q").mkdir(parents=True, exist_ok=True)
    records = out / "records.jsonl"
    done = {json.loads(x)["id"] for x in records.read_text().splitlines() if x.strip()} if records.exists() else set()
    examples = load_examples(args.dataset)
    model, tok = load_causal_lm(None, LoadOptions(device="cpu", dtype="float32"))
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    every = HeadSet(tuple((a, b) for a in range(n_layers) for b in range(n_heads)), model_fingerprint(model),
                    "all heads")
    reranker = AttentionReranker(model, tok, every)
    embedder = load_embedder(None)
    memory = None
    if args.prefix_memory:
        from memorag_core.memory import MemoryConfig, build_memory

        memory = build_memory(MemoryConfig.for_kind(kind="compressed_kv", model=None, ratio=args.ratio,
                                                    window=1024, positions="compact"), model=model, tokenizer=tok)
    pool = pool_vecs = None
    if args.setting == "pooled":
        pool = pooled_passages(examples[args.pool_start:args.pool_start + args.pool])
        pool_vecs = embedder.encode([p.text for p in pool])  # (P, 384) normalized
    (out / "config.json").write_text(json.dumps(vars(args), indent=1))
    for ex in examples[args.start:args.stop]:
        if ex.id in done:
            continue
        sec: dict[str, float] = {}
        t = time.perf_counter()
        qvec = embedder.encode([ex.question], is_query=True)[0]  # (384,)
        if pool is None:
            passages = list(ex.passages)
            pvecs = embedder.encode([p.text for p in passages])  # (10, 384)
            dense = pvecs @ qvec
        else:
            all_scores = pool_vecs @ qvec  # (P,)
            top = np.argsort(-all_scores, kind="stable")[: args.candidates]
            passages, pvecs, dense = [pool[i] for i in top], pool_vecs[top], all_scores[top]
        sec["dense"] = time.perf_counter() - t
        lines = [passage_line(p.title, p.text) for p in passages]
        prefix = None
        if memory is not None:
            t = time.perf_counter()
            memory.memorize(join_passages(ex.passages))
            sec["memorize"] = time.perf_counter() - t
            prefix = memory
        order = reading_order(dense)
        t = time.perf_counter()
        reading = reranker.read(ex.question, [lines[i] for i in order], prefix)
        sec["rerank"] = time.perf_counter() - t
        sec.update(reading.seconds)
        head_scores = np.empty_like(reading.head_scores)  # (L*H, n) back in candidate order
        head_scores[:, order] = reading.head_scores
        np.savez_compressed(out / "q" / f"{ex.id}.npz", head_scores=head_scores.astype(np.float32),
                            token_scores=reading.token_scores.astype(np.float16),
                            token_candidate=order[reading.token_candidate].astype(np.int32),
                            token_chars=reading.token_chars.astype(np.int32), pvecs=pvecs.astype(np.float32),
                            qvec=qvec.astype(np.float32), dense=np.asarray(dense, dtype=np.float32))
        rec = {"id": ex.id, "question": ex.question, "titles": [p.title for p in passages], "lines": lines,
               "gold": list(ex.supporting_titles), "seconds": sec, "heads_per_layer": n_heads}
        with records.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        logger.info("%s %s", ex.id, {k: round(v, 2) for k, v in sec.items()})


def report(args) -> None:
    raise NotImplementedError


# -- report --------------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--dataset", default=DATA)
    c.add_argument("--setting", choices=("per_question", "pooled"), default="per_question")
    c.add_argument("--start", type=int, default=0)
    c.add_argument("--stop", type=int, default=100)
    c.add_argument("--pool", type=int, default=100)
    c.add_argument("--pool-start", type=int, default=0)
    c.add_argument("--candidates", type=int, default=25, help="pooled: dense top-N re-ranked")
    c.add_argument("--prefix-memory", action="store_true", help="read the candidates after the compressed memory")
    c.add_argument("--ratio", type=int, default=4)
    c.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("--dev", required=True, nargs="+", help="dev cache folder(s): tuning happens here only")
    r.add_argument("--held", nargs="*", default=[], help="held-out cache folder(s), scored once")
    r.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "cache":
        cache(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
