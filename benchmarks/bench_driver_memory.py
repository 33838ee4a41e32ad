"""What the memorize job's driver holds per document (triage and packing) and per unit (publish), measured.

The driver-side steps of :func:`jobs.memorize.run_memorize_job` are run on synthetic metadata of realistic shape
(64-hex ids and checksums, staged chunk paths, document ids of ~20 characters), without Ray or models:

* per document: the validation metadata rows (``doc_id, source, position, sha256, reason``), the triage
  (:func:`pipeline.validate.triage`), the item metadata and the packing plan (:func:`pipeline.pack.plan_units`,
  kept as an Arrow table by :func:`pipeline.pack.plan_table`);
* per unit: the Arrow table of per-unit metadata the driver collects from the embed stage,
  :func:`pipeline.publish.build_manifest` over it and the manifest's JSON.

Python allocations are measured with ``tracemalloc`` (peak above the start), Arrow buffers with
``pyarrow.total_allocated_bytes()`` at the same points; the sum of the two peaks is reported as bytes per
document and per unit, then scaled to a corpus (``--tokens``, ``--unit-tokens``, ``--documents``).

Usage::

    python benchmarks/bench_driver_memory.py [--docs 100000] [--units 20000] [--tokens 1e9] [--documents 1e6]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import PackConfig  # noqa: E402
from pipeline.pack import plan_table, plan_units  # noqa: E402
from pipeline.publish import build_manifest  # noqa: E402


def _hex(i: int, salt: str) -> str:
    import hashlib

    return hashlib.sha256(f"{salt}{i}".encode()).hexdigest()


def measure(fn) -> tuple[int, object]:
    """(peak bytes above the start: Python heap + Arrow pool, fn's result)."""
    gc.collect()
    arrow0 = pa.total_allocated_bytes()
    tracemalloc.start()
    tracemalloc.reset_peak()
    out = fn()
    arrow = pa.total_allocated_bytes() - arrow0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak + max(0, arrow), out


def per_document(n: int) -> int:
    """Peak driver bytes of triage + packing for ``n`` documents (one item each, ~600 tokens)."""
    from pipeline.validate import triage

    def run():
        meta = [{"doc_id": f"doc-{i:012d}.txt", "source": "corpus/part-00001.jsonl", "position": i,
                 "sha256": _hex(i, "d"), "reason": ""} for i in range(n)]
        bad, by_id, kept = triage(meta)
        item_meta = [{"doc_id": m["doc_id"], "part": 0, "n_tokens": 600} for m in meta]
        plan = plan_table(plan_units(sorted({(r["doc_id"], r["part"], r["n_tokens"]) for r in item_meta}),
                                     PackConfig()))
        return meta, by_id, kept, item_meta, plan  # all alive at once: the peak the job had before packing ended

    peak, _ = measure(run)
    return peak


def per_unit(n: int) -> int:
    """Peak driver bytes of the publish step for ``n`` units."""

    def run():
        ids = [_hex(i, "u") for i in range(n)]
        meta = pa.table({
            "unit_id": ids, "n_tokens": [8192] * n, "raw_tokens": [8192] * n, "entries": [2048] * n,
            "memory_sha256": [_hex(i, "m") for i in range(n)], "memory_nbytes": [25_000_000] * n,
            "storage_dtype": ["int8"] * n, "memorized": [True] * n, "embedded": [True] * n,
            "seconds": [1.5] * n, "chunks_path": [f"staging/chunks/{'k' * 16}/{u}.parquet" for u in ids],
            "n_chunks": [12] * n, "fingerprint": ["f" * 16] * n, "model_id": ["TommyChien/memorag-qwen2-7b-inst"] * n,
            "model_revision": ["a" * 40] * n})
        manifest = build_manifest(config_dump={}, unit_rows=meta, models={"memory": ("m", None)}, stats={},
                                  extra={})  # as the job does (pipeline.publish.memorize_manifest)
        text = manifest.to_json()
        return meta, manifest, text

    peak, _ = measure(run)
    return peak


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=100_000, help="documents measured")
    p.add_argument("--units", type=int, default=20_000, help="units measured")
    p.add_argument("--tokens", type=float, default=1e9, help="corpus tokens to scale to")
    p.add_argument("--unit-tokens", type=int, default=8192, help="tokens per unit (pack.unit_tokens)")
    p.add_argument("--documents", type=float, default=1e6, help="documents of that corpus")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    doc_b = per_document(args.docs) / args.docs
    unit_b = per_unit(args.units) / args.units
    units = args.tokens / args.unit_tokens
    res = {"bytes_per_document": round(doc_b), "bytes_per_unit": round(unit_b), "docs_measured": args.docs,
           "units_measured": args.units, "scaled": {
               "tokens": args.tokens, "units": round(units), "documents": round(args.documents),
               "documents_gb": round(doc_b * args.documents / 1e9, 2), "units_gb": round(unit_b * units / 1e9, 2)}}
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
