"""The two-turn dialogue builder of benchmarks/bench_sessions.py follows its written rules."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_sessions as bs  # noqa: E402


def test_reference_rules():
    para_person = "Ann Lee (born 1950) is an American singer. She sang."
    assert bs.refer("Where was Ann Lee born?", "Ann Lee", para_person) == "Where was she born?"
    assert bs.refer("Ann Lee's album sold how many copies?", "Ann Lee", para_person) == \
        "Her album sold how many copies?"
    assert bs.refer("Who starred in the film Arrival?", "Arrival", "Arrival is a 2016 film.") == \
        "Who starred in that film?"
    assert bs.refer("Who directed Arrival?", "Arrival", "Arrival is a 2016 film.") == "Who directed it?"
    assert bs.refer("No mention here?", "Arrival", "") is None


def test_dialogues_from_hotpotqa(shared_data_dir):
    rows = [json.loads(x) for x in (shared_data_dir / "hotpotqa_dev_300.jsonl").read_text().splitlines() if x]
    ds = bs.build_dialogues(rows, 50)
    assert len(ds) == 50
    for d in ds:
        assert d["entity"].lower() in d["original"].lower()
        assert d["entity"].lower() not in d["turn2"].lower()  # turn 2 only refers to it
        assert d["turn1"] == f"Tell me about {d['entity']}." and d["answer1"]
        assert len(d["gold"]) == 2 and d["entity_title"] in d["gold"]
    titles, passages = bs.pooled_corpus(rows, {d["id"] for d in ds})
    assert len(titles) == len(set(titles)) == len(passages)
    assert all(g in titles for d in ds for g in d["gold"])
    assert bs.recall_at(["a", "b", "c"], ["c", "x"], 2) == 0.0 and bs.recall_at(["a", "c"], ["c", "x"], 2) == 0.5
