"""Publish: the version manifest and the job's statistics.

The manifest records only what is a function of the corpus and the configuration (counts, token totals, unit
memories with their sha256, files with their sha256), so a resumed run publishes the same artifacts as an
uninterrupted one; run-specific figures (seconds, tokens/s, bytes written by this run, cached vs computed units)
go to :class:`JobStats`, which the job returns, logs, and prints as a table.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class JobStats:
    """What one memorize run did.

    Attributes:
        collection, version: what was published.
        documents: valid documents memorized (after quarantine and dedup).
        quarantined: rows sent to quarantine; ``quarantine_reasons`` counts them per reason code.
        units: memory units in the version; ``units_memorized`` computed in this run, ``units_cached`` found done.
        tokens: memory-model tokens in the version's units; ``tokens_memorized`` those memorized by this run.
        chunks: retrieval chunks in the version; ``chunks_embedded`` units embedded by this run.
        bytes_written: bytes this run wrote (unit memories, staged chunks, version files).
        seconds: wall time of the run; ``memory_seconds``: time spent inside memory actors (sum over actors).
        phase_seconds: wall seconds of each job phase, in order (``setup`` = before the first phase, Ray start
            included when the corpus is large; ``memorize+embed`` is where the model stages run).
        tokens_per_s: ``tokens_memorized / seconds`` (the job's memorize throughput, end to end).
    """

    collection: str = ""
    version: str = ""
    documents: int = 0
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    units: int = 0
    units_memorized: int = 0
    units_cached: int = 0
    tokens: int = 0
    tokens_memorized: int = 0
    chunks: int = 0
    units_embedded: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    memory_seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)

    def add_units(self, meta) -> None:
        """Fill the per-unit counts from the job's per-unit metadata (an Arrow table of :data:`META_COLUMNS`, one
        row per unit of the version): Arrow compute sums, no Python rows."""
        import pyarrow as pa
        import pyarrow.compute as pc

        def total(col) -> float:
            return pc.sum(col).as_py() or 0

        memorized = meta.column("memorized")
        self.units = meta.num_rows
        self.units_memorized = int(total(memorized.cast(pa.int64())))
        self.units_cached = self.units - self.units_memorized
        self.tokens = int(total(meta.column("n_tokens")))
        self.tokens_memorized = int(total(pc.if_else(memorized, meta.column("n_tokens"), 0)))
        self.units_embedded = int(total(meta.column("embedded").cast(pa.int64())))
        self.memory_seconds = float(total(meta.column("seconds")))
        self.chunks = int(total(meta.column("n_chunks")))

    @property
    def tokens_per_s(self) -> float:
        """Tokens memorized by this run per second of wall time."""
        return self.tokens_memorized / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (``tokens_per_s`` included)."""
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}

    def table(self) -> str:
        """The stats as a fixed-width text table (what the CLI prints after Ray Data's progress bars)."""
        rows = [
            ("collection", f"{self.collection} @ {self.version}"),
            ("documents", f"{self.documents:,}"),
            ("quarantined", f"{self.quarantined:,}" + (f"  {self.quarantine_reasons}" if self.quarantined else "")),
            ("units", f"{self.units:,} ({self.units_memorized:,} memorized, {self.units_cached:,} cached)"),
            ("tokens", f"{self.tokens:,} ({self.tokens_memorized:,} memorized)"),
            ("tokens/s", f"{self.tokens_per_s:,.1f}"),
            ("chunks", f"{self.chunks:,} ({self.units_embedded:,} units embedded)"),
            ("bytes written", f"{self.bytes_written:,}"),
            ("wall time", f"{self.seconds:,.1f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 3 + max(len(v) for _, v in rows))
        return "\n".join([line, *(f"{k:<{width}} | {v}" for k, v in rows), line])


META_COLUMNS = ["unit_id", "n_tokens", "raw_tokens", "entries", "memory_sha256", "memory_nbytes", "storage_dtype",
                "memorized", "embedded", "seconds", "chunks_path", "n_chunks", "fingerprint", "model_id",
                "model_revision"]
"""The embed-stage columns the driver keeps, per unit: small metadata, no unit text, gist or embedding."""


def memorized_bytes(meta) -> int:
    """Bytes of the unit memories this run wrote (the units of ``meta`` it memorized)."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.if_else(meta.column("memorized"), meta.column("memory_nbytes"), 0)).as_py() or 0)


def memorize_manifest(config, meta, stats: JobStats, *, dim: int, shards: list[int], n_train: int):
    """The memorize job's manifest: ``config`` (a ``MemorizeJobConfig``), the per-unit metadata ``meta`` (Arrow,
    :data:`META_COLUMNS`), the run's deterministic counts from ``stats``, the index layout."""
    import pyarrow.compute as pc

    from memorag_core.models import EMBEDDED_EMBEDDER

    first = meta.slice(0, 1).to_pylist()[0]
    ic = config.index
    return build_manifest(
        config_dump=config.model_dump(mode="json", by_alias=True), unit_rows=meta,
        models={"memory": (first["model_id"], first["model_revision"]),
                "embedder": (config.chunk_embed.embedder or EMBEDDED_EMBEDDER, None)},
        stats={"documents": stats.documents, "quarantined": stats.quarantined,
               "quarantine_reasons": stats.quarantine_reasons, "units": stats.units, "tokens": stats.tokens,
               "chunks": stats.chunks, "memory_bytes": int(pc.sum(meta.column("memory_nbytes")).as_py() or 0)},
        extra={"memory_fingerprint": first["fingerprint"], "dim": dim, "shards": shards,
               "index": {"kind": ic.kind, "metric": ic.metric, "merged": ic.merge, "n_train": n_train},
               "router": {"gist": config.router.gist}})


def scrub_config(config_dump: dict) -> dict:
    """The job config for the manifest, with secrets (access tokens, storage keys) removed."""
    import copy

    d = copy.deepcopy(config_dump)
    d.pop("storage_options", None)
    d.get("corpus", {}).pop("storage_options", None)
    load = d.get("memory_stage", {}).get("memory", {}).get("load", {})
    load.pop("access_token", None)
    return d


def build_manifest(*, config_dump: dict, unit_rows, models: dict[str, tuple[str, str | None]],
                   stats: dict[str, Any], extra: dict[str, Any]):
    """The :class:`memorag_core.store.Manifest` of a new version (files and ids are filled in by publish).

    Args:
        config_dump: the job config (``model_dump(by_alias=True)``); secrets are removed here.
        unit_rows: one dict per unit with ``unit_id, memory_sha256, memory_nbytes, storage_dtype, n_tokens,
            raw_tokens, entries``, or an Arrow table with those columns.
        models: role -> (id, revision).
        stats: deterministic counts for the manifest.
        extra: index layout (shards, merged file, dims) and other job facts.
    """
    from memorag_core.store import Manifest, ModelRef

    if not isinstance(unit_rows, list):  # an Arrow table: column by column, no intermediate row dicts
        c = {k: unit_rows.column(k).to_pylist() for k in ("unit_id", "memory_sha256", "memory_nbytes",
                                                          "storage_dtype", "n_tokens", "raw_tokens", "entries")}
        ids = c["unit_id"]
        units = {ids[i]: {"sha256": c["memory_sha256"][i], "nbytes": int(c["memory_nbytes"][i]),
                          "storage_dtype": c["storage_dtype"][i], "n_tokens": int(c["n_tokens"][i]),
                          "raw_tokens": int(c["raw_tokens"][i]), "entries": int(c["entries"][i])}
                 for i in sorted(range(len(ids)), key=ids.__getitem__)}
        del c, ids
    else:
        units = _unit_entries(unit_rows)
    return Manifest(models={role: ModelRef(id=i, revision=rev) for role, (i, rev) in models.items()},
                    config=scrub_config(config_dump), units=units, stats=stats, extra=extra)


def _unit_entries(unit_rows: list[dict]) -> dict:
    """``unit_id -> manifest entry`` from row dicts, sorted by id."""
    return {
        r["unit_id"]: {"sha256": r["memory_sha256"], "nbytes": int(r["memory_nbytes"]),
                       "storage_dtype": r["storage_dtype"], "n_tokens": int(r["n_tokens"]),
                       "raw_tokens": int(r["raw_tokens"]), "entries": int(r["entries"])}
        for r in sorted(unit_rows, key=lambda r: r["unit_id"])
    }
