"""``python -m jobs.evaluate`` / ``memorag evaluate``: run a dataset through the evaluation modes and write a table.

Every option of :class:`memorag_core.eval.runner.EvalConfig` is a flag (``--hits 3``, ``--modes rag memorag``),
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

import argparse
import dataclasses
import logging
import sys
import types
import typing
from pathlib import Path

from memorag_core.errors import MemoRAGError
from memorag_core.eval.runner import EvalConfig, EvalRunner

logger = logging.getLogger("jobs.evaluate")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: typing.Any) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed) of a field annotation."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one flag per :class:`EvalConfig` field, plus ``--merge``, ``--log-level``."""
    parser = argparse.ArgumentParser(prog="memorag evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        tp, optional = _base_type(hints[f.name])
        help_text = f.metadata.get("description", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "dataset":
            parser.add_argument(_flag(f.name), help=help_text, default=None)
        elif tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif tp is dict or typing.get_origin(tp) is dict:
            parser.add_argument(_flag(f.name), type=json_arg, default=default_of(f),
                                help=help_text + " (a JSON object, or the path of a JSON file)")
        elif typing.get_origin(tp) is tuple:
            parser.add_argument(_flag(f.name), nargs="+", default=list(default), help=help_text)
        else:
            parser.add_argument(_flag(f.name), type=tp, default=default,
                                help=help_text + (" (omit for None)" if optional else ""))
    parser.add_argument("--merge", nargs="+", metavar="PREDICTIONS_JSON", default=None,
                        help="write one table from these prediction files into --output-dir; no models are run")
    parser.add_argument("--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING")
    return parser


def default_of(f: dataclasses.Field):
    """A dataclass field's default (its factory's value for a mutable default)."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default if f.default is not dataclasses.MISSING else None


def json_arg(text: str) -> dict:
    """A JSON object given inline or as the path of a JSON file (argparse reports a ValueError as a usage error)."""
    import json
    from pathlib import Path

    raw = Path(text).read_text() if not text.lstrip().startswith("{") and Path(text).is_file() else text
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Build the typed config from parsed arguments (validation errors name the field)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)}
    return EvalConfig(**values)


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


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``), run or merge, print the table; returns the exit code.

    Exit codes: 0 done, 2 bad arguments or input (the message names the cause).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.merge:
            print(merge(args.merge, args.output_dir))
            return 0
        if not args.dataset:
            parser.error("--dataset is required (or --merge to combine finished runs)")
        config = config_from_args(args)
        from memorag_core.eval.datasets import load_examples
        from memorag_core.eval.report import markdown_table, rows_from_results

        examples = load_examples(config.dataset, config.dataset_format,
                                 None if config.limit is None else config.offset + config.limit,
                                 config.task)[config.offset:]
        logger.info("evaluating %d examples, modes %s, settings %s", len(examples), config.modes, config.settings)
        runner = EvalRunner(config)
        results = runner.run(examples, progress=lambda msg: logger.info("done %s", msg))
    except MemoRAGError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(rows_from_results(results)))
    for note in results.get("notes", []):
        print(f"- {note}")
    print(f"predictions: {runner.predictions_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
