"""Dataset adapters and title-keeping chunking."""

import json

import pytest

from memorag_core.errors import InvalidInputError
from memorag_core.eval.datasets import (
    Passage,
    chunk_passages,
    detect_format,
    load_examples,
    pooled_passages,
)

HOTPOT = "/work/shared/data/hotpotqa_dev_300.jsonl"


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_hotpotqa_shipped_file():
    examples = load_examples(HOTPOT, limit=3)
    assert len(examples) == 3
    ex = examples[0]
    assert ex.answers == ("Tulsa",)
    assert ex.supporting_titles == ("Tinted Windows (album)", "Tinted Windows (band)")
    assert len(ex.passages) == 10
    assert ex.passages[3].title == "Tinted Windows (album)"
    assert ex.passages[3].text.startswith("Tinted Windows (album): ")
    assert ex.task == "qa"
    assert ex.context().count("\n\n") == 9


def test_hotpotqa_all_300_have_gold_titles_in_context():
    examples = load_examples(HOTPOT)
    assert len(examples) == 300
    for ex in examples:
        titles = {p.title for p in ex.passages}
        assert set(ex.supporting_titles) <= titles, ex.id


def test_longbench_adapter(tmp_path):
    path = _write(tmp_path / "lb.jsonl", [
        {"_id": "a", "input": "Who?", "context": "Long text.", "answers": ["Bob", "Robert"], "dataset": "hotpotqa"},
        {"_id": "b", "input": "", "context": "Report...", "answers": ["Summary."], "dataset": "gov_report"},
    ])
    a, b = load_examples(path)
    assert a.answers == ("Bob", "Robert") and a.task == "qa" and a.passages == (Passage("", "Long text."),)
    assert b.task == "summary"
    assert load_examples(path, task="qa")[1].task == "qa"


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"foo": 1}], "cannot tell the dataset format"),
        ([{"input": "q", "context": "c", "answers": []}], "empty 'answers'"),
        ([{"_id": "x", "input": "q", "context": "c", "answers": ["a"]}] * 2, "repeats"),
    ],
)
def test_bad_records_name_the_cause(tmp_path, records, message):
    path = _write(tmp_path / "bad.jsonl", records)
    with pytest.raises(InvalidInputError, match=message):
        load_examples(path)


def test_bad_files(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(InvalidInputError, match="broken.jsonl:1 is not valid JSON"):
        load_examples(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidInputError, match="holds no examples"):
        load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(InvalidInputError, match="limit"):
        load_examples(HOTPOT, limit=0)


def test_detect_format():
    assert detect_format({"question": 1, "answer": 1, "context": 1, "supporting_facts": 1}) == "hotpotqa"
    assert detect_format({"input": 1, "context": 1, "answers": 1}) == "longbench"


def test_chunk_passages_keeps_fitting_passages_whole():
    words = lambda t: len(t.split())  # noqa: E731 - a word "tokenizer" makes counts hand-checkable
    split = lambda t, k: [" ".join(t.split()[i:i + k]) for i in range(0, len(t.split()), k)]  # noqa: E731
    passages = [Passage("A", "A: one two"), Passage("B", "B: w1 w2 w3 w4 w5"), Passage("C", "  ")]
    chunks = chunk_passages(passages, words, split, chunk_size=3)
    # B does not fit 3 words: its body is cut into 2-word pieces (3 minus the 1-word prefix), each prefixed
    assert [c.text for c in chunks] == ["A: one two", "B: w1 w2", "B: w3 w4", "B: w5"]
    assert all(words(c.text) <= 3 for c in chunks)
    assert [c.title for c in chunks] == ["A", "B", "B", "B"]
    assert [c.passage_index for c in chunks] == [0, 1, 1, 1]
    with pytest.raises(InvalidInputError, match="chunk_size"):
        chunk_passages(passages, words, split, chunk_size=0)


def test_pooled_passages_dedupes_across_examples():
    examples = load_examples(HOTPOT, limit=20)
    pooled = pooled_passages(examples)
    total = sum(len(e.passages) for e in examples)
    assert len(pooled) <= total
    assert len({(p.title, p.text) for p in pooled}) == len(pooled)
    assert pooled[:10] == list(examples[0].passages)
