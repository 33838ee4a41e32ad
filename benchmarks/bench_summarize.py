"""Bulk summarization throughput with the embedded models on this machine: batched vs one unit at a time, and the
seconds of a rerun with nothing new.

1. memorize ``--units`` English excerpts of harry_potter.txt (one unit each) with the embedded SmolLM2-135M into a
   fresh store (the real memorize job, cheap gists);
2. summarize the collection with ``--batch-size B`` (one batched generation per B units), then again from scratch
   (the summaries namespace removed) with batch size 1, alternating ``--repeats`` times;
3. rerun with nothing new, in process and as ``python -m jobs.summarize`` (imports included).

Prints one JSON line per run and a Markdown table. ``summaries/min`` counts unit and reduce summaries written per
minute of wall time (actor start-up included); ``unit s (in-actor)`` is the mean per unit from the staged records
(key points + retrieval + its share of the batched generation).

    python benchmarks/bench_summarize.py --units 8 --batch-size 8 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_collection(store: str, units: int, chars: int) -> str:
    from jobs.memorize import run_memorize_job
    from pipeline.config import MemorizeJobConfig

    text = (ROOT.parent / "shared" / "data" / "harry_potter.txt").read_text(encoding="utf-8")
    if not text:
        raise SystemExit("harry_potter.txt not found beside the checkout")
    corpus = Path(store).parent / "corpus.jsonl"
    step = len(text) // (units + 1)
    corpus.write_text("".join(json.dumps({"doc_id": f"part-{i:03d}",
                                          "text": " ".join(text[(i + 1) * step:(i + 1) * step + chars].split())})
                              + "\n" for i in range(units)))
    cfg = MemorizeJobConfig.model_validate({
        "corpus": {"url": str(corpus)}, "store": store, "collection": "bench",
        "pack": {"unit_tokens": 1024, "boundary_every": 1},
        "memory_stage": {"memory": {"ratio": 4, "window": 256, "load": {"device": "cpu"}}, "num_cpus": 1},
        "chunk_embed": {"chunk_tokens": 128, "num_cpus": 1}, "index": {"shards": 1},
        "router": {"gist": "cheap"}})
    return run_memorize_job(cfg).version


def summarize(store: str, batch_size: int, args) -> dict:
    from jobs.summarize import SummarizeJobConfig, run_summarize_job
    from memorag_core.store.summaries import SummaryStore

    cfg = SummarizeJobConfig.model_validate({
        "store": store, "collection": "bench", "generator": args.generator, "key_point_tokens": args.key_point_tokens,
        "top_k": 3, "max_new_tokens": args.max_new_tokens, "reduce_max_new_tokens": args.max_new_tokens,
        "batch_size": batch_size, "num_cpus": 1, "device": "cpu"})
    t0 = time.perf_counter()
    stats = run_summarize_job(cfg, echo=lambda s: None)
    wall = time.perf_counter() - t0
    s = SummaryStore(store)
    recs = [s.staged("units", k) for k in s.staged_keys("units")]
    return {"batch_size": batch_size, "wall_s": round(wall, 1), "units": stats.units_summarized,
            "reduce_steps": stats.reduce_steps, "generated_tokens": stats.generated_tokens,
            "summaries_per_min": round(stats.summaries_per_minute, 2),
            "unit_summaries_per_min": round(60 * stats.units_summarized / wall, 2),
            "unit_s_in_actor": round(statistics.mean(r["seconds"] for r in recs), 2) if recs else None,
            "nothing_to_do": stats.nothing_to_do}


def in_process(args) -> None:
    """The summarize stage itself, no Ray: one UnitSummaryStage (the actor's object) in this process over every
    unit of an existing collection, batched vs one unit per call, after a warm-up call; then the reduce of the
    unit summaries."""
    import pyarrow as pa

    from jobs.summarize import resolve_generator
    from memorag_core.store import CollectionStore
    from memorag_core.store.summaries import content_key
    from pipeline.summarize_stage import UnitSummaryStage

    store = CollectionStore(args.store)
    version = store.current_version(args.collection)
    m = store.read_manifest(args.collection, version)
    mem_cfg = dict((m.config.get("memory_stage") or {}).get("memory") or {})
    spec, model_name, _ = resolve_generator(args.generator, mem_cfg, m.models.get("memory"))
    settings = {"key_point_tokens": args.key_point_tokens, "top_k": 3, "max_new_tokens": args.max_new_tokens,
                "reduce_max_new_tokens": args.max_new_tokens, "fan_in": 8, "reduce_max_chars": 6000}
    units = sorted(m.units)[: args.units]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    stage = UnitSummaryStage(store.url, None, args.collection, version, settings, spec, model_name, "cpu",
                             args.batch_size)
    print(json.dumps({"stage_init_s": round(time.perf_counter() - t0, 1), "units": len(units),
                      "generator": model_name}), flush=True)

    def call(ids):
        t, c = time.perf_counter(), time.process_time()
        out = stage(pa.table({"unit_id": ids, "key": [content_key("bench", u, time.time()) for u in ids]}))
        return time.perf_counter() - t, time.process_time() - c, out

    call(units[:1])  # warm-up: a process's first decode is several times slower
    rows = []
    for _ in range(args.repeats):
        for bs in (args.batch_size, 1):
            total, cpu, tokens = 0.0, 0.0, 0
            for i in range(0, len(units), bs):
                dt, dc, out = call(units[i:i + bs])
                total += dt
                cpu += dc
                tokens += sum(out.column("generated_tokens").to_pylist())
            r = {"batch_size": bs, "units": len(units), "seconds": round(total, 1), "cpu_s": round(cpu, 1),
                 "unit_summaries_per_min": round(60 * len(units) / total, 2),
                 "unit_summaries_per_cpu_min": round(60 * len(units) / cpu, 2), "generated_tokens": tokens}
            rows.append(r)
            print(json.dumps(r), flush=True)
    texts = [(["summary of a unit " * 20] * min(8, len(units)), "en")]
    t = time.perf_counter()
    stage.summarizer.reduce(args.collection, version, texts * 2)
    print(json.dumps({"reduce_2_prompts_batched_s": round(time.perf_counter() - t, 1)}), flush=True)
    print("\n| mode | batch | units | wall s | CPU s | unit summaries/min (wall) | per CPU-min | tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'batched' if r['batch_size'] > 1 else 'one at a time'} | {r['batch_size']} | {r['units']} | "
              f"{r['seconds']} | {r['cpu_s']} | {r['unit_summaries_per_min']} | {r['unit_summaries_per_cpu_min']} | "
              f"{r['generated_tokens']} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=8)
    p.add_argument("--chars", type=int, default=1500, help="characters per unit (~350 tokens at 1500)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--key-point-tokens", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--generator", default="memory", help="memory | auto | vllm: | hf:PATH")
    p.add_argument("--store", help="store folder (default: a temporary one)")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--in-process", action="store_true",
                   help="no Ray: time the summarize stage in this process over --store/--collection")
    p.add_argument("--collection", default="bench")
    p.add_argument("--threads", type=int, default=0, help="torch threads (--in-process; 0 = torch's default)")
    args = p.parse_args()
    if args.in_process:
        return in_process(args)

    import ray

    env = {"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}
    for attempt in range(10):  # a loaded machine can miss Ray's fixed 30 s raylet start-up window
        try:
            if args.ray_address:
                ray.init(address=args.ray_address, log_to_driver=False, runtime_env=env)
            else:
                ray.init(num_cpus=2, log_to_driver=False, runtime_env=env)
            break
        except Exception as exc:  # noqa: BLE001
            print(json.dumps({"ray_init_failed": str(exc)[:200], "attempt": attempt}), flush=True)
            ray.shutdown()
            time.sleep(20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = Path(tempfile.mkdtemp(prefix="bench-summ-"))
    store = args.store or str(tmp / "store")
    t0 = time.perf_counter()
    version = make_collection(store, args.units, args.chars)
    print(json.dumps({"memorize_s": round(time.perf_counter() - t0, 1), "version": version}), flush=True)
    runs = []
    for _ in range(args.repeats):
        for bs in (args.batch_size, 1):
            shutil.rmtree(Path(store) / "summaries", ignore_errors=True)
            r = summarize(store, bs, args)
            runs.append(r)
            print(json.dumps(r), flush=True)
    rerun = summarize(store, args.batch_size, args)
    print(json.dumps({"rerun_in_process": rerun}), flush=True)
    ray.shutdown()
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "jobs.summarize", "--collection", "bench", "--store", store,
                          "--generator", args.generator, "--key-point-tokens", str(args.key_point_tokens),
                          "--top-k", "3", "--max-new-tokens", str(args.max_new_tokens), "--reduce-max-new-tokens",
                          str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--actor-cpus", "1",
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    cli_s = time.perf_counter() - t0
    print(json.dumps({"rerun_cli_s": round(cli_s, 2), "rc": out.returncode, "stdout": out.stdout.strip()}),
          flush=True)
    print("\n| run | batch | wall s | unit summaries | reduce | summaries/min | unit summaries/min | unit s in actor |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {'batched' if r['batch_size'] > 1 else 'one at a time'} | {r['batch_size']} | {r['wall_s']} | "
              f"{r['units']} | {r['reduce_steps']} | {r['summaries_per_min']} | {r['unit_summaries_per_min']} | "
              f"{r['unit_s_in_actor']} |")
    print(f"\nrerun with nothing new: {rerun['wall_s']} s in process, {cli_s:.1f} s as `python -m jobs.summarize`")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
