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
import os
import sys
import time
from collections import Counter
from pathlib import Path

import typer

from jobs.options import MemorizeJobFlags, invalid_configuration, job_logging, run_app, with_options
from pipeline.config import (
    ChunkEmbedConfig,
    CorpusConfig,
    IndexStageConfig,
    MemorizeJobConfig,
    MemoryStageConfig,
    PackConfig,
    RouterConfig,
    ValidateConfig,
)
from pipeline.publish import JobStats, build_manifest

logger = logging.getLogger(__name__)

_REPO_ROOT = str(Path(__file__).resolve().parents[1])


def _init_ray(config: MemorizeJobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    paths = [_REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MEMORAG_CACHE", "TOKENIZERS_PARALLELISM"):
        if k in os.environ:
            env[k] = os.environ[k]
    # Under `ray job submit` the submitter's runtime env is injected, and ray.init refuses env var keys that it
    # already sets: those keep the submitter's values.
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in job_env}
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs = {} if address else {"num_cpus": config.num_cpus}
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, **kwargs)


class _KeepRows:
    """Filter fn: valid rows that are the kept copy of their doc id (duplicates are quarantined)."""

    def __init__(self, kept: dict[str, tuple]):
        self.kept = kept

    def __call__(self, row: dict) -> bool:
        if row["reason"]:
            return False
        k = self.kept.get(row["doc_id"])
        return k is None or k == (row["source"], row["position"], row["sha256"])


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


def _triage(meta: list[dict]) -> tuple[list[dict], dict[str, list[tuple]], dict[str, tuple]]:
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


def _units_dataset(items, build_unit, max_blocks: int):
    """Group planned items (a table with ``group``) into unit rows on the driver, as ``groupby("group")
    .map_groups(build_unit)`` does, and return them as a Ray Dataset of up to ``max_blocks`` blocks (so that the
    actor pools share the work)."""
    import pyarrow as pa
    import ray.data

    index: dict[str, list[int]] = {}
    for i, g in enumerate(items.column("group").to_pylist()):
        index.setdefault(g, []).append(i)
    units = pa.concat_tables([build_unit(items.take(index[g])) for g in sorted(index)])
    n = max(1, min(units.num_rows, max_blocks))
    step = -(-units.num_rows // n)
    return ray.data.from_arrow([units.slice(k, step) for k in range(0, units.num_rows, step)])


def _quarantine_table(bad: list[dict]):
    import pyarrow as pa

    from pipeline.validate import reason_code

    bad = sorted(bad, key=lambda r: (r["source"], r["position"], r["doc_id"] or "", r["reason"]))
    return pa.table({
        "doc_id": pa.array([r["doc_id"] or None for r in bad], pa.string()),
        "source": pa.array([f"{r['source']}:{r['position']}" if r["position"] else r["source"] for r in bad]),
        "reason": pa.array([reason_code(r["reason"]) for r in bad], pa.string()),
        "detail": pa.array([r["reason"] for r in bad], pa.string()),
    })


def run_memorize_job(config: MemorizeJobConfig) -> JobStats:
    """Run the memorize job and publish a new version of ``config.collection``; returns the run's statistics.

    Joins the Ray cluster at ``config.ray_address`` / ``RAY_ADDRESS`` or an already initialized Ray, else starts a
    local one. Raises InvalidInputError for an unreadable corpus or a corpus with no valid document (nothing is
    published then), and the store's errors when the store fails (the previous version stays live).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from memorag_core.errors import InvalidInputError
    from memorag_core.store import CollectionStore
    from pipeline.chunk_embed import ChunkEmbedStage
    from pipeline.index import BuildShard, build_shards, merge_shards, select_columns, train_index
    from pipeline.memory_stage import MemoryStage
    from pipeline.pack import AssignGroups, BuildUnit, TokenizeSplitStage, plan_units
    from pipeline.read import corpus_nbytes, read_corpus, read_corpus_table
    from pipeline.router import ROUTER_COLUMNS, unique_units, write_router
    from pipeline.validate import ValidateStage, reason_code

    t0 = time.perf_counter()
    # Bad input fails here, before any Ray is started or joined.
    nbytes = corpus_nbytes(config.corpus)
    store = CollectionStore(config.store, config.storage_options)
    writer = store.new_version(config.collection)  # validates the name and reads the live version up front
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
    bad, by_id, kept = _triage(meta)
    stats.documents = len(by_id)
    stats.quarantined = len(bad)
    stats.quarantine_reasons = dict(sorted(Counter(reason_code(r["reason"]) for r in bad).items()))
    logger.info("%d documents valid, %d quarantined %s (%s, %d bytes)", stats.documents, stats.quarantined,
                stats.quarantine_reasons, "driver" if local else "Ray Data", nbytes)
    if not by_id:
        raise InvalidInputError(f"corpus {config.corpus.url!r} has no valid document ({stats.quarantined} "
                                f"quarantined: {stats.quarantine_reasons}); nothing was published")
    phase("read+validate")

    # 3. pack
    mem_cfg = config.memory_stage.memory
    tokenize = TokenizeSplitStage(mem_cfg.model, config.pack, mem_cfg.load)
    if local:
        keep = _KeepRows(kept)
        items_table = tokenize(validated_table.filter(pa.array([keep(r) for r in meta], pa.bool_())))
        item_meta = items_table.select(["doc_id", "part", "n_tokens"]).to_pylist()
    else:
        items = validated.filter(_KeepRows(kept)).map_batches(tokenize, batch_format="pyarrow").materialize()
        item_meta = items.select_columns(["doc_id", "part", "n_tokens"]).take_all()
    plan = plan_units(sorted({(r["doc_id"], r["part"], r["n_tokens"]) for r in item_meta}), config.pack)
    plan_map = {(p.doc_id, p.part): p.group for p in plan}
    if local:
        _init_ray(config)  # only now: a small corpus with bad input fails above without starting Ray
        units = _units_dataset(AssignGroups(plan_map)(items_table), BuildUnit(config.pack.separator),
                               8 * config.memory_stage.concurrency)
    else:
        units = (items.map_batches(AssignGroups(plan_map), batch_format="pyarrow")
                 .groupby("group", num_partitions=_partitions(len(set(plan_map.values()))))
                 .map_groups(BuildUnit(config.pack.separator), batch_format="pyarrow"))
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
    selected = [select.remote([_META_COLUMNS, ROUTER_COLUMNS], *refs[g::groups]) for g in range(groups)]
    metas = ray.get([m for m, _ in selected])
    router_parts = [r for _, r in selected]  # gist columns, for the router task; never fetched here
    dims = {int(m.schema.metadata[b"dim"]) for m in metas if m.schema.metadata and b"dim" in m.schema.metadata}
    meta = pa.concat_tables([m for m in metas if m.num_rows])
    if len(dims) != 1:
        raise RuntimeError(f"embed stage blocks disagree on the embedding dimension: {sorted(dims)}")
    dim = dims.pop()
    phase("memorize+embed")
    meta = unique_units(meta)
    stats.units = meta.num_rows
    memorized_mask = meta.column("memorized")
    stats.units_memorized = int(pc.sum(memorized_mask.cast(pa.int64())).as_py() or 0)
    stats.units_cached = stats.units - stats.units_memorized
    stats.tokens = int(pc.sum(meta.column("n_tokens")).as_py() or 0)
    stats.tokens_memorized = int(pc.sum(pc.if_else(memorized_mask, meta.column("n_tokens"), 0)).as_py() or 0)
    stats.units_embedded = int(pc.sum(meta.column("embedded").cast(pa.int64())).as_py() or 0)
    stats.memory_seconds = float(pc.sum(meta.column("seconds")).as_py() or 0.0)
    stats.chunks = int(pc.sum(meta.column("n_chunks")).as_py() or 0)

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
    writer.write_table("quarantine", "quarantine", _quarantine_table(bad))
    first = meta.slice(0, 1).to_pylist()[0]
    models = {"memory": (first["model_id"], first["model_revision"]),
              "embedder": (ce.embedder or _embedded_embedder(), None)}
    rows = meta.select(["unit_id", "memory_sha256", "memory_nbytes", "storage_dtype", "n_tokens", "raw_tokens",
                        "entries"]).to_pylist()
    manifest = build_manifest(
        config_dump=config.model_dump(mode="json", by_alias=True), unit_rows=rows, models=models,
        stats={"documents": stats.documents, "quarantined": stats.quarantined,
               "quarantine_reasons": stats.quarantine_reasons, "units": stats.units, "tokens": stats.tokens,
               "chunks": stats.chunks, "memory_bytes": int(pc.sum(meta.column("memory_nbytes")).as_py() or 0)},
        extra={"memory_fingerprint": first["fingerprint"], "dim": dim, "shards": [s["shard"] for s in shard_list],
               "index": {"kind": ic.kind, "metric": ic.metric, "merged": ic.merge, "n_train": n_train},
               "router": {"gist": config.router.gist}})
    del rows
    stats.bytes_written = (sum(f["nbytes"] for f in writer.files.values())
                           + int(pc.sum(pc.if_else(memorized_mask, meta.column("memory_nbytes"), 0)).as_py() or 0))
    stats.version = writer.publish(manifest)
    phase("router+publish")
    stats.seconds = time.perf_counter() - t0
    stats.phase_seconds = phase.seconds
    logger.info("published %s/%s\n%s", config.collection, stats.version, stats.table())
    return stats


_META_COLUMNS = ["unit_id", "n_tokens", "raw_tokens", "entries", "memory_sha256", "memory_nbytes", "storage_dtype",
                 "memorized", "embedded", "seconds", "chunks_path", "n_chunks", "fingerprint", "model_id",
                 "model_revision"]
"""The embed-stage columns the driver keeps, per unit: small metadata, no unit text, gist or embedding."""


def _embedded_embedder() -> str:
    from memorag_core.models import EMBEDDED_EMBEDDER

    return EMBEDDED_EMBEDDER


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
