"""The summarize job: a published collection version -> unit, document and collection summaries, incrementally.

Run it on a cluster with ``ray job submit -- python -m jobs.summarize --collection NAME --store s3://...``, locally
with ``memorag summarize --collection NAME --store DIR`` or ``python -m jobs.summarize ...``, or on a schedule
(``infra/kuberay/cronjob-summarize.yaml``, or cron + ``ray job submit``: docs/summarize.md).

1. **plan** (driver): the live collection version's units (ids, documents, order); every unit's summary key
   ``sha256(unit id, generator, prompt version, settings)``; units whose key is staged are done. When the live
   summaries version already covers exactly these units with these settings, the job prints one line and stops
   (no Ray is started).
2. **unit summaries** (Ray Data, :class:`pipeline.summarize_stage.UnitSummaryStage` actors holding a query engine):
   key points from each unit's memory -> the unit's supporting passages -> one batched generation per batch; each
   summary is staged by the actor as soon as it exists. Bad units (missing or corrupt memory, nothing to
   summarize, empty output) are reported and skipped.
3. **reduce** (:class:`pipeline.summarize_stage.ReduceWorker` actors, in dependent waves): one summary per
   document that spans several units, then one for the collection, each a tree of bounded prompts
   (:func:`memorag_core.query.summarize.plan_reduce`); nodes are content-addressed and staged, so only nodes with a
   changed input are recomputed.
4. **publish**: ``summaries/units.parquet``, ``documents.parquet``, ``collection.parquet`` and ``report.md`` in a
   new summaries version (:mod:`memorag_core.store.summaries`), manifest, then its own pointer swap: a killed run
   publishes nothing, and the collection's own pointer is never touched.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import typer
from pydantic import BaseModel, ConfigDict, Field

from jobs.options import SummarizeJobFlags, invalid_configuration, job_logging, run_app, with_options
from memorag_core.generators.resolve import resolve_generator  # noqa: F401 - re-exported for callers of jobs

logger = logging.getLogger(__name__)


class SummarizeJobConfig(BaseModel):
    """Everything the summarize job needs. Every field is described; validated once at the edge."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(description="Store root: a local folder or s3://bucket/prefix.")
    collection: str = Field(description="Collection to summarize (its live version unless `version` is given).")
    version: str | None = Field(None, description="Collection version to summarize; None = the live one.")
    storage_options: dict = Field(default_factory=dict, description="fsspec options for the store root.")
    generator: str = Field("auto", description=(
        "Who writes the summaries: 'memory' (the memory model itself through transformers, no second copy of the "
        "weights), 'auto' (vLLM's engine on the memory model where vLLM is installed and supports the model here, "
        "else 'memory'), or a spec: 'hf:PATH', 'vllm:PATH', 'openai:MODEL@URL'."))
    key_point_tokens: int = Field(128, gt=0, description="Most tokens of a unit's key points (memory decode).")
    top_k: int = Field(4, gt=0, description="Supporting passages per unit summary.")
    max_new_tokens: int = Field(160, gt=0, description="Most tokens of a unit summary.")
    reduce_max_new_tokens: int = Field(200, gt=0, description="Most tokens of a document / collection summary.")
    fan_in: int = Field(8, ge=2, description="Most summaries one reduce prompt reads.")
    reduce_max_chars: int = Field(6000, gt=0, description="Most characters of summaries in one reduce prompt.")
    concurrency: int = Field(1, gt=0, description="Summarize actors (one query engine each).")
    batch_size: int = Field(8, gt=0, description="Units per actor call: their prompts are generated as one batch.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per actor (fractional in tests).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (1 on a GPU cluster).")
    device: str | None = Field(None, description="Device of the models (None: the collection's setting).")
    retry_skipped: bool = Field(False, description="Run even when only previously skipped units are missing.")
    ray_address: str | None = Field(None, description="Ray cluster to join; None: RAY_ADDRESS or a local Ray.")
    num_cpus_local: int | None = Field(None, alias="ray_num_cpus",
                                       description="CPUs of a local Ray started by the job (None = all).")

    def settings(self):
        from memorag_core.query.summarize import SummarySettings

        return SummarySettings(key_point_tokens=self.key_point_tokens, top_k=self.top_k,
                               max_new_tokens=self.max_new_tokens, reduce_max_new_tokens=self.reduce_max_new_tokens,
                               fan_in=self.fan_in, reduce_max_chars=self.reduce_max_chars)


# -- planning ---------------------------------------------------------------------------------------------------
def _init_ray(config: SummarizeJobConfig) -> None:
    """Join or start Ray as the memorize job does (same runtime env: PYTHONPATH, offline flags)."""
    from pipeline.ray_env import init_ray

    init_ray(config.ray_address, config.num_cpus_local)


# -- the job -----------------------------------------------------------------------------------------------------
def run_summarize_job(config: SummarizeJobConfig, echo=print):
    """Summarize ``config.collection`` and publish a new summaries version (or say that nothing changed); returns
    the run's :class:`pipeline.summarize_stage.SummarizeStats`.

    Raises ArtifactNotFoundError (no such collection / version), PublishConflictError (another summarize run
    published first; rerun: staged work is kept), and the store's errors.
    """
    from memorag_core.errors import ArtifactNotFoundError
    from memorag_core.store import CollectionStore
    from memorag_core.store.summaries import SummaryStore

    t0 = time.perf_counter()
    store = CollectionStore(config.store, config.storage_options or None)
    summaries = SummaryStore(store)
    version = config.version or store.current_version(config.collection)
    if version is None:
        raise ArtifactNotFoundError(f"collection {config.collection!r} has no live version at {store.url}")
    # Held until the job ends: gc keeps the collection version read here, the summaries version written here and
    # every staged summary (a running job's records are listed by no summaries manifest until it publishes).
    with store.job_lease(config.collection, "summarize", [version]), \
            summaries.versions.job_lease(config.collection, "summarize") as lease:
        return _summarize(config, store, summaries, version, lease, echo, t0)


def _summarize(config: SummarizeJobConfig, store, summaries, version: str, lease, echo, t0: float):
    """The job's phases, under its leases (see :func:`run_summarize_job`)."""
    from memorag_core.query.summarize import PROMPT_VERSION, plan_summaries, read_units
    from memorag_core.store.summaries import (
        REPORT,
        build_report,
        content_key,
        summaries_current,
        summaries_manifest,
        summary_rows,
        units_digest,
        write_summary_table,
    )
    from pipeline.summarize_stage import SummarizeStats, run_reduce, run_unit_summaries

    reader = store.open_version(config.collection, version)
    manifest = reader.manifest
    memory_config = dict((manifest.config.get("memory_stage") or {}).get("memory") or {})
    gen_spec, model_name, gen_identity = resolve_generator(config.generator, memory_config,
                                                           manifest.models.get("memory"))
    settings = config.settings()
    embed_cfg = manifest.config.get("chunk_embed") or {}
    basis = {"generator": gen_identity, "prompt_version": PROMPT_VERSION, "settings": settings.to_dict(),
             "embedder": manifest.models["embedder"].id if "embedder" in manifest.models else None,
             "chunk_tokens": embed_cfg.get("chunk_tokens")}
    run_key = content_key("run", basis)
    stats = SummarizeStats(collection=config.collection, source_version=version, generator=model_name)
    units = read_units(reader)
    stats.units = len(units)
    digest = units_digest([u.unit_id for u in units])

    previous = summaries.open(config.collection)
    if summaries_current(previous, run_key, digest, config.retry_skipped):
        stats.nothing_to_do = True
        stats.summaries_version = previous.version
        stats.seconds = time.perf_counter() - t0
        skipped = len(previous.extra.get("skipped") or {})
        echo(f"summaries of {config.collection} are current: summaries version {previous.version} covers the "
             f"{len(units)} units of collection version {version}; nothing to do"
             + (f" ({skipped} units skipped earlier; --retry-skipped tries them again)" if skipped else ""))
        return stats
    writer = summaries.new_version(config.collection)  # the summaries pointer it must replace is read here
    lease.hold(writer.version)

    # 1. unit summaries: staged ones are done
    keys = {u.unit_id: content_key("unit", u.unit_id, basis) for u in units}
    staged = summaries.staged_many("units", sorted(keys.values()))
    todo = [u for u in units if keys[u.unit_id] not in staged]
    stats.units_cached = len(units) - len(todo)
    logger.info("%s/%s: %d units, %d summaries staged, %d to summarize (generator %s)", config.collection,
                version, len(units), stats.units_cached, len(todo), model_name)
    errors: dict[str, tuple[str, str]] = {}
    ctor = (store.url, config.storage_options or None, config.collection, version, settings.to_dict(), gen_spec,
            model_name, config.device, config.batch_size)
    if todo:
        _init_ray(config)
        out = run_unit_summaries([{"unit_id": u.unit_id, "key": keys[u.unit_id]} for u in todo], ctor,
                                 concurrency=config.concurrency, batch_size=config.batch_size,
                                 num_cpus=config.num_cpus, num_gpus=config.num_gpus)
        tokens = {u.unit_id: u.n_tokens for u in todo}
        for r in out:
            if r["ok"]:
                stats.units_summarized += 1
                stats.generated_tokens += int(r["generated_tokens"])
                stats.input_tokens += tokens.get(r["unit_id"], 0)
            else:
                errors[r["unit_id"]] = (r["error"], r["detail"])
        staged.update(summaries.staged_many("units", [keys[u.unit_id] for u in todo
                                                      if u.unit_id not in errors]))
        for u in todo:  # summarized and staged by an actor, but its record is gone: counted, never dropped
            if u.unit_id not in errors and keys[u.unit_id] not in staged:
                errors[u.unit_id] = ("lost", "its staged summary disappeared before publish (deleted by a gc?)")
    stats.units_skipped = len(errors)
    stats.skip_reasons = dict(sorted(Counter(e for e, _ in errors.values()).items()))
    for uid, (code, detail) in sorted(errors.items()):
        logger.warning("unit %s skipped: %s (%s)", uid, code, detail)
    texts: dict[str, tuple[str, str]] = {keys[u.unit_id]: (staged[keys[u.unit_id]]["summary"],
                                                           staged[keys[u.unit_id]].get("language") or "en")
                                         for u in units if keys[u.unit_id] in staged}
    good = [u for u in units if keys[u.unit_id] in texts]

    # 2. reduce plans: documents spanning several units, then the collection
    multi, doc_roots, coll_root, node_map = plan_summaries(units, keys, set(texts),
                                                           content_key("reduce-settings", basis), settings.fan_in)
    staged_red = summaries.staged_many("reduce", sorted(node_map))
    for k, rec in staged_red.items():
        texts[k] = (rec["summary"], rec.get("language") or "en")
    stats.reduce_cached = len(staged_red)
    pending = [n for n in node_map.values() if n.key not in texts]
    failed: set[str] = set()
    if pending:
        _init_ray(config)
        stats.reduce_steps = run_reduce(ctor, pending, texts, failed, stats, concurrency=config.concurrency,
                                        batch_size=config.batch_size, num_cpus=config.num_cpus,
                                        num_gpus=config.num_gpus)

    # 3. tables, report, publish
    unit_rows, doc_rows, coll_rows = summary_rows(
        config.collection, version, model_name, good, keys, staged, texts, multi, doc_roots, coll_root)
    for name, rows in (("units", unit_rows), ("documents", doc_rows), ("collection", coll_rows)):
        write_summary_table(writer, name, rows)
    stats.documents = len(doc_rows)
    report = build_report(config.collection, version, writer.version, model_name, coll_rows, doc_rows, unit_rows,
                          errors, stats)
    writer.write_bytes(REPORT, report.encode())
    summ_manifest = summaries_manifest(
        model_name, manifest.models.get("memory"), config.generator, settings.to_dict(), collection=config.collection,
        version=version, digest=digest, run_key=run_key, n_units=len(units), unit_rows=unit_rows, doc_rows=doc_rows,
        skipped={uid: code for uid, (code, _) in errors.items()}, failed=failed, node_keys=set(node_map),
        texts=texts)
    stats.summaries_version = writer.publish(summ_manifest)
    stats.location = f"{summaries.versions.url}/collections/{config.collection}/versions/{stats.summaries_version}"
    stats.seconds = time.perf_counter() - t0
    logger.info("published summaries %s/%s\n%s", config.collection, stats.summaries_version, stats.table())
    return stats


app = typer.Typer(add_completion=False, rich_markup_mode="markdown", help="Summarize a published collection (Ray job).")


@app.command(name="summarize")
@with_options(flags=SummarizeJobFlags)
def summarize_job(*, flags: SummarizeJobFlags) -> None:
    """Summarize a published collection: unit, document and collection summaries, incrementally, into a
    versioned summaries namespace of the store (a Ray job; the same options as `memorag summarize`)."""
    run_job_command(flags)


def run_job_command(flags: SummarizeJobFlags) -> None:
    """Run the job from its flags; print where the summaries are, a preview and the stats table. A bad
    configuration exits with 2 naming the field; the library's errors propagate (``error: ...``, exit 2)."""
    from pydantic import ValidationError

    job_logging(flags.verbose)
    try:
        config = flags.to_config()
    except (ValidationError, ValueError) as exc:
        raise invalid_configuration("memorag summarize", exc) from None
    stats = run_summarize_job(config, echo=typer.echo)
    if flags.stats_json:
        Path(flags.stats_json).write_text(json.dumps(stats.to_dict(), indent=1, sort_keys=True))
    if stats.nothing_to_do:
        return
    from memorag_core.store.summaries import COLLECTION_TABLE, DOCUMENTS_TABLE, REPORT, UNITS_TABLE

    typer.echo(f"summaries of {config.collection} (collection version {stats.source_version}) published as "
               f"{stats.summaries_version}:")
    for rel in (UNITS_TABLE, DOCUMENTS_TABLE, COLLECTION_TABLE, REPORT):
        typer.echo(f"  {stats.location}/{rel}")
    from memorag_core.store.summaries import summary_preview

    typer.echo(summary_preview(config.store, config.collection, config.storage_options or None))
    typer.echo(stats.table())


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.summarize`` (what ``ray job submit -- python -m jobs.summarize ...`` runs): the exit code."""
    return run_app(app, argv, prog_name="python -m jobs.summarize")


if __name__ == "__main__":
    sys.exit(main())
