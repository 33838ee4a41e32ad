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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=None, help="raw tokens (default: harry_potter.txt's count)")
    p.add_argument("--ratio", type=int, default=4, help="compression ratio (raw tokens per memory entry)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--no-s3", action="store_true", help="skip the loopback S3 server")
    p.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

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
