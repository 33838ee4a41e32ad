"""The query engine over collections that the real memorize job published (tiny memory model, real embedder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError, InvalidInputError
from memorag_core.query import QueryEngine, QueryRequest
from memorag_core.retrieval.queries import PlanConfig
from memorag_core.store import CollectionStore

# these tests exercise the clue writer: text clues on (the default plan re-ranks instead, and a tiny random model
# has no attention head set: tests/memorag_core/query/test_rerank_step.py covers that path)
CLUES = PlanConfig(text_clues=True)


@pytest.fixture(scope="module")
def engine(tiny_collection) -> QueryEngine:
    return QueryEngine(tiny_collection.store, refresh_s=0.0, device="cpu", plan=CLUES)


def test_memorag_query_routes_writes_clues_and_finds_the_right_document(engine, tiny_collection):
    req = QueryRequest("Who built the lighthouse of Varnholm, and in which year?", units=2, top_k=3,
                       max_new_tokens=8, clue_max_new_tokens=12)
    r = engine.query("facts", req)
    assert r.version == tiny_collection.version and r.task == "memorag" and r.collection == "facts"
    assert 1 <= len(r.units) <= 2 and len(r.clues) == len(r.units)
    assert [c.unit_id for c in r.clues] == [u.unit_id for u in r.units]
    manifest = CollectionStore(tiny_collection.store).read_manifest("facts")
    assert all(u.unit_id in manifest.units for u in r.units)
    assert r.units[0].reason == "dense"  # the unit holding the question's best hit comes first
    # The tiny random model's clues are noise: fusion may reorder, but the question's best passage stays in.
    assert len(r.evidence) == 3
    gold = next(e for e in r.evidence if e.doc_id == "lighthouse")
    assert "Elsa Brandt" in gold.text and "question" in gold.sources
    assert r.units[0].unit_id == gold.unit_id
    assert all(e.chunk_id and e.unit_id in manifest.units for e in r.evidence)
    assert r.retrieval_queries[0] == ("question", req.query)
    assert set(r.timings) >= {"open", "route", "clues", "retrieve", "generate", "total"}
    assert isinstance(r.answer, str)
    d = r.to_dict()
    assert d["evidence"][0]["doc_id"] == r.evidence[0].doc_id and d["retrieval_queries"][0]["source"] == "question"


def test_memories_are_cached_between_queries(engine):
    req = QueryRequest("When did the railway close to freight?", units=1, top_k=2, max_new_tokens=4,
                       clue_max_new_tokens=8)
    engine.query("facts", req)
    r = engine.query("facts", req)
    assert r.clues[0].cached is True
    assert engine.clue_writer.cache.stats()["hits"] >= 1


def test_qa_task_reads_no_memory(engine):
    r = engine.query("facts", QueryRequest("Who discovered the comet Ilves-7?", task="qa", top_k=2,
                                           max_new_tokens=4))
    assert r.units == [] and r.clues == [] and r.retrieval_queries == [("question",
                                                                         "Who discovered the comet Ilves-7?")]
    assert r.evidence[0].doc_id == "observatory"


def test_summarize_one_document_uses_its_units_and_its_chunks_only(engine):
    r = engine.query("facts", QueryRequest(task="summarize", doc_id="bakery", top_k=3, max_new_tokens=8,
                                           clue_max_new_tokens=8))
    view = engine.catalog.view("facts")
    assert [u.unit_id for u in r.units] == view.units_of_doc("bakery")
    assert r.evidence and all(e.doc_id == "bakery" for e in r.evidence)
    with pytest.raises(ArtifactNotFoundError, match="no document 'nope'"):
        engine.query("facts", QueryRequest(task="summarize", doc_id="nope"))


def test_summarize_collection_spreads_over_units(engine):
    r = engine.query("facts", QueryRequest(task="summarize", units=2, top_k=2, max_new_tokens=4,
                                           clue_max_new_tokens=8))
    assert len(r.units) == 2 and all(u.reason == "spread" for u in r.units)


def test_stream_yields_tokens_then_the_result(engine):
    events = list(engine.stream("facts", QueryRequest("What does the Pellam cider press run on?", units=1,
                                                      top_k=2, max_new_tokens=6, clue_max_new_tokens=8)))
    assert events[-1].kind == "final" and all(e.kind == "token" for e in events[:-1])
    assert "".join(e.text for e in events[:-1]).strip() == events[-1].result.answer


@pytest.mark.parametrize("req,match", [
    (QueryRequest(""), "query is empty"),
    (QueryRequest("x" * 5000), "limit is 4000"),
    (QueryRequest("q", task="translate"), "task must be one of"),
    (QueryRequest("q", top_k=0), "top_k must be between"),
    (QueryRequest("q", units=99), "units must be between"),
    (QueryRequest("q", max_new_tokens=-1), "max_new_tokens must be between"),
    (QueryRequest("q", max_new_tokens="5"), "max_new_tokens must be an integer"),
])
def test_bad_requests_name_the_field(engine, req, match):
    with pytest.raises(InvalidInputError, match=match):
        engine.query("facts", req)


def test_unknown_collection_version_and_bad_names(engine):
    with pytest.raises(ArtifactNotFoundError, match="'nope'"):
        engine.query("nope", QueryRequest("q"))
    with pytest.raises(ArtifactNotFoundError, match="no version"):
        engine.query("facts", QueryRequest("q"), version="20990101T000000.000000Z-deadbeef")
    with pytest.raises(InvalidInputError, match="collection name"):
        engine.query("../etc", QueryRequest("q"))


def test_new_version_is_picked_up_and_old_one_stays_leased(tiny_collection, tmp_path, tiny_lm_dir):
    """A copy of the store; a new version is published while a catalog holds the old one: the next request
    sees the new version, a request pinned to the old one still works, and gc keeps the leased old version."""
    from jobs.memorize import run_memorize_job
    from tests.fixtures.collections import facts_job_config, write_facts_corpus

    store = tmp_path / "store"
    # without the leases that other tests' engines hold on the shared store
    shutil.copytree(tiny_collection.store, store, ignore=shutil.ignore_patterns("leases"))
    eng = QueryEngine(str(store), refresh_s=0.0, device="cpu")
    old = eng.query("facts", QueryRequest("Who opened the bakery?", task="qa", top_k=1, max_new_tokens=2))
    assert old.version == tiny_collection.version
    corpus = write_facts_corpus(tmp_path / "c2.jsonl", extra={
        "harbor": "The harbor of Quillport was dredged in 1931 so that grain ships could dock at low tide."})
    new_version = run_memorize_job(facts_job_config(corpus, str(store), str(tiny_lm_dir))).version
    r = eng.query("facts", QueryRequest("When was the harbor of Quillport dredged?", task="qa", top_k=1,
                                        max_new_tokens=2))
    assert r.version == new_version != old.version and r.evidence[0].doc_id == "harbor"
    pinned = eng.query("facts", QueryRequest("Who opened the bakery?", task="qa", top_k=1, max_new_tokens=2),
                       version=old.version)
    assert pinned.version == old.version
    cs = CollectionStore(str(store))
    assert old.version in cs.leased_versions("facts")
    report = cs.gc("facts", keep_last=1, min_age_s=0)
    assert old.version in report.kept_versions and old.version not in report.removed_versions
    eng.catalog.release()
    assert cs.leased_versions("facts") == set()
    report = cs.gc("facts", keep_last=1, min_age_s=0)
    assert old.version in report.removed_versions


def test_damaged_unit_memory_is_refused(tiny_collection, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_collection.store, store)
    eng = QueryEngine(str(store), refresh_s=0.0, device="cpu", plan=CLUES)
    req = QueryRequest("Who built the lighthouse?", units=1, top_k=1, max_new_tokens=2, clue_max_new_tokens=4)
    unit = eng.retriever.route("facts", tiny_collection.version, req.query, 1)[0].unit_id
    path = Path(CollectionStore(str(store)).unit_memory_url(unit).removeprefix("file://"))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="sha256"):
        eng.query("facts", req)


def test_collections_are_listed_with_counts(engine, tiny_collection):
    infos = {c.name: c for c in engine.catalog.collections()}
    assert infos["facts"].version == tiny_collection.version
    assert infos["facts"].documents == 6 and infos["facts"].units >= 2 and infos["facts"].tokens > 0
