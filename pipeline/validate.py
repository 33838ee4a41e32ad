"""Validate raw document rows: decode them, and send the bad ones to quarantine with a reason.

A row is quarantined when it is malformed (set by the reader), not UTF-8, binary (a NUL byte, or more than
``max_control_ratio`` control characters), empty (only whitespace), or over-long (more than ``max_chars``
characters). Duplicate doc ids are found later, on the driver, where all ids are seen (:func:`triage`, then
:class:`KeepRows` filters the kept copies and :func:`quarantine_table` writes the rest).
The stage never raises on data: every input row comes out either ``ok`` or with a ``reason``.

Output columns, ``VALIDATED_SCHEMA``: ``doc_id``, ``text`` (decoded, ``""`` when quarantined), ``source``,
``position``, ``meta``, ``n_chars``, ``n_bytes``, ``reason`` (``""`` when the document is fine), ``sha256`` (of the
raw bytes).
"""

from __future__ import annotations

import hashlib
import logging

import pyarrow as pa

from pipeline.config import ValidateConfig

logger = logging.getLogger(__name__)

VALIDATED_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("position", pa.int64()),
    ("meta", pa.string()), ("n_chars", pa.int64()), ("n_bytes", pa.int64()), ("reason", pa.string()),
    ("sha256", pa.string()),
])

_ALLOWED_CONTROL = {"\t", "\n", "\r", "\f", "\v"}


def check_document(raw: bytes, error: str, config: ValidateConfig) -> tuple[str, str]:
    """Decode and check one document: ``(text, reason)`` where ``reason == ""`` means it is fine."""
    if error:
        return "", error
    if b"\x00" in raw:
        return "", "binary: contains NUL bytes"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return "", f"not UTF-8: {exc.reason} at byte {exc.start}"
    if not text.strip():
        return "", "empty"
    if len(text) > config.max_chars:
        return "", f"over-long: {len(text)} characters > max_chars {config.max_chars}"
    sample = text[:100_000]
    control = sum(1 for ch in sample if ord(ch) < 32 and ch not in _ALLOWED_CONTROL)
    if control > config.max_control_ratio * len(sample):
        return "", f"binary: {control} control characters in the first {len(sample)}"
    return text, ""


class ValidateStage:
    """Ray Data batch fn (pyarrow in, pyarrow out): raw rows (``pipeline.read.RAW_SCHEMA``) -> validated rows."""

    def __init__(self, config: ValidateConfig):
        self.config = config

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = {name: [] for name in VALIDATED_SCHEMA.names}
        cols = {c: batch.column(c).to_pylist() for c in ("doc_id", "raw", "source", "position", "meta", "error")}
        for i in range(batch.num_rows):
            raw = cols["raw"][i] or b""
            text, reason = check_document(raw, cols["error"][i], self.config)
            out["doc_id"].append(cols["doc_id"][i])
            out["text"].append(text)
            out["source"].append(cols["source"][i])
            out["position"].append(cols["position"][i])
            out["meta"].append(cols["meta"][i])
            out["n_chars"].append(len(text))
            out["n_bytes"].append(len(raw))
            out["reason"].append(reason)
            out["sha256"].append(hashlib.sha256(raw).hexdigest())
        return pa.Table.from_pydict(out, schema=VALIDATED_SCHEMA)


def split_duplicates(doc_ids: list[str]) -> set[int]:
    """Indices (into ``doc_ids``, in the given order) of every repeat of an id already seen.

    The caller passes the ids in a deterministic order (sorted by source and position), so the first occurrence
    is kept and the same rows are quarantined on every run.
    """
    seen: set[str] = set()
    dupes: set[int] = set()
    for i, doc_id in enumerate(doc_ids):
        if doc_id in seen:
            dupes.add(i)
        seen.add(doc_id)
    return dupes


_CODES = (("malformed", "malformed"), ("not UTF-8", "not_utf8"), ("binary", "binary"), ("empty", "empty"),
          ("over-long", "too_long"), ("duplicate", "duplicate_id"))


def reason_code(reason: str) -> str:
    """The short machine-readable code of a reason (``malformed``, ``not_utf8``, ``binary``, ``empty``,
    ``too_long``, ``duplicate_id``) for the quarantine table's ``reason`` column; the full text goes to ``detail``."""
    for prefix, code in _CODES:
        if reason.startswith(prefix):
            return code
    return "invalid"


def triage(meta: list[dict]) -> tuple[list[dict], dict[str, list[tuple]], dict[str, tuple]]:
    """Split validated row metadata into quarantined rows, valid copies per doc id, and the kept copy of every
    duplicated id (the first by source and position; the other copies are quarantined as duplicates)."""
    bad = [r for r in meta if r["reason"]]
    by_id: dict[str, list[tuple]] = {}
    for r in meta:
        if not r["reason"]:
            by_id.setdefault(r["doc_id"], []).append((r["source"], r["position"], r["sha256"]))
    kept: dict[str, tuple] = {}
    for doc_id, copies in by_id.items():
        if len(copies) > 1:
            copies.sort()
            kept[doc_id] = copies[0]
            bad.extend({"doc_id": doc_id, "source": s, "position": p, "reason": f"duplicate doc_id {doc_id!r} "
                        f"(kept {copies[0][0]}:{copies[0][1]})"} for s, p, _ in copies[1:])
    return bad, by_id, kept


class KeepRows:
    """Filter fn: valid rows that are the kept copy of their doc id (duplicates are quarantined)."""

    def __init__(self, kept: dict[str, tuple]):
        self.kept = kept

    def __call__(self, row: dict) -> bool:
        if row["reason"]:
            return False
        k = self.kept.get(row["doc_id"])
        return k is None or k == (row["source"], row["position"], row["sha256"])


def quarantine_table(bad: list[dict]) -> pa.Table:
    """The ``quarantine`` table (``doc_id, source, reason`` code, ``detail``) of quarantined rows, sorted."""
    bad = sorted(bad, key=lambda r: (r["source"], r["position"], r["doc_id"] or "", r["reason"]))
    return pa.table({
        "doc_id": pa.array([r["doc_id"] or None for r in bad], pa.string()),
        "source": pa.array([f"{r['source']}:{r['position']}" if r["position"] else r["source"] for r in bad]),
        "reason": pa.array([reason_code(r["reason"]) for r in bad], pa.string()),
        "detail": pa.array([r["reason"] for r in bad], pa.string()),
    })
