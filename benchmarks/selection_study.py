"""Which kept-entry criterion keeps the evidence? Compressed-KV selection rules compared at equal kept entries.

For each HotpotQA question the 10 paragraphs are memorized at ``--ratio`` with each criterion (same window, same
number of kept entries per window, layer and KV head); then, with the question asked after the memory, we measure
how much of the *gold supporting sentences* the memory still holds:

* ``ll``: teacher-forced mean log-likelihood per token of the gold sentences, given memory + question + "Quote the
  sentences that answer it." (higher is better; the model must reproduce the evidence from memory);
* ``span_recall``: share of the gold sentences' source tokens whose KV entry was kept, averaged over layers and KV
  heads (from the entries' source offsets, ``CompressedKVMemory.offsets``);
* ``rest_recall``: the same for all other tokens (how selective the rule is).

Criteria (a subclass each; only ``score`` or the scoring pass differs):

``snapkv``   SnapKV, the default until this study: attention mass of the window's last 32 tokens, max-pooled
             (kernel 5)
``recent``   the window's most recent entries
``strided``  every ``ratio``-th entry (uniform coverage)
``random``   uniformly random entries (fixed seed)
``allq``     attention mass summed over *all* the window's queries (obs_window 0, obs_sample 0), max-pooled
             (n = 30: the best gold log-likelihood, 25 of 30 wins vs snapkv, about 2x the memorize time)
``obs128``  snapkv with the window's last 128 queries (``obs256``: 256)
``spread128`` 128 of the window's queries spread evenly over it (``spread64``: 64): allq's coverage at snapkv's
             cost; the library default since this study (n = 30: second best, 24 of 30 wins vs snapkv)
``probe``    a fixed generic probe ("What are the key facts, names, dates and numbers in this text?") appended
             after the window for scoring only; its attention mass picks the entries, then it is dropped

    OMP_NUM_THREADS=1 python benchmarks/selection_study.py --n 30 --ratio 16 --out runs/selection
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from memorag_core.memory import scoring
from memorag_core.memory.compressed_kv import CompressedKVMemory
from memorag_core.memory.pointers import crop_to

logger = logging.getLogger("selection")

PROBE = "\nWhat are the key facts, names, dates and numbers in this text?"


class RecentMemory(CompressedKVMemory):
    def score(self, window_scores, layer_idx):
        w = window_scores.shape[-1]
        return torch.arange(w, dtype=torch.float32)[None, None].expand_as(window_scores).clone()


class StridedMemory(CompressedKVMemory):
    def score(self, window_scores, layer_idx):
        w = window_scores.shape[-1]
        i = torch.arange(w)
        s = (i % self.config.ratio == 0).float() - i.float() * 1e-6  # (w,)
        return s[None, None].expand_as(window_scores).clone()


class RandomMemory(CompressedKVMemory):
    def score(self, window_scores, layer_idx):
        g = torch.Generator().manual_seed(1000 * layer_idx + window_scores.shape[-1] + self.entries)
        return torch.rand(window_scores.shape, generator=g)


class ProbeMemory(CompressedKVMemory):
    """Scores a window by the attention of a generic probe appended after it (then drops the probe)."""

    @torch.no_grad()
    def _read_windows(self, cache, rows, windows, compress, prefix):
        if len(rows) != 1 or not compress[0]:  # the prompt head, or a batch: as the base class
            return super()._read_windows(cache, rows, windows, compress, prefix)
        row, ids = rows[0], windows[0]
        probe = self._encode(PROBE)
        w, p = len(ids), len(probe)
        base = cache.layers[0].length  # memory entries before this window
        device = self.model.device
        x = torch.tensor([ids + probe], dtype=torch.long, device=device)  # (1, w + p)
        positions = torch.arange(row.next_position, row.next_position + w + p, device=device)[None]  # (1, w + p)
        self._check_range(row.next_position + w + p)
        with scoring.capture_scores(p, start=base) as scores:  # the probe's attention over the window
            self.model(input_ids=x, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        keep = self._keep_count(w, True)
        for layer_idx, layer in enumerate(cache.layers):
            layer.set_length(base + w)  # drop the probe's entries
            window_scores = self.score(scores[layer_idx][..., :w], layer_idx)  # (1, kv_heads, w)
            self._keep_top(layer, base, window_scores, keep, layer_idx, [row.source_tokens])
        row.entries += keep
        row.next_position += keep if self.config.positions == "compact" else w
        row.source_tokens += w


SNAP = {"obs_window": 32, "obs_sample": 0}
CRITERIA = {"snapkv": (CompressedKVMemory, SNAP), "recent": (RecentMemory, SNAP),
            "strided": (StridedMemory, SNAP), "random": (RandomMemory, SNAP),
            "allq": (CompressedKVMemory, {"obs_window": 0, "obs_sample": 0}), "probe": (ProbeMemory, SNAP),
            "obs128": (CompressedKVMemory, {"obs_window": 128, "obs_sample": 0}),
            "obs256": (CompressedKVMemory, {"obs_window": 256, "obs_sample": 0}),
            "spread64": (CompressedKVMemory, {"obs_window": 0, "obs_sample": 64}),
            "spread128": (CompressedKVMemory, {"obs_window": 0, "obs_sample": 128})}


@torch.no_grad()
def gold_loglik(memory, question: str, gold: str) -> float:
    """Mean log-probability per token of ``gold`` as the answer to the quote task, after the memory."""
    task = memory.task_ids(f"Question: {question}\nQuote the sentences of the text that answer it.")
    target = memory._encode(gold)
    ids = task + target
    entries = memory.entries
    device = memory.model.device
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, n)
    pos = torch.arange(memory.next_position, memory.next_position + len(ids), device=device)[None]
    try:
        logits = memory.model(input_ids=x, position_ids=pos, past_key_values=memory.cache, use_cache=True).logits
    finally:
        crop_to(memory.cache, entries)
    logp = logits[0, len(task) - 1:-1].float().log_softmax(-1)  # (len(target), vocab)
    tgt = torch.tensor(target, device=device)
    return float(logp.gather(1, tgt[:, None]).mean())


def kept_share(memory, token_mask: np.ndarray) -> float:
    """Share of the masked source tokens whose entry is kept, averaged over layers and KV heads."""
    shares = []
    for off in memory.offsets:  # (1, kv_heads, entries)
        for h in range(off.shape[1]):
            o = off[0, h].numpy()
            o = o[o >= 0]
            kept = np.zeros(len(token_mask), dtype=bool)
            kept[o[o < len(token_mask)]] = True
            shares.append(kept[token_mask].mean() if token_mask.any() else np.nan)
    return float(np.nanmean(shares))


def summarize(recs: list[dict], criteria: list[str]) -> dict[str, dict]:
    """Mean of each measure per criterion over the questions that *every* criterion finished (paired, so no row's
    mean holds an easier question set), and on how many of them the criterion's gold log-likelihood beats snapkv's."""
    finished = {(x["id"], x["criterion"]) for x in recs}
    common = {x["id"] for x in recs if all((x["id"], name) in finished for name in criteria)}
    recs = [x for x in recs if x["id"] in common]
    summary = {}
    for name in criteria:
        rs = [x for x in recs if x["criterion"] == name]
        summary[name] = {k: float(np.mean([x[k] for x in rs])) if rs else float("nan")
                         for k in ("ll", "span_recall", "rest_recall", "entries", "seconds")} | {"n": len(rs)}
    base = {x["id"]: x["ll"] for x in recs if x["criterion"] == "snapkv"}
    for name in criteria:
        pairs = [(x["ll"], base[x["id"]]) for x in recs if x["criterion"] == name and x["id"] in base]
        summary[name]["ll_wins_vs_snapkv"] = sum(a > b + 1e-6 for a, b in pairs)
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="../shared/data/hotpotqa_dev_300.jsonl")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--ratio", type=int, default=16)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from memorag_core.memory import MemoryConfig
    from memorag_core.memory.pointers import token_char_starts
    from memorag_core.models import load_causal_lm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    done = set()
    if path.exists():
        done = {(r["id"], r["criterion"]) for r in map(json.loads, path.read_text().splitlines())}
    model, tok = load_causal_lm(None)
    rows = [json.loads(line) for line in open(args.dataset)][: args.n]
    for r in rows:
        titles, sents = r["context"]["title"], r["context"]["sentences"]
        texts = [f"{t}: {''.join(s).strip()}" for t, s in zip(titles, sents)]
        context = "\n\n".join(texts)
        gold_spans, gold = [], []
        for t, sid in zip(r["supporting_facts"]["title"], r["supporting_facts"]["sent_id"]):
            if t not in titles or sid >= len(sents[titles.index(t)]):
                continue
            s = sents[titles.index(t)][sid].strip()
            pi = titles.index(t)
            at = context.find(s, sum(len(x) + 2 for x in texts[:pi]))
            if at >= 0:
                gold_spans.append((at, at + len(s)))
                gold.append(s)
        starts = token_char_starts(tok, context)  # (tokens,)
        mask = np.zeros(len(starts), dtype=bool)
        for a, b in gold_spans:
            mask |= (starts >= a) & (starts < b)
        for name in args.criteria:
            if (r["id"], name) in done:
                continue
            cls, extra = CRITERIA[name]
            cfg = MemoryConfig.for_kind(kind="compressed_kv", model=None, ratio=args.ratio, window=args.window,
                                        positions="compact", **extra)
            memory = cls(cfg, model=model, tokenizer=tok)
            t = time.perf_counter()
            memory.memorize(context)
            sec = time.perf_counter() - t
            rec = {"id": r["id"], "criterion": name, "entries": memory.entries, "seconds": sec,
                   "ll": gold_loglik(memory, r["question"], " ".join(gold)),
                   "span_recall": kept_share(memory, mask), "rest_recall": kept_share(memory, ~mask)}
            with path.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            logger.info("%s", rec)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    summary = summarize(recs, args.criteria)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("| criterion | n | gold LL/token | gold span kept | other kept | entries | memorize s |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['n']} | {s['ll']:.3f} | {100 * s['span_recall']:.1f}% | {100 * s['rest_recall']:.1f}% "
              f"| {s['entries']:.0f} | {s['seconds']:.1f} |")


if __name__ == "__main__":
    main()
