"""Typed configuration and statistics of a memory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from memorag_core.errors import InvalidInputError
from memorag_core.models import LoadOptions

KINDS = ("compressed_kv", "full_kv", "beacon", "gist")
POSITIONS = ("compact", "original")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class MemoryConfig:
    """How a memory is built. Validated once, in ``__post_init__``; every error names the field."""

    kind: str = field(default="compressed_kv", metadata=_help(
        "memory kind: compressed_kv (training-free, any HF causal LM), full_kv (ratio 1), "
        "beacon (MemoRAG's released checkpoints, their own code), gist (Lite mode: KV of LLM-written gists)"))
    model: str | None = field(default=None, metadata=_help(
        "memory model: local folder or hub id; None = the embedded SmolLM2-135M-Instruct"))
    ratio: int = field(default=4, metadata=_help(
        "compression ratio: each window of W raw tokens keeps ceil(W/ratio) KV entries per layer and KV head "
        "(upstream's beacon_ratio); 1 keeps everything"))
    window: int = field(default=1024, metadata=_help("tokens prefilled per step; selection happens per window"))
    obs_window: int = field(default=0, metadata=_help(
        "which of each window's tokens score its entries by their attention: 0 = all of them; N > 0 = the last N "
        "(SnapKV's observation window; 32 was the default before benchmarks/selection_study.py)"))
    obs_sample: int = field(default=128, metadata=_help(
        "when > 0, only this many of the scoring tokens, spread evenly over them, score the entries: the default "
        "128 spread over the whole window kept the evidence better than SnapKV's last 32 at about its cost "
        "(selection study); 0 = every scoring token (obs_window=0, obs_sample=0 measured best, about 2x the "
        "memorize time on small CPU models)"))
    pool_kernel: int = field(default=5, metadata=_help(
        "odd width of the max-pool smoothing of scores along the sequence (1 = none): keeps neighbours of "
        "strongly attended tokens, so kept entries form short runs rather than isolated tokens"))
    positions: str = field(default="compact", metadata=_help(
        "positions of kept entries: compact re-rotates kept keys onto consecutive positions, so a memory of T "
        "tokens occupies ~T/ratio positions (stays inside the model's trained range); original keeps each "
        "token's position (a query then sits at position T)"))
    language: str = field(default="auto", metadata=_help("prompt language: auto (detected from the text), en, zh"))
    gist_chunk_tokens: int = field(default=2048, metadata=_help("gist kind: tokens per chunk that one gist covers"))
    gist_max_new_tokens: int = field(default=256, metadata=_help("gist kind: most tokens one gist may have"))
    max_query_tokens: int = field(default=4096, metadata=_help(
        "longest query (in tokens) accepted by recall/rewrite/answer; longer raises InvalidInputError"))
    load: LoadOptions = field(default_factory=LoadOptions, metadata=_help(
        "how to load the model: dtype, device, cache_dir, token, 4-bit, flash attention, remote code"))

    @classmethod
    def for_kind(cls, **fields: Any) -> "MemoryConfig":
        """A config from ``fields`` where the kind fixes what it implies: full_kv keeps every entry (ratio 1,
        whatever ratio was asked, e.g. a CLI default or upstream's beacon_ratio)."""
        if fields.get("kind") == "full_kv":
            fields["ratio"] = 1
        return cls(**fields)

    def __post_init__(self) -> None:
        if isinstance(self.load, dict):
            self.load = LoadOptions(**self.load)
        if self.kind not in KINDS:
            raise InvalidInputError(f"memory kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.ratio, int) or isinstance(self.ratio, bool) or self.ratio < 1:
            raise InvalidInputError(f"memory ratio must be an integer >= 1, got {self.ratio!r}")
        if self.kind == "full_kv" and self.ratio != 1:
            raise InvalidInputError(f"kind full_kv keeps every entry: ratio must be 1, got {self.ratio}")
        if self.window < 1 or self.obs_window < 0 or self.obs_sample < 0:
            raise InvalidInputError(f"window must be >= 1, obs_window and obs_sample >= 0 (0: all of the window's "
                                    f"tokens), got {self.window}, {self.obs_window}, {self.obs_sample}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise InvalidInputError(f"pool_kernel must be an odd integer >= 1, got {self.pool_kernel}")
        if self.positions not in POSITIONS:
            raise InvalidInputError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.language not in ("auto", "en", "zh"):
            raise InvalidInputError(f"language must be auto, en or zh, got {self.language!r}")

    def to_dict(self) -> dict:
        """A JSON-serializable dict (the ``load`` options without the access token)."""
        d = dataclasses.asdict(self)
        d["load"].pop("access_token", None)
        return d

    def fingerprint_dict(self) -> dict:
        """The fields that change what a memory holds (not device, language detection inputs or query limits)."""
        d = self.to_dict()
        for k in ("max_query_tokens",):
            d.pop(k)
        d["load"] = {"dtype": d["load"]["dtype"], "load_in_4bit": d["load"]["load_in_4bit"]}
        return d


@dataclass
class MemoryStats:
    """What memorizing produced.

    Attributes:
        raw_tokens: context tokens read (the instruction prefix not counted).
        entries: KV entries kept per layer and KV head (prefix included).
        nbytes: bytes of the kept K and V tensors over all layers.
        seconds: wall time spent memorizing (cumulative over appends).
    """

    raw_tokens: int = 0
    entries: int = 0
    nbytes: int = 0
    seconds: float = 0.0

    @property
    def compression(self) -> float:
        """raw tokens per kept entry (about the ratio for long texts)."""
        return self.raw_tokens / self.entries if self.entries else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.raw_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["compression"] = round(self.compression, 3)
        d["tokens_per_second"] = round(self.tokens_per_second, 1)
        return d


def stable_hash(obj: object) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys): for fingerprints and content addresses."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
