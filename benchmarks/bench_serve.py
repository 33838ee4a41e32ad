"""Load, latency and fault benchmark of the memorag Serve application, on loopback only.

What it does (bounded in time: every phase has a duration, every request a timeout):

1. Makes sure the store holds a published collection (``--collection``, default ``facts``); with ``--build`` (or
   when it is missing) the memorize job publishes the six-document facts corpus of the tests into it.
2. Starts a local Ray and Serve on 127.0.0.1 (``jobs.serve.start_serve``), no auth (loopback), with the
   generator named by ``--generator`` (``hf:`` transformers, ``vllm:`` vLLM engine; embedded SmolLM2 by default).
3. For each ``--clients`` level: that many concurrent clients ask memorag-task questions for ``--duration``
   seconds (429 answers are honoured: the client sleeps Retry-After). Reports requests/s (answered), p50/p99 of
   the end-to-end latency and of each stage (route, clues, retrieve, generate) from the response's ``timings``,
   and the status counts (5xx must be 0).
4. With ``--flood``: API keys on; the largest ``--clients`` level of real clients (with a valid key) queries for
   ``--duration`` seconds alone, then again while ``--flood-connections`` connections send requests with a fresh
   random key each as fast as they can. Reports the real clients' errors (any status but 200) and p50 in both
   phases, their ratio, and the flood's rate and statuses (401 expected).
5. With ``--kill-at S``: a fault phase at the highest level: S seconds in, the memory worker's replica process is
   SIGKILLed; Serve's controller starts a new one. Reports the failed requests (5xx, connection errors) during
   the gap, the gap (kill -> first answered memorag request after the kill), and that requests recovered without
   anyone restarting anything.

Results go to stdout and ``--json``. The same command runs on a GPU machine (``--device cuda --generator
vllm:<model> --stage-gpus 0.3``; more replicas via ``--config``).

    python benchmarks/bench_serve.py --store /tmp/bench-store --generator hf: --clients 1 8 64 --duration 60 \\
        --kill-at 20 --json runs/serve-hf.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

logger = logging.getLogger("bench_serve")

QUESTIONS = [
    "Who built the lighthouse of Varnholm?",
    "When did the lighthouse lamp stop burning whale oil?",
    "How old is the oldest tree in the Pellam orchard?",
    "What drives the cider press behind the barn?",
    "Who discovered the comet Ilves-7?",
    "What size is the telescope at Kestrel Ridge?",
    "When did the Marrow Valley railway close to freight?",
    "What is the name of the last steam locomotive?",
    "Where does the bakery's sourdough starter come from?",
    "When are the cardamom buns sold?",
    "How much of its length has the Sorvik glacier lost?",
    "Who measures the glacier front every August?",
]
STAGES = ("route", "clues", "retrieve", "rerank", "generate", "total")


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def ensure_collection(store: str, name: str, build: bool) -> str:
    """The live version of ``name`` in ``store``; published from the facts corpus when missing or asked."""
    from memorag_core.store import CollectionStore

    live = CollectionStore(store).current_version(name)
    if live and not build:
        return live
    from jobs.memorize import run_memorize_job
    from tests.fixtures.collections import facts_job_config, write_facts_corpus

    corpus = write_facts_corpus(Path(store).parent / "bench-corpus.jsonl")
    return run_memorize_job(facts_job_config(corpus, store, None, collection=name, window=128)).version


class Recorder:
    """Outcomes of the requests of one phase: status codes, plus ``conn`` (connection refused/reset: counted as
    server errors) and ``timeout`` (the client's own deadline: overload, reported apart)."""

    def __init__(self) -> None:
        self.ok: list[tuple[float, float, dict]] = []  # (end time, latency, timings)
        self.status: dict[str, int] = {}
        self.failures: list[float] = []  # end times of 5xx and connection errors

    def add(self, code: str, end: float, latency: float, timings: dict | None = None) -> None:
        self.status[code] = self.status.get(code, 0) + 1
        if code == "200":
            self.ok.append((end, latency, timings or {}))
        elif code.startswith("5") or code == "conn":
            self.failures.append(end)


async def client_loop(url: str, body_base: dict, deadline: float, rec: Recorder, timeout: float,
                      headers: dict | None = None) -> None:
    async with httpx.AsyncClient(timeout=timeout, headers=headers or {}) as client:
        while time.monotonic() < deadline:
            body = {**body_base, "query": random.choice(QUESTIONS)}
            t0 = time.monotonic()
            try:
                r = await client.post(url, json=body)
                code = str(r.status_code)
            except httpx.TimeoutException:  # the client gave up (--timeout): overload, not a server error
                r, code = None, "timeout"
            except httpx.HTTPError:
                r, code = None, "conn"
            end = time.monotonic()
            rec.add(code, end, end - t0, r.json().get("timings") if code == "200" else None)
            if code in ("429", "503") and r is not None:
                await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), max(0.0, deadline - end)))
            elif code == "conn":
                await asyncio.sleep(0.5)


def memory_worker_pids() -> list[int]:
    """PIDs of the live MemoryWorker replica actors."""
    import ray
    from ray.util.state import list_actors

    # this process's Ray (another Ray on the machine would make the address ambiguous)
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                         limit=1000)
    return [a.pid for a in actors if "MemoryWorker" in (a.class_name or "") and a.pid]


async def flood_loop(url: str, deadline: float, counts: dict) -> None:
    """Requests with a fresh random well-formed key each, as fast as one connection allows, until ``deadline``."""
    import secrets

    body = json.dumps({"query": "flood", "task": "qa", "max_new_tokens": 1}).encode()
    async with httpx.AsyncClient(timeout=30) as client:
        while time.monotonic() < deadline:
            key = f"mrg_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
            try:
                r = await client.post(url, content=body, headers={"Authorization": f"Bearer {key}",
                                                                  "content-type": "application/json"})
                code = str(r.status_code)
            except httpx.HTTPError:
                code = "conn"
                await asyncio.sleep(0.05)
            counts[code] = counts.get(code, 0) + 1


async def run_phase(url: str, clients: int, duration: float, body: dict, timeout: float,
                    kill_at: float | None = None, headers: dict | None = None, flood: int = 0) -> dict:
    rec = Recorder()
    flooded: dict = {}
    start = time.monotonic()
    deadline = start + duration
    kill_info: dict = {}

    async def killer():
        await asyncio.sleep(kill_at)
        pids = await asyncio.to_thread(memory_worker_pids)
        kill_info["t_kill"] = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        kill_info["pids"] = pids
        logger.info("killed memory worker replica(s) %s at %.1f s", pids, kill_info["t_kill"] - start)

    tasks = [client_loop(url, body, deadline, rec, timeout, headers) for _ in range(clients)]
    tasks += [flood_loop(url, deadline, flooded) for _ in range(flood)]
    if kill_at is not None:
        tasks.append(killer())
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    lat = [x[1] for x in rec.ok]
    out = {
        "clients": clients, "seconds": round(elapsed, 1), "answered": len(rec.ok),
        "requests_per_s": round(len(rec.ok) / elapsed, 3), "status": rec.status,
        "latency_s": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99)},
        "stages_s": {s: {"p50": pct([t[2][s] for t in rec.ok if s in t[2]], 0.5),
                         "p99": pct([t[2][s] for t in rec.ok if s in t[2]], 0.99)} for s in STAGES},
        "server_errors": sum(v for k, v in rec.status.items() if k.startswith("5") or k == "conn"),
        "client_timeouts": rec.status.get("timeout", 0),
        "errors": sum(v for k, v in rec.status.items() if k != "200"),
    }
    if flood:
        sent = sum(flooded.values())
        out["flood"] = {"connections": flood, "sent": sent, "per_s": round(sent / elapsed, 1), "status": flooded}
    if kill_at is not None and "t_kill" in kill_info:
        t_kill = kill_info["t_kill"]
        after = [e for e, _, _ in rec.ok if e > t_kill]
        # A request sent after the kill that was answered had its clues written by the new replica.
        fresh = [e for e, lat, _ in rec.ok if e - lat > t_kill]
        recovered = min(fresh) if fresh else None
        out["fault"] = {
            "killed_pids": kill_info["pids"], "kill_at_s": round(t_kill - start, 1),
            "failed_during_gap": sum(1 for e in rec.failures if e >= t_kill and (recovered is None or e <= recovered
                                                                                 + 5)),
            "failed_total": len(rec.failures),
            "gap_s": round(recovered - t_kill, 1) if recovered else None,
            "answered_after_kill": len(after), "answered_sent_after_kill": len(fresh), "recovered": bool(fresh),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="store folder (the facts collection is published if missing)")
    ap.add_argument("--collection", default="facts")
    ap.add_argument("--build", action="store_true", help="publish a fresh version first")
    ap.add_argument("--generator", default="hf:", help="generator spec: hf:, vllm:, hf:<model>, vllm:<model>")
    ap.add_argument("--device", default="cpu", help="memory model, embedder and transformers generator device")
    ap.add_argument("--stage-gpus", type=float, default=0.0, help="GPUs per memory/retriever/generator replica "
                    "(on one GPU: e.g. 0.3; Ray hides GPUs from replicas that reserve none)")
    ap.add_argument("--config", default=None, help="a Serve config file (replicas, resources); flags override")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per level")
    ap.add_argument("--kill-at", type=float, default=None, help="fault phase: kill the memory worker after S s")
    ap.add_argument("--fault-duration", type=float, default=60.0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--clue-tokens", type=int, default=16)
    ap.add_argument("--units", type=int, default=1)
    ap.add_argument("--task", default="memorag", choices=["memorag", "qa"], help="the real clients' task")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--plan", default=None, help="a JSON file of retrieval plan settings (the serve config's "
                    "retriever.plan), e.g. {\"text_clues\": true, \"rerank_candidates\": 0} for the clue path")
    ap.add_argument("--max-in-flight", type=int, default=32, help="per ingress replica (429 beyond)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--ray-address", default=None, help="join this Ray cluster (loopback) instead of a new one")
    ap.add_argument("--port", type=int, default=0, help="HTTP port (0: a free one)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    ap.add_argument("--flood", action="store_true", help="flood phase: with API keys on, --clients' largest "
                    "level of real clients queries alone, then again while --flood-connections send random keys")
    ap.add_argument("--flood-connections", type=int, default=16, help="connections sending random keys")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would cost the flood its CPU
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    # A private Ray: its own temp folder (short: unix socket paths) and auth token, apart from other Rays here.
    import secrets
    import tempfile

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="mrg-bench-", dir="/tmp"))
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from jobs.serve import app_config, start_serve
    from tests.fixtures.ray_cluster import free_port

    env = {k: os.environ[k] for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    for attempt in range(5):  # Ray gives a starting node 30 s to register; a loaded machine can miss that
        try:
            ray.init(address=args.ray_address, num_cpus=None if args.ray_address else args.num_cpus,
                     include_dashboard=None if args.ray_address else True, dashboard_host="127.0.0.1",
                     log_to_driver=False, runtime_env={"env_vars": env})
            break
        except Exception as exc:  # noqa: BLE001 - retried, then raised
            logger.warning("ray.init failed (attempt %d): %s", attempt + 1, exc)
            ray.shutdown()
            if attempt == 4:
                raise
            time.sleep(10)
    results_load = os.getloadavg()
    t0 = time.perf_counter()
    version = ensure_collection(args.store, args.collection, args.build)
    build_s = time.perf_counter() - t0
    small = {"num_cpus": 0.25}
    gen: dict = {"spec": args.generator, "device": args.device, "deployment": {**small,
                                                                               "max_ongoing_requests": 64}}
    if args.generator.startswith("vllm:"):
        # In-process engine (no spawned worker re-importing vLLM), eager mode: see ENVIRONMENT.md / the vLLM tests.
        gen.update(max_model_len=2048, engine_kwargs={"enforce_eager": True, "distributed_executor_backend": "uni"})
        gen["deployment"]["env_vars"] = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if args.device.startswith("cuda"):  # share the GPU with the memory model and the embedder
            gen["engine_kwargs"] = {"gpu_memory_utilization": 0.5}
    if args.stage_gpus:
        gen["deployment"]["num_gpus"] = args.stage_gpus
    gpu = {"num_gpus": args.stage_gpus} if args.stage_gpus else {}
    over = {
        "limits": {"max_in_flight": args.max_in_flight, "max_new_tokens": max(64, args.max_new_tokens)},
        "ingress": {"deployment": {**small, "max_ongoing_requests": args.max_in_flight * 2 + 8}},
        "memory": {"device": args.device, "deployment": {**small, **gpu, "max_ongoing_requests": 64}},
        "retriever": {"device": args.device, "deployment": {**small, **gpu, "max_ongoing_requests": 64},
                      **({"plan": json.loads(Path(args.plan).read_text())} if args.plan else {})},
        "generator": gen,
    }
    cfg = app_config(args.store, host="127.0.0.1", config_file=args.config, no_auth=not args.flood, overrides=over)
    headers = None
    if args.flood:
        from memorag_core.store.keys import ApiKeyStore

        headers = {"Authorization": f"Bearer {ApiKeyStore(args.store).create(args.collection, 'bench')[1]}"}
    port = args.port or free_port()
    t0 = time.perf_counter()
    base = start_serve(cfg, port=port)
    start_s = time.perf_counter() - t0
    url = f"{base}/v1/collections/{args.collection}/query"
    body = {"task": args.task, "max_new_tokens": args.max_new_tokens, "units": args.units, "top_k": args.top_k,
            "clue_max_new_tokens": args.clue_tokens}
    warm = httpx.post(url, json={**body, "query": QUESTIONS[0]}, timeout=args.timeout, headers=headers)
    warm.raise_for_status()
    results = {"generator": args.generator, "device": args.device, "collection": args.collection,
               "version": version, "build_s": round(build_s, 1), "serve_start_s": round(start_s, 1),
               "request": body, "load_average_at_start": [round(x, 1) for x in results_load], "levels": []}
    if args.flood:
        n = max(args.clients)
        alone = asyncio.run(run_phase(url, n, args.duration, body, args.timeout, headers=headers))
        flooded = asyncio.run(run_phase(url, n, args.duration, body, args.timeout, headers=headers,
                                        flood=args.flood_connections))
        p50 = alone["latency_s"]["p50"], flooded["latency_s"]["p50"]
        results["flood"] = {"alone": alone, "flooded": flooded, "load_average_after": [
            round(x, 1) for x in os.getloadavg()], "p50_ratio": round(p50[1] / p50[0], 2) if all(p50) else None}
        logger.info("flood: %s", json.dumps(results["flood"]))
    for n in ([] if args.flood else args.clients):
        r = asyncio.run(run_phase(url, n, args.duration, body, args.timeout, headers=headers))
        r["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
        logger.info("clients=%d: %s", n, json.dumps(r))
        results["levels"].append(r)
    if args.kill_at is not None:
        n = max(args.clients)
        results["fault"] = asyncio.run(run_phase(url, n, args.fault_duration, body, args.timeout,
                                                 kill_at=args.kill_at, headers=headers))
        logger.info("fault: %s", json.dumps(results["fault"]))
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    bad = sum(lv["server_errors"] for lv in results["levels"])
    if "flood" in results:
        bad += results["flood"]["flooded"]["errors"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
