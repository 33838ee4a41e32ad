"""Read, validate and pack stages: unit tests of the pure parts, and real Ray Data runs on the session cluster."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memorag_core.errors import InvalidInputError
from pipeline.config import CorpusConfig, PackConfig, ValidateConfig
from pipeline.pack import BuildUnit, TokenizeSplitStage, is_boundary, plan_units, unit_id_for
from pipeline.read import list_corpus_files, read_corpus, read_corpus_table
from pipeline.validate import ValidateStage, check_document, split_duplicates


def _validated(config: CorpusConfig) -> list[dict]:
    """Validated rows of a corpus read with Ray Data; the driver-side read (small corpora) must give the same."""
    validate = ValidateStage(ValidateConfig(max_chars=200))
    key = lambda r: (r["source"], r["position"], r["doc_id"])  # noqa: E731
    rows = sorted(read_corpus(config).map_batches(validate, batch_format="pyarrow").take_all(), key=key)
    local = sorted(validate(read_corpus_table(config)).to_pylist(), key=key)
    assert local == rows
    return rows


def test_check_document_reasons():
    cfg = ValidateConfig(max_chars=10)
    assert check_document(b"hello", "", cfg) == ("hello", "")
    assert check_document(b"   \n", "", cfg)[1] == "empty"
    assert check_document(b"a\x00b", "", cfg)[1].startswith("binary")
    assert check_document(b"\x01\x02\x03\x04abc", "", cfg)[1].startswith("binary")
    assert check_document(b"caf\xe9", "", cfg)[1].startswith("not UTF-8")
    assert check_document(b"x" * 11, "", cfg)[1].startswith("over-long: 11")
    assert check_document(b"fine", "malformed JSON: x", cfg) == ("", "malformed JSON: x")
    assert split_duplicates(["a", "b", "a", "c", "b"]) == {2, 4}


def test_read_jsonl_quarantines_bad_rows(ray_local, tmp_path):
    lines = [
        json.dumps({"doc_id": "d1", "text": "first document", "lang": "en"}).encode(),
        b"{not json",
        json.dumps({"doc_id": "d2"}).encode(),
        json.dumps({"doc_id": "d3", "text": 42}).encode(),
        json.dumps({"doc_id": "d4", "text": ""}).encode(),
        b'{"doc_id": "d5", "text": "caf\xe9"}',
        json.dumps({"doc_id": "d6", "text": "y" * 500}).encode(),
        json.dumps({"doc_id": "d7", "text": "nul\u0000inside"}).encode(),
        b"",
        json.dumps({"text": "no id here"}).encode(),
    ]
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rows = _validated(CorpusConfig(url=str(tmp_path / "c.jsonl")))
    by_pos = {r["position"]: r for r in rows}
    assert len(rows) == 9  # the blank line is not a document
    assert by_pos[1]["reason"] == "" and by_pos[1]["text"] == "first document"
    assert json.loads(by_pos[1]["meta"]) == {"lang": "en"}
    assert by_pos[2]["reason"].startswith("malformed JSON")
    assert by_pos[3]["reason"] == "malformed: no 'text' field" and by_pos[3]["doc_id"] == "d2"
    assert by_pos[4]["reason"].startswith("malformed: 'text' is a int")
    assert by_pos[5]["reason"] == "empty"
    assert by_pos[6]["reason"].startswith("not UTF-8")
    assert by_pos[7]["reason"].startswith("over-long: 500")
    assert by_pos[8]["reason"].startswith("binary")
    assert by_pos[10]["doc_id"] == "c.jsonl:10" and by_pos[10]["reason"] == ""


def test_read_text_folder_and_parquet(ray_local, tmp_path):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha text")
    (folder / "sub" / "b.txt").write_text("beta text")
    (folder / "bin.txt").write_bytes(bytes(range(256)))
    rows = _validated(CorpusConfig(url=str(folder)))
    assert {r["doc_id"]: r["reason"][:6] for r in rows} == {"a": "", "sub/b": "", "bin": "binary"}

    table = pa.table({"id": ["p1", None], "body": ["parquet one", "parquet two"], "year": [2001, 2002]})
    pq.write_table(table, tmp_path / "p.parquet")
    rows = _validated(CorpusConfig(url=str(tmp_path / "p.parquet"), text_column="body", id_column="id"))
    ids = sorted(r["doc_id"] for r in rows)
    assert ids[1] == "p1" and ids[0].startswith("p.parquet#") and all(r["reason"] == "" for r in rows)
    assert sorted(json.loads(r["meta"])["year"] for r in rows) == [2001, 2002]
    with pytest.raises(InvalidInputError, match="no text column 'text'"):
        read_corpus(CorpusConfig(url=str(tmp_path / "p.parquet")))
    with pytest.raises(InvalidInputError, match="no text column 'text'"):
        read_corpus_table(CorpusConfig(url=str(tmp_path / "p.parquet")))


def test_list_corpus_files_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        list_corpus_files(CorpusConfig(url=str(tmp_path / "missing")))
    (tmp_path / "x.jsonl").write_text("{}\n")
    (tmp_path / "y.txt").write_text("t")
    with pytest.raises(InvalidInputError, match="mixes formats"):
        list_corpus_files(CorpusConfig(url=str(tmp_path)))
    assert list_corpus_files(CorpusConfig(url=str(tmp_path), format="text"))[3][0].endswith("y.txt")


def test_split_long_document_covers_text(tiny_lm_dir):
    stage = TokenizeSplitStage(str(tiny_lm_dir), PackConfig(unit_tokens=16))
    text = " ".join(f"word{i}" for i in range(60))
    pieces = stage.split(text)
    assert len(pieces) > 1
    assert "".join(text[a:b] for a, b, _ in pieces) == text
    assert all(n <= 16 for _, _, n in pieces)
    assert sum(n for *_, n in pieces) == len(stage._tokenizer()(text, add_special_tokens=False)["input_ids"])
    assert stage.split("short") == [(0, 5, 1)] or stage.split("short")[0][:2] == (0, 5)


def test_plan_is_content_defined():
    cfg = PackConfig(unit_tokens=100, boundary_every=3)
    items = [(f"doc{i:03d}", 0, 10) for i in range(60)]
    plan = plan_units(items, cfg)
    groups = {}
    for p in plan:
        groups.setdefault(p.group, []).append(p.doc_id)
    assert all(sum(10 for _ in g) + len(g) - 1 <= 100 for g in groups.values())
    assert len(groups) > 1
    # a group ends at a boundary document or at the size cap
    for members in groups.values():
        assert all(not is_boundary(d, 3) for d in members[:-1])
    # inserting one document changes only the group it joins (no boundary doc is inserted here)
    new_id = next(f"doc{i:03d}x" for i in range(60) if not is_boundary(f"doc{i:03d}x", 3))
    plan2 = plan_units(items + [(new_id, 0, 10)], cfg)
    groups2 = {}
    for p in plan2:
        groups2.setdefault(p.group, []).append(p.doc_id)
    changed = [g for g in groups2.values() if g not in groups.values()]
    assert len(changed) <= 2 and any(new_id in g for g in changed)
    # split documents: each piece stands alone
    plan3 = plan_units([("a", 0, 100), ("a", 1, 5), ("b", 0, 5)], cfg)
    assert [p.group for p in plan3][:2] == ["a\x1f0", "a\x1f1"] and plan3[2].group == "b\x1f0"


def test_build_unit_offsets():
    group = pa.Table.from_pylist([
        {"doc_id": "b", "part": 0, "text": "bee", "n_tokens": 1, "doc_start": 0, "doc_end": 3, "group": "a\x1f0"},
        {"doc_id": "a", "part": 0, "text": "ay", "n_tokens": 1, "doc_start": 0, "doc_end": 2, "group": "a\x1f0"},
    ])
    row = BuildUnit("\n\n")(group).to_pylist()[0]
    assert row["text"] == "ay\n\nbee" and row["doc_ids"] == ["a", "b"]
    members = json.loads(row["members"])
    assert [row["text"][m["unit_start"]:m["unit_end"]] for m in members] == ["ay", "bee"]
    assert unit_id_for("fp", "x") != unit_id_for("fp2", "x") and len(unit_id_for("fp", "x")) == 64


def test_assign_groups_reads_an_arrow_plan_from_the_object_store(ray_local):
    """The packing plan travels as one Arrow table in the object store: a map task's fn pickles to a few hundred
    bytes whatever the plan's size (the old per-item dict pickled ~50 bytes per item into every task)."""
    import pickle

    import ray

    from pipeline.pack import AssignGroups, plan_table

    items = [(f"doc-{i:06d}", 0, 50) for i in range(20_000)]
    plan = plan_table(plan_units(items, PackConfig(unit_tokens=400, boundary_every=5)))
    fn = AssignGroups(ray.put(plan))
    assert len(pickle.dumps(fn)) < 1_000 < plan.nbytes // 100
    batch = pa.table({"doc_id": ["doc-000007", "doc-000003", "doc-000003"], "part": [0, 0, 0],
                      "text": ["x", "y", "y"]})
    out = fn(batch)
    expect = {r["doc_id"]: r["group"] for r in plan.to_pylist()}
    assert out.column_names == ["doc_id", "part", "text", "group"] and out.num_rows == 3
    assert all(r["group"] == expect[r["doc_id"]] for r in out.to_pylist())
    assert AssignGroups(plan)(batch).sort_by("text").equals(out.sort_by("text"))  # the table itself, no Ray
    with pytest.raises(InvalidInputError, match="'nope', part 0"):
        fn(pa.table({"doc_id": ["nope"], "part": [0], "text": ["z"]}))
