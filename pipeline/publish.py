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


def scrub_config(config_dump: dict) -> dict:
    """The job config for the manifest, with secrets (access tokens, storage keys) removed."""
    import copy

    d = copy.deepcopy(config_dump)
    d.pop("storage_options", None)
    d.get("corpus", {}).pop("storage_options", None)
    load = d.get("memory_stage", {}).get("memory", {}).get("load", {})
    load.pop("access_token", None)
    return d


def build_manifest(*, config_dump: dict, unit_rows: list[dict], models: dict[str, tuple[str, str | None]],
                   stats: dict[str, Any], extra: dict[str, Any]):
    """The :class:`memorag_core.store.Manifest` of a new version (files and ids are filled in by publish).

    Args:
        config_dump: the job config (``model_dump(by_alias=True)``); secrets are removed here.
        unit_rows: one dict per unit with ``unit_id, memory_sha256, memory_nbytes, storage_dtype, n_tokens,
            raw_tokens, entries``.
        models: role -> (id, revision).
        stats: deterministic counts for the manifest.
        extra: index layout (shards, merged file, dims) and other job facts.
    """
    from memorag_core.store import Manifest, ModelRef

    units = {
        r["unit_id"]: {"sha256": r["memory_sha256"], "nbytes": int(r["memory_nbytes"]),
                       "storage_dtype": r["storage_dtype"], "n_tokens": int(r["n_tokens"]),
                       "raw_tokens": int(r["raw_tokens"]), "entries": int(r["entries"])}
        for r in sorted(unit_rows, key=lambda r: r["unit_id"])
    }
    return Manifest(models={role: ModelRef(id=i, revision=rev) for role, (i, rev) in models.items()},
                    config=scrub_config(config_dump), units=units, stats=stats, extra=extra)
