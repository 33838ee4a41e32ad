"""The evaluate entry point: argument parsing, errors, merging finished runs, and the two-question smoke run."""

import json

import pytest

from jobs.evaluate import EvaluateFlags, config_from_flags, main
from jobs.options import parse_flags
from memorag_core.errors import InvalidInputError
from memorag_core.eval.runner import MODES
from memorag_core.eval.report import load_results, save_results

HOTPOT = "/work/shared/data/hotpotqa_dev_300.jsonl"


def test_parser_builds_typed_config():
    flags = parse_flags(EvaluateFlags, ["--dataset", HOTPOT, "--limit", "5", "--modes", "rag,memorag",
                                        "--settings", "pooled", "--hits", "4", "--full-context-max-tokens", "900"])
    config = config_from_flags(flags)
    assert config.limit == 5 and config.hits == 4 and config.full_context_max_tokens == 900
    assert config.modes == ("rag", "memorag") and config.settings == ("pooled",)
    assert config.mem_model is None and config.overwrite is False and config.share_clues is True
    flags = parse_flags(EvaluateFlags, ["--dataset", HOTPOT, "--no-share-clues", "--overwrite", "--modes", "rag",
                                        "--modes", "memorag"])
    config = config_from_flags(flags)
    assert config.share_clues is False and config.overwrite is True and config.modes == ("rag", "memorag")
    assert config_from_flags(parse_flags(EvaluateFlags, ["--dataset", HOTPOT])).modes == MODES


def test_bad_values_name_the_field():
    flags = parse_flags(EvaluateFlags, ["--dataset", HOTPOT, "--modes", "rag,oracle"])
    with pytest.raises(InvalidInputError, match="modes must be a non-empty subset"):
        config_from_flags(flags)
    flags = parse_flags(EvaluateFlags, ["--dataset", HOTPOT, "--hits", "0"])
    with pytest.raises(InvalidInputError, match="hits must be a positive integer"):
        config_from_flags(flags)


def test_missing_dataset_file_is_a_clear_error(tmp_path, capsys):
    rc = main(["--dataset", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "out")])
    assert rc == 2
    assert "nope.jsonl' does not exist" in capsys.readouterr().err


def test_dataset_is_required(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "--dataset is required" in err and "Usage: python -m jobs.evaluate" in err and "Traceback" not in err
    assert main(["--dataset", HOTPOT, "--modes", "rag", "memorag"]) == 2  # one value per flag: a usage error
    assert "--modes and --settings take one value per flag" in capsys.readouterr().err


def _block(f1):
    rec = {"scores": {"f1": f1, "em": 0.0}, "recall_at_k": 0.5, "seconds": {"generate": 1.0}, "tokens_read": 10,
           "tokens_generated": 2, "evidence_chunk_ids": [1]}
    return {"predictions": {"rag": {"q1": rec}}, "wall_seconds": 3.0, "info": {}}


def test_merge_puts_settings_side_by_side(tmp_path, capsys):
    a, b = tmp_path / "a" / "predictions.json", tmp_path / "b" / "predictions.json"
    save_results({"settings": {"per_question": _block(1.0)}, "notes": ["note a"]}, a)
    save_results({"settings": {"pooled": _block(0.5)}, "notes": []}, b)
    rc = main(["--merge", str(a), str(b), "--output-dir", str(tmp_path / "m")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| per_question | rag | 1 | 100.0 |" in out and "| pooled | rag | 1 | 50.0 |" in out
    merged = load_results(tmp_path / "m" / "predictions.json")
    assert set(merged["settings"]) == {"per_question", "pooled"}
    assert (tmp_path / "m" / "results.png").exists()
    assert "[a] note a" in (tmp_path / "m" / "results.md").read_text()


def _smoke(tmp_path, capsys, settings):
    out = tmp_path / "smoke"
    rc = main(["--dataset", HOTPOT, "--limit", "2", "--output-dir", str(out), "--hits", "2", "--settings", ",".join(settings),
               "--clue-max-new-tokens", "8", "--answer-max-new-tokens", "8", "--log-level", "WARNING"])
    assert rc == 0
    table = capsys.readouterr().out
    for setting in settings:
        for mode in ("full", "rag", "memorag", "memorag_draft"):
            assert f"| {setting} | {mode} | 2 |" in table
    results = load_results(out / "predictions.json")
    for setting, block in results["settings"].items():
        preds = block["predictions"]
        rag_recall = [r["recall_at_k"] for r in preds["rag"].values()]
        assert sum(rag_recall) / len(rag_recall) >= 0.5, (setting, rag_recall)
        for mode, by_id in preds.items():
            for rec in by_id.values():
                assert rec["prediction"].strip(), (setting, mode)
        for rec in preds["memorag_draft"].values():
            assert rec["clues"]["draft_answer"]
            assert rec["tokens_generated"] > 0
    assert (out / "results.png").stat().st_size > 1000
    # the table written next to the JSON is the one printed
    assert (out / "results.md").read_text().split("\n\n")[0].strip() in table
    return results


@pytest.mark.slow  # ~5 min on 2 cores; the runner's mechanics are tested on the tiny model (eval/test_runner.py)
def test_smoke_two_questions_with_embedded_models(tmp_path, capsys, embedded_lm_dir):
    """The real embedded models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2), 2 questions, every mode, per question.

    SmolLM2-135M's answers are a smoke signal, not quality; retrieval with the real embedder must find gold
    paragraphs for question-only RAG, and every stage must have produced text. (The pooled setting's mechanics are
    tested on the tiny model; with the embedded models it is the slow test below.)
    """
    _smoke(tmp_path, capsys, ["per_question"])


@pytest.mark.slow
def test_smoke_both_settings_with_embedded_models(tmp_path, capsys, embedded_lm_dir):
    """As the smoke test, in both corpus settings (the pooled one memorizes the 20 paragraphs of both questions)."""
    results = _smoke(tmp_path, capsys, ["per_question", "pooled"])
    assert results["settings"]["pooled"]["info"]["passages"] == 20
