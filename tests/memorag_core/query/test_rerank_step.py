"""The composition's re-ranking step (issue 21): the memorag task retrieves candidates, the memory model's calibrated
attention re-orders them, exactly top_k reach the generator. Stage fakes for the mechanics; the embedded SmolLM2
collection (real heads, real job) for the path every door runs."""

from __future__ import annotations

import pytest

from memorag_core.query import QueryEngine, QueryRequest, run_sync
from memorag_core.query.compose import QueryComposition, Stages, final_result, reranked
from memorag_core.query.types import Evidence, RoutedUnit, UnitClues
from memorag_core.retrieval.queries import PlanConfig


def ev(i: int, score: float) -> Evidence:
    return Evidence(f"doc{i}", "u1", f"c{i}", score, f"doc{i}: passage number {i}", sources=["question"],
                    query="q")


class FakeStages(Stages):
    """Stages in plain Python: 30 candidates scored 30..1, attention that prefers the last ones."""

    def __init__(self, plan: PlanConfig, attention=None) -> None:
        super().__init__(retriever=self, memory=self, generator=self, plan=plan)
        self.attention = attention
        self.calls: dict[str, list] = {"retrieve": [], "rerank": [], "clues": [], "generate": []}

    async def stored_summary(self, name, version, request):
        return None

    async def units(self, name, version, request):
        return [RoutedUnit("u1", 1.0, "dense")] if request.task != "qa" else []

    async def retrieve(self, name, version, query, clues, top_k, doc_id=None, extra=None):
        self.calls["retrieve"].append(top_k)
        return [ev(i, 30.0 - i) for i in range(min(top_k, 30))], [("question", query)]

    async def clues(self, name, version, unit_ids, query, max_new_tokens, with_draft=False):
        self.calls["clues"].append(with_draft)
        return [UnitClues("u1", spans=[], surrogates=[], draft="a draft" if with_draft else None)]

    async def rerank(self, name, version, question, lines, dense_scores, prefix_unit=None, max_tokens=None):
        self.calls["rerank"].append((list(lines), list(dense_scores), prefix_unit, max_tokens))
        return None if self.attention is None else self.attention(len(lines))

    async def generate(self, task, query, evidence, max_new_tokens):
        self.calls["generate"].append(list(evidence))
        return "answer"

    async def stream(self, task, query, evidence, max_new_tokens):
        self.calls["generate"].append(list(evidence))
        yield "answer"


def run(stages: FakeStages, **request):
    comp = QueryComposition(stages)
    return final_result(run_sync(comp.run("c", "v1", QueryRequest("Which passage?", **request).validate())))


def late_first(n: int) -> list[float]:
    return [float(i) for i in range(n)]  # the retrieval's weakest candidate gets the most attention


def test_the_attention_decides_among_the_candidates_and_top_k_reach_the_generator():
    stages = FakeStages(PlanConfig(rerank_candidates=20), attention=late_first)
    r = run(stages, top_k=3)
    assert stages.calls["retrieve"] == [20]  # candidates, not the budget
    lines, dense, prefix, budget = stages.calls["rerank"][0]
    assert lines[0] == "[doc0] passage number 0" and dense[:2] == [30.0, 29.0] and prefix is None and budget == 6144
    assert len(r.evidence) == 3 and len(stages.calls["generate"][0]) == 3
    assert [e.doc_id for e in r.evidence] == ["doc19", "doc18", "doc17"]  # weight 16 of attention vs 1 of retrieval
    assert all("attention" in e.sources for e in r.evidence) and "rerank" in r.timings
    assert stages.calls["clues"] == []  # text clues are opt-in


def test_weight_zero_is_the_retrievals_order_and_no_head_set_is_the_retrievals_order():
    r = run(FakeStages(PlanConfig(rerank_weight=0.0), attention=late_first), top_k=3)
    assert [e.doc_id for e in r.evidence] == ["doc0", "doc1", "doc2"]
    stages = FakeStages(PlanConfig())  # the memory model has no head set: rerank answers None
    r = run(stages, top_k=4)
    assert [e.doc_id for e in r.evidence] == ["doc0", "doc1", "doc2", "doc3"] and "rerank" not in r.timings
    assert len(stages.calls["generate"][0]) == 4 and not r.warnings


def test_qa_is_plain_rag_and_off_means_no_reading():
    stages = FakeStages(PlanConfig(), attention=late_first)
    r = run(stages, task="qa", top_k=3)
    assert stages.calls["retrieve"] == [3] and stages.calls["rerank"] == [] and len(r.evidence) == 3
    stages = FakeStages(PlanConfig(rerank_candidates=0), attention=late_first)
    r = run(stages, top_k=3)
    assert stages.calls["retrieve"] == [3] and stages.calls["rerank"] == []
    assert [e.doc_id for e in r.evidence] == ["doc0", "doc1", "doc2"]


def test_text_clues_and_drafts_still_come_when_asked_and_the_prefix_names_the_routed_unit():
    stages = FakeStages(PlanConfig(text_clues=True, rerank_prefix=True, rerank_max_tokens=1024), late_first)
    r = run(stages, top_k=2)
    assert stages.calls["clues"] == [False] and stages.calls["rerank"][0][2:] == ("u1", 1024)
    stages = FakeStages(PlanConfig(), late_first)
    r = run(stages, top_k=2, use_draft=True)
    assert stages.calls["clues"] == [True] and r.clues[0].draft == "a draft" and len(r.evidence) == 2


def test_reranked_gates_on_confidence_and_refuses_mismatched_scores():
    evidence = [ev(i, 10.0 - i) for i in range(5)]
    flat_top = [1.0, 1.0, 0.0, 0.0, 0.0]  # a tie at the top: confidence 0
    kept = reranked(evidence, [0.0, 0.0, 0.0, 1.0, 1.0], "q", 2, PlanConfig(rerank_gate=0.0))
    assert [e.doc_id for e in kept] == ["doc3", "doc4"]
    gated = reranked(evidence, [0.0, 0.0, 0.0, 1.0, 1.0], "q", 2, PlanConfig(rerank_gate=0.5))
    assert [e.doc_id for e in gated] == ["doc0", "doc1"] and all("attention" not in e.sources for e in gated)
    assert [e.doc_id for e in reranked(evidence, flat_top, "q", 2, PlanConfig())] == ["doc0", "doc1"]
    with pytest.raises(ValueError, match="4 attention scores for 5"):
        reranked(evidence, [1.0] * 4, "q", 2, PlanConfig())


def test_plan_refuses_bad_rerank_settings_by_name():
    from memorag_core.errors import InvalidInputError

    for bad in ({"rerank_candidates": -1}, {"rerank_gate": 2}, {"rerank_max_tokens": 10}):
        with pytest.raises(InvalidInputError, match="rerank"):
            PlanConfig.from_dict(bad)
    assert PlanConfig.from_dict({"rerank_candidates": 30}).to_dict()["rerank_candidates"] == 30


def test_the_embedded_memory_model_reranks_a_published_collection(embedded_collection):
    """SmolLM2 with its packaged heads, over the collection the real job published: the engine's memorag task
    reads 20 candidates (fewer when the collection has fewer) and keeps top_k; the prefix variant reads after the
    routed unit's memory and gives a ranking too."""
    engine = QueryEngine(embedded_collection.store, refresh_s=0.0, device="cpu")
    req = QueryRequest("Who built the lighthouse of Varnholm?", top_k=2, max_new_tokens=4)
    r = engine.query(embedded_collection.name, req)
    assert len(r.evidence) == 2 and "rerank" in r.timings and r.clues == []
    assert any("attention" in e.sources for e in r.evidence)
    assert "lighthouse" in [e.doc_id for e in r.evidence]
    view = engine.catalog.view(embedded_collection.name)
    lines = ["[lighthouse] Elsa Brandt built the lighthouse of Varnholm in 1843.",
             "[railway] The railway closed to freight in 1962.",
             "[observatory] The comet Ilves-7 was found at the observatory."]
    writer = engine.clue_writer
    plain = writer.rerank(view.name, view.version, "Who built the lighthouse of Varnholm?", lines, [0.3, 0.2, 0.1])
    unit = next(iter(view.units))
    after = writer.rerank(view.name, view.version, "Who built the lighthouse of Varnholm?", lines, [0.3, 0.2, 0.1],
                          prefix_unit=unit)
    assert len(plain) == len(after) == 3 and plain != after  # the memory changes what the model reads
    assert max(range(3), key=lambda i: plain[i]) == 0


def test_the_facade_reranks_and_reads_its_memory_first_when_the_plan_says(tiny_lm_dir, shared_data_dir, monkeypatch):
    """The facade's evidence() and __call__ run the rerank step over the bundle; rerank_prefix routes the bundle
    unit first so the memory model reads the candidates after the memory (the scores are faked here: the tiny
    random model has no head set)."""
    from memorag_core.facade import MemoRAG
    from memorag_core.memory import MemoryConfig
    from memorag_core.retrieval import rerank as rr

    seen = []

    def fake_scores(memory, question, lines, dense_scores, *, prefix=False, max_tokens=None):
        seen.append((prefix, len(lines), max_tokens))
        return [float(i) for i in range(len(lines))]  # the weakest candidate first

    monkeypatch.setattr(rr, "memory_scores", fake_scores)
    pipe = MemoRAG(memory_config=MemoryConfig(model=str(tiny_lm_dir), ratio=4, window=256),
                   retrieval_chunk_size=128, plan_config=PlanConfig(rerank_candidates=6))
    pipe.memorize((shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")[:4000])
    q = "Who lives at number four, Privet Drive?"
    plain = pipe.evidence(q, None, hits=6, task="qa")
    top = pipe.evidence(q, None, hits=2)
    assert seen[-1] == (False, 6, 6144) and [h.chunk_id for h in top] == [plain[5].chunk_id, plain[4].chunk_id]
    pipe.plan_config = PlanConfig(rerank_candidates=6, rerank_prefix=True)
    pipe.evidence(q, None, hits=2)
    assert seen[-1][0] is True
    pipe(query=q, max_new_tokens=2)
    assert seen[-1][0] is True and len(seen) == 3
