"""Benchmark the artifact store: load time of a ~120K-token memory from local disk and loopback S3, against
torch.load of the same tensors in the same run, and bytes per token for each storage dtype.

The memory has the exact shape the compressed-KV memory of the embedded model (SmolLM2-135M-Instruct: 30 layers,
3 KV heads, head_dim 64, fp32) keeps for ``harry_potter.txt`` at ratio 4: the token count is measured with the
model's real tokenizer; the K/V values are random (memorizing the book on this CPU takes ~15 min, and load time
does not depend on the values). ``torch.load`` is only the baseline here, on a file this script writes.

Usage::

    python benchmarks/bench_store.py [--tokens N] [--ratio 4] [--repeats 3] [--no-s3] [--json out.json]

Local numbers are warm page cache (the file was just written); "materialize" adds one full pass over every
tensor, since a memory map defers reading until the data is touched.

Round trips (issue 23)::

    python benchmarks/bench_store.py --publish 50000 [--latency-ms 20] [--staged 5000] [--json out.json]

publishes a collection version of N units (the memorize job's publish: version files, manifest with every unit,
the unit check, the pointer swap) to a moto S3 server in a subprocess whose every request waits ``--latency-ms``
first (a WSGI wrapper around moto's app; requests are served in threads, so concurrent requests overlap as on
S3), and counts the requests by method. The units are written before the clock starts, with no latency. It also
times the summaries bookkeeping (``SummaryStore.staged_many`` over ``--staged`` records) and, on a sample, the
old one-request-per-unit paths (``has_unit`` per unit, one ``staged`` read per record) for comparison.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memorag_core.store import fs as sfs  # noqa: E402
from memorag_core.store.memory_file import MemoryTensors, load_memory, save_memory  # noqa: E402

logger = logging.getLogger("bench_store")
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64


def book_tokens() -> int | None:
    """Tokens of harry_potter.txt under the embedded model's tokenizer (None if the book or model is missing)."""
    book = Path(__file__).resolve().parents[2] / "shared" / "data" / "harry_potter.txt"
    try:
        from transformers import AutoTokenizer

        from memorag_core.models import embedded_lm_path

        tok = AutoTokenizer.from_pretrained(str(embedded_lm_path()))
        return len(tok(book.read_text(encoding="utf-8"))["input_ids"])
    except Exception as exc:  # noqa: BLE001 - fall back to the nominal size
        logger.warning("could not count the book's tokens (%s); using --tokens", exc)
        return None


def build_memory(tokens: int, ratio: int) -> MemoryTensors:
    entries = tokens // ratio
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(KV_HEADS, entries, HEAD_DIM, generator=g) for _ in range(LAYERS)]  # (3, entries, 64)
    values = [torch.randn(KV_HEADS, entries, HEAD_DIM, generator=g) for _ in range(LAYERS)]  # (3, entries, 64)
    header = {"model": "embedded:smollm2-135m-instruct", "kind": "compressed_kv", "ratio": ratio,
              "raw_tokens": tokens, "entries": entries, "dtype": "float32"}
    return MemoryTensors(keys=keys, values=values, header=header)


def materialize(m) -> float:
    keys, values = (m.keys, m.values) if isinstance(m, MemoryTensors) else (m["keys"], m["values"])
    return float(sum(t.sum() for t in keys) + sum(t.sum() for t in values))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def serve_moto(port: int) -> None:
    """Run moto's S3 app on 127.0.0.1:port behind a wrapper that delays and counts every request.

    ``POST /__bench/latency?ms=20`` sets the delay and resets the counts; ``GET /__bench/stats`` returns the
    counts by method as JSON (neither is counted or delayed).
    """
    import threading
    from collections import Counter
    from urllib.parse import parse_qs

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    state = {"delay": 0.0, "counts": Counter()}
    lock = threading.Lock()

    def wrapped(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/__bench/"):
            if path == "/__bench/fill":  # setup: objects put straight into moto's backend, no HTTP per object
                import base64

                from moto.core import DEFAULT_ACCOUNT_ID
                from moto.s3.models import s3_backends

                req = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
                backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
                data = base64.b64decode(req["data"])
                for key in req["keys"]:
                    backend.put_object(req["bucket"], key, data)
            if path == "/__bench/latency":
                with lock:
                    state["delay"] = float(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["0"])[0]) / 1000
                    state["counts"] = Counter()
            with lock:
                body = json.dumps({"delay_s": state["delay"], "counts": dict(state["counts"])}).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        with lock:
            state["counts"][environ.get("REQUEST_METHOD", "?")] += 1
            delay = state["delay"]
        if delay:
            time.sleep(delay)
        return app(environ, start_response)

    make_server("127.0.0.1", port, wrapped, threaded=True).serve_forever()


class LatencyS3:
    """A :func:`serve_moto` subprocess: ``endpoint``, ``storage_options()``, ``latency(ms)``, ``stats()``."""

    def __init__(self):
        import socket
        import subprocess

        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-moto-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-moto", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 300  # importing moto takes long on a loaded machine
        while True:
            try:
                httpx.get(f"{self.endpoint}/__bench/stats", timeout=1.0)
                break
            except httpx.HTTPError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"the latency moto server did not start; see {self.log.name}")
                time.sleep(0.1)

    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing",
                "config_kwargs": {"max_pool_connections": 64}}

    def latency(self, ms: float) -> None:
        import httpx

        httpx.post(f"{self.endpoint}/__bench/latency?ms={ms}", timeout=10).raise_for_status()

    def fill(self, bucket: str, keys: list[str], data: bytes) -> None:
        """Put ``data`` at every key of ``bucket`` inside the server (setup; not counted, no latency)."""
        import base64

        import httpx

        for k in range(0, len(keys), 10_000):
            httpx.post(f"{self.endpoint}/__bench/fill", timeout=600, json={
                "bucket": bucket, "keys": keys[k:k + 10_000], "data": base64.b64encode(data).decode()
            }).raise_for_status()

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"{self.endpoint}/__bench/stats", timeout=10).json()["counts"]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def bench_publish(n_units: int, latency_ms: float, n_staged: int, legacy_sample: int = 200) -> dict:
    """Publish a version of ``n_units`` units through the latency server; see the module docstring."""
    import s3fs

    from memorag_core.store import CollectionStore, Manifest
    from memorag_core.store.memory_file import encode_memory
    from memorag_core.store.summaries import SummaryStore, content_key

    server = LatencyS3()
    res: dict = {"units": n_units, "latency_ms": latency_ms, "staged": n_staged}
    try:
        opts = server.storage_options()
        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("bench")
        root = "s3://bench/store"
        g = torch.Generator().manual_seed(0)
        mem = MemoryTensors([torch.randn(1, 4, 8, generator=g)], [torch.randn(1, 4, 8, generator=g)],
                            {"model": "bench"})
        data = encode_memory(mem)
        side = json.dumps({"format": "memorag-unit-sidecar", "sha256": sfs.sha256_hex(data),
                           "nbytes": len(data), "storage_dtype": "keep", "header": {}}).encode()
        ids = [f"{i:064x}" for i in range(n_units)]
        t0 = time.perf_counter()
        server.fill("bench", [f"store/units/{u}/memory.safetensors" for u in ids], data)
        server.fill("bench", [f"store/units/{u}/memory.json" for u in ids], side)
        res["setup_s"] = round(time.perf_counter() - t0, 1)
        logger.warning("setup: %d units in %.1f s", n_units, res["setup_s"])
        store = CollectionStore(root, opts)
        unit_entry = {"sha256": sfs.sha256_hex(data), "nbytes": len(data), "storage_dtype": "keep"}

        server.latency(latency_ms)
        t0 = time.perf_counter()
        writer = store.new_version("bench")
        for s in range(4):
            writer.write_bytes(f"index/shard-{s:05d}.faiss", b"x" * 1000)
        t1 = time.perf_counter()
        writer.publish(Manifest(units={u: unit_entry for u in ids}))
        t2 = time.perf_counter()
        counts = server.stats()
        res["publish"] = {"seconds": round(t2 - t0, 2), "publish_call_s": round(t2 - t1, 2),
                          "requests": sum(counts.values()), "by_method": counts,
                          "requests_per_unit": round(sum(counts.values()) / n_units, 5)}
        logger.warning("publish: %s", res["publish"])

        server.latency(latency_ms)
        sample = ids[:legacy_sample]
        t0 = time.perf_counter()
        for u in sample:
            store.has_unit(u)
        dt = time.perf_counter() - t0
        counts = server.stats()
        res["legacy_has_unit"] = {"sample": len(sample), "seconds": round(dt, 2),
                                  "requests_per_unit": round(sum(counts.values()) / len(sample), 2),
                                  "extrapolated_s": round(dt / len(sample) * n_units, 1)}
        logger.warning("legacy has_unit: %s", res["legacy_has_unit"])

        if n_staged:
            summaries = SummaryStore(store)
            keys = [content_key("unit", u) for u in ids[:n_staged]]
            body = json.dumps({"summary": "s" * 400}).encode()
            base = "bench/store/summaries/staging/units"
            server.fill("bench", [f"{base[len('bench/'):]}/{key}.json" for key in keys], body)
            server.latency(latency_ms)
            t0 = time.perf_counter()
            got = summaries.staged_many("units", keys)
            dt = time.perf_counter() - t0
            counts = server.stats()
            res["staged_many"] = {"records": len(keys), "found": len(got), "seconds": round(dt, 2),
                                  "requests": sum(counts.values()),
                                  "requests_per_record": round(sum(counts.values()) / len(keys), 3)}
            logger.warning("staged_many: %s", res["staged_many"])
            server.latency(latency_ms)
            t0 = time.perf_counter()
            for key in keys[:legacy_sample]:
                summaries.staged("units", key)
            dt = time.perf_counter() - t0
            res["legacy_staged_one_by_one"] = {"sample": legacy_sample, "seconds": round(dt, 2),
                                               "extrapolated_s": round(dt / legacy_sample * len(keys), 1)}
    finally:
        server.stop()
    return res


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--serve-moto":
        serve_moto(int(sys.argv[2]))
        return {}
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=None, help="raw tokens (default: harry_potter.txt's count)")
    p.add_argument("--ratio", type=int, default=4, help="compression ratio (raw tokens per memory entry)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--no-s3", action="store_true", help="skip the loopback S3 server")
    p.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    p.add_argument("--publish", type=int, default=0, help="round-trip mode: publish a version of this many units")
    p.add_argument("--latency-ms", type=float, default=20.0, help="round-trip mode: delay per S3 request")
    p.add_argument("--staged", type=int, default=5000, help="round-trip mode: staged summary records to read")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.publish:
        res = bench_publish(args.publish, args.latency_ms, args.staged)
        print(json.dumps(res, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return res

    tokens = args.tokens or book_tokens() or 120_000
    m = build_memory(tokens, args.ratio)
    res: dict = {"tokens": tokens, "ratio": args.ratio, "entries_per_layer": tokens // args.ratio,
                 "memory_bytes_fp32": m.nbytes, "repeats": args.repeats, "bytes_per_token": {}, "load_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # bytes per token for each storage dtype
        for label, mem, storage in [
            ("fp32", m, None),
            ("bf16", MemoryTensors([k.bfloat16() for k in m.keys], [v.bfloat16() for v in m.values], m.header), None),
            ("fp16", MemoryTensors([k.half() for k in m.keys], [v.half() for v in m.values], m.header), None),
            ("int8", m, "int8"),
            ("fp8", m, "fp8"),
        ]:
            info = save_memory(mem, f"{tmp}/{label}.safetensors", storage_dtype=storage)
            res["bytes_per_token"][label] = round(info.nbytes / tokens, 1)
            if label == "bf16":
                del mem
        local = f"{tmp}/fp32.safetensors"
        sha = sfs.sha256_hex(Path(local).read_bytes())
        torch_path = f"{tmp}/baseline.pt"
        torch.save({"keys": m.keys, "values": m.values}, torch_path)

        r = res["load_s"]
        r["local safetensors (mmap)"] = timed(lambda: load_memory(local), args.repeats)
        r["local safetensors (mmap) + materialize"] = timed(lambda: materialize(load_memory(local)), args.repeats)
        r["local safetensors + sha256 verify"] = timed(lambda: load_memory(local, expected_sha256=sha), args.repeats)
        r["local int8 (dequantize to fp32)"] = timed(lambda: load_memory(f"{tmp}/int8.safetensors"), args.repeats)
        r["local torch.load"] = timed(lambda: torch.load(torch_path, weights_only=True), args.repeats)
        r["local torch.load + materialize"] = timed(
            lambda: materialize(torch.load(torch_path, weights_only=True)), args.repeats)
        r["local torch.load(mmap=True)"] = timed(lambda: torch.load(torch_path, weights_only=True, mmap=True),
                                                 args.repeats)

        if not args.no_s3:
            from tests.fixtures.s3 import MotoServer

            server = MotoServer(Path(tmp) / "moto")
            server.start()
            try:
                # moto assembles a GB-sized multipart upload for longer than the fixture's 20 s read timeout
                opts = server.storage_options(
                    config_kwargs={"connect_timeout": 5, "read_timeout": 900, "retries": {"max_attempts": 1}})
                bucket = server.make_bucket()
                url = f"s3://{bucket}/units/u/memory.safetensors"
                t0 = time.perf_counter()
                save_memory(m, url, storage_options=opts)
                res["s3 save_s"] = time.perf_counter() - t0
                fs, _ = sfs.open_url(url, opts)
                fs.put_file(torch_path, f"{bucket}/baseline.pt")
                r["s3 safetensors"] = timed(lambda: load_memory(url, storage_options=opts), args.repeats)
                r["s3 safetensors + sha256 verify"] = timed(
                    lambda: load_memory(url, expected_sha256=sha, storage_options=opts), args.repeats)
                r["s3 torch.load (cat_file + BytesIO)"] = timed(
                    lambda: torch.load(io.BytesIO(fs.cat_file(f"{bucket}/baseline.pt")), weights_only=True),
                    args.repeats)
            finally:
                server.stop()

    print(f"memory: {tokens} tokens, ratio {args.ratio} -> {tokens // args.ratio} entries/layer, "
          f"{LAYERS} layers x {KV_HEADS} KV heads x {HEAD_DIM}, {m.nbytes / 2**20:.0f} MiB fp32")
    print("| load | seconds (median of %d) |\n|---|---|" % args.repeats)
    for k, v in res["load_s"].items():
        print(f"| {k} | {v:.3f} |")
    print("| storage dtype | bytes/token |\n|---|---|")
    for k, v in res["bytes_per_token"].items():
        print(f"| {k} | {v} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
