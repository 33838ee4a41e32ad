"""The memory stage: actors that each hold one memory model, memorize units and write them through the store.

:class:`MemoryStage` is a Ray Data callable class, run with ``compute=ray.data.ActorPoolStrategy(size=N)`` and
``num_gpus=1`` per actor on a GPU cluster (``num_cpus`` fractional on a CPU test machine). Per unit row it:

1. computes the content-addressed ``unit_id`` = ``unit_id_for(memory.fingerprint(), text, storage_dtype)``;
2. if the store already has ``units/<unit_id>/memory.safetensors`` (an earlier or interrupted run wrote it),
   reads its sidecar ``memory.json`` (sha256, size, header with the stored gist; a few hundred bytes) instead of
   the memory (resume: nothing is recomputed or downloaded); without a sidecar it reads the memory once;
3. otherwise memorizes the text, writes the gist (see below) into the memory header, and writes the file through
   :meth:`CollectionStore.write_unit_memory` (atomic: a killed actor leaves no partial unit).

Gist (the router's per-unit text), chosen by ``RouterConfig.gist``: ``"summary"`` (default) asks the memory model's
``summarize()`` right after memorizing, while the memory is in place, and stores it in the memory file's header
(``header["gist"]``), so a resumed run reads it instead of generating again; ``"cheap"`` is the first
``gist_chars`` characters of the unit text, computed anywhere, never stored.

Memory files are content-addressed, so their bytes must be a function of (model, config, text) only: the wall
time that ``Memory.header()`` records in ``stats.seconds`` is zeroed before writing (the time is reported by the
job's stats instead). Memorizing itself is deterministic on a given machine and thread count, but batched reads
(``units_per_forward`` > 1) and one unit at a time give allclose, not byte-identical, memories (padded rows change
the order of float sums; docs/memory.md), so one unit id can have two byte strings: the sidecar records the file's
tag (S3 ETag, local inode and mtime), and resume trusts it only while the file still has that tag, otherwise it
reads the file and records its own sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time

import pyarrow as pa

from pipeline.config import MemoryStageConfig, RouterConfig
from pipeline.pack import unit_id_for

logger = logging.getLogger(__name__)

MEMORY_OUT_SCHEMA = pa.schema([
    ("unit_id", pa.string()), ("pack_key", pa.string()), ("text", pa.string()), ("n_tokens", pa.int64()),
    ("members", pa.string()), ("doc_ids", pa.list_(pa.string())), ("raw_tokens", pa.int64()),
    ("entries", pa.int64()), ("memory_sha256", pa.string()), ("memory_nbytes", pa.int64()),
    ("storage_dtype", pa.string()), ("memorized", pa.bool_()), ("seconds", pa.float64()), ("gist", pa.string()),
    ("fingerprint", pa.string()), ("model_id", pa.string()), ("model_revision", pa.string()),
])


def read_safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` dict of safetensors bytes (8-byte little-endian header length, then JSON)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}


def cheap_gist(text: str, chars: int) -> str:
    """The first ``chars`` characters of a unit, whitespace collapsed: the 'cheap' router gist."""
    return " ".join(text[: chars * 2].split())[:chars]


class MemoryStage:
    """Ray Data callable class: unit rows (``pipeline.pack.UNIT_ROW_SCHEMA``) -> ``MEMORY_OUT_SCHEMA`` rows.

    Args:
        config: memory config and actor resources.
        router: gist choice.
        store_url, storage_options: the artifact store (unit memories are shared by every collection in it).
        storage_dtype: memory file storage ("keep" the tensors' dtype, or "int8"/"fp8", see
            :mod:`memorag_core.store.memory_file`); None = ``config.storage_dtype``.
    """

    def __init__(self, config: MemoryStageConfig, router: RouterConfig, store_url: str,
                 storage_options: dict | None = None, storage_dtype: str | None = None):
        from memorag_core.errors import InvalidInputError
        from memorag_core.memory import build_memory
        from memorag_core.store import CollectionStore

        self.config, self.router = config, router
        self.storage_dtype = storage_dtype or config.storage_dtype  # "keep", "int8" or "fp8"
        if self.storage_dtype not in ("keep", "int8", "fp8"):
            raise InvalidInputError(f"storage_dtype {self.storage_dtype!r} is not one of 'keep', 'int8', 'fp8'")
        self.store = CollectionStore(store_url, storage_options)
        self.pinned = None
        if config.pin_cpus and not config.num_gpus:
            import torch

            from pipeline.cpu_pin import claim_cpus

            self.pinned = claim_cpus(max(1, int(config.num_cpus)))
            if self.pinned:
                torch.set_num_threads(len(self.pinned))
        t0 = time.perf_counter()
        self.memory = build_memory(config.memory)
        self.fingerprint = self.memory.fingerprint()
        if config.units_per_forward > config.batch_size:
            logger.warning("units_per_forward=%d > batch_size=%d: an actor gets only batch_size units per call, so "
                           "at most that many are read together", config.units_per_forward, config.batch_size)
        logger.info("memory actor ready: %s (%s), fingerprint %s, %.1f s", self.memory.model_id, config.memory.kind,
                    self.fingerprint, time.perf_counter() - t0)

    def _cached(self, unit_id: str) -> tuple[str, int, str | None, dict]:
        """(sha256, nbytes, stored gist or None, header) of an existing unit memory file: from its small sidecar
        (``units/<id>/memory.json``); a unit without one (written before sidecars, or killed between the two
        writes) is read whole once and its sidecar written, so the next resume is cheap."""
        from memorag_core.store import fs as sfs

        info = self.store.unit_memory_info(unit_id)
        if info is not None:
            return info["sha256"], info["nbytes"], info["header"].get("gist"), info["header"]
        path = self.store.unit_memory_url(unit_id)
        fs, p = sfs.open_url(path, self.store.storage_options)
        data = sfs.read_all(fs, p)
        meta = json.loads(read_safetensors_metadata(data).get("memorag", "{}"))
        header = meta.get("header", {})
        sha = hashlib.sha256(data).hexdigest()
        self.store.write_unit_sidecar(unit_id, sha, len(data), meta.get("storage_dtype", "keep"), header)
        return sha, len(data), header.get("gist"), header

    def _gist(self, text: str) -> str:
        if self.router.gist == "cheap":
            return cheap_gist(text, self.router.gist_chars)
        return self.memory.summarize(max_new_tokens=self.router.gist_max_new_tokens).strip()[: self.router.gist_chars
                                                                                               * 4]

    def _gist_key(self) -> str:
        return f"summary:{self.router.gist_max_new_tokens}"

    def process(self, row: dict) -> dict:
        """Memorize (or find) one unit; returns the output row."""
        return self.process_many([row])[0]

    def process_many(self, rows: list[dict]) -> list[dict]:
        """Memorize (or find) units; those not in the store are read ``units_per_forward`` at a time
        (:meth:`Memory.memorize_many`). Returns the output rows, in order."""
        out: list[dict | None] = [None] * len(rows)
        todo = []
        for i, row in enumerate(rows):
            unit_id = unit_id_for(self.fingerprint, row["text"], self.storage_dtype)
            if self.store.has_unit(unit_id):
                out[i] = self._found(row, unit_id)
            else:
                todo.append((i, row, unit_id))
        k = self.config.units_per_forward
        for g in range(0, len(todo), k):
            group = todo[g:g + k]
            t0 = time.perf_counter()
            if len(group) == 1:
                self.memory.reset()
                self.memory.memorize(group[0][1]["text"])
                tensors = [self.memory.export()]
            else:
                tensors = self.memory.memorize_many([row["text"] for _, row, _ in group])
            share = (time.perf_counter() - t0) / len(group)
            for (i, row, unit_id), t in zip(group, tensors):
                out[i] = self._write(row, unit_id, t, share, in_place=len(group) == 1)
        return out  # type: ignore[return-value]

    def _found(self, row: dict, unit_id: str) -> dict:
        """The output row of a unit already in the store (resume: nothing is recomputed)."""
        text = row["text"]
        t0 = time.perf_counter()
        sha, nbytes, gist, header = self._cached(unit_id)
        stats = header.get("stats", {})
        raw_tokens, entries = int(stats.get("raw_tokens", 0)), int(stats.get("entries", 0))
        if self.router.gist == "cheap":
            gist = cheap_gist(text, self.router.gist_chars)
        elif gist is None or header.get("gist_key") != self._gist_key():
            # Written under another gist setting: generate from the stored memory, without rewriting it.
            self.memory.import_tensors(self.store.read_unit_memory(unit_id, expected_sha256=sha))
            gist = self._gist(text)
        return self._row(row, unit_id, raw_tokens, entries, sha, nbytes, False, time.perf_counter() - t0, gist)

    def _write(self, row: dict, unit_id: str, tensors, seconds: float, in_place: bool) -> dict:
        """Gist and write one memorized unit (``tensors`` exported by the memory, which holds it if ``in_place``);
        returns its output row."""
        t0 = time.perf_counter()
        text = row["text"]
        header = dict(tensors.header)
        stats = header.get("stats") or {}
        raw_tokens, entries = int(stats.get("raw_tokens", 0)), int(stats.get("entries", 0))
        if self.router.gist == "summary" and not in_place:
            self.memory.import_tensors(tensors)  # a unit of a batch: its memory in place (no copy) for the summary
        gist = self._gist(text)
        if isinstance(header.get("stats"), dict):
            header["stats"] = {**header["stats"], "seconds": 0.0, "tokens_per_second": 0.0}
        if self.router.gist == "summary":
            header["gist"], header["gist_key"] = gist, self._gist_key()
        tensors.header = header
        storage = None if self.storage_dtype == "keep" else self.storage_dtype
        info = self.store.write_unit_memory(unit_id, tensors, storage_dtype=storage)
        return self._row(row, unit_id, raw_tokens, entries, info.sha256, info.nbytes, True,
                         seconds + time.perf_counter() - t0, gist)

    def _row(self, row: dict, unit_id: str, raw_tokens: int, entries: int, sha: str, nbytes: int,
             memorized: bool, seconds: float, gist: str) -> dict:
        logger.info("unit %s: %s, %d tokens, %.2f s", unit_id[:12], "memorized" if memorized else "cached",
                    raw_tokens, seconds)
        return {
            "unit_id": unit_id, "pack_key": row["pack_key"], "text": row["text"], "n_tokens": row["n_tokens"],
            "members": row["members"], "doc_ids": list(row["doc_ids"]), "raw_tokens": raw_tokens,
            "entries": entries, "memory_sha256": sha, "memory_nbytes": nbytes,
            "storage_dtype": self.storage_dtype, "memorized": memorized, "seconds": seconds,
            "gist": gist, "fingerprint": self.fingerprint, "model_id": self.memory.model_id,
            "model_revision": self.memory.model_revision,
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.process_many(batch.to_pylist())
        return pa.Table.from_pylist(rows, schema=MEMORY_OUT_SCHEMA)
