"""The runner end to end on a tiny random-weight memory/generator model with the real embedded embedder.

The tiny model's answers are noise; these tests check the mechanics: every (setting, mode, example) gets a record,
recall is computed from the retrieved titles, skipped examples say why, resuming reruns nothing, a changed config
is refused, and the pooled memory is saved once and reloaded.
"""

import os

import pytest

from memorag_core.errors import CorruptArtifactError, InvalidInputError
from memorag_core.eval.datasets import load_examples
from memorag_core.eval.metrics import evidence_recall
from memorag_core.eval.report import load_results
from memorag_core.eval.runner import MODES, EvalConfig, EvalRunner

HOTPOT = "/work/shared/data/hotpotqa_dev_300.jsonl"


@pytest.fixture(scope="module")
def examples():
    return load_examples(HOTPOT, limit=2)


@pytest.fixture(scope="module")
def shared_pipeline(tiny_lm_dir):
    """One facade on the tiny model, shared by the tests (loading the embedder is the slow part)."""
    from memorag_core.facade import MemoRAG
    from memorag_core.memory import MemoryConfig

    return MemoRAG(mem_model_name_or_path=str(tiny_lm_dir), ret_hit=2, retrieval_chunk_size=128,
                   memory_config=MemoryConfig(model=str(tiny_lm_dir), ratio=2, window=256))


def _config(tmp_path, tiny_lm_dir, **kw):
    base = dict(dataset=HOTPOT, output_dir=str(tmp_path / "out"), limit=2, mem_model=str(tiny_lm_dir), ratio=2,
                pooled_ratio=4, window=256, hits=2, chunk_size=128, clue_max_new_tokens=6, answer_max_new_tokens=4)
    base.update(kw)
    return EvalConfig(**base)


class _Counting:
    """Wraps the facade and counts the model calls the runner makes."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = {"clues": 0, "answer": 0}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name in ("inner", "calls"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def clues(self, *a, **kw):
        self.calls["clues"] += 1
        return self.inner.clues(*a, **kw)

    def answer_from_evidence(self, *a, **kw):
        self.calls["answer"] += 1
        return self.inner.answer_from_evidence(*a, **kw)


def test_run_records_every_mode_and_resumes(tmp_path, tiny_lm_dir, shared_pipeline, examples, monkeypatch):
    from memorag_core.retrieval.queries import PlanConfig

    # text clues on, so that both memory modes decode (and share) clues; the default plan decodes them for
    # memorag_draft only (test_memorag_mode_follows_the_plan)
    monkeypatch.setattr(shared_pipeline, "plan_config", PlanConfig(text_clues=True))
    config = _config(tmp_path, tiny_lm_dir)
    pipeline = _Counting(shared_pipeline)
    runner = EvalRunner(config, pipeline=pipeline)
    results = runner.run(examples)
    # 2 settings x 5 modes x 2 examples answered; clues decoded once per example and setting (shared)
    assert pipeline.calls == {"clues": 4, "answer": 20}
    for setting in ("per_question", "pooled"):
        preds = results["settings"][setting]["predictions"]
        assert set(preds) == set(MODES)
        for mode in MODES:
            assert set(preds[mode]) == {ex.id for ex in examples}
            for ex in examples:
                rec = preds[mode][ex.id]
                assert not rec.get("skipped"), rec.get("reason")
                assert 0.0 <= rec["scores"]["f1"] <= 1.0 and rec["scores"]["em"] in (0.0, 1.0)
                assert rec["tokens_read"] > 0 and rec["seconds"]["generate"] > 0
                if mode == "full":
                    continue
                assert rec["recall_evidence"] == evidence_recall(rec["evidence_titles"], ex.supporting_titles)
                assert len(rec["evidence_chunk_ids"]) >= 1
                if mode in ("rag", "rag_matched"):
                    assert rec["retrieval_queries"] == [ex.question]
                    assert len(rec["evidence_chunk_ids"]) <= config.hits
                else:
                    # the facade's path: the question first, the fused top ``hits`` chunks handed over
                    assert rec["retrieval_queries"][0] == ex.question
                    assert len(rec["evidence_chunk_ids"]) == config.hits
                    assert rec["recall_at_k"] == rec["recall_evidence"]
                    assert rec["seconds"]["clues"] > 0
        # equal budgets: rag_matched reads as many chunks as memorag handed over, by the question alone
        for ex in examples:
            assert len(preds["rag_matched"][ex.id]["evidence_chunk_ids"]) == len(
                preds["memorag"][ex.id]["evidence_chunk_ids"])
        # clues are shared: both memory modes saw the same spans and surrogates
        for ex in examples:
            a, b = preds["memorag"][ex.id]["clues"], preds["memorag_draft"][ex.id]["clues"]
            assert (a["spans"], a["surrogates"]) == (b["spans"], b["surrogates"]) and a["draft_answer"] is None
    assert all(results["settings"][s]["wall_seconds"] > 0 for s in ("per_question", "pooled"))
    info = results["settings"]["pooled"]["info"]
    n_passages = len({(p.title, p.text) for ex in examples for p in ex.passages})
    assert info["passages"] == n_passages and info["memory_action"] == "memorized"
    assert info["memory_stats"]["raw_tokens"] == info["memory_tokens"]
    # per-question memorization is charged to the memory modes only
    first = results["settings"]["per_question"]["predictions"]
    assert "memorize" in first["memorag"][examples[0].id]["seconds"]
    assert "memorize" not in first["rag"][examples[0].id]["seconds"]
    out = tmp_path / "out"
    assert (out / "results.md").read_text().count("| per_question |") == 5
    assert (out / "results.png").stat().st_size > 1000

    # resume: nothing is recomputed, the file is unchanged apart from timings
    again = _Counting(shared_pipeline)
    EvalRunner(config, pipeline=again).run(examples)
    assert again.calls == {"clues": 0, "answer": 0}
    assert load_results(out / "predictions.json")["settings"]["per_question"]["predictions"] == first
    # the same dataset named by another path (relative to the current folder) is the same run
    renamed = _Counting(shared_pipeline)
    EvalRunner(_config(tmp_path, tiny_lm_dir, dataset=os.path.relpath(HOTPOT)), pipeline=renamed).run(examples)
    assert renamed.calls == {"clues": 0, "answer": 0}

    # pooled predictions removed: the saved pooled memory and index are loaded, not memorized or embedded again
    res = load_results(out / "predictions.json")
    pooled_first = res["settings"]["pooled"]["predictions"]
    assert info["index_seconds"] > 0 and len(list((out / "pooled_index").glob("*/manifest.json"))) == 1
    res["settings"]["pooled"]["predictions"] = {m: {} for m in MODES}
    from memorag_core.eval.report import save_results

    save_results(res, out / "predictions.json")
    third = _Counting(shared_pipeline)
    results3 = EvalRunner(config, pipeline=third).run(examples)
    info3 = results3["settings"]["pooled"]["info"]
    assert info3["memory_action"] == "loaded" and info3["memorize_seconds"] > 0 and "load_seconds" in info3
    assert "index_load_seconds" in info3 and info3["index_seconds"] == info["index_seconds"]
    assert third.calls == {"clues": 2, "answer": 10}
    pooled_third = results3["settings"]["pooled"]["predictions"]
    for ex in examples:
        assert pooled_third["rag"][ex.id]["evidence_chunk_ids"] == pooled_first["rag"][ex.id]["evidence_chunk_ids"]
    # a damaged saved index is refused by its checksum, not used
    index_file = next((out / "pooled_index").glob("*/g-*/index.faiss"))
    index_file.write_bytes(index_file.read_bytes()[:-8] + b"\0" * 8)
    save_results(res, out / "predictions.json")
    with pytest.raises(CorruptArtifactError, match="index.faiss"):
        EvalRunner(config, pipeline=_Counting(shared_pipeline)).run(examples)

    # a changed config is refused, naming the field
    with pytest.raises(InvalidInputError, match="hits"):
        EvalRunner(_config(tmp_path, tiny_lm_dir, hits=3), pipeline=shared_pipeline).run(examples)


def test_full_mode_skips_when_context_does_not_fit(tmp_path, tiny_lm_dir, shared_pipeline, examples):
    config = _config(tmp_path, tiny_lm_dir, modes=("full", "rag"), settings=("per_question",),
                     full_context_max_tokens=100)
    results = EvalRunner(config, pipeline=shared_pipeline).run(examples)
    preds = results["settings"]["per_question"]["predictions"]
    for ex in examples:
        assert preds["full"][ex.id]["skipped"] is True
        assert "exceeds the generator budget of 100" in preds["full"][ex.id]["reason"]
        assert not preds["rag"][ex.id].get("skipped")
    assert "| full | 0 (+2 skipped) |" in (tmp_path / "out" / "results.md").read_text()


def test_over_long_passages_are_split_and_keep_titles(tmp_path, tiny_lm_dir, shared_pipeline, examples):
    runner = EvalRunner(_config(tmp_path, tiny_lm_dir, chunk_size=32), pipeline=shared_pipeline)
    chunks = runner.make_chunks(examples[0].passages)
    assert len(chunks) > len(examples[0].passages)
    assert all(runner.chunker.count_tokens(c.text) <= 32 for c in chunks)  # the embedder's tokens
    assert all(c.text.startswith(c.title + ": ") for c in chunks)


class _Hit:
    def __init__(self, chunk_id, score, text):
        self.chunk_id, self.score, self.text = chunk_id, score, text


def test_rank_hits_maps_hits_to_chunks_and_takes_the_top_by_score(tmp_path, tiny_lm_dir, shared_pipeline):
    from memorag_core.eval.datasets import EvalChunk

    runner = EvalRunner(_config(tmp_path, tiny_lm_dir, hits=2), pipeline=shared_pipeline)
    chunks = [EvalChunk(f"T{i}: text {i}", f"T{i}", i) for i in range(5)]
    hits = [_Hit(3, 0.9, "T3: text 3"), _Hit(99, 0.5, "T1: text 1"),  # a stale id is matched by its text
            _Hit(4, 0.7, "T4: text 4"), _Hit(3, 0.95, "T3: text 3")]  # a repeat keeps its best score
    order, topk = runner._rank_hits(hits, chunks)
    assert order == [3, 1, 4]
    assert topk == [3, 4]  # the best two by score, not the first two met
    with pytest.raises(InvalidInputError, match="not one of the indexed evaluation chunks"):
        runner._rank_hits([_Hit(7, 0.1, "unknown text")], chunks)
    with pytest.raises(InvalidInputError, match="rag_matched needs the memorag mode"):
        runner._block = {"predictions": {"memorag": {}}}
        from memorag_core.eval.datasets import load_examples

        runner._matched_budget(load_examples(HOTPOT, limit=1)[0])


def test_memorag_mode_follows_the_plan(tmp_path, tiny_lm_dir, shared_pipeline, examples):
    """The default plan: memorag decodes no text clues (it re-ranks; a tiny random model has no head set, so its
    order is the retrieval's), memorag_draft decodes them with the draft; R@5 is recorded beside R@k."""
    config = _config(tmp_path, tiny_lm_dir, modes=("rag", "memorag", "memorag_draft"), settings=("per_question",))
    pipeline = _Counting(shared_pipeline)
    results = EvalRunner(config, pipeline=pipeline).run(examples)
    preds = results["settings"]["per_question"]["predictions"]
    assert pipeline.calls["clues"] == len(examples)  # memorag_draft's decodes only
    for ex in examples:
        assert "clues" not in preds["memorag"][ex.id] and preds["memorag_draft"][ex.id]["clues"]["draft_answer"]
        for mode in ("rag", "memorag"):
            rec = preds[mode][ex.id]
            assert rec["recall_at_5"] >= rec["recall_at_k"] and len(rec["evidence_chunk_ids"]) == config.hits
        # no head set: the memorag mode's passages are the question's, as rag's
        assert preds["memorag"][ex.id]["evidence_chunk_ids"] == preds["rag"][ex.id]["evidence_chunk_ids"]
    assert "R@5" in (tmp_path / "out" / "results.md").read_text()
