"""Aggregation, Markdown table, chart and results JSON."""

import json

import pytest

from memorag_core.errors import CorruptArtifactError, SchemaVersionError
from memorag_core.eval.report import (
    aggregate,
    compare_modes,
    load_results,
    markdown_table,
    rows_from_results,
    save_chart,
    save_results,
    write_report,
)


def _rec(f1, em, recall, seconds, skipped=False):
    if skipped:
        return {"skipped": True, "reason": "too long"}
    return {"scores": {"f1": f1, "em": em}, "recall_at_k": recall, "recall_evidence": recall,
            "evidence_chunk_ids": [0, 1, 2], "tokens_read": 100, "tokens_generated": 10,
            "seconds": seconds}


def _results():
    return {"settings": {"per_question": {"predictions": {
        "rag": {"a": _rec(1.0, 1.0, 0.5, {"retrieve": 0.1, "generate": 1.0}),
                "b": _rec(0.5, 0.0, 1.0, {"retrieve": 0.3, "generate": 2.0})},
        "full": {"a": _rec(0.0, 0.0, None, {"generate": 4.0}), "b": _rec(0, 0, None, {}, skipped=True)},
    }}}}


def test_aggregate_means_and_skips():
    rows = rows_from_results(_results())
    rag = next(r for r in rows if r.mode == "rag")
    assert rag.n == 2 and rag.skipped == 0
    assert rag.means["f1"] == pytest.approx(0.75)
    assert rag.means["em"] == pytest.approx(0.5)
    assert rag.means["recall_at_k"] == pytest.approx(0.75)
    assert rag.means["seconds_total"] == pytest.approx((1.1 + 2.3) / 2)
    assert rag.means["rouge_l"] is None
    full = next(r for r in rows if r.mode == "full")
    assert full.n == 1 and full.skipped == 1
    assert full.means["recall_at_k"] is None


def test_markdown_table_layout():
    table = markdown_table(rows_from_results(_results()))
    lines = table.strip().splitlines()
    assert lines[0].startswith("| setting | mode | n | F1 | EM |")
    assert "ROUGE-L" not in lines[0]  # no summary task in these records
    assert "| per_question | rag | 2 | 75.0 | 50.0 | 75.0 |" in table
    assert "| per_question | full | 1 (+1 skipped) | 0.0 | 0.0 | - |" in table


def test_chart_and_report_files(tmp_path):
    results = _results()
    paths = write_report(results, tmp_path)
    assert paths["markdown"].read_text().startswith("| setting |")
    png = paths["chart"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert save_chart([aggregate("s", "m", [])], tmp_path / "empty.png").exists()


def test_results_json_roundtrip_and_errors(tmp_path):
    path = tmp_path / "p.json"
    save_results({"settings": {}, "x": float("nan")}, path)
    loaded = load_results(path)
    assert loaded["x"] is None and loaded["schema"] == "memorag-eval/1"
    path.write_text("{")
    with pytest.raises(CorruptArtifactError, match="not valid JSON"):
        load_results(path)
    path.write_text(json.dumps({"schema": "other/9"}))
    with pytest.raises(SchemaVersionError, match="other/9"):
        load_results(path)


def test_compare_modes_counts_per_question():
    results = {"settings": {"pooled": {"predictions": {
        "rag": {"a": _rec(0.5, 0, 1.0, {}), "b": _rec(0.5, 0, 0.5, {}), "c": _rec(0.2, 0, 0.5, {}),
                "d": _rec(0, 0, 0, {}, skipped=True)},
        "memorag": {"a": _rec(1.0, 0, 0.5, {}), "b": _rec(0.5, 0, 0.5, {}), "c": _rec(0.0, 0, 1.0, {}),
                    "d": _rec(1.0, 0, 1.0, {}), "e": _rec(1.0, 0, 1.0, {})},
    }}}}
    assert compare_modes(results, "memorag", "rag") == [
        "pooled: memorag vs rag on f1: 1 better, 1 equal, 1 worse (3 questions)"]
    assert compare_modes(results, "memorag", "rag", "recall_at_k") == [
        "pooled: memorag vs rag on recall_at_k: 1 better, 1 equal, 1 worse (3 questions)"]
