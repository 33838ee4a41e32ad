"""Memory-stage throughput with 1 and with 2 CPU actors, in one run, on this machine.

Runs the memory stage (pipeline.memory_stage.MemoryStage, through Ray Data with an ActorPoolStrategy) over the
same units twice, into two fresh stores (so nothing is cached), with ``concurrency`` 1 then 2, and reports
memory-model tokens per second of wall time for each (actor start-up and model load included), and their ratio
(goal >= 1.8x on 2 free cores); ``compute_tokens_per_s`` is the in-actor rate (start-up excluded, assumes the
actors are evenly loaded), which shows whether the actors slow each other down.

    python benchmarks/bench_memorize_actors.py --units 16 --unit-chars 6000 [--model PATH] [--json out.json]

Default model: the embedded SmolLM2-135M-Instruct. Each actor gets 1 CPU and torch uses 1 thread per actor, so
the comparison measures scaling across actors, not intra-op threading.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

logger = logging.getLogger("bench_memorize_actors")


def run(units: int, unit_chars: int, model: str | None, actors: int, store: str) -> dict:
    """Memorize ``units`` synthetic units with ``actors`` actors; returns tokens, seconds, tokens/s."""
    import pyarrow as pa
    import ray.data
    from ray.data import ActorPoolStrategy

    from pipeline.config import MemoryStageConfig, RouterConfig
    from pipeline.memory_stage import MemoryStage

    words = "river stone lantern harbor orchard meadow signal copper violet engine garden winter".split()
    texts = [" ".join(words[(u * 5 + k * k) % len(words)] for k in range(unit_chars // 6)) + f" unit {u} {store}"
             for u in range(units)]
    rows = [{"pack_key": str(u), "text": t, "n_tokens": 0, "members": "[]", "doc_ids": [str(u)]}
            for u, t in enumerate(texts)]
    cfg = MemoryStageConfig(memory={"model": model, "load": {"device": "cpu"}}, concurrency=actors, num_cpus=1)
    # One block per unit, built here: a repartition (a CPU task) could never run while 2 actors hold both CPUs.
    table = pa.Table.from_pylist(rows)
    ds = ray.data.from_arrow([table.slice(k, 1) for k in range(units)])
    t0 = time.perf_counter()
    out = ds.map_batches(MemoryStage, fn_constructor_args=(cfg, RouterConfig(gist="cheap"), store),
                         compute=ActorPoolStrategy(size=actors), batch_size=1, num_cpus=1,
                         batch_format="pyarrow").take_all()
    seconds = time.perf_counter() - t0
    tokens = sum(r["raw_tokens"] for r in out)
    actor_seconds = sum(r["seconds"] for r in out)
    return {"actors": actors, "units": len(out), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "actor_seconds": round(actor_seconds, 2),
            # in-actor rate: tokens per second of memorizing, summed over actors (actor start-up excluded)
            "compute_tokens_per_s": round(actors * tokens / actor_seconds, 1)}


def main() -> None:
    """Parse flags, run 1 then 2 actors, print and optionally save the results."""
    import ray

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--units", type=int, default=16)
    p.add_argument("--unit-chars", type=int, default=6000)
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(json.dumps({"loadavg_before": list(os.getloadavg())}))
    ray.init(num_cpus=2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    # warm-up: first model load and first forward in a process are several times slower
    with tempfile.TemporaryDirectory() as d:
        run(2, 1000, args.model, 1, d)
    results = []
    for actors in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            results.append(run(args.units, args.unit_chars, args.model, actors, d))
            logger.info("%s", results[-1])
    speedup = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
    compute = results[1]["compute_tokens_per_s"] / results[0]["compute_tokens_per_s"]
    report = {"results": results, "speedup_2_vs_1": round(speedup, 2),
              "compute_speedup_2_vs_1": round(compute, 2), "loadavg_after": list(os.getloadavg())}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
