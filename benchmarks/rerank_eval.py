"""Attention re-ranking (issue 21): cache the model's calibrated attention per question, then score every row.

Two phases, so the expensive part runs once and every tuning choice is cheap:

``cache``: for each question, the dense scores (all-MiniLM-L6-v2, question vs passage) of its candidates (per
question: its 10 HotpotQA paragraphs; pooled: the dense top ``--candidates`` of the pool's paragraphs), and the
re-ranker's reading of them (``memorag_core.retrieval.rerank``): calibrated attention per (layer, head) and
candidate, and per candidate token (float16), for every head, so head selection and the bridge span can be tuned
afterwards. ``--prefix-memory`` reads the candidates after the question's compressed memory (ratio 4, as in
Session 7). Resumable: one JSON line per question in ``<out>/records.<start>-<stop>.jsonl``, arrays in
``<out>/q/<id>.npz``.

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
    records = out / f"records.{args.start}-{args.stop}.jsonl"  # one file per slice: slices run side by side
    done = {json.loads(x)["id"] for f in out.glob("records*.jsonl") for x in f.read_text().splitlines() if x.strip()}
    examples = load_examples(args.dataset)
    model, tok = load_causal_lm(None, LoadOptions(device="cpu", dtype=args.dtype))
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
        reading = reranker.read(ex.question, [lines[i] for i in order], prefix, args.layers)
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


# -- report --------------------------------------------------------------------------------------------------------
class Q:
    """One cached question: dense scores, per-head readings and embeddings (arrays in candidate order)."""

    def __init__(self, folder: Path, rec: dict) -> None:
        z = np.load(folder / "q" / f"{rec['id']}.npz")
        self.id, self.question, self.titles, self.lines = rec["id"], rec["question"], rec["titles"], rec["lines"]
        self.gold = np.array([t in rec["gold"] for t in self.titles])  # (n,)
        self.n_gold = len(set(rec["gold"]))
        self.dense, self.head_scores = z["dense"].astype(np.float64), z["head_scores"]  # (n,), (L*H, n)
        self.pvecs, self.qvec = z["pvecs"], z["qvec"]  # (n, 384), (384,)
        self.seconds, self.per_layer = rec["seconds"], rec["heads_per_layer"]
        self._z = z

    def reading(self):
        from memorag_core.retrieval.rerank import Reading

        z = self._z
        return Reading(self.head_scores, z["token_scores"].astype(np.float32), z["token_candidate"],
                       z["token_chars"], self.per_layer, {})


def load_cache(folders: list[str]) -> list[Q]:
    out: dict[str, Q] = {}
    for folder in folders:
        for line in (x for path in sorted(Path(folder).glob("records*.jsonl")) for x in path.read_text().splitlines()):
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec["id"], Q(Path(folder), rec))
    return list(out.values())


def recall(q: Q, scores: np.ndarray, k: int) -> float:
    from memorag_core.retrieval.rerank import recall_at

    return float(recall_at(np.asarray(scores, dtype=np.float64), q.gold, k, q.n_gold))


def fused_scores(q: Q, att: np.ndarray | None, weight: float, gate: float, bridge: np.ndarray | None = None,
                 bridge_weight: float = 0.0) -> np.ndarray:
    """(n,) a score per candidate whose order is the library fusion's (interpolation of dense, attention, bridge)."""
    from memorag_core.retrieval.fusion import FusionConfig, Ranking, fuse
    from memorag_core.retrieval.rerank import attention_confidence

    n = len(q.dense)
    keys = list(range(n))
    rankings = [Ranking("question", q.question, keys, q.dense.tolist())]
    if att is not None:
        rankings.append(Ranking("attention", q.question, keys, att.tolist(), confidence=attention_confidence(att)))
    if bridge is not None:
        rankings.append(Ranking("bridge", "bridge", keys, bridge.tolist()))
    cfg = FusionConfig(method="interpolate", gate=gate, question_floor=0,
                       weights={"question": 1.0, "attention": weight, "bridge": bridge_weight})
    out = np.zeros(n)
    for rank, f in enumerate(fuse(rankings, cfg)):
        out[f.key] = n - rank
    return out


def prf_scores(q: Q, alpha: float) -> np.ndarray:
    """Dense pseudo-relevance feedback (Rocchio, no model): the question's vector moved toward its top passage's."""
    v = q.qvec + alpha * q.pvecs[int(np.argmax(q.dense))]
    return q.pvecs @ (v / np.linalg.norm(v))


def mean_r(qs: list[Q], score_fn, k: int) -> float:
    return 100.0 * float(np.mean([recall(q, score_fn(q), k) for q in qs])) if qs else float("nan")


def report(args) -> None:
    from memorag_core.retrieval.embedders import load_embedder
    from memorag_core.retrieval.rerank import bridge_span, rank_heads, select_heads

    dev, held = load_cache(args.dev), load_cache(args.held)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("dev %d questions, held-out %d", len(dev), len(held))
    per_layer = dev[0].per_layer
    if args.max_layers:  # rows are layer-major: keep the first N layers' heads only
        for q in dev + held:
            q.head_scores = q.head_scores[: args.max_layers * per_layer]
    hs = select_heads([q.head_scores for q in dev], [q.gold for q in dev], heads_per_layer=per_layer,
                      fingerprint=args.fingerprint, model="SmolLM2-135M-Instruct (embedded)",
                      n_golds=[q.n_gold for q in dev],
                      meta={"dataset": "hotpotqa_dev_300.jsonl", "calibration": f"1-{len(dev)} (dev)",
                            "prompt": "Passages: [title] text lines weakest-first by dense score, then the "
                                      "instruction and Query: <question>; minus Query: N/A"})
    hs.save(out / "heads.json")
    count = len(hs.heads)
    rows_final = [a * per_layer + b for a, b in hs.heads]
    # out-of-fold heads on dev (ranked on the other half, same count): every dev tuning below uses these
    halves = [list(range(0, len(dev), 2)), list(range(1, len(dev), 2))]
    oof_rows: dict[str, list[int]] = {}
    for fit, test in (halves, halves[::-1]):
        order = rank_heads([dev[i].head_scores for i in fit], [dev[i].gold for i in fit], 3,
                           [dev[i].n_gold for i in fit])
        for i in test:
            oof_rows[dev[i].id] = [int(r) for r in order[:count]]
    rows_of = {q.id: oof_rows[q.id] for q in dev}
    rows_of.update({q.id: rows_final for q in held})

    def att(q: Q, rows=None) -> np.ndarray:
        return q.head_scores[rows if rows is not None else rows_of[q.id]].sum(axis=0).astype(np.float64)

    # tuning on dev (out-of-fold attention)
    alphas = (0.1, 0.25, 0.5, 1.0)
    alpha = max(alphas, key=lambda a: (mean_r(dev, lambda q: prf_scores(q, a), 3),
                                       mean_r(dev, lambda q: prf_scores(q, a), 5)))
    lambdas = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    gates = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
    grid = {(lam, g): (mean_r(dev, lambda q: fused_scores(q, att(q), lam, g), 3),
                       mean_r(dev, lambda q: fused_scores(q, att(q), lam, g), 5)) for lam in lambdas for g in gates}
    lam0 = max(lambdas, key=lambda lam: (*grid[(lam, 0.0)], -lam))
    lam_g, gate = max(grid, key=lambda lg: (*grid[lg], -lg[1], -lg[0]))
    embedder = load_embedder(None)
    span_cache: dict[str, np.ndarray] = {}

    def bridge_scores(q: Q, width: int, slots: int) -> tuple[np.ndarray, str]:
        base = fused_scores(q, att(q), lam_g, gate)
        top = [int(i) for i in np.argsort(-base, kind="stable")[:slots]]
        heads = [(r // q.per_layer, r % q.per_layer) for r in rows_of[q.id]]
        span = bridge_span(q.reading(), q.lines, top, heads, width)
        text = f"{q.question} {span}".strip()
        if text not in span_cache:
            span_cache[text] = embedder.encode([text], is_query=True)[0]
        return q.pvecs @ span_cache[text], span

    t = time.perf_counter()
    bgrid = {}
    for width in (2, 4, 8):
        for slots in (1, 2):
            bs = {q.id: bridge_scores(q, width, slots)[0] for q in dev}
            for bw in (0.25, 0.5, 1.0):
                fn = lambda q: fused_scores(q, att(q), lam_g, gate, bs[q.id], bw)  # noqa: E731
                bgrid[(width, slots, bw)] = (mean_r(dev, fn, 3), mean_r(dev, fn, 5))
    width, slots, bw = max(bgrid, key=lambda p: (*bgrid[p], -p[2]))
    logger.info("bridge grid %.1f s", time.perf_counter() - t)
    t = time.perf_counter()
    sample = dev[: min(20, len(dev))]
    for q in sample:
        span_cache.clear()
        bridge_scores(q, width, slots)
    bridge_s = (time.perf_counter() - t) / max(1, len(sample))

    def rows_for(qs: list[Q], in_sample_dev: bool) -> list[dict]:
        def a(q):  # final heads on held-out; on dev out-of-fold unless in-sample asked
            return att(q, rows_final if in_sample_dev else None)

        bs = {q.id: bridge_scores(q, width, slots) for q in qs}
        table = [
            ("plain RAG (dense, MiniLM)", lambda q: q.dense),
            (f"dense PRF (alpha {alpha})", lambda q: prf_scores(q, alpha)),
            ("attention, all heads", lambda q: q.head_scores.sum(axis=0)),
            (f"attention, top {count} heads", a),
            (f"interpolation (weight {lam0})", lambda q: fused_scores(q, a(q), lam0, 0.0)),
            (f"interpolation + gate (weight {lam_g}, gate {gate})", lambda q: fused_scores(q, a(q), lam_g, gate)),
            (f"+ bridge span (width {width}, top {slots}, weight {bw})",
             lambda q: fused_scores(q, a(q), lam_g, gate, bs[q.id][0], bw)),
        ]
        res = [{"row": name, "R@3": mean_r(qs, fn, 3), "R@5": mean_r(qs, fn, 5)} for name, fn in table]
        full = all(np.abs(q.head_scores[-per_layer:]).max() > 0 for q in qs[:5])
        if not full:  # the cache read only the head set's layers: no all-heads row
            res[2]["R@3"] = res[2]["R@5"] = float("nan")
        return res

    med = lambda qs, key: float(np.median([q.seconds.get(key, 0.0) for q in qs])) if qs else float("nan")  # noqa
    result = {
        "heads": hs.to_dict(), "prf_alpha": alpha, "interpolation_weight": lam0, "gated_weight": lam_g,
        "gate": gate, "bridge": {"width": width, "slots": slots, "weight": bw},
        "dev_grid_interpolation": {f"{k[0]}/{k[1]}": v for k, v in grid.items()},
        "dev_grid_bridge": {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in bgrid.items()},
        "dev_oof": rows_for(dev, False), "dev_in_sample": rows_for(dev, True),
        "held": rows_for(held, False) if held else [],
        "n": {"dev": len(dev), "held": len(held)},
        "seconds": {s: {"dev": med(dev, s), "held": med(held, s)} for s in ("dense", "prefill", "tails", "rerank",
                                                                            "memorize")},
        "bridge_seconds": bridge_s,
        "spans_dev_examples": [(q.question, bridge_scores(q, width, slots)[1]) for q in dev[:10]],
    }
    if args.dev_mem:  # the memory as prefix: same questions, same (dev-chosen) heads and weights
        mem = load_cache(args.dev_mem)
        if args.max_layers:
            for q in mem:
                q.head_scores = q.head_scores[: args.max_layers * per_layer]
        same = {q.id: q for q in dev}
        pairs = [(same[q.id], q) for q in mem if q.id in same]
        plain_qs, mem_qs = [a for a, _ in pairs], [b for _, b in pairs]
        fa = lambda q: att(q, rows_final)  # noqa: E731
        result["memory_prefix"] = {
            "n": len(pairs),
            "plain RAG": [mean_r(plain_qs, lambda q: q.dense, k) for k in (3, 5)],
            "attention, candidates alone": [mean_r(plain_qs, fa, k) for k in (3, 5)],
            "attention, memory + candidates": [mean_r(mem_qs, fa, k) for k in (3, 5)],
            "gated interpolation, candidates alone": [
                mean_r(plain_qs, lambda q: fused_scores(q, fa(q), lam_g, gate), k) for k in (3, 5)],
            "gated interpolation, memory + candidates": [
                mean_r(mem_qs, lambda q: fused_scores(q, fa(q), lam_g, gate), k) for k in (3, 5)],
            "seconds_memorize": med(mem_qs, "memorize"), "seconds_rerank": med(mem_qs, "rerank"),
            "seconds_rerank_alone": med(plain_qs, "rerank"),
        }
    (out / "report.json").write_text(json.dumps(result, indent=1))
    lines = ["| row | dev R@3 (out-of-fold heads) | dev R@5 | dev R@3 in-sample | held-out R@3 | held-out R@5 |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(result["dev_oof"]):
        h = result["held"][i] if result["held"] else {"R@3": float("nan"), "R@5": float("nan")}
        lines.append(f"| {r['row']} | {r['R@3']:.1f} | {r['R@5']:.1f} | {result['dev_in_sample'][i]['R@3']:.1f} | "
                     f"{h['R@3']:.1f} | {h['R@5']:.1f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({k: result[k] for k in ("prf_alpha", "interpolation_weight", "gated_weight", "gate", "bridge",
                                             "n", "seconds", "bridge_seconds")}, indent=1))
    print("heads", hs.heads, hs.meta.get("count_cv"))
    if "memory_prefix" in result:
        print(json.dumps(result["memory_prefix"], indent=1))


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
    c.add_argument("--dtype", default="bfloat16", help="model dtype (bfloat16: ~2.5x less CPU with AMX, "
                   "calibrated scores correlate 0.9998 with float32)")
    c.add_argument("--layers", type=int, default=None, help="read only the first N layers (heads chosen below N)")
    c.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("--dev", required=True, nargs="+", help="dev cache folder(s): tuning happens here only")
    r.add_argument("--held", nargs="*", default=[], help="held-out cache folder(s), scored once")
    r.add_argument("--out", required=True)
    r.add_argument("--dev-mem", nargs="*", default=[], help="dev cache(s) read after the compressed memory")
    r.add_argument("--max-layers", type=int, default=None, help="choose heads only in the first N layers")
    r.add_argument("--fingerprint", default="", help="model fingerprint recorded in heads.json (default: computed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "cache":
        cache(args)
    else:
        if not args.fingerprint:
            from memorag_core.models import load_causal_lm
            from memorag_core.retrieval.rerank import model_fingerprint

            args.fingerprint = model_fingerprint(load_causal_lm(None)[0])
        report(args)


if __name__ == "__main__":
    main()
