"""The ``memorag`` command.

* ``memorag memorize PATH --save-dir DIR``: one process, no Ray: memorize a text file (or a folder of .txt files)
  into a bundle (memory + chunks + index) at DIR (local folder or ``s3://``), with a progress bar and stats.
* ``memorag ask "QUESTION" --from DIR``: answer from a saved bundle (``--task qa|memorag|summarize``).
* ``memorag ask "QUESTION" --collection NAME --store URL``: answer over a published collection with the query
  engine (``memorag_core.query``): the answer streams, then the evidence with doc ids.
* ``memorag memorize --corpus URL --collection NAME ...``: the corpus-scale Ray Data job (``jobs.memorize``),
  on the local Ray unless ``--ray-address`` / ``RAY_ADDRESS`` says otherwise.
* ``memorag evaluate ...``: the evaluation harness (``jobs.evaluate``).
* ``memorag summarize --collection NAME --store URL ...``: bulk, incremental summaries of a published collection
  (``jobs.summarize``), on the local Ray unless ``--ray-address`` / ``RAY_ADDRESS`` says otherwise.
* ``memorag serve --store URL``: the HTTP API on a local Ray + Serve (``jobs.serve``, ``pipeline.serve``).
* ``memorag keys create|revoke|list --store URL --collection NAME``: API keys per collection.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="MemoRAG: memory-augmented retrieval-augmented generation.")


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
def memorize(
    path: Path = typer.Argument(..., help="a text file, or a folder of .txt files"),
    save_dir: str = typer.Option(..., "--save-dir", "-o", help="bundle folder: local path or s3://bucket/prefix"),
    model: Optional[str] = typer.Option(None, help="memory model folder or hub id (default: embedded SmolLM2)"),
    embedder: Optional[str] = typer.Option(None, help="embedder folder or hub id (default: embedded MiniLM)"),
    kind: str = typer.Option("compressed_kv", help="memory kind: compressed_kv | full_kv | gist | beacon"),
    ratio: int = typer.Option(4, help="compression ratio (window tokens per kept entry)"),
    window: int = typer.Option(1024, help="tokens per prefill window"),
    positions: str = typer.Option("compact", help="compact | original"),
    chunk_size: Optional[int] = typer.Option(None, help="retrieval chunk size in the embedder's tokens (default: "
                                             "the embedder's limit; a larger size is refused)"),
    max_chars: Optional[int] = typer.Option(None, help="read only the first N characters (quick trials)"),
    storage_dtype: Optional[str] = typer.Option(None, help="store K/V as int8 or fp8 (default: keep dtype)"),
) -> None:
    """Memorize a text (or a folder of texts) into a bundle: memory, chunks and index."""
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
    question: Optional[str] = typer.Argument(None, help="the question (omit with --task summarize)"),
    from_dir: Optional[str] = typer.Option(None, "--from", help="bundle written by `memorag memorize PATH`"),
    collection: Optional[str] = typer.Option(None, help="published collection to ask (with --store)"),
    store: Optional[str] = typer.Option(None, help="store root of --collection: folder or s3://bucket/prefix"),
    version: Optional[str] = typer.Option(None, help="collection version (default: the live one)"),
    units: int = typer.Option(4, help="collection: unit memories that write clues"),
    top_k: int = typer.Option(5, help="collection: passages handed to the generator"),
    doc_id: Optional[str] = typer.Option(None, help="collection, --task summarize: the document to summarize"),
    s3_endpoint: Optional[str] = typer.Option(None, help="S3-compatible endpoint URL of an s3:// store"),
    task: str = typer.Option("memorag", help="qa (bundle: memory only; collection: plain RAG) | memorag (clues + "
                                             "retrieval) | summarize"),
    model: Optional[str] = typer.Option(None, help="memory model (default: the one the bundle was memorized with)"),
    embedder: Optional[str] = typer.Option(None, help="embedder (default: the one the bundle records; another "
                                           "one is refused by name)"),
    generator: Optional[str] = typer.Option(None, help="generator spec: path, hf:ID, vllm:ID, openai:MODEL@URL"),
    kind: Optional[str] = typer.Option(None, help="memory kind (default: from the bundle)"),
    ratio: Optional[int] = typer.Option(None, help="compression ratio (default: from the bundle)"),
    window: Optional[int] = typer.Option(None, help="prefill window (default: from the bundle)"),
    positions: Optional[str] = typer.Option(None, help="compact | original (default: from the bundle)"),
    hits: int = typer.Option(3, help="chunks handed to the generator (fused over the question and its clues)"),
    max_new_tokens: int = typer.Option(128, help="most tokens in the answer"),
    clue_max_new_tokens: int = typer.Option(64, help="most tokens per clue (spans, surrogate questions, draft)"),
    use_memory_answer: bool = typer.Option(False, help="add the memory's draft answer to the evidence"),
    show_clues: bool = typer.Option(True, help="print the clues and the retrieved chunks"),
) -> None:
    """Answer a question from a published collection (--collection, --store) or a saved bundle (--from).

    Bundle memory settings are read from the bundle; flags override them."""
    from memorag_core.errors import InvalidInputError

    if (collection is None) == (from_dir is None):
        raise InvalidInputError("give either --collection NAME --store URL, or --from BUNDLE_DIR")
    if collection is not None:
        if not store:
            raise InvalidInputError("--collection needs --store URL")
        _ask_collection(question, collection, store, version=version, task=task, units=units, top_k=top_k,
                        doc_id=doc_id, generator=generator, max_new_tokens=max_new_tokens,
                        clue_max_new_tokens=clue_max_new_tokens, use_draft=use_memory_answer,
                        show_clues=show_clues, s3_endpoint=s3_endpoint)
        return
    config = stored_memory_config(from_dir, model=model, kind=kind, ratio=ratio, window=window, positions=positions)
    embedder, chunk_size = stored_retrieval(from_dir, embedder)
    pipe = _pipeline(config, embedder, generator, hits, chunk_size)
    pipe.load(from_dir)  # refuses a bundle embedded with another model, by name
    start = time.perf_counter()
    if task == "memorag":
        clues = pipe.clues(question, use_memory_answer=use_memory_answer, max_new_tokens=clue_max_new_tokens)
        hits_ = pipe.evidence(question, clues)
        if show_clues:
            typer.echo("clues:")
            for q in clues.retrieval_queries:
                typer.echo(f"  - {q}")
            typer.echo(f"retrieved {len(hits_)} chunks ({clues.seconds:.1f}s for clues)")
        evidence = [h.text.strip() for h in hits_]
        if clues.draft_answer:
            evidence.append(f"The answer might be {clues.draft_answer}.")
        typer.echo("answer: ", nl=False)
        for piece in pipe.stream_answer(question, evidence, max_new_tokens=max_new_tokens):
            typer.echo(piece, nl=False)
        typer.echo("")
    else:
        typer.echo("answer: " + pipe(query=question, task_type=task, max_new_tokens=max_new_tokens))
    typer.echo(f"({time.perf_counter() - start:.1f}s)")


def _ask_collection(question: Optional[str], collection: str, store: str, *, version: Optional[str], task: str,
                    units: int, top_k: int, doc_id: Optional[str], generator: Optional[str], max_new_tokens: int,
                    clue_max_new_tokens: int, use_draft: bool, show_clues: bool, s3_endpoint: Optional[str]) -> None:
    """``memorag ask --collection``: the query engine in this process; the answer streams, then the evidence."""
    from memorag_core.query import QueryEngine, QueryRequest

    options = {"endpoint_url": s3_endpoint} if s3_endpoint else None
    engine = QueryEngine(store, options, generator=generator)
    request = QueryRequest(question, task=task, max_new_tokens=max_new_tokens, units=units, top_k=top_k,
                           clue_max_new_tokens=clue_max_new_tokens, doc_id=doc_id, use_draft=use_draft)
    typer.echo("answer: ", nl=False)
    result = None
    for event in engine.stream(collection, request, version):
        if event.kind == "token":
            typer.echo(event.text, nl=False)
        else:
            result = event.result
    typer.echo("")
    assert result is not None
    if show_clues and result.clues:
        typer.echo("clues:")
        for c in result.clues:
            for kind, lines in (("span", c.spans), ("question", c.surrogates), ("key point", c.key_points)):
                for line in lines:
                    typer.echo(f"  [{c.unit_id[:8]} {kind}] {line}")
            if c.draft:
                typer.echo(f"  [{c.unit_id[:8]} draft] {c.draft}")
    typer.echo(f"evidence ({collection} @ {result.version}):")
    for i, e in enumerate(result.evidence, 1):
        text = " ".join(e.text.split())
        typer.echo(f"  {i}. {e.doc_id}  score {e.score:.4f}  [{', '.join(e.sources)}]  "
                   f"{text[:100]}{'...' if len(text) > 100 else ''}")
    t = result.timings
    typer.echo("(" + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()) + ")")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                "help_option_names": []})
def summarize(ctx: typer.Context) -> None:
    """Summarize a published collection: unit, document and collection summaries, incrementally (Ray job).

    Every flag goes to ``jobs.summarize`` (``memorag summarize --help`` lists them).
    """
    from jobs.summarize import main as summarize_main

    code = summarize_main(list(ctx.args))
    if code:
        raise typer.Exit(code)


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
    key_id: str = typer.Argument(..., help="the key id (the 16 hex characters after 'mrg_'), or the key"),
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: dispatches the Ray job and evaluation to their own parsers, the rest to typer."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "evaluate":
        from jobs.evaluate import main as evaluate_main

        return evaluate_main(argv[1:]) or 0
    if argv and argv[0] == "memorize" and any(a.split("=")[0] in ("--corpus", "--collection") for a in argv[1:]):
        from jobs.memorize import main as job_main

        return job_main(argv[1:]) or 0
    from memorag_core.errors import MemoRAGError

    try:
        app(args=argv, standalone_mode=False)
    except MemoRAGError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # click's usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
