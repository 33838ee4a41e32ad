"""Memory-stage throughput with 1 and with 2 CPU actors, in one run, on this machine.

Runs the memory stage (pipeline.memory_stage.MemoryStage, through Ray Data with an ActorPoolStrategy, exactly as
jobs/memorize.py wires it) over the same units with ``concurrency`` 1 and 2, each time into a fresh store (so
nothing is cached). The two settings alternate (1, 2, 1, 2, ...) ``--repeats`` times so that a noisy neighbour
hits both, and the medians are compared. Three rates per run, all in memory-model tokens per second:

``tokens_per_s``
    end to end: tokens / wall time of the whole ``map_batches`` (actor start-up and model load included);
``stage_tokens_per_s``
    steady state: tokens / (last unit finished - first unit started); actor start-up excluded, but load imbalance,
    idle actors, Ray's scheduling and store writes included. For a corpus of millions of tokens this is the rate
    that matters (start-up is paid once per job);
``compute_tokens_per_s``
    inside the actors: tokens / seconds spent memorizing, times the number of actors (assumes even load); shows
    whether the actors slow each other down (shared caches, memory bandwidth).

Each run also says who used the CPUs in its steady-state window (``cpu``: cores used on average by the actors, the
driver, Ray Data's helper actors, Ray's own daemons and everything else; ``benchmarks/cpu_accounting.py``): on a
2-core machine, whatever is not left to the two actors bounds the 2-vs-1 ratio.

    python benchmarks/bench_memorize_actors.py --units 12 --unit-chars 9000 --repeats 2 \\
        [--window 1024] [--pin-cpus] [--json out.json]

Default model: the embedded SmolLM2-135M-Instruct. Each actor gets 1 CPU and torch uses 1 thread per actor, so
the comparison measures scaling across actors, not intra-op threading.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time

import pyarrow as pa

from cpu_accounting import CpuSampler  # benchmarks/ is on sys.path when this file runs as a script
from pipeline.memory_stage import MemoryStage

logger = logging.getLogger("bench_memorize_actors")


class TimedMemoryStage(MemoryStage):
    """The job's memory stage, with wall-clock start and end of each unit added to its row (benchmark only: the
    job's rows stay free of timestamps so that published artifacts are reproducible)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.time()
        out = super().__call__(batch)
        n = out.num_rows
        end = time.time()
        return (out.append_column("t_start", pa.array([start] * n)).append_column("t_end", pa.array([end] * n))
                .append_column("pinned", pa.array([str(self.pinned)] * n)))


def run(units: int, unit_chars: int, model: str | None, window: int, actors: int, store: str,
        pin_cpus: bool = False, sampler: CpuSampler | None = None) -> dict:
    """Memorize ``units`` synthetic units with ``actors`` actors; returns tokens, seconds and the three rates."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from pipeline.config import MemoryStageConfig, RouterConfig

    words = "river stone lantern harbor orchard meadow signal copper violet engine garden winter".split()
    texts = [" ".join(words[(u * 5 + k * k) % len(words)] for k in range(unit_chars // 6)) + f" unit {u} {store}"
             for u in range(units)]
    rows = [{"pack_key": str(u), "text": t, "n_tokens": 0, "members": "[]", "doc_ids": [str(u)]}
            for u, t in enumerate(texts)]
    cfg = MemoryStageConfig(memory={"model": model, "window": window, "load": {"device": "cpu"}},
                            concurrency=actors, num_cpus=1, pin_cpus=pin_cpus)
    # One block per unit, built here: a repartition (a CPU task) could never run while 2 actors hold both CPUs.
    table = pa.Table.from_pylist(rows)
    ds = ray.data.from_arrow([table.slice(k, 1) for k in range(units)])
    t0 = time.perf_counter()
    out = ds.map_batches(TimedMemoryStage, fn_constructor_args=(cfg, RouterConfig(gist="cheap"), store),
                         compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=cfg.max_tasks_in_flight),
                         batch_size=cfg.batch_size, num_cpus=cfg.num_cpus, batch_format="pyarrow").take_all()
    seconds = time.perf_counter() - t0
    tokens = sum(r["raw_tokens"] for r in out)
    actor_seconds = sum(r["seconds"] for r in out)
    first, last = min(r["t_start"] for r in out), max(r["t_end"] for r in out)
    span = last - first
    cpu = sampler.usage(first, last) if sampler is not None else None
    return {"actors": actors, "units": len(out), "tokens": tokens, "seconds": round(seconds, 2),
            "stage_seconds": round(span, 2), "tokens_per_s": round(tokens / seconds, 1),
            "stage_tokens_per_s": round(tokens / span, 1), "actor_seconds": round(actor_seconds, 2),
            "compute_tokens_per_s": round(actors * tokens / actor_seconds, 1),
            "pinned_cores": sorted({r["pinned"] for r in out}), "cpu": cpu}


def summarize(results: list[dict]) -> dict:
    """Medians per actor count and the 2-vs-1 ratios of each rate."""
    med = {}
    for actors in (1, 2):
        runs = [r for r in results if r["actors"] == actors]
        med[actors] = {k: round(statistics.median(r[k] for r in runs), 1)
                       for k in ("tokens_per_s", "stage_tokens_per_s", "compute_tokens_per_s")}
    ratios = {f"{k}_2_vs_1": round(med[2][k] / med[1][k], 2) for k in med[1]}
    cores = {}
    for actors in (1, 2):
        runs = [r["cpu"]["groups"] for r in results if r["actors"] == actors and r.get("cpu")]
        if runs:
            cores[actors] = {g: round(statistics.median(r[g]["cores"] for r in runs), 3) for g in runs[0]}
    out = {"median_1_actor": med[1], "median_2_actors": med[2], **ratios}
    if cores:
        out["median_cores_by_group"] = cores
    return out


def main() -> None:
    """Parse flags, alternate 1 and 2 actors, print and optionally save the results."""
    import ray

    from memorag_core.memory import MemoryConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--units", type=int, default=12)
    p.add_argument("--unit-chars", type=int, default=9000, help="characters per unit (~6 per token)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each actor count, alternating")
    p.add_argument("--window", type=int, default=MemoryConfig().window, help="memory prefill window (tokens)")
    p.add_argument("--pin-cpus", action="store_true", help="memory_stage.pin_cpus: one core per actor")
    p.add_argument("--model", default=None)
    p.add_argument("--cpu-interval", type=float, default=1.0, help="seconds between CPU-accounting samples")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(json.dumps({"loadavg_before": list(os.getloadavg())}))
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    # warm-up: first model load and first forward in a process are several times slower
    with tempfile.TemporaryDirectory() as d:
        run(2, 1000, args.model, args.window, 1, d)
    results = []
    with CpuSampler(interval=args.cpu_interval) as sampler:
        for _ in range(args.repeats):
            for actors in (1, 2):
                with tempfile.TemporaryDirectory() as d:
                    results.append(run(args.units, args.unit_chars, args.model, args.window, actors, d,
                                       args.pin_cpus, sampler))
                    logger.info("%s", results[-1])
    report = {"window": args.window, "pin_cpus": args.pin_cpus, "results": results, **summarize(results),
              "loadavg_after": list(os.getloadavg())}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
