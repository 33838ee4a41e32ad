"""The memorize job: corpus -> validated documents -> units -> memories -> chunks + embeddings -> index shards ->
router -> a new published collection version.

Run it on a cluster with ``ray job submit -- python -m jobs.memorize --corpus s3://... --collection name --store
s3://...``, or locally (a local Ray is started) with ``memorag memorize --corpus ... --collection ...`` or
``python -m jobs.memorize ...``. Stages live in :mod:`pipeline`; this module only wires them.

A corpus of at most ``local_prepare_bytes`` is read, validated and packed in the driver with the same stage
functions (Ray Data tasks and shuffles cost more than that work); the memory and embed actor pools, the index
training, the shard builds and the router run on Ray in both cases, and both paths publish the same bytes.

Driver memory: besides per-document validation metadata (doc ids, for duplicates and the packing plan), the
driver holds one small Arrow table of per-unit metadata (ids, sizes, checksums, counts, staged chunk paths), never
unit texts, gists, embeddings, chunk tables or index shards: shard, index and router files are written by the
tasks that build them, into the version folder, and only their paths, sizes and sha256 come back.

Resumability: unit memories (``units/<unit_id>/``) and per-unit chunk tables (``staging/chunks/<key>/``) are
content-addressed and written atomically, so a rerun after a kill at any point skips every finished unit; the
index, router and version files are rebuilt from them (cheap) in a deterministic order, and the published files
are byte-identical to an uninterrupted run's (only the version id and timestamps differ).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import typer

from jobs.options import MemorizeJobFlags, invalid_configuration, job_logging, run_app, with_options
from pipeline.config import MemorizeJobConfig
from pipeline.publish import META_COLUMNS, JobStats, memorize_manifest, memorized_bytes

logger = logging.getLogger(__name__)

def _init_ray(config: MemorizeJobConfig) -> None:
    from pipeline.ray_env import init_ray

    init_ray(config.ray_address, config.num_cpus)


class _Phases:
    """Logs the wall time of each job phase (INFO) and keeps them in ``seconds`` (phase -> seconds)."""

    def __init__(self, t0: float | None = None):
        self.t = time.perf_counter()
        self.seconds: dict[str, float] = {}
        if t0 is not None:
            self.seconds["setup"] = round(self.t - t0, 3)

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        logger.info("phase %s: %.1f s", name, now - self.t)
        self.seconds[name] = round(now - self.t, 3)
        self.t = now


def _partitions(groups: int, per_partition: int = 32, most: int = 200) -> int:
    """Hash-shuffle partitions for ``groups`` groups (Ray Data's default, 200, costs minutes on small data)."""
    return max(1, min(most, -(-groups // per_partition)))


def run_memorize_job(config: MemorizeJobConfig) -> JobStats:
    """Run the memorize job and publish a new version of ``config.collection``; returns the run's statistics.

    Joins the Ray cluster at ``config.ray_address`` / ``RAY_ADDRESS`` or an already initialized Ray, else starts a
    local one. Raises InvalidInputError for an unreadable corpus or a corpus with no valid document (nothing is
    published then), and the store's errors when the store fails (the previous version stays live).
    """
    from memorag_core.store import CollectionStore
    from pipeline.read import corpus_nbytes

    t0 = time.perf_counter()
    # Bad input fails here, before any Ray is started or joined.
    nbytes = corpus_nbytes(config.corpus)
    store = CollectionStore(config.store, config.storage_options)
    writer = store.new_version(config.collection)  # validates the name and reads the live version up front
    # Held until the job ends: gc keeps the version being written and every unit and staged file it may reuse.
    with store.job_lease(config.collection, "memorize", [writer.version, writer.base]):
        return _memorize(config, store, writer, nbytes, t0)


def _memorize(config: MemorizeJobConfig, store, writer, nbytes: int, t0: float) -> JobStats:
    """The job's phases, under its lease (see :func:`run_memorize_job`)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from memorag_core.errors import InvalidInputError
    from pipeline.chunk_embed import ChunkEmbedStage
    from pipeline.index import BuildShard, build_shards, merge_shards, select_columns, train_index
    from pipeline.memory_stage import MemoryStage
    from pipeline.pack import AssignGroups, BuildUnit, TokenizeSplitStage, plan_table, plan_units, units_dataset
    from pipeline.read import read_corpus, read_corpus_table
    from pipeline.router import ROUTER_COLUMNS, unique_units, write_router
    from pipeline.validate import KeepRows, ValidateStage, quarantine_table, reason_code, triage

    local = nbytes <= config.local_prepare_bytes
    if not local:
        _init_ray(config)
    stats = JobStats(collection=config.collection)
    phase = _Phases(t0)

    # 1-2. read and validate (on the driver for a small corpus: same functions, no Ray Data tasks)
    if local:
        validated_table = ValidateStage(config.validate_)(read_corpus_table(config.corpus))
        meta = validated_table.select(["doc_id", "source", "position", "sha256", "reason"]).to_pylist()
    else:
        validated = read_corpus(config.corpus).map_batches(ValidateStage(config.validate_),
                                                           batch_format="pyarrow").materialize()
        meta = validated.select_columns(["doc_id", "source", "position", "sha256", "reason"]).take_all()
    bad, by_id, kept = triage(meta)
    stats.documents = len(by_id)
    stats.quarantined = len(bad)
    stats.quarantine_reasons = dict(sorted(Counter(reason_code(r["reason"]) for r in bad).items()))
    logger.info("%d documents valid, %d quarantined %s (%s, %d bytes)", stats.documents, stats.quarantined,
                stats.quarantine_reasons, "driver" if local else "Ray Data", nbytes)
    if not by_id:
        raise InvalidInputError(f"corpus {config.corpus.url!r} has no valid document ({stats.quarantined} "
                                f"quarantined: {stats.quarantine_reasons}); nothing was published")
    quarantine = quarantine_table(bad)  # small Arrow table; the per-row dicts go now
    del bad, by_id
    phase("read+validate")

    # 3. pack
    mem_cfg = config.memory_stage.memory
    tokenize = TokenizeSplitStage(mem_cfg.model, config.pack, mem_cfg.load)
    if local:
        keep = KeepRows(kept)
        items_table = tokenize(validated_table.filter(pa.array([keep(r) for r in meta], pa.bool_())))
        del validated_table  # the validated rows (texts included) are not needed past triage and tokenizing
        item_meta = items_table.select(["doc_id", "part", "n_tokens"]).to_pylist()
    else:
        items = validated.filter(KeepRows(kept)).map_batches(tokenize, batch_format="pyarrow").materialize()
        del validated  # its blocks leave the object store: items hold the texts from here on
        item_meta = items.select_columns(["doc_id", "part", "n_tokens"]).take_all()
    del meta, kept
    plan = plan_table(plan_units(sorted({(r["doc_id"], r["part"], r["n_tokens"]) for r in item_meta}),
                                 config.pack))
    del item_meta
    if local:
        _init_ray(config)  # only now: a small corpus with bad input fails above without starting Ray
        units = units_dataset(AssignGroups(plan)(items_table), BuildUnit(config.pack.separator),
                               8 * config.memory_stage.concurrency)
        del items_table
    else:
        # the plan goes to the object store once; map tasks read it there (not a pickled dict per task)
        n_groups = int(pc.count_distinct(plan.column("group")).as_py())
        units = (items.map_batches(AssignGroups(ray.put(plan)), batch_format="pyarrow")
                 .groupby("group", num_partitions=_partitions(n_groups))
                 .map_groups(BuildUnit(config.pack.separator), batch_format="pyarrow"))
        del items
    del plan
    phase("pack")

    # 4. memory actors, then chunk + embed actors
    ms, ce = config.memory_stage, config.chunk_embed
    memorized = units.map_batches(
        MemoryStage, fn_constructor_args=(ms, config.router, config.store, config.storage_options),
        compute=ActorPoolStrategy(size=ms.concurrency, max_tasks_in_flight_per_actor=ms.max_tasks_in_flight),
        batch_size=ms.batch_size, num_cpus=ms.num_cpus,
        num_gpus=ms.num_gpus, batch_format="pyarrow")
    embedded = memorized.map_batches(
        ChunkEmbedStage, fn_constructor_args=(ce, config.store, config.storage_options, mem_cfg.model),
        compute=ActorPoolStrategy(size=ce.concurrency), batch_size=ce.batch_size, num_cpus=ce.num_cpus,
        num_gpus=ce.num_gpus, batch_format="pyarrow")
    # The embed stage's blocks stay in the object store (refs); tasks read them. Per-unit metadata only (no text,
    # gists or embeddings) comes to the driver, as one Arrow table.
    refs = embedded.to_arrow_refs()
    groups = max(1, min(len(refs), 2 * int(ray.cluster_resources().get("CPU", 1))))
    select = ray.remote(select_columns).options(num_returns=2)
    selected = [select.remote([META_COLUMNS, ROUTER_COLUMNS], *refs[g::groups]) for g in range(groups)]
    metas = ray.get([m for m, _ in selected])
    router_parts = [r for _, r in selected]  # gist columns, for the router task; never fetched here
    dims = {int(m.schema.metadata[b"dim"]) for m in metas if m.schema.metadata and b"dim" in m.schema.metadata}
    meta = pa.concat_tables([m for m in metas if m.num_rows])
    if len(dims) != 1:
        raise RuntimeError(f"embed stage blocks disagree on the embedding dimension: {sorted(dims)}")
    dim = dims.pop()
    phase("memorize+embed")
    meta = unique_units(meta)
    stats.add_units(meta)

    # 5. index: train once (a task), shards in parallel tasks that write their own files, optional merge task
    ic = config.index
    folder = writer.folder()
    n_train = min(ic.train_sample, stats.chunks)
    trained = ray.get(ray.remote(train_index).remote(ic, dim, config.store, config.storage_options,
                                                     meta.column("chunks_path").to_pylist()))
    build_shard = BuildShard(ic, trained, n_train, config.store, config.storage_options, folder)
    shard_list = build_shards(refs, build_shard, ic.shards, groups)
    for s in shard_list:
        for f in json.loads(s["files"]):
            writer.record_file(f["path"], f["sha256"], f["nbytes"])
    if ic.merge:
        shard_index_files = [f"index/shard-{s['shard']:05d}.faiss" for s in shard_list]
        f = ray.get(ray.remote(merge_shards).remote(ic, folder, shard_index_files, n_train))
        writer.record_file(f["path"], f["sha256"], f["nbytes"])

    # 6. router (a task over the gist columns), quarantine, publish
    phase("index")
    router_files = ray.get(ray.remote(write_router).remote(folder, *router_parts))
    del refs, router_parts
    for f in router_files:
        writer.record_file(f["path"], f["sha256"], f["nbytes"])
    writer.write_table("quarantine", "quarantine", quarantine)
    manifest = memorize_manifest(config, meta, stats, dim=dim, shards=[s["shard"] for s in shard_list],
                                 n_train=n_train)
    stats.bytes_written = sum(f["nbytes"] for f in writer.files.values()) + memorized_bytes(meta)
    stats.version = writer.publish(manifest)
    phase("router+publish")
    stats.seconds = time.perf_counter() - t0
    stats.phase_seconds = phase.seconds
    logger.info("published %s/%s\n%s", config.collection, stats.version, stats.table())
    return stats


app = typer.Typer(add_completion=False, rich_markup_mode="markdown",
                  help="Memorize a corpus into a new version of a collection (Ray job).")


@app.command(name="memorize")
@with_options(flags=MemorizeJobFlags)
def memorize_job(*, flags: MemorizeJobFlags) -> None:
    """Memorize a corpus into a new version of a collection: validated documents, unit memories, chunks, index
    shards and router, published atomically (a Ray job; the same options as `memorag memorize --corpus`)."""
    run_job_command(flags)


def run_job_command(flags: MemorizeJobFlags) -> None:
    """Run the job from its flags: print the stats table (and write ``--stats-json``). A bad configuration exits
    with 2 naming the field; the library's errors propagate (``error: ...``, exit 2, by :func:`run_app`)."""
    from pydantic import ValidationError

    job_logging(flags.verbose)
    try:
        config = flags.to_config()
    except (ValidationError, ValueError) as exc:
        raise invalid_configuration("memorag memorize", exc) from None
    stats = run_memorize_job(config)
    typer.echo(stats.table())
    if flags.stats_json:
        Path(flags.stats_json).write_text(json.dumps(stats.to_dict(), indent=1, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.memorize`` (what ``ray job submit -- python -m jobs.memorize ...`` runs): the exit code."""
    return run_app(app, argv, prog_name="python -m jobs.memorize")


if __name__ == "__main__":
    sys.exit(main())
