"""Evaluation harness: dataset adapters, metrics, the mode runner and the report (table, chart, JSON).

Entry point: ``python -m jobs.evaluate`` (``memorag evaluate``). No Ray imports here.
"""

from memorag_core.eval.datasets import (
    EvalChunk,
    EvalExample,
    Passage,
    chunk_passages,
    load_examples,
    pooled_passages,
)
from memorag_core.eval.metrics import (
    best_over_references,
    evidence_recall,
    exact_match,
    f1_score,
    normalize_answer,
    rouge_l,
)
from memorag_core.eval.report import Row, aggregate, load_results, markdown_table, save_chart, save_results, write_report
from memorag_core.eval.runner import MODES, SETTINGS, EvalConfig, EvalRunner

__all__ = [
    "MODES", "SETTINGS", "EvalChunk", "EvalConfig", "EvalExample", "EvalRunner", "Passage", "Row", "aggregate",
    "best_over_references", "chunk_passages", "evidence_recall", "exact_match", "f1_score", "load_examples",
    "load_results", "markdown_table", "normalize_answer", "pooled_passages", "rouge_l", "save_chart", "save_results",
    "write_report",
]
