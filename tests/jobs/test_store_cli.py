"""`memorag collections`, `memorag collections show`, `memorag gc` and `memorag ask --json` against a real small
collection published by the memorize job (tests/fixtures/collections.py), a second version published by
`memorag memorize --corpus` (one document added, one removed), and the same store on a moto S3 server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.cli import main
from memorag_core.store import CollectionStore
from memorag_core.store.keys import ApiKeyStore
from memorag_core.store.overview import manifest_bytes, version_documents
from tests.fixtures.collections import FACTS, write_facts_corpus

pytestmark = pytest.mark.timeout(600)


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def two_versions(tiny_collection, tmp_path_factory):
    """A copy of the tiny `facts` store with a second version: `glacier` removed, `harbour` added (published by
    `memorag memorize --corpus`, the job's config file plus flags); one API key."""
    root = tmp_path_factory.mktemp("store-cli")
    store = root / "store"
    shutil.copytree(tiny_collection.store, store, ignore=shutil.ignore_patterns("leases"))
    names = [k for k in FACTS if k != "glacier"]
    corpus = write_facts_corpus(root / "c2.jsonl", names, extra={
        "harbour": "The harbour of Kell was dredged in 1911 so that steamers could dock at low tide."})
    cfg = root / "job.json"
    cfg.write_text(tiny_collection.config.model_dump_json(by_alias=True))
    code = main(["memorize", "--config", str(cfg), "--corpus", str(corpus), "--store", str(store)])
    assert code == 0
    ApiKeyStore(str(store)).create("facts", "test key")
    return str(store)


def test_collections_lists_the_store_at_a_glance(two_versions, capsys):
    st = CollectionStore(two_versions)
    live = st.current_version("facts")
    m = st.read_manifest("facts")
    code, out, _ = run(capsys, ["collections", "--store", two_versions, "--json"])
    assert code == 0
    [row] = json.loads(out)["collections"]
    assert row["collection"] == "facts" and row["live_version"] == live and row["versions"] == 2
    assert row["documents"] == len(FACTS) == m.stats["documents"] and row["units"] == len(m.units) > 0
    assert row["tokens"] == m.stats["tokens"] > 0 and row["bytes"] == manifest_bytes(m) > 0
    assert row["keys"] == 1 and row["summaries_version"] is None
    assert row["published_at"] == json.loads((Path(two_versions) / "collections/facts/CURRENT").read_text())[
        "published_at"]
    code, out, _ = run(capsys, ["collections", "--store", two_versions])
    header, rule, line = out.splitlines()
    assert header.split()[:3] == ["collection", "live", "version"] and "summaries" in header and "keys" in header
    assert line.split()[:2] == ["facts", live] and line.split()[-1] == "1"


def test_collections_show_lists_versions_and_what_each_changed(two_versions, tiny_collection, capsys):
    code, out, _ = run(capsys, ["collections", "show", "facts", "--store", two_versions, "--json"])
    assert code == 0
    shown = json.loads(out)
    first, second = shown["history"]
    assert first["version"] == tiny_collection.version and not first["live"] and second["live"]
    assert first["documents_added"] == sorted(FACTS) and first["documents_removed"] == []
    assert second["documents_added"] == ["harbour"] and second["documents_removed"] == ["glacier"]
    assert second["parent"] == first["version"]
    st = CollectionStore(two_versions)
    m1, m2 = st.read_manifest("facts", first["version"]), st.read_manifest("facts", second["version"])
    assert second["units_added"] == sorted(set(m2.units) - set(m1.units)) != []
    assert second["units_removed"] == sorted(set(m1.units) - set(m2.units)) != []
    assert version_documents(st, "facts", second["version"]) == (set(FACTS) - {"glacier"}) | {"harbour"}
    code, out, _ = run(capsys, ["collections", "show", "facts", "--store", two_versions])
    assert code == 0 and "documents added: harbour" in out and "documents removed: glacier" in out
    code, _, err = run(capsys, ["collections", "show", "nope", "--store", two_versions])
    assert code == 2 and "error:" in err and "'nope'" in err


def test_gc_dry_run_lists_then_gc_deletes_the_same_and_keeps_what_a_job_holds(two_versions, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(two_versions, store)
    st = CollectionStore(str(store))
    old, live = st.list_versions("facts")
    only_old = sorted(set(st.read_manifest("facts", old).units) - set(st.read_manifest("facts", live).units))
    before = sorted(p.relative_to(store) for p in store.rglob("*"))

    code, out, _ = run(capsys, ["gc", "--store", str(store), "--min-age", "0", "--dry-run", "--json"])
    assert code == 0
    planned = json.loads(out)
    assert planned["dry_run"] and sorted(p.relative_to(store) for p in store.rglob("*")) == before  # nothing gone
    [c] = planned["collections"]
    assert c["versions"] == [old] and c["live"] == live and sorted(c["units"]) == only_old
    assert planned["freed_bytes"] > 0

    st.write_lease("facts", "job-1", [old], ttl_s=600)  # a running job holds the old version: gc leaves it
    code, out, _ = run(capsys, ["gc", "--store", str(store), "--min-age", "0"])
    assert code == 0 and f"deleted facts: version {old}" not in out
    assert st.list_versions("facts") == [old, live]
    st.delete_lease("facts", "job-1")

    code, out, _ = run(capsys, ["gc", "--store", str(store), "--min-age", "0"])
    assert code == 0 and f"deleted facts: version {old}" in out
    for uid in only_old:
        assert f"deleted facts: unit {uid}" in out and not st.has_unit(uid)
    assert st.list_versions("facts") == [live]
    reader = st.open_version("facts")  # the live version still reads in full
    assert all(st.has_unit(u) for u in reader.manifest.units) and reader.read_table("chunks").num_rows > 0
    code, out, _ = run(capsys, ["gc", "--store", str(store), "--min-age", "0", "--json"])
    assert json.loads(out)["freed_bytes"] == 0


def test_collections_on_moto_s3(two_versions, moto_s3, capsys, monkeypatch):
    """The same store uploaded to a loopback S3 server reads the same through --store s3://... --s3-endpoint."""
    import s3fs

    bucket = moto_s3.make_bucket()
    opts = {k: v for k, v in moto_s3.storage_options().items() if k != "retries"}
    s3fs.S3FileSystem(**opts).put(two_versions + "/", f"{bucket}/store", recursive=True)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", opts.get("key") or "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", opts.get("secret") or "testing")
    url = f"s3://{bucket}/store"
    code, local, _ = run(capsys, ["collections", "--store", two_versions, "--json"])
    code, remote, err = run(capsys, ["collections", "--store", url, "--s3-endpoint", moto_s3.endpoint_url, "--json"])
    assert code == 0, err
    assert json.loads(remote) == json.loads(local)
    code, out, err = run(capsys, ["gc", "--store", url, "--s3-endpoint", moto_s3.endpoint_url, "--dry-run",
                                  "--min-age", "0", "--json"])
    assert code == 0, err
    assert len(json.loads(out)["collections"][0]["versions"]) == 1


def test_ask_json_is_the_http_api_answer_object(tiny_collection, capsys):
    """`memorag ask --json` prints the object POST /v1/collections/{name}/query returns: QueryResult.to_api(),
    which the route serves (checked through the route itself, on a FastAPI app with the real router)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from memorag_core.query import QueryEngine, QueryLimits, QueryRequest
    from pipeline.serve.routes.deps import get_ingress
    from pipeline.serve.routes.native import QueryOut, router

    args = ["--collection", "facts", "--store", tiny_collection.store, "--units", "1", "--top-k", "2",
            "--max-new-tokens", "4", "--clue-max-new-tokens", "6"]
    code, out, err = run(capsys, ["ask", "Who built the lighthouse of Varnholm?", *args, "--json"])
    assert code == 0, err
    cli = json.loads(out)  # the whole output is one JSON object
    assert QueryOut.model_validate(cli).model_dump(mode="json") == cli  # the route's model, no field more or less
    assert cli["collection"] == "facts" and cli["version"] == tiny_collection.version and cli["evidence"]

    engine = QueryEngine(tiny_collection.store)
    result = engine.query("facts", QueryRequest("Who built the lighthouse of Varnholm?", units=1, top_k=2,
                                                max_new_tokens=4, clue_max_new_tokens=6))

    class Ingress:  # hands the route this result, so that its serialization is what is compared
        limits = QueryLimits()

        async def authorize(self, name, authorization):
            return None

        def owner(self, name, authorization):
            return None

        async def query(self, name, request, version, owner=None):
            return result

    api = FastAPI()
    api.include_router(router)
    api.dependency_overrides[get_ingress] = Ingress
    served = TestClient(api).post("/v1/collections/facts/query", json={"query": "x"}).json()
    assert served == json.loads(json.dumps(result.to_api()))  # what the CLI prints for this result
    assert set(served) == set(cli) and [set(e) for e in served["evidence"]] == [set(e) for e in cli["evidence"]]
