"""DenseRetriever with the real embedded MiniLM: multi-query dedupe, upstream order, persistence, errors."""

from __future__ import annotations

import numpy as np
import pytest

from memorag_core.errors import CorruptArtifactError, InvalidInputError, MemoryNotReadyError
from memorag_core.retrieval import DenseRetriever, IndexConfig

CORPUS = [
    "Harry lived with the Dursleys in a cupboard under the stairs at number four, Privet Drive.",   # 0
    "Hogwarts School of Witchcraft and Wizardry is hidden in the Scottish Highlands.",              # 1
    "Quidditch is played on broomsticks with four balls: the Quaffle, two Bludgers and the Snitch.",  # 2
    "The central bank raised interest rates to fight inflation.",                                     # 3
    "Severus Snape taught Potions at Hogwarts and was head of Slytherin house.",                     # 4
    "Sourdough bread rises thanks to wild yeast in the starter.",                                     # 5
    "The Golden Snitch is a tiny winged ball; catching it ends the Quidditch match.",                # 6
    "Photosynthesis turns sunlight into chemical energy in plants.",                                  # 7
]


@pytest.fixture(scope="module")
def retriever(minilm_embedder):
    r = DenseRetriever(minilm_embedder, hits=3)
    r.add(CORPUS[:5])
    r.add(CORPUS[5:])  # ids continue across add() calls
    return r


def test_single_query_finds_the_obvious_passage(retriever):
    hits = retriever.search(["Which teacher taught Potions?"], hits=1)
    assert [h.chunk_id for h in hits] == [4]
    assert hits[0].text == CORPUS[4] and hits[0].query == "Which teacher taught Potions?"
    assert retriever.search("what does the bread starter contain", hits=1)[0].chunk_id == 5


def test_multi_query_dedupes_and_keeps_corpus_order(retriever, minilm_embedder):
    queries = ["How does the Snitch end a Quidditch game?", "Quidditch balls and broomsticks",
               "What rises sourdough?"]
    hits = retriever.search(queries, hits=2)
    ids = [h.chunk_id for h in hits]
    assert ids == sorted(ids), "hits come back in corpus order"
    assert len(ids) == len(set(ids)), "no passage twice"
    assert {2, 6, 5} <= set(ids) and len(ids) < 2 * len(queries)  # the two Quidditch queries overlap
    # Each hit carries its best score over the queries, and the query that gave it.
    q = minilm_embedder.encode(queries, is_query=True)  # (3, 384)
    p = minilm_embedder.encode(CORPUS)  # (8, 384)
    sims = q @ p.T  # (3, 8)
    top2 = np.argsort(-sims, axis=1)[:, :2]  # (3, 2)
    assert sorted({int(i) for row in top2 for i in row}) == ids
    for h in hits:
        rows = [qi for qi in range(3) if h.chunk_id in top2[qi]]
        best = max(rows, key=lambda qi: sims[qi, h.chunk_id])
        assert h.query == queries[best]
        assert h.score == pytest.approx(float(sims[best, h.chunk_id]), abs=1e-5)


def test_default_hits_is_three_per_query(retriever):
    assert len(retriever.search(["Hogwarts"])) == 3
    assert len(retriever.search(["x"], hits=100)) == len(CORPUS)  # capped at the corpus size


def test_persistence_round_trip(retriever, minilm_embedder):
    data = retriever.index_bytes()
    again = DenseRetriever.from_parts(minilm_embedder, list(retriever.corpus), data, IndexConfig(), hits=3)
    queries = ["cupboard under the stairs", "interest rates"]
    assert again.search(queries) == retriever.search(queries)
    with pytest.raises(CorruptArtifactError, match="corpus has 7"):
        DenseRetriever.from_parts(minilm_embedder, CORPUS[:7], data)


def test_bundle_round_trip_and_missing_or_damaged_files(retriever, minilm_embedder, tmp_path):
    from memorag_core.errors import ArtifactNotFoundError
    from memorag_core.retrieval.retriever import INDEX_FILE
    from memorag_core.store.bundle import Bundle

    bundle = Bundle(str(tmp_path / "b"))
    retriever.write_to(bundle)
    bundle.commit({"kind": "test"})
    again = DenseRetriever.read_from(Bundle(str(tmp_path / "b")), minilm_embedder, IndexConfig(), hits=3)
    assert again.corpus == retriever.corpus
    assert again.search(["cupboard under the stairs"]) == retriever.search(["cupboard under the stairs"])
    with pytest.raises(ArtifactNotFoundError):
        DenseRetriever.read_from(Bundle(str(tmp_path / "nothing")), minilm_embedder)
    index_path = next(p for p in (tmp_path / "b").rglob("*") if p.is_file() and p.name.startswith(INDEX_FILE))
    index_path.write_bytes(index_path.read_bytes()[:-8] + b"12345678")
    with pytest.raises(CorruptArtifactError):
        DenseRetriever.read_from(Bundle(str(tmp_path / "b")), minilm_embedder)


def test_ivf_retriever_and_l2(minilm_embedder):
    ivf = DenseRetriever(minilm_embedder, IndexConfig(kind="ivf", nlist=2, nprobe=2), hits=1)
    ivf.add(CORPUS)  # trained on the first batch
    assert ivf.search(["Potions teacher"])[0].chunk_id == 4
    l2 = DenseRetriever(minilm_embedder, IndexConfig(metric="l2"), hits=2)
    l2.add(CORPUS)
    hits = l2.search(["Potions teacher", "Snape Slytherin"])
    # With l2 the best (lowest) distance is kept; on unit vectors it is 2 - 2 * cosine.
    best = [h for h in hits if h.chunk_id == 4][0]
    cos = float((minilm_embedder.encode([best.query], is_query=True) @ minilm_embedder.encode([CORPUS[4]]).T)[0, 0])
    assert best.score == pytest.approx(2 - 2 * cos, abs=1e-4)


def test_remove_all_and_errors(minilm_embedder):
    r = DenseRetriever(minilm_embedder)
    with pytest.raises(MemoryNotReadyError, match="before any passage"):
        r.search(["anything"])
    r.add(CORPUS[:2])
    r.remove_all()
    assert r.corpus == [] and len(r.index) == 0
    with pytest.raises(MemoryNotReadyError):
        r.search(["anything"])
    with pytest.raises(InvalidInputError, match="empty"):
        r.add([])
    with pytest.raises(InvalidInputError, match="list of str"):
        r.add("one string")  # type: ignore[arg-type]
    r.add(CORPUS[:2])
    with pytest.raises(InvalidInputError, match=r"texts\[0\]"):
        r.search([None])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="empty string"):
        r.search([""])
    with pytest.raises(InvalidInputError, match="hits"):
        r.search(["ok"], hits=0)
    with pytest.raises(InvalidInputError, match="at least nlist"):
        DenseRetriever(minilm_embedder, IndexConfig(kind="ivf", nlist=16)).add(CORPUS)
