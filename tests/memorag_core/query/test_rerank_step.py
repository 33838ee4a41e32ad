"""The composition's re-ranking step (issue 21): the memorag task retrieves candidates, the memory model's calibrated
attention re-orders them, exactly top_k reach the generator. Stage fakes for the mechanics; the embedded SmolLM2
collection (real heads, real job) for the path every door runs."""

from __future__ import annotations

import pytest

from memorag_core.query import QueryEngine, QueryRequest, run_sync
from memorag_core.query.compose import QueryComposition, Stages, final_result, reranked
from memorag_core.query.types import Evidence, RoutedUnit, UnitClues
from memorag_core.retrieval.queries import PlanConfig
from memorag_core.retrieval.rerank import CandidateScores


def ev(i: int, score: float) -> Evidence:
    return Evidence(f"doc{i}", "u1", f"c{i}", score, f"doc{i}: passage number {i}", sources=["question"],
                    query="q")


class FakeStages(Stages):
    """Stages in plain Python: 30 candidates scored 30..1, attention that prefers the last ones."""

    def __init__(self, plan: PlanConfig, attention=None, span: str = "") -> None:
        super().__init__(retriever=self, memory=self, generator=self, plan=plan)
        self.attention = attention
        self.span = span
        self.calls: dict[str, list] = {"retrieve": [], "rerank": [], "clues": [], "generate": [], "queries": []}

    async def stored_summary(self, name, version, request):
        return None

    async def units(self, name, version, request):
        return [RoutedUnit("u1", 1.0, "dense")] if request.task != "qa" else []

    async def retrieve(self, name, version, query, clues, top_k, doc_id=None, extra=None):
        self.calls["retrieve"].append(top_k)
        self.calls["queries"].append(query)
        if self.span and self.span in query:  # the bridge query finds doc40 first, then the retrieval's order
            found = [Evidence("doc40", "u1", "c40", 1.0, "doc40: the bridge passage", ["question"], query)]
            return found + [ev(i, 0.9 - i / 100) for i in range(min(top_k, 30) - 1)], [("question", query)]
        return [ev(i, 30.0 - i) for i in range(min(top_k, 30))], [("question", query)]

    async def clues(self, name, version, unit_ids, query, max_new_tokens, with_draft=False):
        self.calls["clues"].append(with_draft)
        return [UnitClues("u1", spans=[], surrogates=[], draft="a draft" if with_draft else None)]

    async def rerank(self, name, version, question, lines, dense_scores, prefix_unit=None, max_tokens=None,
                     bridge_slots=0, bridge_width=2):
        self.calls["rerank"].append((list(lines), list(dense_scores), prefix_unit, max_tokens, bridge_slots))
        if self.attention is None:
            return None
        return CandidateScores(self.attention(len(lines)), self.span if bridge_slots else "")

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
    lines, dense, prefix, budget, bridge_slots = stages.calls["rerank"][0]
    assert bridge_slots == 0  # no bridge span unless the plan weighs it
    assert lines[0] == "[doc0] passage number 0" and dense[:2] == [30.0, 29.0] and prefix is None and budget == 6144
    assert len(r.evidence) == 3 and len(stages.calls["generate"][0]) == 3
    # weight 16 of attention vs 1 of retrieval chose doc19, doc18, doc17; the generator reads them in the
    # retrieval's order (evidence_order's default)
    assert [e.doc_id for e in r.evidence] == ["doc17", "doc18", "doc19"]
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
    assert stages.calls["clues"] == [False] and stages.calls["rerank"][0][2:4] == ("u1", 1024)
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
    for bad, name in (({"bridge_weight": -1}, "bridge_weight"), ({"bridge_slots": 0}, "bridge_slots"),
                      ({"prf_alpha": -0.5}, "prf_alpha"), ({"evidence_order": "random"}, "evidence_order")):
        with pytest.raises(InvalidInputError, match=name):
            PlanConfig.from_dict(bad)
    with pytest.raises(InvalidInputError, match="candidates"):
        QueryRequest("q", candidates=-1).validate()


def test_the_result_carries_the_ranking_it_was_cut_from_when_asked():
    """candidates=N returns the final ranking's first N (the re-ranked order for memorag, the retrieval's for qa);
    the generator still reads top_k, which are the ranking's first top_k."""
    stages = FakeStages(PlanConfig(rerank_candidates=20), attention=late_first)
    r = run(stages, top_k=3, candidates=5)
    assert [x.doc_id for x in r.ranking] == ["doc19", "doc18", "doc17", "doc16", "doc15"]
    assert {x.doc_id for x in r.ranking[:3]} == {e.doc_id for e in r.evidence}
    assert r.ranking[0].score >= r.ranking[4].score and r.to_api()["ranking"][0]["chunk_id"] == "c19"
    stages = FakeStages(PlanConfig(), attention=late_first)
    r = run(stages, task="qa", top_k=3, candidates=5)
    assert stages.calls["retrieve"] == [5] and len(r.evidence) == 3  # ranked deeper, read the budget
    assert [x.doc_id for x in r.ranking] == ["doc0", "doc1", "doc2", "doc3", "doc4"]
    assert run(FakeStages(PlanConfig(), late_first), top_k=3).ranking == []  # not asked: not sent


def test_evidence_order_retrieval_hands_the_reranked_set_in_the_retrievals_order():
    stages = FakeStages(PlanConfig(), attention=late_first)  # evidence_order="retrieval" is the default
    r = run(stages, top_k=3, candidates=3)
    assert [e.doc_id for e in r.evidence] == ["doc17", "doc18", "doc19"]  # the set the attention chose
    assert [x.doc_id for x in r.ranking] == ["doc19", "doc18", "doc17"]  # the ranking keeps its order
    assert stages.calls["generate"][0][0] == "doc17: passage number 17"
    stages = FakeStages(PlanConfig(evidence_order="ranked"), attention=late_first)
    r = run(stages, top_k=3)
    assert [e.doc_id for e in r.evidence] == ["doc19", "doc18", "doc17"]  # best first
    assert stages.calls["generate"][0][0] == "doc19: passage number 19"


def test_the_bridge_span_retrieves_once_more_and_its_passages_can_enter_at_equal_passages():
    """bridge_weight > 0: the memory stage returns the span its attention leans on, question + span is one more
    retrieval (source bridge), and its ranking is interpolated at that weight; exactly top_k still reach the
    generator. Weight 0 asks for no span and retrieves once."""
    stages = FakeStages(PlanConfig(bridge_weight=20.0, bridge_slots=2), attention=late_first, span="Varnholm")
    r = run(stages, top_k=3, candidates=3)
    assert stages.calls["rerank"][0][4] == 2 and stages.calls["queries"] == ["Which passage?",
                                                                              "Which passage? Varnholm"]
    assert ("bridge", "Which passage? Varnholm") in r.retrieval_queries
    assert [x.doc_id for x in r.ranking[:3]] == ["doc40", "doc19", "doc18"] and r.ranking[0].score > 0
    # read in the retrieval's order: the candidates first as retrieved, the bridge's own passage after them
    assert [e.doc_id for e in r.evidence] == ["doc18", "doc19", "doc40"] and r.evidence[2].sources == ["bridge"]
    off = FakeStages(PlanConfig(), attention=late_first, span="Varnholm")
    r = run(off, top_k=3)
    assert off.calls["rerank"][0][4] == 0 and len(off.calls["retrieve"]) == 1
    assert "doc40" not in [e.doc_id for e in r.evidence]


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
    plain, after = plain.scores, after.scores
    assert len(plain) == len(after) == 3 and plain != after  # the memory changes what the model reads
    assert max(range(3), key=lambda i: plain[i]) == 0
    # the bridge span: words of the candidate the attention ranks first, never its [title]
    bridged = writer.rerank(view.name, view.version, "Who built the lighthouse of Varnholm?", lines,
                            [0.3, 0.2, 0.1], bridge_slots=1, bridge_width=2)
    assert bridged.scores == plain and bridged.span and bridged.span in lines[0].split("] ", 1)[1]
    # the engine with the bridge and PRF settings runs the whole path on the real collection
    bridge_engine = QueryEngine(embedded_collection.store, refresh_s=0.0, device="cpu",
                                plan=PlanConfig(bridge_weight=1.0, prf_alpha=0.5))
    r = bridge_engine.query(embedded_collection.name, QueryRequest("Who built the lighthouse of Varnholm?", top_k=2,
                                                                    max_new_tokens=4, candidates=4))
    assert len(r.evidence) == 2 and len(r.ranking) == 4 and "rerank" in r.timings
    assert [s for s, _ in r.retrieval_queries][-1] == "bridge"


def test_the_facade_reranks_and_reads_its_memory_first_when_the_plan_says(tiny_lm_dir, shared_data_dir, monkeypatch):
    """The facade's evidence() and __call__ run the rerank step over the bundle; rerank_prefix routes the bundle
    unit first so the memory model reads the candidates after the memory (the scores are faked here: the tiny
    random model has no head set)."""
    from memorag_core.facade import MemoRAG
    from memorag_core.memory import MemoryConfig
    from memorag_core.retrieval import rerank as rr

    seen = []

    def fake_scores(memory, question, lines, dense_scores, *, prefix=False, max_tokens=None, bridge_slots=0,
                    bridge_width=2):
        seen.append((prefix, len(lines), max_tokens))
        return CandidateScores([float(i) for i in range(len(lines))])  # the weakest candidate first

    monkeypatch.setattr(rr, "memory_scores", fake_scores)
    pipe = MemoRAG(memory_config=MemoryConfig(model=str(tiny_lm_dir), ratio=4, window=256),
                   retrieval_chunk_size=128, plan_config=PlanConfig(rerank_candidates=6))
    pipe.memorize((shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")[:4000])
    q = "Who lives at number four, Privet Drive?"
    plain = pipe.evidence(q, None, hits=6, task="qa")
    top = pipe.evidence(q, None, hits=2)
    # the attention picked the two weakest; the generator reads them in the retrieval's order
    assert seen[-1] == (False, 6, 6144) and [h.chunk_id for h in top] == [plain[4].chunk_id, plain[5].chunk_id]
    _, ranked = pipe.evidence_ranking(q, None, hits=2, candidates=3)
    assert [h.chunk_id for h in ranked] == [plain[5].chunk_id, plain[4].chunk_id, plain[3].chunk_id]
    pipe.plan_config = PlanConfig(rerank_candidates=6, rerank_prefix=True)
    pipe.evidence(q, None, hits=2)
    assert seen[-1][0] is True
    pipe(query=q, max_new_tokens=2)
    assert seen[-1][0] is True and len(seen) == 4
