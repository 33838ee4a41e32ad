"""The options of the jobs, defined once, and the plumbing that runs a typer command as a process entry point.

A job's flags are a dataclass whose fields are ``Annotated[type, typer.Option(...)]`` (name, type, help, default:
the one definition). :func:`with_options` puts those fields into a command's signature, so the same flags appear
in ``python -m jobs.memorize --help`` (what ``ray job submit -- python -m jobs.memorize ...`` runs) and in
``memorag memorize --help``; the command receives one instance of the dataclass. :func:`run_app` runs a typer app
the way a console script should: usage errors print the usage line and the message and exit 2 (no traceback),
errors of the library (:class:`memorag_core.errors.MemoRAGError`) print ``error: ...`` and exit 2.

This module imports only typer at import time (``memorag --help`` and shell completion stay fast).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer

logger = logging.getLogger(__name__)

DEFAULT_STORE = "./memorag-store"
"""The store root when neither ``--store``, ``$MEMORAG_STORE`` nor a ``--config`` file names one."""


# -- plumbing -----------------------------------------------------------------------------------------------------
def with_options(**groups: type) -> Callable[[Callable], Callable]:
    """Decorator: add the fields of each dataclass in ``groups`` (parameter name -> dataclass) to a typer command's
    options; the command is called with one instance per group under that name.

    The fields must have typer annotations (``Annotated[T, typer.Option(...)]``) and defaults. They become
    keyword-only parameters after the command's own, in field order; names must not clash.
    """

    def decorate(func: Callable) -> Callable:
        sig = inspect.signature(func)
        hints = typing.get_type_hints(func, include_extras=True)
        params = [p.replace(annotation=hints.get(p.name, p.annotation))
                  for p in sig.parameters.values() if p.name not in groups]
        names = {p.name for p in params}
        group_fields: dict[str, list[str]] = {}
        for group, cls in groups.items():
            field_hints = typing.get_type_hints(cls, include_extras=True)
            group_fields[group] = []
            for f in dataclasses.fields(cls):
                if f.name in names:
                    raise TypeError(f"{func.__name__}: option {f.name!r} of {cls.__name__} clashes with another")
                names.add(f.name)
                group_fields[group].append(f.name)
                params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                                annotation=field_hints[f.name]))

        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            for group, cls in groups.items():
                kwargs[group] = cls(**{n: kwargs.pop(n) for n in group_fields[group]})
            return func(*args, **kwargs)

        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def run_app(app: typer.Typer, argv: list[str] | None = None, prog_name: str | None = None) -> int:
    """Run a typer ``app`` on ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Exit codes: 0 done; 2 a usage error (typer prints the usage line and the message: unknown option, missing
    argument, bad value) or an error of the library (printed as ``error: <message>``); a command's own
    ``typer.Exit(code)``; 130 on Ctrl-C. Any other exception is a bug and keeps its traceback.
    """
    from memorag_core.errors import MemoRAGError

    try:
        app(args=list(sys.argv[1:] if argv is None else argv), prog_name=prog_name, standalone_mode=True)
    except SystemExit as exc:  # standalone mode ends every run, help and usage errors included, with sys.exit
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except MemoRAGError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    return 0


def usage_error(ctx: typer.Context, message: str) -> None:
    """Stop with a usage error (usage line, message, exit 2), as a mistyped option does."""
    ctx.fail(message)


def _config_file(path: Optional[Path]) -> dict:
    """The JSON of a ``--config`` file (``{}`` without one); InvalidInputError names an unreadable file."""
    from memorag_core.errors import read_json_object

    return {} if path is None else read_json_object(path, f"--config {path}")


def _put(data: dict, path: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``path`` ``"a.b.c"`` unless ``value`` is None."""
    if value is None:
        return
    *parents, last = path.split(".")
    d = data
    for key in parents:
        d = d.setdefault(key, {})
    d[last] = value


_STORE_HELP = "store root: local folder or s3://bucket/prefix (default: $MEMORAG_STORE, the --config file's, or " \
              f"{DEFAULT_STORE})"
_COMMON = "Run and output"


# -- the memorize job ---------------------------------------------------------------------------------------------
_JOB = "Corpus job (Ray): --corpus --collection --store"
_BOTH = "Memory and embedder"


@dataclass
class MemorizeJobFlags:
    """The flags of the memorize job (``python -m jobs.memorize`` and ``memorag memorize --corpus ...``).

    :meth:`to_config` turns them, over an optional ``--config`` JSON file, into a validated
    :class:`pipeline.config.MemorizeJobConfig`; a flag that is given overrides the file.
    """

    corpus: Annotated[Optional[str], typer.Option(
        help="JSONL/Parquet file or folder of .txt/.jsonl/.parquet (local or s3://)", rich_help_panel=_JOB)] = None
    collection: Annotated[Optional[str], typer.Option(
        help="collection name to publish a new version of", rich_help_panel=_JOB)] = None
    store: Annotated[Optional[str], typer.Option(envvar="MEMORAG_STORE", show_envvar=False, help=_STORE_HELP,
                                                 rich_help_panel=_JOB)] = None
    config: Annotated[Optional[Path], typer.Option(
        help="JSON file with a MemorizeJobConfig; flags given override it", rich_help_panel=_JOB)] = None
    corpus_format: Annotated[Optional[Literal["auto", "jsonl", "parquet", "text"]], typer.Option(
        "--format", help="corpus format (default auto)", rich_help_panel=_JOB)] = None
    text_column: Annotated[Optional[str], typer.Option(
        help="text column / JSON key (default text)", rich_help_panel=_JOB)] = None
    id_column: Annotated[Optional[str], typer.Option(
        help="doc id column (default doc_id)", rich_help_panel=_JOB)] = None
    memory_model: Annotated[Optional[str], typer.Option(
        "--memory-model", "--model", help="memory model folder or hub id (default: embedded SmolLM2)",
        rich_help_panel=_BOTH)] = None
    memory_kind: Annotated[Optional[Literal["compressed_kv", "full_kv", "gist", "beacon"]], typer.Option(
        "--memory-kind", "--kind", help="memory kind (default compressed_kv)", rich_help_panel=_BOTH)] = None
    ratio: Annotated[Optional[int], typer.Option(
        min=1, help="compression ratio: window tokens per kept entry (default 4)", rich_help_panel=_BOTH)] = None
    embedder: Annotated[Optional[str], typer.Option(
        help="embedder folder or hub id (default: embedded MiniLM)", rich_help_panel=_BOTH)] = None
    max_chars: Annotated[Optional[int], typer.Option(
        min=1, help="corpus job: quarantine documents longer than N characters; PATH: read only the first N "
                    "characters (quick trials)", rich_help_panel=_BOTH)] = None
    storage_dtype: Annotated[Optional[Literal["int8", "fp8", "keep"]], typer.Option(
        help="how unit memories are stored: int8 (the job's default; per-channel keys answered as the kept dtype "
             "did), fp8, or keep the model's dtype (a bundle's default)", rich_help_panel=_BOTH)] = None
    unit_tokens: Annotated[Optional[int], typer.Option(
        min=1, help="most tokens per memory unit", rich_help_panel=_JOB)] = None
    chunk_tokens: Annotated[Optional[int], typer.Option(
        min=1, help="most tokens (memory tokenizer) per retrieval chunk", rich_help_panel=_JOB)] = None
    actors: Annotated[Optional[int], typer.Option(min=1, help="memory actors", rich_help_panel=_JOB)] = None
    actor_cpus: Annotated[Optional[float], typer.Option(
        min=0, help="CPUs per memory actor", rich_help_panel=_JOB)] = None
    pin_cpus: Annotated[Optional[bool], typer.Option(
        "--pin-cpus/--no-pin-cpus", help="pin each CPU memory actor to cores of its own", rich_help_panel=_JOB)] = None
    actor_gpus: Annotated[Optional[float], typer.Option(
        min=0, help="GPUs per memory actor (1 on a GPU cluster)", rich_help_panel=_JOB)] = None
    embed_actors: Annotated[Optional[int], typer.Option(min=1, help="embed actors", rich_help_panel=_JOB)] = None
    embed_cpus: Annotated[Optional[float], typer.Option(
        min=0, help="CPUs per embed actor", rich_help_panel=_JOB)] = None
    shards: Annotated[Optional[int], typer.Option(min=1, help="index shards", rich_help_panel=_JOB)] = None
    gist: Annotated[Optional[Literal["summary", "cheap"]], typer.Option(
        help="router gist: the memory's summary or the first characters", rich_help_panel=_JOB)] = None
    ray_address: Annotated[Optional[str], typer.Option(
        help="Ray cluster address (default: RAY_ADDRESS or a local Ray)", rich_help_panel=_JOB)] = None
    num_cpus: Annotated[Optional[int], typer.Option(
        min=1, help="CPUs of a local Ray started by the job", rich_help_panel=_JOB)] = None
    local_prepare_bytes: Annotated[Optional[int], typer.Option(
        min=0, help="prepare corpora up to this size on the driver instead of Ray Data tasks (0: never)",
        rich_help_panel=_JOB)] = None
    s3_endpoint: Annotated[Optional[str], typer.Option(
        help="S3-compatible endpoint URL for s3:// corpus and store", rich_help_panel=_JOB)] = None
    stats_json: Annotated[Optional[Path], typer.Option(
        help="also write the run's statistics as JSON to this local path", rich_help_panel=_JOB)] = None
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging", rich_help_panel=_JOB)] = False

    def to_config(self):
        """The validated :class:`~pipeline.config.MemorizeJobConfig` (pydantic's ValidationError names a bad field;
        InvalidInputError an unreadable ``--config`` file)."""
        from pipeline.config import MemorizeJobConfig

        data = _config_file(self.config)
        for path, value in (
                ("corpus.url", self.corpus), ("collection", self.collection), ("store", self.store),
                ("corpus.format", self.corpus_format), ("corpus.text_column", self.text_column),
                ("corpus.id_column", self.id_column), ("memory_stage.memory.model", self.memory_model),
                ("memory_stage.memory.kind", self.memory_kind), ("memory_stage.memory.ratio", self.ratio),
                ("chunk_embed.embedder", self.embedder), ("pack.unit_tokens", self.unit_tokens),
                ("chunk_embed.chunk_tokens", self.chunk_tokens), ("validate.max_chars", self.max_chars),
                ("memory_stage.concurrency", self.actors), ("memory_stage.num_cpus", self.actor_cpus),
                ("memory_stage.pin_cpus", self.pin_cpus), ("memory_stage.num_gpus", self.actor_gpus),
                ("memory_stage.storage_dtype", self.storage_dtype),
                ("chunk_embed.concurrency", self.embed_actors), ("chunk_embed.num_cpus", self.embed_cpus),
                ("index.shards", self.shards), ("router.gist", self.gist), ("ray_address", self.ray_address),
                ("num_cpus", self.num_cpus), ("local_prepare_bytes", self.local_prepare_bytes)):
            _put(data, path, value)
        data.setdefault("store", DEFAULT_STORE)
        if self.s3_endpoint:
            data.setdefault("storage_options", {})["endpoint_url"] = self.s3_endpoint
            data.setdefault("corpus", {}).setdefault("storage_options", {})["endpoint_url"] = self.s3_endpoint
        return MemorizeJobConfig.model_validate(data)


# -- the summarize job --------------------------------------------------------------------------------------------
_SUMMARIZE = "Summaries"
_RAY = "Ray"


@dataclass
class SummarizeJobFlags:
    """The flags of the summarize job (``python -m jobs.summarize`` and ``memorag summarize``)."""

    collection: Annotated[Optional[str], typer.Option(help="collection name")] = None
    store: Annotated[Optional[str], typer.Option(envvar="MEMORAG_STORE", show_envvar=False, help=_STORE_HELP)] = None
    collection_version: Annotated[Optional[str], typer.Option(
        "--version", help="collection version (default: the live one)")] = None
    config: Annotated[Optional[Path], typer.Option(
        help="JSON file with a SummarizeJobConfig; flags given override it")] = None
    generator: Annotated[Optional[str], typer.Option(
        help="auto | memory | hf:PATH | vllm:PATH | openai:MODEL@URL (default auto)", rich_help_panel=_SUMMARIZE)
    ] = None
    key_point_tokens: Annotated[Optional[int], typer.Option(
        help="most tokens of a unit's key points", rich_help_panel=_SUMMARIZE)] = None
    top_k: Annotated[Optional[int], typer.Option(
        help="supporting passages per unit summary", rich_help_panel=_SUMMARIZE)] = None
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help="most tokens of a unit summary", rich_help_panel=_SUMMARIZE)] = None
    reduce_max_new_tokens: Annotated[Optional[int], typer.Option(
        help="most tokens of a document/collection summary", rich_help_panel=_SUMMARIZE)] = None
    fan_in: Annotated[Optional[int], typer.Option(
        help="most summaries per reduce prompt", rich_help_panel=_SUMMARIZE)] = None
    reduce_max_chars: Annotated[Optional[int], typer.Option(
        help="most characters of summaries per reduce prompt", rich_help_panel=_SUMMARIZE)] = None
    retry_skipped: Annotated[bool, typer.Option(
        "--retry-skipped", help="run again for units skipped by the last run", rich_help_panel=_SUMMARIZE)] = False
    actors: Annotated[Optional[int], typer.Option(help="summarize actors", rich_help_panel=_RAY)] = None
    batch_size: Annotated[Optional[int], typer.Option(
        help="units per actor call (one batched generation)", rich_help_panel=_RAY)] = None
    actor_cpus: Annotated[Optional[float], typer.Option(help="CPUs per actor", rich_help_panel=_RAY)] = None
    actor_gpus: Annotated[Optional[float], typer.Option(help="GPUs per actor", rich_help_panel=_RAY)] = None
    device: Annotated[Optional[str], typer.Option(
        help="device of the models (cpu, cuda, auto)", rich_help_panel=_RAY)] = None
    ray_address: Annotated[Optional[str], typer.Option(
        help="Ray cluster address (default: RAY_ADDRESS or a local Ray)", rich_help_panel=_RAY)] = None
    num_cpus: Annotated[Optional[int], typer.Option(
        help="CPUs of a local Ray started by the job", rich_help_panel=_RAY)] = None
    s3_endpoint: Annotated[Optional[str], typer.Option(help="S3-compatible endpoint URL for an s3:// store")] = None
    stats_json: Annotated[Optional[Path], typer.Option(
        help="also write the run's statistics as JSON to this local path")] = None
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False

    def to_config(self):
        """The validated :class:`jobs.summarize.SummarizeJobConfig` (pydantic's ValidationError names a bad
        field; InvalidInputError an unreadable ``--config`` file)."""
        from jobs.summarize import SummarizeJobConfig

        data = _config_file(self.config)
        flags = {"collection": self.collection, "version": self.collection_version, "generator": self.generator,
                 "key_point_tokens": self.key_point_tokens, "top_k": self.top_k,
                 "max_new_tokens": self.max_new_tokens, "reduce_max_new_tokens": self.reduce_max_new_tokens,
                 "fan_in": self.fan_in, "reduce_max_chars": self.reduce_max_chars, "concurrency": self.actors,
                 "batch_size": self.batch_size, "num_cpus": self.actor_cpus, "num_gpus": self.actor_gpus,
                 "device": self.device, "ray_address": self.ray_address, "ray_num_cpus": self.num_cpus,
                 "store": self.store}
        data.update({k: v for k, v in flags.items() if v is not None})
        data.setdefault("store", DEFAULT_STORE)
        if self.retry_skipped:
            data["retry_skipped"] = True
        if self.s3_endpoint:
            data.setdefault("storage_options", {})["endpoint_url"] = self.s3_endpoint
        return SummarizeJobConfig.model_validate(data)


def job_logging(verbose: bool) -> None:
    """Logging of a job: INFO (DEBUG with ``--verbose``), with timestamps where no handler is set up yet."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def invalid_configuration(prog: str, exc: Exception) -> typer.Exit:
    """Print ``error: <prog>: invalid configuration: ...`` and return the Exit(2) to raise."""
    typer.echo(f"error: {prog}: invalid configuration: {exc}", err=True)
    return typer.Exit(2)


def parse_flags(flags_cls: type, argv: list[str]):
    """``argv`` parsed into a ``flags_cls`` instance exactly as the job's command line parses it (for tests and
    tools); a usage error prints as on the command line and raises SystemExit(2)."""
    captured = {}
    app = typer.Typer(add_completion=False)

    @app.command()
    @with_options(flags=flags_cls)
    def parse(*, flags) -> None:
        captured["flags"] = flags

    code = run_app(app, argv, prog_name="parse")
    if code:
        raise SystemExit(code)
    return captured["flags"]
