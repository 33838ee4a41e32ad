"""The one query composition (memorag_core/query/compose.py): budgets, drafts, conversations, failed records,
grounding, and the facade running the same chain, over the tiny collection the real memorize job published."""

from __future__ import annotations

import pytest

from memorag_core.query import QueryEngine, QueryRequest, keeps_question, run_sync
from memorag_core.query.compose import complete
from memorag_core.query.sessions import SessionContext
from memorag_core.query.types import UnitClues


@pytest.fixture(scope="module")
def engine(tiny_collection) -> QueryEngine:
    return QueryEngine(tiny_collection.store, refresh_s=0.0, device="cpu")


class Spy:
    """Wraps an answerer and records the evidence each call hands the generator (then delegates)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def generate(self, task, query, evidence, **kw):
        self.calls.append((task, query, list(evidence)))
        return self.inner.generate(task, query, evidence, **kw)

    def stream(self, task, query, evidence, **kw):
        self.calls.append((task, query, list(evidence)))
        return self.inner.stream(task, query, evidence, **kw)


@pytest.fixture
def spy(engine, tiny_collection, monkeypatch):
    engine.answerer_for(engine.catalog.view("facts"))
    s = Spy(engine.answerer)
    monkeypatch.setattr(engine, "_answerer", s)
    return s


def test_content_words_decide_whether_a_rewrite_replaces_the_question():
    assert keeps_question("Where did he go next?", "Where did Harry Potter go next after the feast?")
    assert not keeps_question("Where did he go next?", "I have read the text. What is the task?")
    assert keeps_question("What about his brothers?", "What about Ron's brother?")  # compared by first letters
    assert not keeps_question("Which year was it built?", "")
    assert keeps_question("And him?", "What did Dumbledore say?")  # nothing of content to lose
    assert keeps_question("他为什么去伦敦？", "哈利为什么去伦敦？") and not keeps_question("他为什么去伦敦？", "任务是什么？")
    assert keeps_question("Built in 1843?", "Was the lighthouse built in 1843?")
    assert not keeps_question("Built in 1843?", "Was the lighthouse built in 1901?")


def test_in_process_stages_never_suspend_and_a_suspension_is_named():
    async def ready():
        return 7

    async def events():
        yield await ready()
        yield 8

    assert complete(ready()) == 7 and list(run_sync(events())) == [7, 8]

    class Pending:  # what real I/O (a deployment handle, a socket) looks like to a coroutine: it yields first
        def __await__(self):
            yield "pending"
            return 1

    async def suspends():
        return await Pending()

    with pytest.raises(RuntimeError, match="suspended"):
        complete(suspends())


@pytest.mark.parametrize("units", [1, 2, 3])
def test_exactly_top_k_passages_reach_the_generator_with_drafts_and_many_units(engine, spy, units):
    req = QueryRequest("Who built the lighthouse of Varnholm?", units=units, top_k=2, max_new_tokens=3,
                       clue_max_new_tokens=6, use_draft=True)
    r = engine.query("facts", req)
    assert len(r.units) == units and len(r.evidence) == 2
    task, question, evidence = spy.calls[-1]
    assert evidence == [e.text for e in r.evidence]  # the fused passages, no "The answer might be" lines
    assert not any(t.startswith("The answer might be") for t in evidence)
    drafts = [c.draft for c in r.clues if c.draft]
    # every unit's draft is a retrieval query (unless it restates the question or an earlier query)
    assert all(("draft", d.strip()) in r.retrieval_queries or d.strip().lower() == req.query.lower()
               for d in drafts[:1])


def test_a_rewrite_that_drops_the_question_only_retrieves(engine, spy, monkeypatch):
    from memorag_core.query.sessions import Conversations

    rewrites = {"lost": "I have read the text. What is the task?",
                "kept": "Who built the lighthouse of Varnholm in Osterby?"}
    recorded = []

    def prepare(self, collection, owner, query, *, session_id=None, user_id=None):
        return SessionContext(session_id=session_id, standalone=rewrites[session_id.split("-")[0]])

    def record(self, *a, **kw):
        recorded.append(a)

    monkeypatch.setattr(Conversations, "prepare", prepare)
    monkeypatch.setattr(Conversations, "record", record)
    q = "Who built the lighthouse of Varnholm?"
    base = dict(units=1, top_k=2, max_new_tokens=3, clue_max_new_tokens=6)
    r = engine.query("facts", QueryRequest(q, session_id="lost-abcdefgh", **base))
    assert r.question == q and spy.calls[-1][1] == q  # answered: the question, not the rewrite
    assert ("session", rewrites["lost"]) in r.retrieval_queries  # the rewrite still retrieves
    r = engine.query("facts", QueryRequest(q, session_id="kept-abcdefgh", **base))
    assert r.question == rewrites["kept"] and spy.calls[-1][1] == rewrites["kept"]
    assert len(recorded) == 2 and not r.warnings


def test_a_failed_turn_record_returns_the_answer_with_a_warning(engine, monkeypatch):
    from memorag_core.query.sessions import Conversations

    monkeypatch.setattr(Conversations, "prepare", lambda self, *a, **kw: SessionContext(session_id=kw["session_id"]))

    def record(self, *a, **kw):
        raise OSError("store unreachable")

    monkeypatch.setattr(Conversations, "record", record)
    r = engine.query("facts", QueryRequest("When did the railway close?", session_id="s-abcdefgh", units=1,
                                           top_k=1, max_new_tokens=3, clue_max_new_tokens=4))
    assert isinstance(r.answer, str) and r.evidence
    assert len(r.warnings) == 1 and "not recorded" in r.warnings[0] and "OSError" in r.warnings[0]
    assert r.to_dict()["warnings"] == r.warnings


def test_a_recalled_span_is_grounded_in_its_units_chunks(engine, tiny_collection):
    view = engine.catalog.view("facts")
    row = next(i for i in range(view.chunks.num_rows) if view.row(i)["doc_id"] == "orchard")
    text, unit = view.row(row)["text"], view.row(row)["unit_id"]
    span = " ".join(text.split()[:12])
    clues = [UnitClues(unit, spans=[span])]
    evidence, queries = engine.retriever.retrieve("facts", view.version, "Which kind of wheel drives the press?",
                                                  clues, 2)
    assert ("span", span) not in queries  # grounded: it points at its chunk instead of being searched
    hit = next(e for e in evidence if e.doc_id == "orchard")
    assert "grounded" in hit.sources
    # from another unit's memory the same span grounds nowhere and is searched as text
    other = next(u for u in view.units if u != unit)
    _, queries = engine.retriever.retrieve("facts", view.version, "Which kind of wheel drives the press?",
                                           [UnitClues(other, spans=[span])], 2)
    assert ("span", span) in queries


def test_plan_settings_are_one_typed_object_for_every_door(tiny_collection):
    from memorag_core.errors import InvalidInputError
    from memorag_core.retrieval.queries import PlanConfig
    from pipeline.serve.config import RetrieverConfig

    plan = PlanConfig.from_dict({"fusion": {"question_floor": 2, "weights": {"span": 0.0}}, "depth": 12})
    assert plan.fusion.question_floor == 2 and plan.fusion.weight("span") == 0.0 and plan.fusion.weight(
        "question") == 1.0 and plan.depth == 12
    assert PlanConfig.from_dict(plan.to_dict()) == plan
    with pytest.raises(InvalidInputError, match="question_flor"):
        PlanConfig.from_dict({"fusion": {"question_flor": 2}})
    with pytest.raises(Exception, match="unknown retrieval plan settings"):
        RetrieverConfig.model_validate({"plan": {"deph": 3}})
    assert RetrieverConfig.model_validate({"plan": plan.to_dict()}).plan_config() == plan
    engine = QueryEngine(tiny_collection.store, plan=plan, device="cpu")
    assert engine.retriever.plan == plan and engine.retriever.fusion.question_floor == 2


def test_a_follow_up_with_the_embedded_model_keeps_its_question(embedded_collection, tmp_path):
    """SmolLM2-135M can rewrite a follow-up into an instruction echo; whatever it writes, the answered question
    keeps the follow-up's content words, and the rewrite (when any) joins retrieval."""
    import shutil

    from memorag_core.query.sessions import SessionConfig

    store = tmp_path / "store"  # sessions are written into the store: a copy, so the shared fixture stays clean
    shutil.copytree(embedded_collection.store, store, ignore=shutil.ignore_patterns("leases"))
    engine = QueryEngine(str(store), refresh_s=0.0, device="cpu",
                         session_config=SessionConfig(standalone_tokens=24, recall_tokens=8))
    from memorag_core.query.sessions import owner_of

    owner = owner_of(None, "facts")
    state = engine.conversations.sessions.create("facts", owner)
    fast = dict(units=1, top_k=2, max_new_tokens=6, clue_max_new_tokens=6)
    first = engine.query("facts", QueryRequest("Who built the lighthouse of Varnholm?", session_id=state.id,
                                               **fast), owner=owner)
    assert first.question == "Who built the lighthouse of Varnholm?" and not first.warnings
    follow = "In which year did its lamp stop burning whale oil?"
    r = engine.query("facts", QueryRequest(follow, session_id=state.id, **fast), owner=owner)
    assert r.session["turn"] == 2
    rewrite = r.session["standalone"]
    assert keeps_question(follow, r.question)  # the answered question never loses the follow-up's content
    if rewrite:
        assert ("session", rewrite) in r.retrieval_queries
        assert r.question == (rewrite if keeps_question(follow, rewrite) else follow)
    else:
        assert r.question == follow
