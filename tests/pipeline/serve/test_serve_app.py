"""The memorag Serve application on a real local Ray Serve (127.0.0.1), with the embedded models, over the facts
collection that the memorize job published (a local store copy, and moto S3 at the end).

One Serve instance for the module (starting Serve and loading the models is the expensive part); the tests run
against it in order, the S3 test last since it redeploys the application over another store.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import dataclass

import httpx
import pytest

from memorag_core.store import CollectionStore
from memorag_core.store.keys import ApiKeyStore
from tests.fixtures.ray_cluster import free_port

pytestmark = pytest.mark.timeout(600)

QUESTION = "Who built the lighthouse of Varnholm?"
FAST = {"max_new_tokens": 4, "units": 1, "top_k": 2, "clue_max_new_tokens": 6}


@dataclass
class Served:
    url: str
    store: str
    version: str
    key: str
    other_key: str
    cfg: object

    def h(self, key: str | None = "own") -> dict:
        key = self.key if key == "own" else key
        return {"Authorization": f"Bearer {key}"} if key else {}


def app_config(store: str, storage_options=None, **over):
    from pipeline.serve.config import ServeAppConfig

    small = {"num_cpus": 0.1}
    data = {
        "store": store, "storage_options": storage_options, "auth": True, "host": "127.0.0.1", "refresh_s": 1.0,
        "limits": {"max_query_chars": 500, "max_new_tokens": 64, "max_units": 4, "max_top_k": 10,
                   "max_body_bytes": 4096, "max_in_flight": 2, "retry_after_s": 2},
        "ingress": {"deployment": {**small, "max_ongoing_requests": 16}, "key_cache_s": 0.0,
                    "key_index_refresh_s": 0.0},
        "memory": {"device": "cpu", "deployment": {**small, "max_ongoing_requests": 8}},
        "retriever": {"device": "cpu", "deployment": small},
        "generator": {"spec": "hf:", "device": "cpu", "deployment": small},
    }
    data.update(over)
    return ServeAppConfig.model_validate(data)


@pytest.fixture(scope="module")
def served(ray_local, embedded_collection, tmp_path_factory):
    from ray import serve

    from pipeline.serve.app import build_app

    store = tmp_path_factory.mktemp("serve") / "store"
    shutil.copytree(embedded_collection.store, store, ignore=shutil.ignore_patterns("leases"))
    keys = ApiKeyStore(str(store))
    _, key = keys.create("facts")
    _, other_key = keys.create("other")
    port = free_port()
    cfg = app_config(str(store))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="memorag", route_prefix="/")
    try:
        yield Served(f"http://127.0.0.1:{port}", str(store), embedded_collection.version, key, other_key, cfg)
    finally:
        serve.shutdown()


def post(served: Served, body, *, key="own", path="/v1/collections/facts/query", timeout=180, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(served.url + path, content=data, headers={"content-type": "application/json",
                                                                 **served.h(key)}, timeout=timeout, **kw)


def sse_events(text: str) -> list[tuple[str | None, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        event, data = None, []
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        out.append((event, "\n".join(data)))
    return out


def test_query_answers_with_clues_evidence_version_and_timings(served):
    r = post(served, {"query": QUESTION, **FAST})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["version"] == served.version and d["collection"] == "facts" and d["task"] == "memorag"
    assert isinstance(d["answer"], str) and d["clues"] == []  # the default: re-ranking, no text clues
    assert {"doc_id", "unit_id", "chunk_id", "score", "text"} <= set(d["evidence"][0])
    assert "lighthouse" in [e["doc_id"] for e in d["evidence"]]
    assert set(d["timings"]) >= {"route", "clues", "retrieve", "rerank", "generate", "total"}
    for _ in range(2):  # a draft decodes the unit's clues (the second time from the memory cache)
        drafted = post(served, {"query": QUESTION, "use_draft": True, **FAST})
        assert drafted.status_code == 200, drafted.text
        c = drafted.json()["clues"]
        assert len(c) == 1 and c[0]["unit_id"] and "rerank" in drafted.json()["timings"]
    assert c[0]["cached"]
    qa = post(served, {"query": "Who discovered the comet Ilves-7?", "task": "qa", "top_k": 1, "max_new_tokens": 2})
    assert qa.status_code == 200 and qa.json()["clues"] == [] and qa.json()["evidence"][0]["doc_id"] == "observatory"


def test_stream_sends_tokens_then_a_final_event(served):
    r = post(served, {"query": "What does the Pellam cider press run on?", "stream": True, **FAST})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1][0] == "final" and all(e == "token" for e, _ in events[:-1]) and len(events) >= 2
    final = json.loads(events[-1][1])
    assert final["version"] == served.version and final["evidence"] and "timings" in final
    assert "".join(json.loads(d)["text"] for _, d in events[:-1]).strip() == final["answer"]


def test_openai_client_chat_completions_and_models(served):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=served.key, max_retries=0, timeout=180)
    assert [m.id for m in client.models.list().data] == ["facts"]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": QUESTION}]
    c = client.chat.completions.create(model="facts", messages=msgs, max_tokens=4,
                                       extra_body={"units": 1, "top_k": 2, "clue_max_new_tokens": 6})
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert isinstance(c.choices[0].message.content, str) and c.model == "facts"
    assert c.model_extra["memorag"]["version"] == served.version
    chunks = list(client.chat.completions.create(model="facts", messages=msgs, max_tokens=4, stream=True,
                                                 extra_body={"task": "qa", "top_k": 1}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["memorag"]["evidence"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="mrg_nope", max_retries=0).models.list()
    with pytest.raises(openai.PermissionDeniedError):  # a key of another collection
        client.chat.completions.create(model="other", messages=msgs, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_new_tokens"):
        client.chat.completions.create(model="facts", messages=msgs, max_tokens=10**6)


def test_one_request_four_doors_same_evidence_and_same_greedy_answer(served, tmp_path):
    """`memorag ask --collection --json`, the native API, the OpenAI-compatible chat route and the evaluation over
    the published collection run one composition: same version, same evidence ids, same greedy answer."""
    import openai
    from typer.testing import CliRunner

    from jobs.cli import app
    from memorag_core.eval.datasets import load_examples
    from memorag_core.eval.runner import EvalConfig, EvalRunner
    from tests.fixtures.collections import FACTS

    settings = {"units": 2, "top_k": 2, "clue_max_new_tokens": 6}
    cli = CliRunner().invoke(app, ["ask", QUESTION, "--collection", "facts", "--store", served.store, "--units", "2",
                                   "--top-k", "2", "--clue-max-new-tokens", "6", "--max-new-tokens", "8", "--json"])
    assert cli.exit_code == 0, cli.output
    by_cli = json.loads(cli.stdout)
    native = post(served, {"query": QUESTION, "max_new_tokens": 8, **settings})
    assert native.status_code == 200, native.text
    by_http = native.json()
    assert set(by_cli) == set(by_http)  # `ask --json` prints the HTTP API's object
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=served.key, max_retries=0, timeout=300)
    chat = client.chat.completions.create(model="facts", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=8, extra_body=settings)
    by_chat = chat.model_extra["memorag"]
    dataset = tmp_path / "one.jsonl"
    dataset.write_text(json.dumps({"id": "q1", "question": QUESTION, "answer": "Elsa Brandt",
                                   "supporting_facts": {"title": ["lighthouse"], "sent_id": [0]},
                                   "context": {"title": list(FACTS), "sentences": [[v] for v in FACTS.values()]}})
                       + "\n")
    config = EvalConfig(dataset=str(dataset), output_dir=str(tmp_path / "eval"), settings=("pooled",),
                        modes=("memorag",), store=served.store, collection="facts", hits=2, units=2,
                        clue_max_new_tokens=6, answer_max_new_tokens=8, device="cpu")
    record = EvalRunner(config).run(load_examples(dataset))["settings"]["pooled"]["predictions"]["memorag"]["q1"]

    ids = [[e["chunk_id"] for e in d["evidence"]] for d in (by_cli, by_http, by_chat)] + [record["evidence_chunk_ids"]]
    assert all(i == ids[0] for i in ids) and len(ids[0]) == 2, ids
    answers = [by_cli["answer"], by_http["answer"], chat.choices[0].message.content, record["prediction"]]
    assert all(a == answers[0] for a in answers), answers
    assert {by_cli["version"], by_http["version"], by_chat["version"], record["version"]} == {served.version}
    # the default memorag task: SmolLM2's packaged heads re-ranked the candidates at every door, no text clues
    for d in (by_cli, by_http, by_chat):
        assert "rerank" in d["timings"] and d["clues"] == []
        assert any("attention" in e["sources"] for e in d["evidence"])
    assert record["seconds"]["rerank"] > 0 and record["recall_at_5"] >= record["recall_at_k"]
    # the native route hands the ranking the evidence was cut from when asked (R@5 of the evaluation reads it)
    ranked = post(served, {"query": QUESTION, "max_new_tokens": 8, "candidates": 4, **settings}).json()
    assert {r["chunk_id"] for r in ranked["ranking"][:2]} == set(ids[0]) and len(ranked["ranking"]) == 4
    assert by_http["ranking"] == [] and by_chat["ranking"] == []
    chat_ranked = client.chat.completions.create(model="facts", messages=[{"role": "user", "content": QUESTION}],
                                                 max_tokens=8, extra_body={**settings, "candidates": 4})
    assert chat_ranked.model_extra["memorag"]["ranking"] == ranked["ranking"]  # one composition, one ranking


def test_keys_missing_unknown_other_collection_and_revoked(served):
    body = {"query": QUESTION, "task": "qa", "top_k": 1, "max_new_tokens": 1}
    r = post(served, body, key=None)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"
    assert post(served, body, key="mrg_0123456789abcdef_" + "x" * 43).status_code == 401
    assert post(served, body, key=served.other_key).status_code == 403
    assert httpx.get(served.url + "/v1/collections", timeout=30).status_code == 401
    keys = ApiKeyStore(served.store)
    rec, key = keys.create("facts")
    assert post(served, body, key=key).status_code == 200
    keys.revoke("facts", rec.key_id)
    assert post(served, body, key=key).status_code == 401  # key_cache_s=0 in this app


def test_in_flight_limit_answers_429_with_retry_after(served):
    async def burst():
        async with httpx.AsyncClient(timeout=300) as client:
            body = json.dumps({"query": QUESTION, "task": "qa", "top_k": 1, "max_new_tokens": 24})
            return await asyncio.gather(*[
                client.post(served.url + "/v1/collections/facts/query", content=body,
                            headers={"content-type": "application/json", **served.h()}) for _ in range(6)])

    codes = [r.status_code for r in asyncio.run(burst())]
    assert set(codes) <= {200, 429} and codes.count(429) >= 3 and codes.count(200) >= 1, codes
    r429 = next(r for r in asyncio.run(burst()) if r.status_code == 429)
    assert r429.headers["retry-after"] == "2" and r429.json()["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("body,status,param", [
    ({"query": ""}, 400, "query"),
    ({"query": "   "}, 400, "query"),
    ({"query": "x" * 600}, 400, "query"),
    ({"query": "q", "task": "translate"}, 400, "task"),
    ({"query": "q", "top_k": -1}, 400, "top_k"),
    ({"query": "q", "top_k": 10**9}, 400, "top_k"),
    ({"query": "q", "units": 0}, 400, "units"),
    ({"query": "q", "max_new_tokens": 100000}, 400, "max_new_tokens"),
    ({"query": "q", "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ({"query": 5}, 422, "query"),
    ({"query": "q", "stream": "yes"}, 422, "stream"),
    ({"query": "q", "bogus": 1}, 422, "bogus"),
    ({"query": "q", "version": "../../etc"}, 422, "version"),
    ({"query": "q", "version": "20990101T000000.000000Z-deadbeef", "task": "qa"}, 404, None),
    (b'{"query": "q",', 400, "body"),
    (b"[1, 2]", 422, None),
    (b"x" * 5000, 413, "body"),
])
def test_bad_input_gets_a_4xx_json_error_naming_the_field(served, body, status, param):
    if isinstance(body, dict):
        body = {"max_new_tokens": 2, **body}
    r = post(served, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and "Traceback" not in r.text
    assert served.store not in r.text and "/tmp" not in r.text  # no store path in any error body
    if param:
        assert err["param"] == param, err


def test_chunked_body_over_the_limit_gets_413_and_a_small_one_is_answered(served):
    def chunks(n):  # no Content-Length: httpx sends a generator with Transfer-Encoding: chunked
        yield b'{"query": "' + b"x" * 10 + b'", "task": "qa", "max_new_tokens": 2, "pad": "'
        for _ in range(n):
            yield b"y" * 1000
        yield b'"}'

    headers = {"content-type": "application/json", **served.h()}
    url = served.url + "/v1/collections/facts/query"
    r = httpx.post(url, content=chunks(200), headers=headers, timeout=180)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body", r.text
    small = b'{"query": "' + QUESTION.encode() + b'", "task": "qa", "max_new_tokens": 2}'
    r = httpx.post(url, content=iter([small[:10], small[10:]]), headers=headers, timeout=180)
    assert r.status_code == 200 and r.json()["version"] == served.version, r.text

def test_unknown_and_invalid_collections(served):
    body = {"query": "q", "task": "qa", "max_new_tokens": 2}
    r = post(served, body, path="/v1/collections/bad%20name!/query")
    assert r.status_code == 422 and r.json()["error"]["param"] == "collection"
    assert post(served, body, path="/v1/collections/..%2F..%2Fetc/query").status_code in (404, 422)
    # Unknown collection: a key of "other" opens it, and it does not exist.
    r = post(served, body, key=served.other_key, path="/v1/collections/other/query")
    assert r.status_code == 404 and "other" in r.json()["error"]["message"]


def test_health_readiness_collections_and_openapi(served):
    assert httpx.get(served.url + "/healthz", timeout=30).json() == {"status": "ok"}
    ready = httpx.get(served.url + "/readyz", timeout=60)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    cols = httpx.get(served.url + "/v1/collections", headers=served.h(), timeout=30).json()["collections"]
    assert [c["name"] for c in cols] == ["facts"]
    assert cols[0]["version"] == served.version and cols[0]["documents"] == 6 and cols[0]["units"] >= 1
    assert cols[0]["tokens"] > 0
    spec = httpx.get(served.url + "/openapi.json", timeout=30).json()
    assert {"/v1/collections/{name}/query", "/v1/chat/completions", "/v1/models", "/v1/collections", "/healthz",
            "/readyz"} <= set(spec["paths"])
    assert httpx.get(served.url + "/docs", timeout=30).status_code == 200


def test_prometheus_metrics_are_exported(served):
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    post(served, {"query": "q", "top_k": -1})  # one error for the error counter
    deadline, text = time.time() + 120, ""
    want = ("memorag_requests_total", "memorag_request_errors_total", "memorag_stage_seconds",
            "memorag_memory_cache_total", 'status="400"', 'stage="clues"', 'result="hit"')
    # Metrics reach the node's exporter on Ray's export period: poll until this test's own error is there too
    # (the names alone appear as soon as earlier tests' requests are exported).
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in want):
            break
        time.sleep(2)
    assert all(w in text for w in want), [w for w in want if w not in text]


def test_new_version_is_picked_up_in_flight_query_keeps_its_version_and_gc_keeps_held(served, tmp_path):
    """Publish v2 while serving: a query in flight on v1 finishes on v1, the next ones run on v2 (pointer re-read
    within refresh_s), v1 stays queryable by id, and gc keeps v1 while the replicas hold it."""
    from jobs.memorize import run_memorize_job
    from tests.fixtures.collections import facts_job_config, write_facts_corpus

    cs = CollectionStore(served.store)
    v1 = served.version
    corpus = write_facts_corpus(tmp_path / "c2.jsonl", extra={
        "harbor": "The harbor of Quillport was dredged in 1931 so that grain ships could dock at low tide."})
    v2 = run_memorize_job(facts_job_config(corpus, served.store, None, window=128)).version
    cs._swap_pointer("facts", v1, v2)  # back to v1, so that the switch below happens during a query
    time.sleep(served.cfg.refresh_s + 0.5)
    body = {"query": "When was the harbor of Quillport dredged?", "task": "qa", "top_k": 1}

    async def in_flight_then_switch():
        async with httpx.AsyncClient(timeout=300) as client:
            slow = asyncio.create_task(client.post(
                served.url + "/v1/collections/facts/query", headers=served.h(),
                json={**body, "max_new_tokens": 40, "stream": True}))
            await asyncio.sleep(1.0)
            cs._swap_pointer("facts", v2, v1)
            return await slow

    slow = asyncio.run(in_flight_then_switch())
    assert json.loads(sse_events(slow.text)[-1][1])["version"] == v1
    time.sleep(served.cfg.refresh_s + 0.5)
    r = post(served, {**body, "max_new_tokens": 2}).json()
    assert r["version"] == v2 and r["evidence"][0]["doc_id"] == "harbor"
    pinned = post(served, {**body, "max_new_tokens": 2, "version": v1}).json()
    assert pinned["version"] == v1 and pinned["evidence"][0]["doc_id"] != "harbor"
    assert v1 in cs.leased_versions("facts")
    report = cs.gc("facts", keep_last=1, min_age_s=0)
    assert v1 in report.kept_versions and v1 not in report.removed_versions


def test_a_body_without_json_content_type_is_read_as_json(served):
    """The README's curl example: ``curl -d '{...}'`` sends application/x-www-form-urlencoded."""
    body = json.dumps({"query": QUESTION, "task": "qa", "top_k": 1, "max_new_tokens": 2})
    for ctype in (None, "application/x-www-form-urlencoded", "text/plain"):
        headers = {**served.h(), **({"content-type": ctype} if ctype else {})}
        r = httpx.post(served.url + "/v1/collections/facts/query", content=body, headers=headers, timeout=180)
        assert r.status_code == 200 and r.json()["task"] == "qa", (ctype, r.text)


@pytest.mark.parametrize("extra,status,param", [
    ({"top_k": True}, 422, "top_k"),
    ({"max_tokens": "5"}, 422, "max_tokens"),
    ({"stream": 1}, 422, "stream"),
    ({"user": 7}, 422, "user"),
    ({"top_k": 10**6}, 400, "top_k"),
    ({"user": "../etc"}, 400, None),
])
def test_chat_route_is_as_strict_as_the_native_one_and_writes_nothing_first(served, extra, status, param):
    from pathlib import Path

    msgs = [{"role": "user", "content": "Who built it?"}, {"role": "assistant", "content": "Elsa."},
            {"role": "user", "content": "When?"}]
    r = post(served, {"model": "facts", "messages": msgs, "max_tokens": 2, **extra}, path="/v1/chat/completions")
    assert r.status_code == status, r.text
    if param:
        assert r.json()["error"]["param"] == param
    tenants = Path(served.store) / "tenants"
    assert not list(tenants.glob("*/sessions/*")), "a history was recorded for a request that was refused"


def test_serves_a_collection_that_the_memorize_job_published_to_moto_s3(served, moto_s3_server, tmp_path):
    """Redeploys the application over an S3 store (moto on loopback); keys live in the same bucket. Then the S3
    server is stopped mid-run: the loaded live version keeps answering (naming its version), /readyz says
    degraded, error bodies name no bucket; started again, the service is ready again."""
    moto_s3 = moto_s3_server
    from ray import serve

    from jobs.memorize import run_memorize_job
    from pipeline.serve.app import build_app
    from tests.fixtures.collections import facts_job_config, write_facts_corpus

    bucket = moto_s3.make_bucket()
    store, opts = f"s3://{bucket}/store", moto_s3.storage_options()
    corpus = write_facts_corpus(tmp_path / "c.jsonl", names=["lighthouse", "railway", "bakery"])
    job_opts = {k: v for k, v in opts.items() if k != "retries"}  # memorag's option; the job passes them to s3fs
    cfg = facts_job_config(corpus, store, None, window=128, storage_options=job_opts)
    version = run_memorize_job(cfg).version
    _, key = ApiKeyStore(store, opts).create("facts")
    serve.run(build_app(app_config(store, opts)), name="memorag", route_prefix="/")
    r = post(served, {"query": "When did the Marrow Valley railway close to freight?", **FAST}, key=key)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == version and "railway" in [e["doc_id"] for e in r.json()["evidence"]]
    assert post(served, {"query": "q", "task": "qa", "max_new_tokens": 2}, key=served.key).status_code == 401  # keys of another store
    moto_s3.stop()
    try:
        r = post(served, {"query": "When did the Marrow Valley railway close to freight?", **FAST}, key=key)
        assert r.status_code == 200 and r.json()["version"] == version, r.text
        ready = httpx.get(served.url + "/readyz", timeout=120).json()
        assert ready["status"] == "degraded" and ready["checks"]["store"].startswith("unavailable")
        assert ready["serving"] == {"facts": version}
        bad = post(served, {"query": "q", "task": "qa", "max_new_tokens": 2, "session_id": "abcdefgh12"}, key=key)
        assert bad.status_code in (404, 503) and bucket not in bad.text and "s3://" not in bad.text, bad.text
    finally:
        moto_s3.restart()
    deadline = time.time() + 60
    while httpx.get(served.url + "/readyz", timeout=120).json()["status"] != "ready" and time.time() < deadline:
        time.sleep(1)
    assert httpx.get(served.url + "/readyz", timeout=120).json()["status"] == "ready"
