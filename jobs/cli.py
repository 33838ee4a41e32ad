"""The ``memorag`` command: one command tree for every job (``memorag --help`` lists them).

* ``memorag memorize PATH --save-dir DIR``: one process, no Ray: memorize a text file (or a folder of .txt files)
  into a bundle (memory + chunks + index) at DIR (local folder or ``s3://``), with a progress bar and stats.
* ``memorag memorize --corpus URL --collection NAME --store URL``: the corpus-scale Ray Data job
  (``jobs.memorize``; the same options as ``python -m jobs.memorize``), on the local Ray unless ``--ray-address`` /
  ``RAY_ADDRESS`` says otherwise.
* ``memorag ask "QUESTION" --from DIR``: answer from a saved bundle (``--task qa|memorag|summarize``).
* ``memorag ask "QUESTION" --collection NAME --store URL``: answer over a published collection with the query
  engine (``memorag_core.query``): the answer streams, then the evidence with doc ids (``--json``: the HTTP API's
  answer object).
* ``memorag summarize --collection NAME --store URL ...``: bulk, incremental summaries of a published collection
  (``jobs.summarize``, the same options as ``python -m jobs.summarize``).
* ``memorag evaluate ...``: the evaluation harness (``jobs.evaluate``).
* ``memorag serve --store URL``: the HTTP API on a local Ray + Serve (``jobs.serve``, ``pipeline.serve``).
* ``memorag keys create|revoke|list --store URL --collection NAME``: API keys per collection.
* ``memorag collections --store URL`` / ``memorag collections show NAME --store URL``: what a store holds.
* ``memorag gc --store URL [--dry-run]``: delete old versions and unused unit memories (the store's gc).

Usage errors (unknown option, missing argument, bad value) print the usage line and the message and exit with 2;
errors of the library print ``error: ...`` and exit with 2 (:func:`jobs.options.run_app`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from jobs.evaluate import evaluate_command
from jobs.options import MemorizeJobFlags, SummarizeJobFlags, run_app, usage_error, with_options

app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown",
                  help="MemoRAG: memory-augmented retrieval-augmented generation.")

_BUNDLE = "Bundle (one process): PATH --save-dir DIR"


def read_context(path: Path) -> str:
    """The text of one file, or of every .txt file under a folder (sorted, each headed by its relative name)."""
    from memorag_core.errors import InvalidInputError
    from memorag_core.memory import check_text

    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise InvalidInputError(f"folder {path} holds no .txt files")
        parts = [f"## {f.relative_to(path)}\n\n{check_text(f.read_bytes(), str(f))}" for f in files]
        return "\n\n".join(parts)
    if not path.exists():
        raise InvalidInputError(f"{path} does not exist")
    return check_text(path.read_bytes(), str(path))


def _pipeline(config, embedder: Optional[str], generator: Optional[str], hits: int, chunk_size: Optional[int]):
    from memorag_core.facade import MemoRAG

    pipe = MemoRAG(ret_model_name_or_path=embedder, gen_model_name_or_path=generator, ret_hit=hits,
                   retrieval_chunk_size=chunk_size, memory_config=config)
    pipe.memory.show_progress = True
    return pipe


def stored_memory_config(bundle_dir: str, **overrides):
    """The memory config a bundle was memorized with (its manifest), with the non-None ``overrides`` applied.

    Bundles written before the manifest recorded the config give the defaults plus the overrides.
    """
    from memorag_core.memory import MemoryConfig
    from memorag_core.store.bundle import Bundle

    stored = dict((Bundle(bundle_dir).read_manifest().get("memory") or {}).get("config") or {})
    stored.pop("load", None)  # device and dtype belong to this machine, not to the bundle
    stored.update({k: v for k, v in overrides.items() if v is not None})
    return MemoryConfig.for_kind(**stored)


def stored_retrieval(bundle_dir: str, embedder: Optional[str]) -> tuple[Optional[str], Optional[int]]:
    """The embedder (None = the embedded one) and chunk size a bundle was indexed with; ``embedder`` overrides
    the name (the facade then refuses a mismatch by name when loading)."""
    from memorag_core.models import EMBEDDED_EMBEDDER
    from memorag_core.store.bundle import Bundle

    retrieval = Bundle(bundle_dir).read_manifest().get("retrieval") or {}
    name = embedder or retrieval.get("embedder")
    return (None if name in (None, EMBEDDED_EMBEDDER) else name), retrieval.get("chunk_size")


@app.command()
@with_options(job=MemorizeJobFlags)
def memorize(
    ctx: typer.Context,
    path: Annotated[Optional[Path], typer.Argument(
        metavar="PATH", help="a text file, or a folder of .txt files, to memorize into a bundle (--save-dir)",
        show_default=False)] = None,
    save_dir: Annotated[Optional[str], typer.Option(
        "--save-dir", "-o", help="bundle folder: local path or s3://bucket/prefix", rich_help_panel=_BUNDLE)] = None,
    window: Annotated[int, typer.Option(min=1, help="tokens per prefill window", rich_help_panel=_BUNDLE)] = 1024,
    positions: Annotated[Literal["compact", "original"], typer.Option(
        help="memory positions", rich_help_panel=_BUNDLE)] = "compact",
    chunk_size: Annotated[Optional[int], typer.Option(
        min=1, help="retrieval chunk size in the embedder's tokens (default: the embedder's limit; a larger size "
                    "is refused)", rich_help_panel=_BUNDLE)] = None,
    *,
    job: MemorizeJobFlags,
) -> None:
    """Memorize a text or folder into a bundle (`memorag memorize PATH --save-dir DIR`, one process), or a corpus
    into a new version of a collection (`memorag memorize --corpus URL --collection NAME --store URL`, a Ray job:
    the same options as `python -m jobs.memorize`)."""
    bundle = {"--" + n.replace("_", "-"): ctx.get_parameter_source(n).name in ("COMMANDLINE", "ENVIRONMENT")
              for n in ("save_dir", "window", "positions", "chunk_size")}
    if path is None:
        if not (job.corpus or job.collection or job.config):
            usage_error(ctx, "give PATH --save-dir DIR (a bundle), or --corpus URL --collection NAME (the job)")
        wrong = [k for k, v in bundle.items() if v]
        if wrong:
            usage_error(ctx, f"{', '.join(wrong)}: bundle option(s) (with PATH), not for the corpus job")
        from jobs.memorize import run_job_command

        run_job_command(job)
        return
    job_only = [f.name for f in dataclasses.fields(job) if ctx.get_parameter_source(f.name).name == "COMMANDLINE"
                and f.name not in ("memory_model", "memory_kind", "ratio", "embedder", "max_chars", "storage_dtype")]
    if job_only:
        names = ", ".join("--" + n.replace("_", "-").replace("corpus-format", "format") for n in job_only)
        usage_error(ctx, f"{names}: corpus job option(s), not for a bundle from PATH")
    if not save_dir:
        usage_error(ctx, "memorizing PATH into a bundle needs --save-dir DIR")
    memorize_bundle(path, save_dir, model=job.memory_model, embedder=job.embedder,
                    kind=job.memory_kind or "compressed_kv", ratio=job.ratio or 4, window=window,
                    positions=positions, chunk_size=chunk_size, max_chars=job.max_chars,
                    storage_dtype=None if job.storage_dtype in (None, "keep") else job.storage_dtype)


def memorize_bundle(path: Path, save_dir: str, *, model: Optional[str], embedder: Optional[str], kind: str,
                    ratio: int, window: int, positions: str, chunk_size: Optional[int], max_chars: Optional[int],
                    storage_dtype: Optional[str]) -> None:
    """``memorag memorize PATH``: memorize a text (or a folder of texts) into a bundle: memory, chunks, index."""
    from memorag_core.memory import MemoryConfig

    text = read_context(path)
    if max_chars:
        text = text[:max_chars]
    config = MemoryConfig.for_kind(kind=kind, model=model, ratio=ratio, window=window, positions=positions)
    pipe = _pipeline(config, embedder, None, 3, chunk_size)
    start = time.perf_counter()
    pipe.memorize(text, save_dir=save_dir, print_stats=True, storage_dtype=storage_dtype)
    typer.echo(f"saved to {save_dir} in {time.perf_counter() - start:.1f}s")


@app.command()
def ask(
    ctx: typer.Context,
    question: Optional[str] = typer.Argument(None, metavar="QUESTION", show_default=False,
                                             help="the question (omit with --task summarize)"),
    from_dir: Optional[str] = typer.Option(None, "--from", help="bundle written by `memorag memorize PATH`"),
    collection: Optional[str] = typer.Option(None, help="published collection to ask (with --store)"),
    store: Optional[str] = typer.Option(None, help="store root of --collection: folder or s3://bucket/prefix"),
    version: Optional[str] = typer.Option(None, help="collection version (default: the live one)"),
    units: int = typer.Option(4, help="collection: unit memories that write clues"),
    top_k: int = typer.Option(5, help="collection: passages handed to the generator"),
    candidates: int = typer.Option(0, help="collection: also return the final ranking's first N passages (the "
                                   "re-ranked candidates; `ranking` in --json)"),
    doc_id: Optional[str] = typer.Option(None, help="collection, --task summarize: the document to summarize"),
    s3_endpoint: Optional[str] = typer.Option(None, help="S3-compatible endpoint URL of an s3:// store"),
    json_output: bool = typer.Option(False, "--json", help="print the answer as the HTTP API's JSON object "
                                     "(POST /v1/collections/{name}/query), nothing else"),
    task: Literal["memorag", "qa", "summarize"] = typer.Option(
        "memorag", help="qa (plain RAG: the question alone retrieves) | memorag (candidates re-ranked by the memory "
        "model's attention; text clues with --plan) | summarize"),
    model: Optional[str] = typer.Option(None, help="memory model (default: the one the bundle was memorized with)"),
    embedder: Optional[str] = typer.Option(None, help="embedder (default: the one the bundle records; another "
                                           "one is refused by name)"),
    generator: Optional[str] = typer.Option(None, help="generator spec: path, hf:ID, vllm:ID, openai:MODEL@URL"),
    kind: Optional[Literal["compressed_kv", "full_kv", "gist", "beacon"]] = typer.Option(
        None, help="memory kind (default: from the bundle)"),
    ratio: Optional[int] = typer.Option(None, help="compression ratio (default: from the bundle)"),
    window: Optional[int] = typer.Option(None, help="prefill window (default: from the bundle)"),
    positions: Optional[Literal["compact", "original"]] = typer.Option(
        None, help="compact | original (default: from the bundle)"),
    hits: int = typer.Option(3, help="chunks handed to the generator (fused over the question and its clues)"),
    max_new_tokens: int = typer.Option(128, help="most tokens in the answer"),
    clue_max_new_tokens: int = typer.Option(64, help="most tokens per clue (spans, surrogate questions, draft)"),
    use_memory_answer: bool = typer.Option(False, help="the memory also writes a draft answer, which joins "
                                           "retrieval as one more query"),
    show_clues: bool = typer.Option(True, help="print the clues and the retrieved chunks"),
    plan: Optional[str] = typer.Option(None, help="JSON file (or object) of retrieval plan settings (PlanConfig "
                                       "fields: rerank_candidates, rerank_weight, text_clues, bridge_weight, "
                                       "prf_alpha, evidence_order, sources, depth, fusion {...}); the same fields "
                                       "as the serve config's retriever.plan"),
) -> None:
    """Answer a question from a published collection (--collection, --store) or a saved bundle (--from).

    Bundle memory settings are read from the bundle; flags override them."""
    if (collection is None) == (from_dir is None):
        usage_error(ctx, "give either --collection NAME --store URL, or --from BUNDLE_DIR")
    if collection is not None:
        if not store:
            usage_error(ctx, "--collection needs --store URL")
        _ask_collection(question, collection, store, version=version, task=task, units=units, top_k=top_k,
                        candidates=candidates, doc_id=doc_id, generator=generator, max_new_tokens=max_new_tokens,
                        clue_max_new_tokens=clue_max_new_tokens, use_draft=use_memory_answer,
                        show_clues=show_clues, s3_endpoint=s3_endpoint, plan=plan, json_output=json_output)
        return
    config = stored_memory_config(from_dir, model=model, kind=kind, ratio=ratio, window=window, positions=positions)
    embedder, chunk_size = stored_retrieval(from_dir, embedder)
    pipe = _pipeline(config, embedder, generator, hits, chunk_size)
    from memorag_core.retrieval.queries import load_plan_config

    pipe.plan_config = load_plan_config(plan)
    pipe.load(from_dir)  # refuses a bundle embedded with another model, by name
    pipe.clue_max_new_tokens = clue_max_new_tokens
    start = time.perf_counter()
    emit(pipe.stream(question, task, max_new_tokens=max_new_tokens, use_memory_answer=use_memory_answer),
         show_clues, json_output)
    if not json_output:
        typer.echo(f"({time.perf_counter() - start:.1f}s in all)")


def _ask_collection(question: Optional[str], collection: str, store: str, *, version: Optional[str], task: str,
                    units: int, top_k: int, doc_id: Optional[str], generator: Optional[str], max_new_tokens: int,
                    clue_max_new_tokens: int, use_draft: bool, show_clues: bool, s3_endpoint: Optional[str],
                    plan: Optional[str] = None, json_output: bool = False, candidates: int = 0) -> None:
    """``memorag ask --collection``: the query engine in this process; the answer streams, then the evidence.
    With ``json_output`` it prints only :meth:`QueryResult.to_api` (the HTTP API's answer object)."""
    from memorag_core.query import QueryEngine, QueryRequest

    options = {"endpoint_url": s3_endpoint} if s3_endpoint else None
    from memorag_core.retrieval.queries import load_plan_config

    engine = QueryEngine(store, options, generator=generator, plan=load_plan_config(plan))
    request = QueryRequest(question, task=task, max_new_tokens=max_new_tokens, units=units, top_k=top_k,
                           clue_max_new_tokens=clue_max_new_tokens, doc_id=doc_id, use_draft=use_draft,
                           candidates=candidates)
    emit(engine.stream(collection, request, version), show_clues, json_output)


def emit(events, show_clues: bool, json_output: bool) -> None:
    """Print a query's events: the HTTP API's JSON object alone (``json_output``), or the streamed answer and
    then its clues, evidence and timings (every ``ask`` door prints this way)."""
    if json_output:
        from memorag_core.query.compose import final_result

        typer.echo(json.dumps(final_result(events).to_api(), ensure_ascii=False))
        return
    print_events(events, show_clues)


def print_events(events, show_clues: bool) -> None:
    """Stream a query's answer, then its clues, evidence and timings."""
    result, started = None, False
    for event in events:
        if event.kind == "token":
            if not started:  # after the models have loaded (their progress bars go to stderr first)
                typer.echo("answer: ", nl=False)
                started = True
            typer.echo(event.text, nl=False)
        else:
            result = event.result
    typer.echo("" if started else "answer: ")
    if result is None:  # pragma: no cover - a composition always ends with a final event
        raise RuntimeError("the query ended without a result")
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if show_clues and result.clues:
        typer.echo("clues:")
        for c in result.clues:
            for kind, lines in (("span", c.spans), ("question", c.surrogates), ("key point", c.key_points)):
                for line in lines:
                    typer.echo(f"  [{c.unit_id[:8]} {kind}] {line}")
            if c.draft:
                typer.echo(f"  [{c.unit_id[:8]} draft] {c.draft}")
    typer.echo(f"retrieved {len(result.evidence)} passages; evidence ({result.collection} @ {result.version}):")
    for i, e in enumerate(result.evidence, 1):
        text = " ".join(e.text.split())
        typer.echo(f"  {i}. {e.doc_id}  score {e.score:.4f}  [{', '.join(e.sources)}]  "
                   f"{text[:100]}{'...' if len(text) > 100 else ''}")
    t = result.timings
    typer.echo("(" + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()) + ")")


@app.command()
@with_options(flags=SummarizeJobFlags)
def summarize(*, flags: SummarizeJobFlags) -> None:
    """Summarize a published collection: unit, document and collection summaries, incrementally, into a versioned
    summaries namespace of the store (a Ray job; the same options as `python -m jobs.summarize`)."""
    from jobs.summarize import run_job_command

    run_job_command(flags)


app.command("evaluate")(evaluate_command)


@app.command()
def serve(
    store: str = typer.Option(..., "--store", help="store root: local folder or s3://bucket/prefix"),
    host: str = typer.Option("127.0.0.1", help="address to serve HTTP on"),
    port: int = typer.Option(8000, help="HTTP port"),
    config: Optional[Path] = typer.Option(None, "--config", help="Serve config file (pipeline/serve/serve_config.yaml)"),
    no_auth: bool = typer.Option(False, "--no-auth", help="no API keys (refused unless HOST is loopback)"),
    ray_address: Optional[str] = typer.Option(None, help="join this Ray cluster instead of starting a local one"),
) -> None:
    """Start a local Ray + Serve running the memorag HTTP API over a store; prints the URL."""
    from jobs.serve import app_config, serve_forever, start_serve

    from memorag_core.errors import InvalidInputError

    try:
        cfg = app_config(store, host=host, config_file=str(config) if config else None, no_auth=no_auth)
    except ValueError as exc:  # pydantic's ValidationError names the field
        raise InvalidInputError(str(exc)) from None
    url = start_serve(cfg, port=port, ray_address=ray_address, progress=lambda m: typer.echo(m, err=True))
    typer.echo(f"memorag serving at {url} (API docs: {url}/docs)", err=False)
    sys.stdout.flush()
    serve_forever(url)


keys_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="API keys per collection (stored hashed in the store).")
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    store: str = typer.Option(..., "--store", help="store root: local folder or s3://bucket/prefix"),
    collection: str = typer.Option(..., "--collection", help="the collection the key opens"),
    label: str = typer.Option("", help="a note stored with the key"),
    tenant: Optional[str] = typer.Option(None, help="who owns what the key's callers store (sessions, user "
                                                    "memories); give a revoked key's tenant to rotate it "
                                                    "(default: the new key's id)"),
) -> None:
    """Create a key; it is printed once (only its salted hash is stored)."""
    from memorag_core.store.keys import ApiKeyStore

    record, key = ApiKeyStore(store).create(collection, label, tenant=tenant)
    typer.echo(f"key id: {record.key_id} (tenant {record.tenant})", err=True)
    typer.echo(key)


@keys_app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., metavar="KEY_ID",
                                 help="the key id (the 16 hex characters after 'mrg_'), or the key"),
    store: str = typer.Option(..., "--store", help="store root"),
    collection: str = typer.Option(..., "--collection", help="the collection of the key"),
) -> None:
    """Revoke a key (a running service stops accepting it within a few seconds)."""
    from memorag_core.store.keys import ApiKeyStore, parse_key

    parsed = parse_key(key_id)
    ApiKeyStore(store).revoke(collection, parsed[0] if parsed else key_id)
    typer.echo(f"revoked {parsed[0] if parsed else key_id}")


@keys_app.command("list")
def keys_list(
    store: str = typer.Option(..., "--store", help="store root"),
    collection: str = typer.Option(..., "--collection", help="the collection"),
) -> None:
    """The key ids of a collection (never the keys)."""
    from memorag_core.store.keys import ApiKeyStore

    for r in ApiKeyStore(store).list(collection):
        typer.echo(f"{r.key_id}\t{r.tenant}\t{r.created_at}\t{r.label}")


# -- the store at a glance ----------------------------------------------------------------------------------------
collections_app = typer.Typer(add_completion=False, rich_markup_mode="markdown",
                              help="What a store holds: `memorag collections --store URL` lists the collections; "
                                   "`memorag collections show NAME --store URL` lists one's versions.")
app.add_typer(collections_app, name="collections")

StoreOpt = Annotated[Optional[str], typer.Option(
    "--store", envvar="MEMORAG_STORE", show_envvar=False,
    help="store root: local folder or s3://bucket/prefix (default $MEMORAG_STORE)")]
S3EndpointOpt = Annotated[Optional[str], typer.Option(help="S3-compatible endpoint URL of an s3:// store")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON (for scripts) instead of a table")]


def _open_store(ctx: typer.Context, store: Optional[str], s3_endpoint: Optional[str]):
    """The :class:`CollectionStore` at ``store``; a missing ``--store`` is a usage error, a bad URL the store's."""
    if not store:
        usage_error(ctx, "--store URL is required (or set $MEMORAG_STORE)")
    from memorag_core.errors import InvalidInputError
    from memorag_core.store import CollectionStore

    st = CollectionStore(store, {"endpoint_url": s3_endpoint} if s3_endpoint else None)
    if "://" not in store and not Path(st.root).is_dir():
        raise InvalidInputError(f"store {store} does not exist")
    return st


def _size(n: int) -> str:
    """Bytes in a unit people read: 1.2 MB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A plain text table: left-aligned columns, a rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@collections_app.callback(invoke_without_command=True)
def collections(ctx: typer.Context, store: StoreOpt = None, s3_endpoint: S3EndpointOpt = None,
                json_output: JsonOpt = False) -> None:
    """The collections of a store: live version, when it was published, documents, units, tokens, bytes (of the
    live version, its unit memories included), live summaries version and API keys."""
    if ctx.invoked_subcommand is not None:
        return
    from memorag_core.store.overview import store_overview

    rows = store_overview(_open_store(ctx, store, s3_endpoint))
    if json_output:
        typer.echo(json.dumps({"collections": [r.to_dict() for r in rows]}, indent=1))
        return
    if not rows:
        typer.echo(f"no collections at {store}")
        return
    header = ["collection", "live version", "published at", "documents", "units", "tokens", "bytes", "summaries",
              "keys"]
    typer.echo(_table(header, [[r.collection, r.live_version or "-", (r.published_at or "-")[:19],
                                f"{r.documents:,}", f"{r.units:,}", f"{r.tokens:,}", _size(r.bytes),
                                r.summaries_version or "-", str(r.keys)] for r in rows]))


@collections_app.command("show")
def collections_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="the collection", show_default=False)],
    store: StoreOpt = None, s3_endpoint: S3EndpointOpt = None, json_output: JsonOpt = False,
) -> None:
    """The versions of one collection, oldest first, and what each added or removed (units, documents)."""
    from memorag_core.store.overview import collection_overview, version_history

    st = _open_store(ctx, store, s3_endpoint)
    info = collection_overview(st, name)
    history = version_history(st, name)
    if json_output:
        typer.echo(json.dumps({**info.to_dict(), "history": [v.to_dict() for v in history]}, indent=1))
        return
    typer.echo(f"{name} at {st.url}: live {info.live_version or '(none)'}, summaries "
               f"{info.summaries_version or '(none)'}, {info.keys} API keys")
    header = ["version", "created at", "live", "documents", "units", "tokens", "bytes", "+docs", "-docs", "+units",
              "-units"]
    typer.echo(_table(header, [[v.version, v.created_at[:19], "*" if v.live else "", f"{v.documents:,}",
                                f"{v.units:,}", f"{v.tokens:,}", _size(v.bytes), str(len(v.documents_added)),
                                str(len(v.documents_removed)), str(len(v.units_added)), str(len(v.units_removed))]
                               for v in history]))
    for v in history:
        for label, ids in (("added", v.documents_added), ("removed", v.documents_removed)):
            if ids and v is not history[0]:
                shown = ", ".join(ids[:10]) + (f" ... ({len(ids) - 10} more)" if len(ids) > 10 else "")
                typer.echo(f"{v.version}: documents {label}: {shown}")


@app.command()
def gc(
    ctx: typer.Context,
    store: StoreOpt = None,
    collection: Annotated[Optional[str], typer.Option(help="only this collection (default: every one)")] = None,
    keep_last: Annotated[int, typer.Option(min=1, help="newest versions kept per collection, the live one aside")
                         ] = 1,
    min_age: Annotated[float, typer.Option(
        min=0, help="seconds: anything younger is kept (a job may still be writing it)")] = 3600.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be deleted, delete nothing")] = False,
    s3_endpoint: S3EndpointOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Delete old collection versions, unit memories and staged files that no kept version uses, and old
    summaries versions: the store's own gc, which keeps the live version, the newest --keep-last, anything a
    running service or job holds (a lease) and anything younger than --min-age. Lists what it deletes."""
    from memorag_core.store.summaries import SummaryStore

    st = _open_store(ctx, store, s3_endpoint)
    names = [collection] if collection else st.list_collections()
    summaries = SummaryStore(st)
    out = []
    for name in names:
        r = st.gc(name, keep_last, min_age_s=min_age, dry_run=dry_run)
        s = summaries.gc(name, max(keep_last, 2), min_age_s=min_age, dry_run=dry_run)
        out.append({"collection": name, "live": r.live, "versions": r.removed_versions, "units": r.removed_units,
                    "staging": r.removed_staging, "summaries_versions": s["versions"],
                    "summaries_staged": s["staged"], "freed_bytes": r.freed_bytes + s["freed_bytes"]})
    total = sum(o["freed_bytes"] for o in out)
    if json_output:
        typer.echo(json.dumps({"dry_run": dry_run, "collections": out, "freed_bytes": total}, indent=1))
        return
    verb = "would delete" if dry_run else "deleted"
    for o in out:
        for what, key in (("version", "versions"), ("unit", "units"), ("staged chunk table", "staging"),
                          ("summaries version", "summaries_versions"), ("staged summary", "summaries_staged")):
            for item in o[key]:
                typer.echo(f"{verb} {o['collection']}: {what} {item}")
    n = sum(len(o[k]) for o in out for k in ("versions", "units", "staging", "summaries_versions",
                                              "summaries_staged"))
    typer.echo(f"{verb} {n} items, {_size(total)}, in {len(out)} collections" + (" (dry run)" if dry_run else ""))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``memorag``: the exit code (0 done, 2 usage error or library error; see
    :func:`jobs.options.run_app`)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_app(app, argv, prog_name="memorag")


if __name__ == "__main__":
    raise SystemExit(main())
