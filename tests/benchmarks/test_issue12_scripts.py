"""The issue-12 measurement scripts: the ablation's rows and pools, the clue cache's pool check, the selection
study's paired summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablation  # noqa: E402
import clue_cache  # noqa: E402
import selection_study  # noqa: E402


def _write_cache(folder: Path, examples, point_at, setting="per_question", **config) -> None:
    """A clue cache with no text clues and pointer mass only on the passages ``point_at(example)`` names."""
    (folder / "pointers").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"setting": setting, **config}))
    with (folder / "clues.jsonl").open("w") as fh:
        for ex in examples:
            fh.write(json.dumps({"id": ex.id, "question": ex.question, "spans": "", "surrogates": "", "answer": "",
                                 "seconds": {"clues": 1.0, "pointers": 0.5}}) + "\n")
            mass = np.zeros((2, 1, len(ex.passages)), dtype=np.float32)  # (layers, heads, passages)
            for i in point_at(ex):
                mass[:, :, i] = 1.0
            np.savez(folder / "pointers" / f"{ex.id}.npz", mass=mass, count=np.ones_like(mass))


def test_ablation_rows_score_the_question_and_the_pointers(shared_data_dir, tmp_path):
    from memorag_core.eval.datasets import load_examples
    from memorag_core.retrieval import load_embedder

    dataset = shared_data_dir / "hotpotqa_dev_300.jsonl"
    emb = load_embedder(None)
    fits = lambda ex: all(len(emb.tokenizer(p.text)["input_ids"]) <= 250 for p in ex.passages)  # noqa: E731
    examples = [ex for ex in load_examples(str(dataset))[:20] if fits(ex)][:3]  # one chunk per passage
    titles = lambda ex: [p.title for p in ex.passages]  # noqa: E731
    gold = lambda ex: [titles(ex).index(t) for t in dict.fromkeys(ex.supporting_titles)]  # noqa: E731
    wrong = lambda ex: [i for i in range(len(ex.passages)) if i not in gold(ex)][:2]  # noqa: E731
    _write_cache(tmp_path / "gold", examples, gold)
    _write_cache(tmp_path / "wrong", examples, wrong)

    ablation.main(["--dataset", str(dataset), "--cache", str(tmp_path / "gold"), "--setting", "per_question",
                   "--budgets", "3", "--out", str(tmp_path / "a"), "--params", _params(tmp_path)])
    res = json.loads((tmp_path / "a" / "ablation.json").read_text())
    assert res["n"] == 3
    assert res["summary"]["3"]["pointers alone"]["R"] == pytest.approx(100.0)
    # the question row is plain dense retrieval: recompute it from the embedder (one chunk per passage)
    expect = []
    for ex in examples:
        sims = emb.encode([p.text for p in ex.passages]) @ emb.encode([ex.question], is_query=True)[0]
        top = {titles(ex)[i] for i in np.argsort(-sims)[:3]}
        expect.append(sum(g in top for g in dict.fromkeys(ex.supporting_titles)) / len(set(ex.supporting_titles)))
    assert res["summary"]["3"]["question"]["R"] == pytest.approx(100 * np.mean(expect))
    assert res["clue_seconds_median"] == pytest.approx(1.5)

    ablation.main(["--dataset", str(dataset), "--cache", str(tmp_path / "wrong"), "--setting", "per_question",
                   "--budgets", "3", "--out", str(tmp_path / "b"), "--params", _params(tmp_path)])
    res = json.loads((tmp_path / "b" / "ablation.json").read_text())
    # pointers at the two non-gold passages fill the top 3 with at most one gold passage (the third slot)
    assert res["summary"]["3"]["pointers alone"]["R"] <= 50.0


def _params(tmp_path: Path) -> str:
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"pointer_layers": [0, 1], "pointer_normalize": "mean", "rrf_k": 10.0}))
    return str(path)


def test_pooled_caches_must_name_one_pool(tmp_path):
    for name, start in (("a", 0), ("b", 100)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"setting": "pooled", "pool": 100,
                                                                  "pool_start": start}))
    assert ablation.pool_range([str(tmp_path / "b")], None, None) == (100, 100)
    with pytest.raises(SystemExit, match="different pools"):
        ablation.pool_range([str(tmp_path / "a"), str(tmp_path / "b")], None, None)
    with pytest.raises(SystemExit, match="differ from the caches' memory"):
        ablation.pool_range([str(tmp_path / "b")], 0, None)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"setting": "per_question"}))
    with pytest.raises(SystemExit, match="not a pooled cache"):
        ablation.pool_range([str(tmp_path / "c")], None, None)


def test_clue_cache_refuses_questions_outside_the_pool(shared_data_dir, tmp_path):
    with pytest.raises(SystemExit, match="outside the pool"):
        clue_cache.main(["--dataset", str(shared_data_dir / "hotpotqa_dev_300.jsonl"), "--setting", "pooled",
                         "--pool", "100", "--pool-start", "100", "--start", "0", "--stop", "100",
                         "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c" / "clues.jsonl").exists()


def test_selection_summary_is_paired_over_questions_every_criterion_finished():
    recs = [
        {"id": "q1", "criterion": "snapkv", "ll": -2.0, "span_recall": 0.1, "rest_recall": 0.2, "entries": 10,
         "seconds": 1.0},
        {"id": "q1", "criterion": "probe", "ll": -1.5, "span_recall": 0.3, "rest_recall": 0.2, "entries": 10,
         "seconds": 2.0},
        {"id": "q2", "criterion": "snapkv", "ll": -3.0, "span_recall": 0.0, "rest_recall": 0.2, "entries": 10,
         "seconds": 1.0},
        {"id": "q2", "criterion": "probe", "ll": -3.5, "span_recall": 0.1, "rest_recall": 0.2, "entries": 10,
         "seconds": 2.0},
        # q3 has only the default: an easy question that must not lift snapkv's mean
        {"id": "q3", "criterion": "snapkv", "ll": -0.1, "span_recall": 0.9, "rest_recall": 0.2, "entries": 10,
         "seconds": 1.0},
    ]
    s = selection_study.summarize(recs, ["snapkv", "probe"])
    assert s["snapkv"]["n"] == s["probe"]["n"] == 2
    assert s["snapkv"]["ll"] == pytest.approx(-2.5)
    assert s["probe"]["ll"] == pytest.approx(-2.5)
    assert s["probe"]["span_recall"] == pytest.approx(0.2)
    assert s["probe"]["ll_wins_vs_snapkv"] == 1
    assert s["snapkv"]["ll_wins_vs_snapkv"] == 0


def test_every_selection_criterion_keeps_its_own_entries(tiny_lm_dir):
    """Each criterion must change what is kept (a subclass hook that the memory no longer calls would silently
    measure the default twice), keep the same number of entries, and leave a memory that answers."""
    import torch

    from memorag_core.memory import MemoryConfig
    from memorag_core.models import load_causal_lm

    model, tok = load_causal_lm(str(tiny_lm_dir))
    text = " ".join(f"Fact {i}: the {w} river flows past town {i * 7}." for i, w in
                    enumerate(["red", "blue", "green", "amber", "grey", "black"] * 5))
    kept = {}
    for name, (cls, extra) in selection_study.CRITERIA.items():
        cfg = MemoryConfig.for_kind(kind="compressed_kv", model=None, ratio=4, window=64, positions="compact",
                                    **extra)
        memory = cls(cfg, model=model, tokenizer=tok)
        memory.memorize(text)
        kept[name] = (memory.entries, torch.cat([o.flatten() for o in memory.offsets]))
        assert memory.cache.layers[0].length == memory.entries  # the probe's entries were dropped
        assert np.isfinite(selection_study.gold_loglik(memory, "Which river is red?", "Fact 0: the red river"))
    entries = {n for n, _ in kept.values()}
    assert len(entries) == 1, kept
    base = kept["snapkv"][1]
    for name, (_, offsets) in kept.items():
        if name != "snapkv":
            assert not torch.equal(offsets, base), f"{name} keeps exactly snapkv's entries"
