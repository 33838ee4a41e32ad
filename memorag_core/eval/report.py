"""Evaluation output: aggregate prediction records into rows, a Markdown table, a PNG chart and a JSON file.

A *record* is the dict that :mod:`memorag_core.eval.runner` writes for one (setting, mode, example): the
prediction, its scores, the retrieved titles, per-stage seconds and token counts. The JSON file holds every
record, the run's config and the machine, so runs can be compared later and resumed
(:func:`load_results`/:func:`save_results`).

Table columns (means over the examples a mode answered; ``-`` where a metric does not apply):

=============  ===================================================================================================
n              examples answered (``skipped`` counts those not run, e.g. the context did not fit the generator)
F1, EM         LongBench-normalized token F1 and exact match, best over reference answers, in percent
ROUGE-L        LCS F-measure, for summary tasks, in percent
R@k            evidence recall: share of gold supporting titles among the top-k chunks (k = hits), in percent
R@ev           the same over every chunk handed to the generator (clue modes retrieve k per query)
chunks         chunks handed to the generator
read / gen     tokens read by the generator (question + evidence) / tokens generated (clues + answer)
clue/ret/gen s seconds per example for clue generation (memory model), retrieval, and answer generation
total s        seconds per example including per-example memorization, where the mode needs it
=============  ===================================================================================================
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memorag_core.errors import CorruptArtifactError, SchemaVersionError

logger = logging.getLogger(__name__)

RESULTS_SCHEMA = "memorag-eval/1"
"""Schema tag of the predictions JSON; :func:`load_results` refuses other tags."""


@dataclass(frozen=True)
class Row:
    """Aggregate metrics of one (setting, mode) over its records.

    Attributes:
        setting: Corpus setting (``per_question`` or ``pooled``).
        mode: Evaluation mode (``full``, ``rag``, ``memorag``, ``memorag_draft``).
        n: Number of answered examples.
        skipped: Number of examples the mode did not run (with a reason in their records).
        means: Metric name -> mean over answered examples; ``None`` where no example has the metric.
    """

    setting: str
    mode: str
    n: int
    skipped: int
    means: dict[str, float | None]


# (column header, key in Row.means, scale, format)
COLUMNS: list[tuple[str, str, float, str]] = [
    ("F1", "f1", 100.0, "{:.1f}"),
    ("EM", "em", 100.0, "{:.1f}"),
    ("ROUGE-L", "rouge_l", 100.0, "{:.1f}"),
    ("R@k", "recall_at_k", 100.0, "{:.1f}"),
    ("R@5", "recall_at_5", 100.0, "{:.1f}"),
    ("R@ev", "recall_evidence", 100.0, "{:.1f}"),
    ("chunks", "evidence_chunks", 1.0, "{:.1f}"),
    ("read", "tokens_read", 1.0, "{:.0f}"),
    ("gen", "tokens_generated", 1.0, "{:.0f}"),
    ("clue s", "seconds_clues", 1.0, "{:.2f}"),
    ("ret s", "seconds_retrieve", 1.0, "{:.3f}"),
    ("rerank s", "seconds_rerank", 1.0, "{:.2f}"),
    ("gen s", "seconds_generate", 1.0, "{:.2f}"),
    ("total s", "seconds_total", 1.0, "{:.2f}"),
]


def _record_values(record: dict[str, Any]) -> dict[str, float | None]:
    scores = record.get("scores", {})
    seconds = record.get("seconds", {})
    return {
        "f1": scores.get("f1"),
        "em": scores.get("em"),
        "rouge_l": scores.get("rouge_l"),
        "recall_at_k": record.get("recall_at_k"),
        "recall_at_5": record.get("recall_at_5"),
        "recall_evidence": record.get("recall_evidence"),
        "evidence_chunks": float(len(record.get("evidence_chunk_ids", []))) if record.get("evidence_chunk_ids") is not None else None,
        "tokens_read": record.get("tokens_read"),
        "tokens_generated": record.get("tokens_generated"),
        "seconds_clues": seconds.get("clues"),
        "seconds_retrieve": seconds.get("retrieve"),
        "seconds_rerank": seconds.get("rerank"),
        "seconds_generate": seconds.get("generate"),
        "seconds_total": sum(v for v in seconds.values() if v is not None) if seconds else None,
    }


def aggregate(setting: str, mode: str, records: Iterable[dict[str, Any]]) -> Row:
    """Average the metrics of one mode's records; skipped records only count in ``Row.skipped``."""
    answered: list[dict[str, float | None]] = []
    skipped = 0
    for rec in records:
        if rec.get("skipped"):
            skipped += 1
        else:
            answered.append(_record_values(rec))
    means: dict[str, float | None] = {}
    for _, key, _, _ in COLUMNS:
        vals = [v[key] for v in answered if v[key] is not None]
        means[key] = sum(vals) / len(vals) if vals else None
    return Row(setting=setting, mode=mode, n=len(answered), skipped=skipped, means=means)


def rows_from_results(results: dict[str, Any]) -> list[Row]:
    """One :class:`Row` per (setting, mode) in a results dict (as written by the runner), in run order."""
    rows = []
    for setting, block in results.get("settings", {}).items():
        for mode, by_id in block.get("predictions", {}).items():
            rows.append(aggregate(setting, mode, by_id.values()))
    return rows


def markdown_table(rows: list[Row]) -> str:
    """A Markdown table: one line per (setting, mode), one column per metric; columns empty in every row are
    dropped (e.g. ROUGE-L on a QA dataset)."""
    used = [c for c in COLUMNS if any(r.means.get(c[1]) is not None for r in rows)]
    header = ["setting", "mode", "n"] + [c[0] for c in used]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        n = f"{r.n}" + (f" (+{r.skipped} skipped)" if r.skipped else "")
        cells = [r.setting, r.mode, n]
        for _, key, scale, fmt in used:
            v = r.means.get(key)
            cells.append("-" if v is None else fmt.format(v * scale))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_chart(rows: list[Row], path: str | Path, metrics: tuple[str, ...] = ("f1", "em", "rouge_l", "recall_at_k")) -> Path:
    """Grouped bar chart (PNG): one group per (setting, mode), one bar per metric present, in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [m for m in metrics if any(r.means.get(m) is not None for r in rows)]
    labels = {c[1]: c[0] for c in COLUMNS}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.0))
    width = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(rows))]
        ys = [100.0 * (r.means.get(key) or 0.0) for r in rows]
        ax.bar(xs, ys, width=width, label=labels[key])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r.setting}\n{r.mode}\n(n={r.n})" for r in rows], fontsize=8)
    ax.set_ylabel("percent")
    ax.set_ylim(0, 100)
    if keys:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_modes(results: dict[str, Any], mode: str, baseline: str, metric: str = "f1") -> list[str]:
    """Per-question wins/ties/losses of ``mode`` against ``baseline`` on ``metric``, one line per setting.

    Only questions both modes answered count. A line reads e.g.
    ``"per_question: memorag vs rag on f1: 3 better, 5 equal, 2 worse (10 questions)"``.
    """
    lines = []
    for setting, block in results.get("settings", {}).items():
        preds = block.get("predictions", {})
        a, b = preds.get(mode, {}), preds.get(baseline, {})
        better = equal = worse = 0
        for qid in a.keys() & b.keys():
            ra, rb = a[qid], b[qid]
            if ra.get("skipped") or rb.get("skipped"):
                continue
            va = ra.get("scores", {}).get(metric, ra.get(metric))  # answer scores, or a record field (recall_at_k)
            vb = rb.get("scores", {}).get(metric, rb.get(metric))
            if va is None or vb is None:
                continue
            if abs(va - vb) < 1e-9:
                equal += 1
            elif va > vb:
                better += 1
            else:
                worse += 1
        n = better + equal + worse
        if n:
            lines.append(f"{setting}: {mode} vs {baseline} on {metric}: {better} better, {equal} equal, {worse} worse "
                         f"({n} questions)")
    return lines


def _clean(obj: Any) -> Any:
    # JSON has no NaN/inf: store them as null so the file stays standard JSON.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def save_results(results: dict[str, Any], path: str | Path) -> None:
    """Write the results JSON atomically (temporary file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = dict(results, schema=RESULTS_SCHEMA)
    fd, tmp = tempfile.mkstemp(prefix=".predictions-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(_clean(results), fh, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results JSON written by :func:`save_results`.

    Raises:
        CorruptArtifactError: the file does not parse as JSON.
        SchemaVersionError: the file has another schema tag.
    """
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorruptArtifactError(f"results file {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(results, dict) or results.get("schema") != RESULTS_SCHEMA:
        found = results.get("schema") if isinstance(results, dict) else type(results).__name__
        raise SchemaVersionError(f"results file {str(path)!r} has schema {found!r}, expected {RESULTS_SCHEMA!r}")
    return results


def write_report(results: dict[str, Any], out_dir: str | Path, stem: str = "results") -> dict[str, Path]:
    """Write ``<stem>.md`` (table plus run notes) and ``<stem>.png`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    rows = rows_from_results(results)
    table = markdown_table(rows)
    notes = list(results.get("notes", []))
    modes = {m for b in results.get("settings", {}).values() for m in b.get("predictions", {})}
    for mode in ("memorag", "memorag_draft"):
        if mode in modes and "rag" in modes:
            notes.extend(compare_modes(results, mode, "rag", "f1"))
            notes.extend(compare_modes(results, mode, "rag", "recall_at_k"))
    md = out_dir / f"{stem}.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(table + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else ""), encoding="utf-8")
    png = save_chart(rows, out_dir / f"{stem}.png") if rows else None
    paths = {"markdown": md}
    if png is not None:
        paths["chart"] = png
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
