"""``python -m jobs.evaluate`` / ``memorag evaluate``: run a dataset through the evaluation modes and write a table.

Every option of :class:`memorag_core.eval.runner.EvalConfig` is a flag (``--hits 3``, ``--modes rag,memorag``),
with the field's description as help. Outputs go to ``--output-dir``: ``predictions.json`` (every prediction,
resumable), ``results.md`` (the table) and ``results.png`` (the chart). The table is also printed.

``--merge A.json B.json ...`` writes one table and chart from several finished prediction files (e.g. the
per-question and pooled settings run as two processes) into ``--output-dir`` without running models.

Examples::

    python -m jobs.evaluate --dataset /work/shared/data/hotpotqa_dev_300.jsonl --limit 2 --output-dir runs/smoke
    python -m jobs.evaluate --dataset data.jsonl --mem-model TommyChien/memorag-qwen2-7b-inst --memory-kind beacon \\
        --ret-model BAAI/bge-m3 --generator vllm:Qwen/Qwen2-7B-Instruct      # the same command on a GPU
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from jobs.options import run_app, usage_error, with_options
from memorag_core.eval.runner import EvalConfig, EvalRunner

logger = logging.getLogger("jobs.evaluate")


def _base_type(tp: typing.Any) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed) of a field annotation."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def _flags_class() -> type:
    """A dataclass with one typed option per :class:`EvalConfig` field (the field's description is its help;
    tuple fields take one value per flag, repeated or joined with commas)."""
    hints = typing.get_type_hints(EvalConfig)
    fields = []
    for f in dataclasses.fields(EvalConfig):
        tp, optional = _base_type(hints[f.name])
        help_text = f.metadata.get("description", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "dataset":
            ann = Annotated[Optional[str], typer.Option(help=help_text + " (required unless --merge)")]
        elif tp is bool:
            ann = Annotated[bool, typer.Option(help=help_text)]
        elif tp is dict or typing.get_origin(tp) is dict:
            ann = Annotated[Optional[str], typer.Option(
                help=help_text + " (a JSON object, or the path of a JSON file)", show_default=False)]
            default = None
        elif typing.get_origin(tp) is tuple:
            ann = Annotated[Optional[list[str]], typer.Option(
                help=help_text + "; repeat the flag or join values with commas", show_default=",".join(default))]
            default = None
        else:
            ann = Annotated[Optional[tp] if optional else tp, typer.Option(
                help=help_text + (" (omit for None)" if optional else ""))]
        fields.append((f.name, ann, dataclasses.field(default=default)))
    return dataclasses.make_dataclass("EvaluateFlags", fields)


EvaluateFlags = _flags_class()
"""The evaluation's flags: one per :class:`EvalConfig` field."""


def config_from_flags(flags) -> EvalConfig:
    """The typed config from parsed flags (validation errors name the field); tuple flags split on commas."""
    values = {}
    for f in dataclasses.fields(EvalConfig):
        v = getattr(flags, f.name)
        if isinstance(v, list):
            v = tuple(x for item in v for x in item.split(",") if x)
        elif isinstance(v, str) and f.name in JSON_FIELDS:
            v = json_arg(v, f.name)
        if v is not None or f.default is None:
            values[f.name] = v
    return EvalConfig(**values)


#: EvalConfig fields given as a JSON object (inline or a file's path)
JSON_FIELDS = {f.name for f in dataclasses.fields(EvalConfig)
               if typing.get_origin(_base_type(typing.get_type_hints(EvalConfig)[f.name])[0]) is dict
               or _base_type(typing.get_type_hints(EvalConfig)[f.name])[0] is dict}


def json_arg(text: str, name: str) -> dict:
    """A JSON object given inline or as the path of a JSON file; InvalidInputError naming the flag otherwise."""
    from memorag_core.errors import read_json_object

    return read_json_object(text, f"--{name.replace('_', '-')}", inline=True)


def merge(paths: list[str], out_dir: str) -> str:
    """Merge several prediction files (settings side by side) into one report; returns the Markdown table."""
    from memorag_core.eval.report import load_results, markdown_table, rows_from_results, save_results, write_report

    merged: dict = {"settings": {}, "notes": [], "sources": []}
    for p in paths:
        res = load_results(p)
        merged["sources"].append({"path": str(p), "config": res.get("config"), "machine": res.get("machine")})
        merged["notes"].extend(f"[{Path(p).parent.name}] {n}" for n in res.get("notes", []))
        for setting, block in res.get("settings", {}).items():
            key = setting if setting not in merged["settings"] else f"{setting} ({Path(p).parent.name})"
            merged["settings"][key] = block
    save_results(merged, Path(out_dir) / "predictions.json")
    write_report(merged, out_dir)
    return markdown_table(rows_from_results(merged))


app = typer.Typer(add_completion=False, rich_markup_mode="markdown",
                  help="Evaluate standard RAG against MemoRAG on a dataset.")


@app.command(name="evaluate")
@with_options(flags=EvaluateFlags)
def evaluate_command(
    ctx: typer.Context,
    predictions: Annotated[Optional[list[Path]], typer.Argument(
        metavar="[PREDICTIONS_JSON]...", help="with --merge: finished predictions.json files to put side by side",
        show_default=False)] = None,
    merge_runs: Annotated[bool, typer.Option(
        "--merge", help="write one table and chart from the PREDICTIONS files into --output-dir; no models run")
    ] = False,
    log_level: Annotated[str, typer.Option(help="logging level: DEBUG, INFO, WARNING")] = "INFO",
    *,
    flags,
) -> None:
    """Run a dataset through the evaluation modes (full, rag, memorag ...) and settings; print the table.

    Outputs go to --output-dir: predictions.json (every prediction, resumable), results.md (the table) and
    results.png (the chart). `--merge A.json B.json` puts finished runs side by side without running models.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(log_level.upper())
    if merge_runs:
        if not predictions:
            usage_error(ctx, "--merge needs the predictions.json files to merge")
        typer.echo(merge([str(p) for p in predictions], flags.output_dir))
        return
    if predictions:
        usage_error(ctx, f"unexpected arguments {' '.join(map(str, predictions))}: --modes and --settings take "
                         "one value per flag (repeat it, or join values with commas); files go with --merge")
    if not flags.dataset:
        usage_error(ctx, "--dataset is required (or --merge to combine finished runs)")
    config = config_from_flags(flags)
    from memorag_core.eval.datasets import load_examples
    from memorag_core.eval.report import markdown_table, rows_from_results

    examples = load_examples(config.dataset, config.dataset_format,
                             None if config.limit is None else config.offset + config.limit,
                             config.task)[config.offset:]
    logger.info("evaluating %d examples, modes %s, settings %s", len(examples), config.modes, config.settings)
    runner = EvalRunner(config)
    results = runner.run(examples, progress=lambda msg: logger.info("done %s", msg))
    typer.echo(markdown_table(rows_from_results(results)))
    for note in results.get("notes", []):
        typer.echo(f"- {note}")
    typer.echo(f"predictions: {runner.predictions_path}")


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.evaluate``: the exit code (0 done, 2 bad arguments or input, the message names the cause)."""
    return run_app(app, argv, prog_name="python -m jobs.evaluate")


if __name__ == "__main__":
    sys.exit(main())
