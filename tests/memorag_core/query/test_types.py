"""QueryResult.to_api: the JSON object of the HTTP API's answer (and of `memorag ask --json`), JSON-ready even when
the engine's numbers are numpy scalars."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memorag_core.query.types import Evidence, QueryResult, Ranked, RoutedUnit


def test_to_api_is_plain_json_with_the_api_fields():
    result = QueryResult(
        answer="Elsa Brandt", collection="facts", version="v1", task="memorag",
        units=[RoutedUnit(unit_id="u1", score=np.float32(0.75), reason="dense")],
        evidence=[Evidence(doc_id="lighthouse", unit_id="u1", chunk_id="c1", score=np.float32(0.5), text="t",
                           sources=["question"], start=np.int64(3), end=np.int64(9))],
        timings={"total": np.float64(1.23456)}, retrieval_queries=[("question", "Who built it?")],
        ranking=[Ranked("lighthouse", "u1", "c1", np.float32(0.5))])
    with pytest.raises(TypeError):  # the dataclass dump keeps numpy scalars: not JSON
        json.dumps(result.to_dict())
    api = result.to_api()
    assert json.loads(json.dumps(api)) == api
    assert api["evidence"][0]["score"] == 0.5 and type(api["evidence"][0]["score"]) is float
    assert type(api["evidence"][0]["start"]) is int and api["units"][0]["score"] == 0.75
    assert api["timings"] == {"total": 1.2346}
    assert api["retrieval_queries"] == [{"source": "question", "query": "Who built it?"}]
    assert set(api) == {"answer", "collection", "version", "task", "units", "clues", "evidence", "timings",
                        "retrieval_queries", "session", "question", "warnings", "ranking"}
    assert api["ranking"] == [{"doc_id": "lighthouse", "unit_id": "u1", "chunk_id": "c1", "score": 0.5}]
    assert type(api["ranking"][0]["score"]) is float
