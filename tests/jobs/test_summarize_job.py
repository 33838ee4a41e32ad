"""The summarize job end to end on a real Ray cluster, over collections that the real memorize job published
(tiny random Llama for the mechanics: its text is noise, the bookkeeping is what is checked).

One module collection ``books``: the six facts documents plus ``saga``, a long document that spans several units
(so there is a document summary). Each test works on its own copy of that store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.options import SummarizeJobFlags, parse_flags
from jobs.summarize import SummarizeJobConfig, run_summarize_job
from memorag_core.store import CollectionStore
from memorag_core.store.summaries import SummaryStore
from tests.fixtures.collections import facts_job_config, write_facts_corpus
from tests.pipeline.corpus import doc_text

REPO = Path(__file__).resolve().parents[2]
SAGA = " ".join(doc_text(k, words=30) for k in range(14))  # ~5 units at unit_tokens 120


@dataclass
class Books:
    root: Path
    store: str
    version: str
    tiny: Path


@pytest.fixture(scope="module")
def books(ray_local, tmp_path_factory, tiny_lm_dir) -> Books:
    from jobs.memorize import run_memorize_job

    root = tmp_path_factory.mktemp("summarize-books")
    corpus = write_facts_corpus(root / "corpus.jsonl", extra={"saga": SAGA})
    stats = run_memorize_job(facts_job_config(corpus, str(root / "store"), str(tiny_lm_dir), collection="books"))
    return Books(root, str(root / "store"), stats.version, tiny_lm_dir)


def copy_store(books: Books, dest: Path) -> str:
    shutil.copytree(books.store, dest)
    return str(dest)


def job_config(store: str, **over) -> SummarizeJobConfig:
    data = {"store": store, "collection": "books", "generator": "memory", "key_point_tokens": 8, "top_k": 2,
            "max_new_tokens": 8, "reduce_max_new_tokens": 8, "fan_in": 3, "batch_size": 4, "num_cpus": 0.5,
            "device": "cpu"}
    data.update(over)
    return SummarizeJobConfig.model_validate(data)


def staged_unit_files(store: str) -> list[Path]:
    d = Path(store) / "summaries" / "staging" / "units"
    return sorted(d.glob("*.json")) if d.exists() else []


def test_full_run_publishes_summaries_then_a_rerun_does_nothing(books, tmp_path, capsys):
    """`memorag summarize` (jobs.cli.main) publishes units/documents/collection tables and a report in the
    summaries namespace; the collection's own pointer is untouched; the rerun says so in one line."""
    from jobs.cli import main as cli_main

    store = copy_store(books, tmp_path / "store")
    cfg_file = tmp_path / "job.json"
    cfg_file.write_text(job_config(store).model_dump_json(by_alias=True))
    stats_file = tmp_path / "stats.json"
    t0 = time.perf_counter()
    assert cli_main(["summarize", "--config", str(cfg_file), "--stats-json", str(stats_file)]) == 0
    first_s = time.perf_counter() - t0
    out = capsys.readouterr().out
    stats = json.loads(stats_file.read_text())
    manifest = CollectionStore(store).read_manifest("books")
    n = len(manifest.units)
    assert stats["units"] == n == stats["units_summarized"] and stats["units_cached"] == 0
    assert stats["units_skipped"] == 0 and stats["documents"] == 1 and stats["reduce_steps"] >= 2
    assert stats["summaries_per_minute"] > 0 and stats["generated_tokens"] > 0
    for rel in ("summaries/units.parquet", "summaries/documents.parquet", "summaries/collection.parquet",
                "report.md"):
        assert f"{stats['location']}/{rel}" in out
    assert "summaries/min" in out and "collection" in out.split("summaries/min")[0]
    assert CollectionStore(store).current_version("books") == books.version  # never touched

    summaries = SummaryStore(store)
    stored = summaries.open("books")
    assert stored.version == stats["summaries_version"] and stored.source_version == books.version
    units = stored.units.to_pylist()
    assert sorted(r["unit_id"] for r in units) == sorted(manifest.units)
    assert all(r["summary"] and r["model"] and r["prompt_version"].startswith("p1-") for r in units)
    assert all(r["source_version"] == books.version and r["created_at"] for r in units)
    docs = stored.documents.to_pylist()
    from memorag_core.query import CollectionCatalog

    view = CollectionCatalog(store).view("books")
    assert [d["doc_id"] for d in docs] == ["saga"] and sorted(docs[0]["unit_ids"]) == view.units_of_doc("saga")
    assert stored.collection.num_rows == 1 and stored.collection.column("summary")[0].as_py()
    report = stored.reader.read_bytes("report.md").decode()
    assert report.startswith("# Summaries of `books`") and "## Documents" in report and "### saga" in report
    assert len(staged_unit_files(store)) == n

    # nothing new: one line, no Ray work, no new version
    lines = []
    t0 = time.perf_counter()
    again = run_summarize_job(job_config(store), echo=lines.append)
    rerun_s = time.perf_counter() - t0
    assert again.nothing_to_do and again.summaries_version == stored.version and len(lines) == 1
    assert "nothing to do" in lines[0] and books.version in lines[0]
    assert summaries.current_version("books") == stored.version
    assert rerun_s < first_s
    capsys.readouterr()
    assert cli_main(["summarize", "--config", str(cfg_file)]) == 0
    assert [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()] == [lines[0]]


def test_engine_returns_the_stored_summary_while_it_is_current(books, tmp_path, tiny_lm_dir):
    from jobs.memorize import run_memorize_job
    from memorag_core.query import QueryEngine, QueryRequest

    store = copy_store(books, tmp_path / "store")
    run_summarize_job(job_config(store))
    stored = SummaryStore(store).open("books")
    engine = QueryEngine(store, refresh_s=0.0, device="cpu")
    r = engine.query("books", QueryRequest(task="summarize", max_new_tokens=4, clue_max_new_tokens=4))
    assert r.answer == stored.collection.column("summary")[0].as_py() and r.clues == []
    r = engine.query("books", QueryRequest(task="summarize", doc_id="saga", max_new_tokens=4))
    assert r.answer == stored.documents.column("summary")[0].as_py()
    view = engine.catalog.view("books")
    alone = [d for d in ("lighthouse", "orchard", "observatory", "railway", "bakery", "glacier")
             if view.unit_docs.get(view.units_of_doc(d)[0]) == [d]]
    unit_rows = {u["unit_id"]: u["summary"] for u in stored.units.to_pylist()}
    for d in alone:  # a document alone in its unit: that unit's summary
        r = engine.query("books", QueryRequest(task="summarize", doc_id=d, max_new_tokens=4))
        assert r.answer == unit_rows[view.units_of_doc(d)[0]]
    # a new collection version with other units: the stored summaries are stale, the engine summarizes live
    corpus = write_facts_corpus(tmp_path / "c2.jsonl", ["lighthouse", "orchard"])
    run_memorize_job(facts_job_config(corpus, store, str(tiny_lm_dir), collection="books"))
    r = engine.query("books", QueryRequest(task="summarize", max_new_tokens=4, clue_max_new_tokens=4, units=2))
    assert r.clues and r.answer != stored.collection.column("summary")[0].as_py()


def test_incremental_summarizes_only_new_units_and_drops_removed_documents(books, tmp_path, tiny_lm_dir):
    from jobs.memorize import run_memorize_job

    store = copy_store(books, tmp_path / "store")
    first = run_summarize_job(job_config(store))
    units1 = set(CollectionStore(store).read_manifest("books").units)
    # the corpus loses the long document and gains one
    corpus = write_facts_corpus(tmp_path / "c2.jsonl", extra={"harbour": "The harbour of Keld froze in 1947. "
                                                               "Fishermen walked to the lighthouse on the ice."})
    run_memorize_job(facts_job_config(corpus, store, str(tiny_lm_dir), collection="books"))
    units2 = set(CollectionStore(store).read_manifest("books").units)
    new_units = units2 - units1
    assert new_units and units2 & units1
    second = run_summarize_job(job_config(store))
    assert second.units == len(units2) and second.units_summarized == len(new_units)
    assert second.units_cached == len(units2 & units1)
    stored = SummaryStore(store).open("books")
    assert stored.documents.num_rows == 0  # saga is gone, with its summary
    assert sorted(stored.units.column("unit_id").to_pylist()) == sorted(units2)
    assert second.summaries_version != first.summaries_version
    # staged unit summaries: one per unit ever summarized (exactly once each)
    assert len(staged_unit_files(store)) == len(units1 | units2)


def test_bad_units_are_reported_and_skipped(books, tmp_path):
    store = copy_store(books, tmp_path / "store")
    units = sorted(CollectionStore(store).read_manifest("books").units)
    corrupt, missing = units[0], units[1]
    path = Path(store) / "units" / corrupt / "memory.safetensors"
    data = bytearray(path.read_bytes())
    data[-100:] = b"\x00" * 100
    path.write_bytes(bytes(data))
    shutil.rmtree(Path(store) / "units" / missing)
    stats = run_summarize_job(job_config(store))
    assert stats.units_skipped == 2 and stats.skip_reasons == {"corrupt_memory": 1, "missing_memory": 1}
    assert stats.units_summarized == len(units) - 2 and stats.summaries_version
    stored = SummaryStore(store).open("books")
    assert set(stored.units.column("unit_id").to_pylist()) == set(units) - {corrupt, missing}
    assert stored.extra["skipped"] == {corrupt: "corrupt_memory", missing: "missing_memory"}
    assert stored.collection.num_rows == 1
    report = stored.reader.read_bytes("report.md").decode()
    assert "## Skipped units" in report and corrupt in report and "missing_memory" in report
    lines = []
    again = run_summarize_job(job_config(store), echo=lines.append)
    assert again.nothing_to_do and "2 units skipped earlier" in lines[0]
    retried = run_summarize_job(job_config(store, retry_skipped=True))
    assert retried.units_summarized == 0 and retried.units_cached == len(units) - 2 and retried.units_skipped == 2


@pytest.mark.slow  # a memorize run and two or three summarize runs: ~1 min on an idle 2-core VM
def test_a_document_that_changes_under_the_same_id(books, tmp_path, tiny_lm_dir):
    """``saga`` keeps its id, its text changes: the next run summarizes only its new units, the document row lists
    exactly the new version's units of ``saga`` (all of them reduced), and the old row is not served for them."""
    from jobs.memorize import run_memorize_job
    from memorag_core.query import CollectionCatalog

    store = copy_store(books, tmp_path / "store")
    run_summarize_job(job_config(store))
    first = SummaryStore(store).open("books")
    (old_row,) = first.documents.to_pylist()
    units1 = set(CollectionStore(store).read_manifest("books").units)
    saga2 = SAGA[: len(SAGA) // 2] + " " + " ".join(doc_text(k, words=30) for k in range(40, 46))
    corpus = write_facts_corpus(tmp_path / "c2.jsonl", extra={"saga": saga2})
    run_memorize_job(facts_job_config(corpus, store, str(tiny_lm_dir), collection="books"))
    units2 = set(CollectionStore(store).read_manifest("books").units)
    assert units2 - units1 and units1 & units2  # saga's first half kept its units
    second = run_summarize_job(job_config(store))
    assert second.units_summarized == len(units2 - units1) and second.units_cached == len(units1 & units2)
    stored = SummaryStore(store).open("books")
    (row,) = stored.documents.to_pylist()
    view = CollectionCatalog(store).view("books")
    new_saga = view.units_of_doc("saga")
    assert row["doc_id"] == "saga" and sorted(row["unit_ids"]) == sorted(new_saga) != sorted(old_row["unit_ids"])
    assert row["key"] != old_row["key"] and row["summary"]
    assert stored.document_summary("saga", new_saga, view.unit_docs) == row["summary"]
    assert first.document_summary("saga", new_saga, view.unit_docs) is None  # the old row is stale


@pytest.mark.slow  # a memorize run and two or three summarize runs: ~1 min on an idle 2-core VM
def test_a_failed_reduce_is_retried_by_the_next_run(books, tmp_path):
    """A live summaries version whose collection reduce failed (no collection row, nothing staged for it) is not
    "current": the next run recomputes only that reduce step and publishes the collection summary."""
    from memorag_core.store import Manifest

    store = copy_store(books, tmp_path / "store")
    run_summarize_job(job_config(store))
    summaries = SummaryStore(store)
    good = summaries.open("books")
    root = good.collection.column("key")[0].as_py()
    # the state a failed collection reduce leaves: the same tables without the collection row, failed_reduce set
    (Path(store) / "summaries" / "staging" / "reduce" / f"{root}.json").unlink()
    w = summaries.new_version("books")
    w.write_table("summaries", "units", good.units)
    w.write_table("summaries", "documents", good.documents)
    w.write_table("summaries", "collection", good.collection.slice(0, 0))
    w.write_bytes("report.md", b"# Summaries\n")
    m = good.reader.manifest
    w.publish(Manifest(models=m.models, config=m.config, stats=m.stats,
                       extra={**good.extra, "failed_reduce": [root], "staged_keys": [
                           k for k in good.extra["staged_keys"] if k != root]}))
    assert summaries.open("books").collection.num_rows == 0
    healed = run_summarize_job(job_config(store))
    assert not healed.nothing_to_do and healed.units_summarized == 0 and healed.reduce_steps == 1
    stored = summaries.open("books")
    assert stored.collection.num_rows == 1 and stored.collection.column("key")[0].as_py() == root
    assert stored.extra["failed_reduce"] == []
    assert run_summarize_job(job_config(store)).nothing_to_do  # complete now


def _settled(store: str, quiet_s: float = 3.0, timeout: float = 60.0) -> int:
    last, since, deadline = len(staged_unit_files(store)), time.time(), time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.25)
        now = len(staged_unit_files(store))
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet_s:
            return now
    raise AssertionError("unit summaries were still being staged after the kill")


def test_killed_run_publishes_nothing_and_the_rerun_summarizes_each_unit_once(books, ray_local, tmp_path):
    store = copy_store(books, tmp_path / "store")
    n = len(CollectionStore(store).read_manifest("books").units)
    cfg_file = tmp_path / "job.json"
    # longer decodes (the tiny model writes ~100 tokens/s here) so that the kill lands between units
    slow = {"key_point_tokens": 96, "max_new_tokens": 96}
    cfg_file.write_text(job_config(store, batch_size=1, **slow).model_dump_json(by_alias=True))
    proc = subprocess.Popen([sys.executable, "-m", "jobs.summarize", "--config", str(cfg_file)], cwd=REPO,
                            env=dict(ray_local.env), stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "killed.log", "wb"), start_new_session=True)
    try:
        deadline = time.time() + 240
        while not staged_unit_files(store):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "no unit summary staged within 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _settled(store)
    assert 0 < done < n, f"{done} of {n} units summarized by the killed run; the kill missed mid-run"
    assert SummaryStore(store).current_version("books") is None  # nothing published
    before = {p.name: p.stat().st_mtime_ns for p in staged_unit_files(store)}
    resumed = run_summarize_job(job_config(store, **slow))
    assert resumed.units_cached == done and resumed.units_summarized == n - done
    after = {p.name: p.stat().st_mtime_ns for p in staged_unit_files(store)}
    assert len(after) == n and all(after[k] == v for k, v in before.items())  # none rewritten
    stored = SummaryStore(store).open("books")
    assert stored.units.num_rows == n and stored.collection.num_rows == 1


def test_flags_map_onto_the_config_and_bad_input_exits_2(tmp_path, capsys):
    from jobs.summarize import main

    flags = parse_flags(SummarizeJobFlags, ["--collection", "c", "--store", str(tmp_path), "--actors", "2",
                                            "--batch-size", "16", "--generator", "vllm:", "--fan-in", "4",
                                            "--actor-gpus", "1", "--retry-skipped"])
    cfg = flags.to_config()
    assert (cfg.concurrency, cfg.batch_size, cfg.generator, cfg.fan_in, cfg.num_gpus, cfg.retry_skipped) == \
        (2, 16, "vllm:", 4, 1.0, True)
    assert main(["--collection", "c", "--store", str(tmp_path), "--fan-in", "1"]) == 2
    assert "fan_in" in capsys.readouterr().err
    assert main(["--collection", "nope", "--store", str(tmp_path)]) == 2
    assert "has no live version" in capsys.readouterr().err


def test_ray_job_submit_with_s3_store(books, ray_head, moto_s3, tmp_path):
    """`ray job submit` to the `ray start --head` cluster; the collection and the summaries on loopback S3."""
    import s3fs

    bucket = moto_s3.make_bucket()
    opts = {k: v for k, v in moto_s3.storage_options().items() if k != "retries"}
    fs = s3fs.S3FileSystem(**opts)
    fs.put(books.store + "/", f"{bucket}/store", recursive=True)
    cfg = job_config(f"s3://{bucket}/store", storage_options=opts)
    cfg_file = tmp_path / "job.json"
    cfg_file.write_text(cfg.model_dump_json(by_alias=True))
    env = dict(ray_head.env, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    runtime_env = json.dumps({"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                                           "TRANSFORMERS_OFFLINE": "1"}})
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_head.dashboard_url,
           "--runtime-env-json", runtime_env, "--", sys.executable, "-m", "jobs.summarize", "--config",
           str(cfg_file)]
    for _ in range(3):  # the head's job agent can be slow to come up on a loaded machine
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in out.stderr:
            break
        time.sleep(10)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in (out.stdout + out.stderr) and "summaries/min" in out.stdout
    summaries = SummaryStore(f"s3://{bucket}/store", moto_s3.storage_options())
    stored = summaries.open("books")
    n = len(summaries.store.read_manifest("books").units)
    assert stored.units.num_rows == n and stored.collection.num_rows == 1 and stored.documents.num_rows == 1
    assert len(summaries.staged_keys("units")) == n


def test_generator_auto_picks_vllm_only_where_it_runs(tiny_lm_dir, embedded_lm_dir):
    import importlib.util

    from jobs.summarize import resolve_generator
    from memorag_core.store import ModelRef

    ref = ModelRef(id="m", revision="r")
    # the tiny model's head_dim (16) is not one vLLM's CPU backend supports: transformers on the memory model
    assert resolve_generator("auto", {"model": str(tiny_lm_dir)}, ref) == (None, "m", ["model", "m", "r"])
    spec, name, ident = resolve_generator("auto", {"model": None}, ref)  # embedded SmolLM2: head_dim 64
    if importlib.util.find_spec("vllm") is not None:
        assert (spec, name) == ("vllm:", "vllm:m")
    else:
        assert spec is None
    # the content-key identity is the concrete model, whichever engine auto picked on this machine
    assert ident == ["model", "m", "r"] == resolve_generator("memory", {}, ref)[2] == \
        resolve_generator("vllm:", {}, ref)[2]
    assert resolve_generator("hf:/x", {}, ref) == ("hf:/x", "hf:/x", ["spec", "hf:/x"])
