"""Scale simulation: the whole memorize job on a generated corpus of N tokens, with tiny random models.

The point is to measure the pipeline (reading, validation, packing, Ray Data shuffles, store writes, index build,
router, publish, and the driver), not the model: the memory model is a 1-layer random Llama (hidden 64) with the
real SmolLM2 tokenizer, the embedder a 1-layer random BERT (hidden 32, mean pooling) with the real MiniLM tokenizer.

Corpus: passages of the two shared books (``../shared/data/harry_potter.txt``, ``fortress_besieged.txt``) at
random offsets and lengths (200-6,000 characters, ~1.5K tokens on average), each prefixed with its own id line so that no two documents (and
so no two units) are equal, written as JSONL files of ~8 MB, until the estimated token count reaches ``--tokens``
(chars per token measured on each book with the memory tokenizer). The job then runs exactly as
``python -m jobs.memorize`` does, in a separate driver process on a fresh local Ray (``--num-cpus``, default 2),
through the Ray Data path at every size (``local_prepare_bytes=0``, so that sizes are comparable).

    python benchmarks/bench_scale.py --tokens 2000000 [--work DIR] [--keep]

prints one JSON line:

``tokens`` (memory-model tokens in the published version), ``seconds`` (job wall time in the driver),
``driver_peak_rss_mb`` (the driver process's own peak RSS, ``getrusage(RUSAGE_SELF)``), ``stage_seconds`` (wall
seconds per job phase: setup incl. Ray start, read+validate, pack, memorize+embed (the model stages, streaming
together), index, router+publish), ``stage_tokens_per_s``, ``non_model_max_share`` (the largest share of wall time
taken by a phase other than memorize+embed), ``object_store_peak_mb`` and ``spilled_mb`` (Ray's plasma store,
sampled every 2 s), ``index_build_seconds``, ``store_bytes`` (by top folder: units, staging, collections), units,
chunks, documents, and the run's settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOOKS = ("harry_potter.txt", "fortress_besieged.txt")


def shared_data() -> Path:
    """../shared/data beside the checkout ($MEMORAG_SHARED_DATA overrides)."""
    env = os.environ.get("MEMORAG_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def build_tiny_lm(folder: Path) -> Path:
    """A 1-layer random Llama (hidden 64, 4 heads, 2 KV heads, head_dim 16) with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from memorag_core.models import embedded_lm_path, load_tokenizer

    tok = load_tokenizer(str(embedded_lm_path()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_tiny_embedder(folder: Path) -> Path:
    """A 1-layer random BERT (hidden 32, mean pooling declared in config.json) with the MiniLM tokenizer."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from memorag_core.models import embedded_embedder_path

    tok = AutoTokenizer.from_pretrained(str(embedded_embedder_path()))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["pooling"] = "mean"
    (folder / "config.json").write_text(json.dumps(data, indent=1))
    return folder


def write_corpus(folder: Path, tokens: int, model_dir: Path, seed: int = 0,
                 file_bytes: int = 8 * 2**20) -> dict:
    """JSONL files of book passages until ~``tokens`` memory tokens (estimated); returns what was written."""
    from memorag_core.models import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    books = []
    for name in BOOKS:
        text = (shared_data() / name).read_text(encoding="utf-8")
        sample = text[:100_000]
        chars_per_token = len(sample) / len(tok(sample)["input_ids"])
        books.append((name.split(".")[0], text, chars_per_token))
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    est, docs, n_files, out, size = 0.0, 0, 0, None, 0
    while est < tokens:
        name, text, cpt = books[rng.randrange(len(books))]
        length = rng.randint(200, 6_000)
        start = rng.randrange(0, max(1, len(text) - length))
        body = f"[{name} passage {docs}]\n" + text[start:start + length]
        line = json.dumps({"doc_id": f"{name}-{docs:08d}", "text": body}, ensure_ascii=False) + "\n"
        if out is None or size >= file_bytes:
            if out is not None:
                out.close()
            out = open(folder / f"part-{n_files:05d}.jsonl", "w", encoding="utf-8")
            n_files, size = n_files + 1, 0
        out.write(line)
        size += len(line.encode())
        est += len(body) / cpt
        docs += 1
    if out is not None:
        out.close()
    return {"documents": docs, "files": n_files, "estimated_tokens": int(est)}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


class _ObjectStoreSampler(threading.Thread):
    """Polls Ray's plasma store every ``every`` s (the raylet's store stats, as ``ray memory --stats-only``
    reports them); keeps the peaks of bytes used and bytes spilled, in MiB."""

    def __init__(self, every: float = 1.0):
        super().__init__(daemon=True)
        self.every, self.peak_mb, self.spilled_mb, self.samples = every, 0.0, 0.0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = None
        while not self.stop.wait(self.every):
            if not ray.is_initialized():
                continue
            try:
                state = state or get_state_from_address(None)
                stats = get_memory_info_reply(state).store_stats
            except Exception:  # noqa: BLE001 - a sample lost while Ray starts or stops
                continue
            self.samples += 1
            self.peak_mb = max(self.peak_mb, stats.object_store_bytes_used / 2**20)
            self.spilled_mb = max(self.spilled_mb, stats.spilled_bytes_total / 2**20)


def driver_main(cfg_file: str, out_file: str, num_cpus: int) -> None:
    """The driver process: start a fresh local Ray, run the job, write stats + this process's peak RSS."""
    import ray

    from jobs.memorize import run_memorize_job
    from pipeline.config import MemorizeJobConfig
    from pipeline.ray_env import REPO_ROOT as _REPO_ROOT

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = MemorizeJobConfig.model_validate_json(Path(cfg_file).read_text())
    env = {"PYTHONPATH": _REPO_ROOT, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    sampler = _ObjectStoreSampler()
    sampler.start()
    peak_after: dict[str, float] = {}

    class _PeakAtPhase(logging.Handler):
        """Records this process's peak RSS so far at the end of each job phase (where the peak arises)."""

        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("phase ") and record.args:
                peak_after[str(record.args[0])] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    logging.getLogger("jobs.memorize").addHandler(_PeakAtPhase())
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env}, log_to_driver=False,
             include_dashboard=False)
    ray_start = time.perf_counter() - t0
    stats = run_memorize_job(config)
    sampler.stop.set()
    ray.shutdown()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out_file).write_text(json.dumps({"stats": stats.to_dict(), "driver_peak_rss_mb": round(peak_kb / 1024, 1),
                                          "object_store_peak_mb": round(sampler.peak_mb, 1),
                                          "spilled_mb": round(sampler.spilled_mb, 1), "store_samples": sampler.samples,
                                          "ray_start_seconds": round(ray_start, 2),
                                          "driver_peak_rss_mb_after_phase": peak_after}))


def job_config(corpus: Path, store: Path, lm: Path, embedder: Path, args) -> dict:
    """The job settings of the benchmark (tiny models, cheap gists, Ray Data path, IVF index in shards). Both actor
    pools take 0.5 CPU, leaving one of the 2 CPUs to Ray Data's tasks (read, shuffles, shard builds): with a 1-CPU
    memory actor, the 1-CPU tasks upstream of it could never be scheduled and the job hung."""
    return {
        "corpus": {"url": str(corpus)}, "store": str(store), "collection": "scale",
        "pack": {"unit_tokens": args.unit_tokens},
        "memory_stage": {"memory": {"model": str(lm), "ratio": args.ratio, "load": {"device": "cpu"}},
                         "concurrency": 1, "num_cpus": 0.5, "batch_size": 1},
        "chunk_embed": {"embedder": str(embedder), "num_cpus": 0.5, "batch_size": 16},
        "index": {"kind": "ivf", "nlist": 64, "nprobe": 8, "shards": args.shards, "train_sample": 20_000},
        "router": {"gist": "cheap", "gist_chars": 200},
        "local_prepare_bytes": 0,
    }


def run(args) -> dict:
    """Build models and corpus, run the job in a driver subprocess, and return the JSON result."""
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    models = work / "models"
    lm, emb = models / "tiny-lm", models / "tiny-embedder"
    if not (lm / "config.json").exists():
        build_tiny_lm(lm)
    if not (emb / "config.json").exists():
        build_tiny_embedder(emb)
    corpus, store = work / f"corpus-{args.tokens}", work / f"store-{args.tokens}"
    if store.exists():
        import shutil

        shutil.rmtree(store)  # a fresh store: nothing cached
    t0 = time.perf_counter()
    corpus_info = write_corpus(corpus, args.tokens, lm) if not corpus.exists() else {"reused": True}
    gen_seconds = time.perf_counter() - t0
    cfg_file, out_file = work / f"job-{args.tokens}.json", work / f"result-{args.tokens}.json"
    cfg_file.write_text(json.dumps(job_config(corpus, store, lm, emb, args)))
    # Ray's socket paths must stay under 108 bytes: its temp folder is a short one under /tmp, not inside `work`.
    ray_tmp = tempfile.mkdtemp(prefix="bsr-", dir="/tmp")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               RAY_TMPDIR=ray_tmp, TOKENIZERS_PARALLELISM="false")
    log = open(work / f"driver-{args.tokens}.log", "wb")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--driver", str(cfg_file), str(out_file),
                           "--num-cpus", str(args.num_cpus)], cwd=REPO, env=env, stdout=log, stderr=log)
    wall = time.perf_counter() - t0
    import shutil

    shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode:
        raise SystemExit(f"the job failed ({proc.returncode}); see {work / f'driver-{args.tokens}.log'}")
    res = json.loads(out_file.read_text())
    st = res["stats"]
    phases = st["phase_seconds"]
    total = st["seconds"]
    non_model = {k: v for k, v in phases.items() if k != "memorize+embed"}
    out = {
        "tokens": st["tokens"], "seconds": round(total, 2), "driver_peak_rss_mb": res["driver_peak_rss_mb"],
        "stage_seconds": phases,
        "stage_tokens_per_s": {k: round(st["tokens"] / v, 1) if v else None for k, v in phases.items()},
        "non_model_max_share": round(max(non_model.values()) / total, 3) if non_model and total else None,
        "non_model_max_stage": max(non_model, key=non_model.get) if non_model else None,
        "tokens_per_s": round(st["tokens"] / total, 1) if total else None,
        "memory_actor_seconds": round(st["memory_seconds"], 2),
        "object_store_peak_mb": res["object_store_peak_mb"], "spilled_mb": res["spilled_mb"],
        "object_store_samples": res.get("store_samples"),
        "index_build_seconds": phases.get("index"),
        "store_bytes": {d.name: _du(d) for d in sorted(store.iterdir())} if store.exists() else {},
        "corpus_bytes": _du(corpus), "documents": st["documents"], "units": st["units"], "chunks": st["chunks"],
        "driver_peak_rss_mb_after_phase": res.get("driver_peak_rss_mb_after_phase"),
        "ray_start_seconds": res["ray_start_seconds"], "driver_process_seconds": round(wall, 2),
        "corpus_generation_seconds": round(gen_seconds, 2), "corpus": corpus_info,
        "settings": {"unit_tokens": args.unit_tokens, "ratio": args.ratio, "shards": args.shards,
                     "num_cpus": args.num_cpus, "index": "ivf nlist 64", "path": "ray-data"},
    }
    if not args.keep:
        import shutil

        shutil.rmtree(store, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, help="corpus size in memory-model tokens (estimated when generating)")
    p.add_argument("--work", help="work folder (models, corpus, store, logs); default a new temp folder")
    p.add_argument("--unit-tokens", type=int, default=8192, help="pack.unit_tokens (default the job's 8192)")
    p.add_argument("--ratio", type=int, default=8, help="memory compression ratio")
    p.add_argument("--shards", type=int, default=4, help="index shards")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--keep", action="store_true", help="keep the store after the run")
    p.add_argument("--driver", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.driver:
        driver_main(*args.driver, num_cpus=args.num_cpus)
        return 0
    if not args.tokens:
        p.error("--tokens is required")
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
