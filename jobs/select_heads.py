"""Choose the attention heads that re-rank best, for one memory model, on a calibration slice.

For every question of the slice the re-ranker (:mod:`memorag_core.retrieval.rerank`) reads the question's
candidate passages weakest-first by dense score and the question after them, with every head; each head alone
ranks the candidates by its calibrated attention, and the heads are ranked by R@k over the slice (gold = the
supporting titles). How many heads to sum is chosen by 2-fold cross-validation inside the slice. The result is a
small JSON (:class:`HeadSet`: (layer, head) pairs, the model's fingerprint, how they were chosen)::

    python -m jobs.select_heads --dataset ../shared/data/hotpotqa_dev_300.jsonl --questions 1-100 \
        --out heads/smollm2.json
    # or from the readings benchmarks/rerank_eval.py cached (same computation, no model run):
    python -m jobs.select_heads --scores /work/runs/rerank/pq_dev /work/runs/rerank/pq_dev_b --questions 1-100 \
        --out memorag_core/retrieval/heads/smollm2-135m-instruct.json

Choose heads on development questions only; never on the questions you report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np

from memorag_core.errors import InvalidInputError

logger = logging.getLogger(__name__)


def parse_range(text: str) -> tuple[int, int]:
    """``"1-100"`` (1-based, inclusive) -> (0, 100) as a Python slice."""
    try:
        a, b = (int(x) for x in text.split("-"))
    except ValueError as exc:
        raise InvalidInputError(f"--questions must look like 1-100, got {text!r}") from exc
    if not 1 <= a <= b:
        raise InvalidInputError(f"--questions must be 1-based and increasing, got {text!r}")
    return a - 1, b


def readings_from_model(dataset: str, lo: int, hi: int, model_name: str | None):
    """Run the re-ranker with every head over questions [lo, hi): (per-question head scores, golds, model info)."""
    import torch

    from memorag_core.eval.datasets import load_examples
    from memorag_core.models import LoadOptions, load_causal_lm
    from memorag_core.retrieval.embedders import load_embedder
    from memorag_core.retrieval.rerank import AttentionReranker, HeadSet, model_fingerprint, passage_line, reading_order

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tok = load_causal_lm(model_name, LoadOptions(device="auto", dtype="float32"))
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    every = HeadSet(tuple((a, b) for a in range(layers) for b in range(heads)), model_fingerprint(model))
    reranker = AttentionReranker(model, tok, every)
    embedder = load_embedder(None)
    scores, golds = [], []
    for i, ex in enumerate(load_examples(dataset)[lo:hi]):
        passages = list(ex.passages)
        dense = embedder.encode([p.text for p in passages]) @ embedder.encode([ex.question], is_query=True)[0]
        order = reading_order(dense)
        reading = reranker.read(ex.question, [passage_line(passages[j].title, passages[j].text) for j in order])
        s = np.empty_like(reading.head_scores)
        s[:, order] = reading.head_scores  # (L*H, n) in passage order
        scores.append(s)
        golds.append(np.array([p.title in ex.supporting_titles for p in passages]))
        logger.info("question %d: read in %.1f s", lo + i + 1, sum(reading.seconds.values()))
    return scores, golds, model_fingerprint(model), model_name or "SmolLM2-135M-Instruct (embedded)", heads


def readings_from_cache(folders: list[str], lo: int, hi: int, dataset: str):
    """The same from benchmarks/rerank_eval.py cache folders (``records*.jsonl`` + ``q/<id>.npz``)."""
    from memorag_core.eval.datasets import load_examples
    from memorag_core.models import load_causal_lm
    from memorag_core.retrieval.rerank import model_fingerprint

    wanted = [ex.id for ex in load_examples(dataset)[lo:hi]]
    recs = {}
    for folder in folders:
        for line in (x for f in sorted(Path(folder).glob("records*.jsonl")) for x in f.read_text().splitlines()):
            if line.strip():
                r = json.loads(line)
                recs[r["id"]] = (Path(folder), r)
    missing = [q for q in wanted if q not in recs]
    if missing:
        raise InvalidInputError(f"{len(missing)} of the {len(wanted)} questions are not in the cache, "
                                f"e.g. {missing[0]}")
    scores, golds, per_layer = [], [], None
    for q in wanted:
        folder, r = recs[q]
        scores.append(np.load(folder / "q" / f"{q}.npz")["head_scores"])
        golds.append(np.array([t in r["gold"] for t in r["titles"]]))
        per_layer = r["heads_per_layer"]
    model, _ = load_causal_lm(None)
    return scores, golds, model_fingerprint(model), "SmolLM2-135M-Instruct (embedded)", per_layer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="../shared/data/hotpotqa_dev_300.jsonl", help="HotpotQA-format JSONL")
    ap.add_argument("--questions", default="1-100", help="calibration questions, 1-based inclusive (dev only)")
    ap.add_argument("--model", default=None, help="memory model folder or hub id (default: embedded SmolLM2)")
    ap.add_argument("--scores", nargs="*", default=None,
                    help="cache folders of benchmarks/rerank_eval.py to read instead of running the model "
                         "(embedded model only)")
    ap.add_argument("--count", type=int, default=None, help="heads to keep (default: 2-fold cross-validation)")
    ap.add_argument("--k", type=int, default=3, help="the recall budget heads are ranked by")
    ap.add_argument("--out", required=True, help="the head set JSON to write")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from memorag_core.retrieval.rerank import select_heads

    lo, hi = parse_range(args.questions)
    if args.scores:
        scores, golds, fp, name, per_layer = readings_from_cache(args.scores, lo, hi, args.dataset)
    else:
        scores, golds, fp, name, per_layer = readings_from_model(args.dataset, lo, hi, args.model)
    heads = select_heads(scores, golds, heads_per_layer=per_layer, fingerprint=fp, model=name, count=args.count,
                         k=args.k, meta={"dataset": Path(args.dataset).name, "calibration": args.questions,
                                         "prompt": "Passages: [title] text lines weakest-first by dense score, "
                                                   "then the instruction and Query: <question>; minus Query: N/A"})
    heads.save(args.out)
    logger.info("wrote %d heads to %s: %s (R@%d summed %.3f on the calibration questions)", len(heads.heads),
                args.out, heads.heads, args.k, heads.meta["recall_summed"])


if __name__ == "__main__":
    main()
