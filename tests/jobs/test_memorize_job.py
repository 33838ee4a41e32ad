"""The memorize job end to end on a real Ray cluster with real (tiny or embedded) models.

One baseline run (module fixture) is shared:

* a full run: quarantine, units, chunks, index shards + merged index, router, manifest, stats;
* incremental: adding documents memorizes only new units, removing drops their units and chunks;
* resume: a real run (``python -m jobs.memorize`` subprocess) is killed with SIGKILL after some units are
  stored; the rerun (through the Ray Data read/pack/shard path) memorizes only what is missing and publishes
  files byte-identical to the uninterrupted baseline (which used the driver-side path for small corpora);
* ``memorag memorize --corpus ... --collection ...`` through ``jobs.cli.main``;
* bad flags and bad input end with exit code 2 and a message naming the cause;
* ``ray job submit`` against a ``ray start --head`` cluster with the store on a loopback S3 server (moto).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dataclasses import dataclass

import numpy as np
import pytest

from jobs.memorize import run_memorize_job
from jobs.options import MemorizeJobFlags, parse_flags
from memorag_core.store import CollectionStore
from pipeline.config import MemorizeJobConfig
from tests.pipeline.corpus import doc_text, write_jsonl_corpus

REPO = Path(__file__).resolve().parents[2]
BASE_DOCS = list(range(30))  # ~20 units with the long document: enough that a kill lands mid-run


def job_config(corpus: Path | str, store: str, tiny_lm_dir: Path, **over) -> MemorizeJobConfig:
    """Small, fast settings: tiny memory model, cheap gists, fractional-CPU actors, 2 shards."""
    data = {
        "corpus": {"url": str(corpus)},
        "store": store,
        "collection": "books",
        "pack": {"unit_tokens": 160, "boundary_every": 3},
        "memory_stage": {"memory": {"model": str(tiny_lm_dir), "ratio": 4, "window": 64, "obs_window": 8,
                                    "load": {"device": "cpu"}},
                         "concurrency": 1, "num_cpus": 0.5},
        "chunk_embed": {"chunk_tokens": 64, "num_cpus": 0.5},
        "index": {"shards": 2, "merge": True},
        "router": {"gist": "cheap", "gist_chars": 200},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return MemorizeJobConfig.model_validate(data)


def published_files(store_url: str, collection: str = "books", storage_options=None) -> dict[str, bytes]:
    """Every file of the live version (manifest excluded) by relative path."""
    store = CollectionStore(store_url, storage_options)
    reader = store.open_version(collection)
    return {p: reader.read_bytes(p) for p in reader.files()}


@dataclass
class Baseline:
    root: Path
    corpus: Path
    store: str
    config: MemorizeJobConfig
    stats: object


@pytest.fixture(scope="module")
def baseline(ray_local, tmp_path_factory, tiny_lm_dir) -> Baseline:
    """One uninterrupted run of the job (collection ``books``), shared by the tests of this module."""
    root = tmp_path_factory.mktemp("memorize-baseline")
    corpus = write_jsonl_corpus(root / "corpus" / "c.jsonl", BASE_DOCS)
    cfg = job_config(corpus, str(root / "store"), tiny_lm_dir)
    return Baseline(root, corpus, str(root / "store"), cfg, run_memorize_job(cfg))


def test_memorize_job_publishes_collection(baseline):
    stats = baseline.stats
    assert stats.documents == len(BASE_DOCS) + 1 and stats.quarantined == 3
    assert stats.quarantine_reasons == {"binary": 1, "empty": 1, "malformed": 1}
    assert stats.units == stats.units_memorized > 3 and stats.units_cached == 0
    assert stats.tokens_memorized == stats.tokens > 0 and stats.chunks >= stats.units
    assert stats.bytes_written > 0 and stats.tokens_per_s > 0
    assert "quarantined" in stats.table() and "tokens/s" in stats.table()

    store = CollectionStore(baseline.store)
    reader = store.open_version("books")
    m = reader.manifest
    assert m.version == stats.version and len(m.units) == stats.units
    assert all(store.has_unit(u) for u in m.units)
    files = set(reader.files())
    assert {"index/merged.faiss", "router/units.parquet", "router/index.faiss",
            "quarantine/quarantine.parquet"} <= files
    chunks = reader.read_table("chunks")
    assert chunks.num_rows == stats.chunks
    assert set(chunks.column("unit_id").to_pylist()) == set(m.units)
    # every chunk's text is its span of the unit text, and of the document
    units = {r["unit_id"]: r for r in reader.read_table("units").to_pylist()}
    docs = {f"doc-{i:03d}": doc_text(i) for i in BASE_DOCS}
    for c in chunks.to_pylist():
        assert units[c["unit_id"]]["text"][c["start"]:c["end"]] == c["text"]
        if c["doc_id"] in docs:
            assert docs[c["doc_id"]][c["doc_start"]:c["doc_end"]] == c["text"]
    # the long document was split into several units of its own
    long_units = [u for u in units.values() if u["doc_ids"] == ["long-000"]]
    assert len(long_units) > 1 and all(u["start"] is not None for u in long_units)
    q = reader.read_table("quarantine").to_pylist()
    assert sorted(r["reason"] for r in q) == ["binary", "empty", "malformed"]
    assert all(r["detail"] and r["source"].startswith("c.jsonl:") for r in q)
    # the merged index finds a chunk by its own embedding
    from memorag_core.retrieval import IndexConfig, VectorIndex

    index = VectorIndex.from_bytes(reader.read_bytes("index/merged.faiss"), IndexConfig())
    assert len(index) == stats.chunks
    row = chunks.to_pylist()[5]
    _, ids = index.search(np.asarray(row["embedding"], np.float32), 1)
    assert int(ids[0, 0]) == row["faiss_id"]
    # the router sends a unit's own gist to that unit
    from memorag_core.retrieval.router import UnitRouter
    from memorag_core.retrieval import load_embedder

    router = UnitRouter.from_version(reader)
    gist_row = router.table.to_pylist()[0]
    qv = load_embedder(None).encode([gist_row["gist"]])[0]
    assert router.route(qv, k=1)[0][0] == gist_row["unit_id"]


def test_units_are_8_bit_and_the_collection_answers(baseline):
    """The job's default storage is int8 (memory_stage.storage_dtype): every published unit file holds 8-bit K/V,
    and the query engine loads them (dequantized) and answers from them."""
    from memorag_core.query import QueryEngine, QueryRequest
    from pipeline.memory_stage import read_safetensors_metadata

    store = CollectionStore(baseline.store)
    m = store.open_version("books").manifest
    assert m.config["memory_stage"]["storage_dtype"] == "int8"
    assert {u["storage_dtype"] for u in m.units.values()} == {"int8"}
    for uid in m.units:
        data = (Path(baseline.store) / "units" / uid / "memory.safetensors").read_bytes()
        assert json.loads(read_safetensors_metadata(data)["memorag"])["storage_dtype"] == "int8"
        n = int.from_bytes(data[:8], "little")
        kv = {k: v["dtype"] for k, v in json.loads(data[8:8 + n]).items() if k.endswith((".key", ".value"))}
        assert set(kv.values()) == {"I8"}
    from memorag_core.retrieval.queries import PlanConfig

    # text clues on: every routed unit's int8 memory is read back and decoded after
    engine = QueryEngine(baseline.store, refresh_s=0.0, device="cpu", plan=PlanConfig(text_clues=True))
    r = engine.query("books", QueryRequest(query="What is in the lighthouse?", units=2, max_new_tokens=4,
                                           clue_max_new_tokens=4, top_k=2))
    assert r.version == baseline.stats.version and len(r.units) == 2 and len(r.clues) == 2
    assert r.evidence and isinstance(r.answer, str) and r.answer.strip()


def test_gc_in_the_middle_of_the_job(ray_local, tmp_path, tiny_lm_dir, monkeypatch):
    """A gc with no age margin runs while the job is about to publish (every unit, staged table and version file
    written, none listed by a manifest yet): the job's lease keeps them, the job publishes, the collection loads
    and answers; after the job, gc keeps what the live version uses."""
    from memorag_core.query import QueryEngine, QueryRequest
    from memorag_core.store.collection import VersionWriter

    corpus = write_jsonl_corpus(tmp_path / "c.jsonl", list(range(6)))
    store_url = str(tmp_path / "store")
    reports = []
    publish = VersionWriter.publish

    def gc_then_publish(self, manifest, **kw):
        reports.append(self.store.gc(self.collection, keep_last=1, min_age_s=0))
        return publish(self, manifest, **kw)

    monkeypatch.setattr(VersionWriter, "publish", gc_then_publish)
    stats = run_memorize_job(job_config(corpus, store_url, tiny_lm_dir))
    (report,) = reports
    assert report.deferred and "memorize" in report.deferred
    assert report.removed_versions == report.removed_units == report.removed_staging == []
    store = CollectionStore(store_url)
    assert store.current_version("books") == stats.version and store.job_leases() == []
    r = QueryEngine(store_url, refresh_s=0.0, device="cpu").query(
        "books", QueryRequest(query="What is in the orchard?", units=1, max_new_tokens=4, clue_max_new_tokens=4,
                              top_k=2))
    assert r.version == stats.version and r.evidence and r.answer.strip()
    after = store.gc("books", keep_last=1, min_age_s=0)
    assert after.deferred is None and after.removed_units == [] and after.removed_staging == []


def test_incremental_add_and_remove(baseline, tmp_path, tiny_lm_dir):
    """Into the baseline's store (whose units are all memorized): collection ``inc`` gets the baseline corpus plus
    three documents, then loses five."""
    store = baseline.store
    units1 = set(CollectionStore(store).read_manifest("books").units)
    c2 = write_jsonl_corpus(tmp_path / "v2" / "c.jsonl", BASE_DOCS + [100, 101, 102])
    s2 = run_memorize_job(job_config(c2, store, tiny_lm_dir, collection="inc"))
    units2 = set(CollectionStore(store).read_manifest("inc").units)
    new = units2 - units1
    assert s2.units_memorized == len(new) > 0 and s2.units_cached == s2.units - len(new)
    assert s2.units_memorized < len(units1) and len(units1 & units2) > len(new)
    assert s2.units_embedded == len(new)
    assert s2.documents == len(BASE_DOCS) + 4
    # remove five documents: their chunks and the units holding them leave the next version
    keep = [i for i in BASE_DOCS if i not in (2, 3, 5, 7, 11)] + [100, 101, 102]
    c3 = write_jsonl_corpus(tmp_path / "v3" / "c.jsonl", keep)
    s3 = run_memorize_job(job_config(c3, store, tiny_lm_dir, collection="inc"))
    reader = CollectionStore(store).open_version("inc")
    chunk_docs = set(reader.read_table("chunks").column("doc_id").to_pylist())
    assert chunk_docs == {f"doc-{i:03d}" for i in keep} | {"long-000"}
    unit_docs = {d for ds in reader.read_table("units").column("doc_ids").to_pylist() for d in ds}
    assert unit_docs == chunk_docs
    units3 = set(reader.manifest.units)
    assert units2 - units3, "removing documents dropped no unit"
    assert s3.units_memorized == len(units3 - units2 - units1) < s3.units
    assert reader.manifest.stats["documents"] == len(keep) + 1
    # the older version of "books" is untouched
    assert set(CollectionStore(store).read_manifest("books").units) == units1


def _stored_units(store: Path) -> int:
    return len(list((store / "units").glob("*/memory.safetensors"))) if (store / "units").exists() else 0


def _wait_for_units(store: Path, n: int, proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = _stored_units(store)
        if done >= n:
            return done
        if proc.poll() is not None:
            raise AssertionError(f"the job exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"no {n} units stored within {timeout} s")


def _settled_units(store: Path, quiet_s: float = 3.0, timeout: float = 60.0) -> int:
    """Stored units once the count stops changing (the killed driver's actors are gone)."""
    last, since, deadline = _stored_units(store), time.time(), time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.25)
        now = _stored_units(store)
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet_s:
            return now
    raise AssertionError(f"units were still being written {timeout} s after the kill")


def test_kill_and_resume_is_byte_identical(baseline, ray_local, tmp_path):
    ref = baseline.stats
    store_b = tmp_path / "store-b"
    cfg_b = baseline.config.model_copy(update={"store": str(store_b)})
    cfg_file = tmp_path / "b.json"
    cfg_file.write_text(cfg_b.model_dump_json(by_alias=True))
    proc = subprocess.Popen([sys.executable, "-m", "jobs.memorize", "--config", str(cfg_file)], cwd=REPO,
                            env=dict(ray_local.env), stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "killed.log", "wb"), start_new_session=True)
    try:
        _wait_for_units(store_b, 1, proc, timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _settled_units(store_b)
    assert 0 < done < ref.units, f"{done} of {ref.units} units stored by the killed run; the kill missed mid-run"
    assert CollectionStore(str(store_b)).current_version("books") is None
    # resume through the Ray Data read/validate/pack/shard path (the baseline used the driver-side path)
    resumed = run_memorize_job(cfg_b.model_copy(update={"local_prepare_bytes": 0}))
    assert resumed.units_cached == done and resumed.units_memorized == ref.units - done
    assert _stored_units(store_b) == ref.units
    a = published_files(baseline.store)
    b = published_files(str(store_b))
    assert sorted(a) == sorted(b)
    assert [p for p in a if a[p] != b[p]] == []
    ma = CollectionStore(baseline.store).read_manifest("books")
    mb = CollectionStore(str(store_b)).read_manifest("books")
    assert ma.units == mb.units and ma.files == mb.files and ma.stats == mb.stats and ma.extra == mb.extra
    for uid in ma.units:
        assert (Path(baseline.store) / "units" / uid / "memory.safetensors").read_bytes() == \
               (store_b / "units" / uid / "memory.safetensors").read_bytes()


def test_memorag_memorize_cli_runs_the_job(baseline, tmp_path):
    """``memorag memorize --corpus X --collection Y --store Z`` (jobs.cli.main) runs the job: into the baseline's
    store every unit is found done, and the new collection's files equal the baseline's (with the memory actor
    pinned to a core of its own: --pin-cpus)."""
    from jobs.cli import main as cli_main

    cfg_file = tmp_path / "job.json"
    cfg_file.write_text(baseline.config.model_dump_json(by_alias=True))
    stats_file = tmp_path / "stats.json"
    rc = cli_main(["memorize", "--config", str(cfg_file), "--corpus", str(baseline.corpus), "--collection",
                   "books-cli", "--store", baseline.store, "--gist", "cheap", "--pin-cpus", "--stats-json",
                   str(stats_file)])
    assert rc == 0
    stats = json.loads(stats_file.read_text())
    assert stats["collection"] == "books-cli" and stats["documents"] == baseline.stats.documents
    assert stats["units_memorized"] == 0 and stats["units_cached"] == baseline.stats.units
    a = published_files(baseline.store, "books")
    b = published_files(baseline.store, "books-cli")
    assert sorted(a) == sorted(b) and [p for p in a if a[p] != b[p]] == []


def test_bad_config_and_cli_flags(tmp_path, capsys):
    """Flags map onto the config; bad flags and bad input exit with 2 and name the cause (no Ray is started)."""
    from jobs.memorize import main

    flags = parse_flags(MemorizeJobFlags, ["--corpus", "c.jsonl", "--collection", "x", "--store", str(tmp_path),
                                           "--actors", "2", "--actor-cpus", "0.5", "--gist", "cheap",
                                           "--local-prepare-bytes", "0", "--pin-cpus", "--storage-dtype", "fp8"])
    cfg = flags.to_config()
    assert cfg.memory_stage.storage_dtype == "fp8"
    assert cfg.memory_stage.concurrency == 2 and cfg.memory_stage.num_cpus == 0.5 and cfg.router.gist == "cheap"
    assert cfg.memory_stage.pin_cpus and cfg.memory_stage.max_tasks_in_flight == 1
    assert cfg.local_prepare_bytes == 0

    def run_main(argv: list[str]) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        return capsys.readouterr().err

    store = ["--store", str(tmp_path / "store")]
    err = run_main(["--corpus", "c.jsonl", "--collection", "bad name!", *store])
    assert "invalid configuration" in err and "collection name 'bad name!'" in err
    err = run_main(["--corpus", "c.jsonl", "--collection", "x", "--unit-tokens", "32", "--chunk-tokens", "64",
                    *store])
    assert "chunk_tokens (64) must not exceed pack.unit_tokens (32)" in err
    missing = tmp_path / "missing.jsonl"
    err = run_main(["--corpus", str(missing), "--collection", "x", *store, "--num-cpus", "1"])
    assert f"error: corpus {str(missing)!r} does not exist" in err
    all_bad = tmp_path / "bad.jsonl"
    all_bad.write_text('{"doc_id": "a", "text": "  "}\n{not json\n')
    err = run_main(["--corpus", str(all_bad), "--collection", "x", *store, "--num-cpus", "1"])
    assert "has no valid document (2 quarantined: {'empty': 1, 'malformed': 1})" in err
    assert CollectionStore(str(tmp_path / "store")).current_version("x") is None
    err = run_main(["--corpus", "c.jsonl", "--collection", "x", "--no-such-flag"])  # a usage error: no traceback
    assert "No such option: --no-such-flag" in err and "Usage: python -m jobs.memorize" in err
    assert "Traceback" not in err


def test_ray_job_submit_with_s3_store(ray_head, moto_s3, tmp_path, tiny_lm_dir):
    """`ray job submit` to the `ray start --head` cluster; corpus and store on the loopback S3 server."""
    import s3fs

    bucket = moto_s3.make_bucket()
    opts = {k: v for k, v in moto_s3.storage_options().items() if k != "retries"}
    fs = s3fs.S3FileSystem(**opts)
    local = write_jsonl_corpus(tmp_path / "c.jsonl", list(range(8)), long_doc=False)
    fs.put_file(str(local), f"{bucket}/corpus/c.jsonl")
    cfg = job_config(f"s3://{bucket}/corpus/c.jsonl", f"s3://{bucket}/store", tiny_lm_dir)
    data = json.loads(cfg.model_dump_json(by_alias=True))
    data["storage_options"] = opts
    data["corpus"]["storage_options"] = opts
    cfg_file = tmp_path / "job.json"
    cfg_file.write_text(json.dumps(data))
    env = dict(ray_head.env, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    runtime_env = json.dumps({"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                                           "TRANSFORMERS_OFFLINE": "1"}})
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_head.dashboard_url,
           "--runtime-env-json", runtime_env, "--", sys.executable, "-m", "jobs.memorize",
           "--config", str(cfg_file)]
    deadline = time.monotonic() + 240  # the head's job agent can take minutes to come up on a loaded machine
    while True:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
        if "No available agent to submit job" not in out.stderr or time.monotonic() > deadline:
            break
        time.sleep(10)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in (out.stdout + out.stderr) and "units" in out.stdout  # the job's stats table
    store = CollectionStore(f"s3://{bucket}/store", moto_s3.storage_options())
    reader = store.open_version("books")
    assert reader.manifest.stats["documents"] == 8 and reader.manifest.stats["quarantined"] == 3
    assert all(store.has_unit(u) for u in reader.manifest.units)
    assert reader.read_table("chunks").num_rows == reader.manifest.stats["chunks"] > 0
