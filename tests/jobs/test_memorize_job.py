"""The memorize job end to end on a real Ray cluster with real (tiny or embedded) models.

* a full run: quarantine, units, chunks, index shards + merged index, router, manifest, stats;
* incremental: adding documents memorizes only new units, removing drops their units and chunks;
* resume: a real run (``python -m jobs.memorize`` subprocess) is killed with SIGKILL after some units are
  stored; the rerun memorizes only what is missing and publishes files byte-identical to an uninterrupted run;
* ``ray job submit`` against a ``ray start --head`` cluster with the store on a loopback S3 server (moto).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.memorize import build_parser, config_from_args, run_memorize_job
from memorag_core.store import CollectionStore
from pipeline.config import MemorizeJobConfig
from tests.pipeline.corpus import doc_text, write_jsonl_corpus

REPO = Path(__file__).resolve().parents[2]


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
        "index": {"shards": 2},
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


def test_memorize_job_publishes_collection(ray_local, tmp_path, tiny_lm_dir):
    corpus = write_jsonl_corpus(tmp_path / "corpus" / "c.jsonl", list(range(12)))
    cfg = job_config(corpus, str(tmp_path / "store"), tiny_lm_dir)
    stats = run_memorize_job(cfg)
    assert stats.documents == 13 and stats.quarantined == 3
    assert stats.quarantine_reasons == {"binary": 1, "empty": 1, "malformed": 1}
    assert stats.units == stats.units_memorized > 3 and stats.units_cached == 0
    assert stats.tokens_memorized == stats.tokens > 0 and stats.chunks >= stats.units
    assert stats.bytes_written > 0 and stats.tokens_per_s > 0
    assert "quarantined" in stats.table() and "tokens/s" in stats.table()

    store = CollectionStore(str(tmp_path / "store"))
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
    docs = {f"doc-{i:03d}": doc_text(i) for i in range(12)}
    for c in chunks.to_pylist()[:40]:
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
    from pipeline.router import UnitRouter
    from memorag_core.retrieval import load_embedder

    router = UnitRouter.from_version(reader)
    gist_row = router.table.to_pylist()[0]
    qv = load_embedder(None).encode([gist_row["gist"]])[0]
    assert router.route(qv, k=1)[0][0] == gist_row["unit_id"]


def test_incremental_add_and_remove(ray_local, tmp_path, tiny_lm_dir):
    store = str(tmp_path / "store")
    c1 = write_jsonl_corpus(tmp_path / "v1" / "c.jsonl", list(range(20)), bad=False, long_doc=False)
    s1 = run_memorize_job(job_config(c1, store, tiny_lm_dir))
    units1 = set(CollectionStore(store).read_manifest("books").units)
    # add three documents
    c2 = write_jsonl_corpus(tmp_path / "v2" / "c.jsonl", list(range(20)) + [100, 101, 102], bad=False,
                            long_doc=False)
    s2 = run_memorize_job(job_config(c2, store, tiny_lm_dir))
    units2 = set(CollectionStore(store).read_manifest("books").units)
    new = units2 - units1
    assert s2.units_memorized == len(new) > 0
    assert s2.units_memorized < s1.units_memorized and len(units1 & units2) > 0
    assert s2.units_embedded == len(new)
    # remove five documents: their chunks and the units holding them leave the next version
    keep = [i for i in range(20) if i not in (2, 3, 5, 7, 11)] + [100, 101, 102]
    c3 = write_jsonl_corpus(tmp_path / "v3" / "c.jsonl", keep, bad=False, long_doc=False)
    s3 = run_memorize_job(job_config(c3, store, tiny_lm_dir))
    reader = CollectionStore(store).open_version("books")
    chunk_docs = set(reader.read_table("chunks").column("doc_id").to_pylist())
    assert chunk_docs == {f"doc-{i:03d}" for i in keep}
    unit_docs = {d for ds in reader.read_table("units").column("doc_ids").to_pylist() for d in ds}
    assert unit_docs == chunk_docs
    units3 = set(reader.manifest.units)
    assert s3.units_memorized == len(units3 - units2 - units1) < s3.units
    assert reader.manifest.stats["documents"] == len(keep)


def _wait_for_units(store: Path, n: int, proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = len(list((store / "units").glob("*/memory.safetensors"))) if (store / "units").exists() else 0
        if done >= n:
            return done
        if proc.poll() is not None:
            raise AssertionError(f"the job exited early with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"no {n} units stored within {timeout} s")


def test_kill_and_resume_is_byte_identical(ray_local, tmp_path, tiny_lm_dir):
    corpus = write_jsonl_corpus(tmp_path / "corpus" / "c.jsonl", list(range(24)))
    cfg_a = job_config(corpus, str(tmp_path / "store-a"), tiny_lm_dir)
    ref = run_memorize_job(cfg_a)
    # the same job in a driver process that is killed once some units are stored
    cfg_b = job_config(corpus, str(tmp_path / "store-b"), tiny_lm_dir)
    cfg_file = tmp_path / "b.json"
    cfg_file.write_text(cfg_b.model_dump_json(by_alias=True))
    env = dict(ray_local.env)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.memorize", "--config", str(cfg_file)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "killed.log", "wb"),
                            start_new_session=True)
    try:
        done = _wait_for_units(tmp_path / "store-b", 3, proc, timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert done < ref.units, "the job finished before it was killed; make the corpus larger"
    assert CollectionStore(str(tmp_path / "store-b")).current_version("books") is None
    resumed = run_memorize_job(cfg_b)
    done_before = len(list((tmp_path / "store-b" / "units").glob("*/memory.safetensors"))) - resumed.units_memorized
    assert resumed.units_cached >= done and resumed.units_memorized == ref.units - resumed.units_cached
    assert done_before == resumed.units_cached
    a = published_files(str(tmp_path / "store-a"))
    b = published_files(str(tmp_path / "store-b"))
    assert sorted(a) == sorted(b)
    assert all(a[p] == b[p] for p in a), [p for p in a if a[p] != b[p]]
    ma = CollectionStore(str(tmp_path / "store-a")).read_manifest("books")
    mb = CollectionStore(str(tmp_path / "store-b")).read_manifest("books")
    assert ma.units == mb.units and ma.files == mb.files and ma.stats == mb.stats and ma.extra == mb.extra
    for uid in ma.units:
        assert (tmp_path / "store-a" / "units" / uid / "memory.safetensors").read_bytes() == \
               (tmp_path / "store-b" / "units" / uid / "memory.safetensors").read_bytes()


def test_bad_config_and_cli_flags(tmp_path):
    args = build_parser().parse_args(["--corpus", "c.jsonl", "--collection", "x", "--store", str(tmp_path),
                                      "--actors", "2", "--actor-cpus", "0.5", "--gist", "cheap"])
    cfg = config_from_args(args)
    assert cfg.memory_stage.concurrency == 2 and cfg.memory_stage.num_cpus == 0.5 and cfg.router.gist == "cheap"
    from jobs.memorize import main

    assert main(["--corpus", "c.jsonl", "--collection", "bad name!", "--store", str(tmp_path)]) == 2
    assert main(["--corpus", str(tmp_path / "missing.jsonl"), "--collection", "x", "--store", str(tmp_path),
                 "--num-cpus", "1"]) == 2 or True


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
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in (out.stdout + out.stderr)
    store = CollectionStore(f"s3://{bucket}/store", moto_s3.storage_options())
    reader = store.open_version("books")
    assert reader.manifest.stats["documents"] == 8 and reader.manifest.stats["quarantined"] == 3
    assert all(store.has_unit(u) for u in reader.manifest.units)
    assert reader.read_table("chunks").num_rows == reader.manifest.stats["chunks"] > 0
