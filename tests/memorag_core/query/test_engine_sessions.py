"""Conversations through the query engine, on collections the real memorize job published: a follow-up in a
session (tiny model: mechanics), and a preference stated in one session changing what a later session of the same
user retrieves for an ambiguous request (embedded SmolLM2-135M: real recalls)."""

from __future__ import annotations

import pytest

from memorag_core.errors import ArtifactNotFoundError
from memorag_core.query import QueryEngine, QueryRequest
from memorag_core.query.sessions import SessionConfig, owner_of

KEY_A = owner_of("mrg_a", "facts")
KEY_B = owner_of("mrg_b", "facts")


@pytest.fixture(scope="module")
def engine(tiny_collection) -> QueryEngine:
    return QueryEngine(tiny_collection.store, refresh_s=0.0, device="cpu",
                       session_config=SessionConfig(standalone_tokens=8, recall_tokens=8))


def test_a_follow_up_in_a_session(engine):
    s = engine.conversations.sessions.create("facts", KEY_A)
    r1 = engine.query("facts", QueryRequest("Who built the lighthouse of Varnholm?", task="qa", top_k=2,
                                            max_new_tokens=4, session_id=s.id), owner=KEY_A)
    assert r1.session["turn"] == 1 and r1.session["standalone"] is None
    assert "session" in r1.timings
    r2 = engine.query("facts", QueryRequest("When was it built?", units=1, top_k=2, max_new_tokens=4,
                                            clue_max_new_tokens=4, session_id=s.id), owner=KEY_A)
    assert r2.session["turn"] == 2
    sources = [src for src, _ in r2.retrieval_queries]
    assert sources[0] == "question" and r2.retrieval_queries[0][1] == "When was it built?"
    # whatever the tiny model wrote joins retrieval as 'session' queries (exact restatements dropped)
    assert set(sources) <= {"question", "span", "surrogate", "session"}
    state = engine.conversations.sessions.get("session", s.id, KEY_A, "facts")
    assert state.turn_count == 2 and state.turns[0].titles == [e.doc_id for e in r1.evidence]
    with pytest.raises(ArtifactNotFoundError):  # another key's request never reads the session
        engine.query("facts", QueryRequest("When?", task="qa", max_new_tokens=2, session_id=s.id), owner=KEY_B)
    with pytest.raises(ArtifactNotFoundError, match="does not exist"):
        engine.query("facts", QueryRequest("When?", task="qa", max_new_tokens=2, session_id="NoSuchSession"),
                     owner=KEY_A)


@pytest.fixture(scope="module")
def embedded_engine(embedded_collection) -> QueryEngine:
    return QueryEngine(embedded_collection.store, refresh_s=0.0, device="cpu",
                       session_config=SessionConfig(user_every=1, recall_tokens=24, standalone_tokens=16))


def _rank(result, doc_id: str) -> int:
    docs = list(dict.fromkeys(e.doc_id for e in result.evidence))
    return docs.index(doc_id) if doc_id in docs else len(docs)


@pytest.mark.slow  # several SmolLM2 appends and decodes: minutes on a loaded 2-core machine
def test_a_stated_preference_changes_a_later_sessions_retrieval(embedded_engine):
    eng = embedded_engine
    ambiguous = "Where should I go this Saturday morning?"
    req = dict(task="qa", top_k=6, max_new_tokens=1)
    base = eng.query("facts", QueryRequest(ambiguous, **req), owner=KEY_A)
    prefs = {"alice": ("I love fresh bread and buns. Which bakery sells cardamom buns?", "bakery"),
             "bob": ("I love stargazing and comets. Which observatory has a telescope?", "observatory")}
    ranks = {}
    for user, (statement, _) in prefs.items():
        s = eng.conversations.sessions.create("facts", KEY_A, user_id=user)
        eng.query("facts", QueryRequest(statement, session_id=s.id, **req), owner=KEY_A)  # session 1 (fed the
        # user memory: user_every=1), then a later session of the same user asks the ambiguous question
        later = eng.conversations.sessions.create("facts", KEY_A, user_id=user)
        r = eng.query("facts", QueryRequest(ambiguous, session_id=later.id, **req), owner=KEY_A)
        # the request's attention over the user memory points at the record of what this user said
        assert r.session["user_pointed"] == [statement], r.session
        assert any(src == "user" for src, _ in r.retrieval_queries)
        ranks[user] = {doc: _rank(r, doc) for doc in ("bakery", "observatory")}
    base_ranks = {doc: _rank(base, doc) for doc in ("bakery", "observatory")}
    # Each user's preferred place ranks better for them than for the other user, and no worse than without
    # any user memory.
    assert ranks["alice"]["bakery"] < ranks["bob"]["bakery"], (ranks, base_ranks)
    assert ranks["bob"]["observatory"] < ranks["alice"]["observatory"], (ranks, base_ranks)
    assert ranks["alice"]["bakery"] <= base_ranks["bakery"] and ranks["bob"]["observatory"] <= base_ranks[
        "observatory"], (ranks, base_ranks)
    # The user memory belongs to the key that wrote it.
    assert eng.conversations.sessions.get("user", "alice", KEY_B) is None
