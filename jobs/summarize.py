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

import importlib.util
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import typer
from pydantic import BaseModel, ConfigDict, Field

from jobs.options import SummarizeJobFlags, invalid_configuration, job_logging, run_app, with_options

logger = logging.getLogger(__name__)

_VLLM_CPU_HEAD_DIMS = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}


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


@dataclass
class SummarizeStats:
    """What one summarize run did (printed as a table; ``--stats-json`` writes it as JSON)."""

    collection: str = ""
    source_version: str = ""
    summaries_version: str = ""
    nothing_to_do: bool = False
    generator: str = ""
    units: int = 0
    units_summarized: int = 0
    units_cached: int = 0
    units_skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    documents: int = 0
    reduce_steps: int = 0
    reduce_cached: int = 0
    input_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    location: str = ""

    @property
    def summaries_per_minute(self) -> float:
        """Summaries (unit and reduce) written by this run per minute of wall time."""
        n = self.units_summarized + self.reduce_steps
        return 60.0 * n / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "summaries_per_minute": round(self.summaries_per_minute, 2)}

    def table(self) -> str:
        rows = [
            ("collection", f"{self.collection} @ {self.source_version}"),
            ("summaries", self.summaries_version or "(none published)"),
            ("generator", self.generator),
            ("units", f"{self.units:,} ({self.units_summarized:,} summarized, {self.units_cached:,} cached, "
                      f"{self.units_skipped:,} skipped)" + (f"  {self.skip_reasons}" if self.skip_reasons else "")),
            ("documents", f"{self.documents:,} multi-unit document summaries"),
            ("reduce steps", f"{self.reduce_steps:,} computed, {self.reduce_cached:,} cached"),
            ("tokens", f"{self.input_tokens:,} unit tokens read, {self.generated_tokens:,} generated"),
            ("wall time", f"{self.seconds:,.1f} s"),
            ("summaries/min", f"{self.summaries_per_minute:,.1f}"),
        ]
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 3 + max(len(v) for _, v in rows))
        return "\n".join([line, *(f"{k:<{width}} | {v}" for k, v in rows), line])


@dataclass
class UnitMeta:
    unit_id: str
    doc_ids: list[str]
    start: int | None
    n_tokens: int

    @property
    def order(self) -> tuple:
        return (self.doc_ids[0] if self.doc_ids else "", self.start if self.start is not None else 1 << 62,
                self.unit_id)


# -- planning ---------------------------------------------------------------------------------------------------
def resolve_generator(spec: str, memory_config: dict, memory_ref) -> tuple[str | None, str, list]:
    """``(spec for the actors (None = memory model), model name for the tables, identity for content keys)``."""
    mem_id = memory_ref.id if memory_ref else str(memory_config.get("model"))
    mem_rev = memory_ref.revision if memory_ref else None
    if spec == "auto":
        spec = "memory"
        if importlib.util.find_spec("vllm") is not None:
            head_dim = _head_dim(memory_config.get("model"))
            if head_dim in _VLLM_CPU_HEAD_DIMS or _has_cuda():
                spec = "vllm:" + (memory_config.get("model") or "")
            else:
                logger.info("generator auto: vLLM is installed but head_dim %s is not supported here; transformers",
                            head_dim)
        logger.info("generator auto -> %s", spec)
    if spec == "memory":
        return None, mem_id, ["memory", mem_id, mem_rev]
    if spec.startswith("vllm:") and not spec[5:]:
        return spec, f"vllm:{mem_id}", ["vllm", mem_id, mem_rev]
    return spec, spec, ["spec", spec]


def _head_dim(model: str | None) -> int | None:
    try:
        from transformers import AutoConfig

        from memorag_core.models import resolve_lm

        cfg = AutoConfig.from_pretrained(resolve_lm(model))
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    except Exception as exc:  # noqa: BLE001 - unknown: let transformers generate
        logger.info("cannot read the memory model's head_dim (%s)", exc)
        return None


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def read_units(reader) -> list[UnitMeta]:
    """The version's units (id, documents, start offset, tokens), without their text."""
    import io

    import pyarrow.parquet as pq

    out = []
    for rel in reader.files("units/"):
        if not rel.endswith(".parquet"):
            continue
        t = pq.read_table(io.BytesIO(reader.read_bytes(rel)), columns=["unit_id", "doc_ids", "start", "n_tokens"])
        out += [UnitMeta(r["unit_id"], list(r["doc_ids"] or []), r["start"], int(r["n_tokens"] or 0))
                for r in t.to_pylist()]
    known = set(reader.manifest.units)
    missing = known - {u.unit_id for u in out}
    out += [UnitMeta(u, [], None, 0) for u in sorted(missing)]  # no units table: still summarized, unordered
    return sorted([u for u in out if u.unit_id in known], key=lambda u: u.order)


def _majority(langs: list[str]) -> str:
    return Counter(langs).most_common(1)[0][0] if langs else "en"


def _init_ray(config: SummarizeJobConfig) -> None:
    """Join or start Ray as the memorize job does (same runtime env: PYTHONPATH, offline flags)."""
    from types import SimpleNamespace

    from jobs.memorize import _init_ray as init

    init(SimpleNamespace(ray_address=config.ray_address, num_cpus=config.num_cpus_local))


# -- the job -----------------------------------------------------------------------------------------------------
def run_summarize_job(config: SummarizeJobConfig, echo=print) -> SummarizeStats:
    """Summarize ``config.collection`` and publish a new summaries version (or say that nothing changed).

    Raises ArtifactNotFoundError (no such collection / version), PublishConflictError (another summarize run
    published first; rerun: staged work is kept), and the store's errors.
    """
    import pyarrow as pa

    from memorag_core.errors import ArtifactNotFoundError
    from memorag_core.query.summarize import PROMPT_VERSION, plan_reduce
    from memorag_core.store import CollectionStore, Manifest, ModelRef
    from memorag_core.store.summaries import (
        COLLECTION_TABLE,
        DOCUMENTS_TABLE,
        REPORT,
        UNITS_TABLE,
        SummaryStore,
        content_key,
        units_digest,
    )

    t0 = time.perf_counter()
    store = CollectionStore(config.store, config.storage_options or None)
    summaries = SummaryStore(store)
    version = config.version or store.current_version(config.collection)
    if version is None:
        raise ArtifactNotFoundError(f"collection {config.collection!r} has no live version at {store.url}")
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
    if previous is not None and previous.extra.get("run_key") == run_key \
            and previous.source_units_sha256 == digest \
            and not (config.retry_skipped and previous.extra.get("skipped")):
        stats.nothing_to_do = True
        stats.summaries_version = previous.version
        stats.seconds = time.perf_counter() - t0
        skipped = len(previous.extra.get("skipped") or {})
        echo(f"summaries of {config.collection} are current: summaries version {previous.version} covers the "
             f"{len(units)} units of collection version {version}; nothing to do"
             + (f" ({skipped} units skipped earlier; --retry-skipped tries them again)" if skipped else ""))
        return stats
    writer = summaries.new_version(config.collection)  # the summaries pointer it must replace is read here

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
        import ray.data
        from ray.data import ActorPoolStrategy

        from pipeline.summarize_stage import UnitSummaryStage

        _init_ray(config)
        rows = [{"unit_id": u.unit_id, "key": keys[u.unit_id]} for u in todo]
        blocks = max(1, min(len(rows), -(-len(rows) // config.batch_size)))
        ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            UnitSummaryStage, fn_constructor_args=ctor,
            compute=ActorPoolStrategy(size=config.concurrency, max_tasks_in_flight_per_actor=1),
            batch_size=config.batch_size, num_cpus=config.num_cpus, num_gpus=config.num_gpus,
            batch_format="pyarrow")
        out = ds.take_all()
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
    stats.units_skipped = len(errors)
    stats.skip_reasons = dict(sorted(Counter(e for e, _ in errors.values()).items()))
    for uid, (code, detail) in sorted(errors.items()):
        logger.warning("unit %s skipped: %s (%s)", uid, code, detail)
    texts: dict[str, tuple[str, str]] = {keys[u.unit_id]: (staged[keys[u.unit_id]]["summary"],
                                                           staged[keys[u.unit_id]].get("language") or "en")
                                         for u in units if keys[u.unit_id] in staged}
    good = [u for u in units if keys[u.unit_id] in texts]

    # 2. reduce plans: documents spanning several units, then the collection
    by_doc: dict[str, list[UnitMeta]] = {}
    for u in units:
        for d in u.doc_ids:
            by_doc.setdefault(d, []).append(u)
    multi = {d: sorted(us, key=lambda u: (u.start if u.start is not None else 1 << 62, u.unit_id))
             for d, us in by_doc.items() if len(us) > 1}
    rkey = content_key("reduce-settings", basis)
    nodes, doc_roots = [], {}
    for d in sorted(multi):
        root, ns = plan_reduce([keys[u.unit_id] for u in multi[d] if keys[u.unit_id] in texts], f"document:{d}",
                               rkey, settings.fan_in)
        if root is not None:
            doc_roots[d] = root
            nodes += ns
    covered = {u.unit_id for us in multi.values() for u in us}
    entries = sorted([((d,), doc_roots[d]) for d in doc_roots]
                     + [(u.order, keys[u.unit_id]) for u in good if u.unit_id not in covered])
    coll_root, ns = plan_reduce([k for _, k in entries], "collection", rkey, settings.fan_in)
    nodes += ns
    node_map = {}
    for n in nodes:
        node_map.setdefault(n.key, n)
    staged_red = summaries.staged_many("reduce", sorted(node_map))
    for k, rec in staged_red.items():
        texts[k] = (rec["summary"], rec.get("language") or "en")
    stats.reduce_cached = len(staged_red)
    pending = [n for n in node_map.values() if n.key not in texts]
    failed: set[str] = set()
    if pending:
        stats.reduce_steps = _run_reduce(config, ctor, pending, texts, failed, stats)

    # 3. tables, report, publish
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    common = {"model": model_name, "prompt_version": PROMPT_VERSION, "source_version": version}
    unit_rows = [{"unit_id": u.unit_id, "summary": texts[keys[u.unit_id]][0],
                  "key_points": staged[keys[u.unit_id]].get("key_points") or [], "kind": "unit",
                  "doc_ids": u.doc_ids, "key": keys[u.unit_id], "language": texts[keys[u.unit_id]][1],
                  "created_at": staged[keys[u.unit_id]].get("created_at") or now, **common} for u in good]
    doc_rows = [{"unit_id": None, "summary": texts[r][0], "key_points": None, "kind": "document", "doc_id": d,
                 "unit_ids": [u.unit_id for u in multi[d]], "key": r, "language": texts[r][1], "created_at": now,
                 **common} for d, r in sorted(doc_roots.items()) if r in texts]
    coll_rows = ([{"unit_id": None, "summary": texts[coll_root][0], "key_points": None, "kind": "collection",
                   "collection": config.collection, "key": coll_root, "language": texts[coll_root][1],
                   "units": len(good), "created_at": now, **common}]
                 if coll_root is not None and coll_root in texts else [])
    _write(writer, "units", unit_rows, pa)
    _write(writer, "documents", doc_rows, pa)
    _write(writer, "collection", coll_rows, pa)
    stats.documents = len(doc_rows)
    skipped = {uid: code for uid, (code, _) in errors.items()}
    report = build_report(config.collection, version, writer.version, model_name, coll_rows, doc_rows, unit_rows,
                          errors, stats)
    writer.write_bytes(REPORT, report.encode())
    used_keys = sorted({r["key"] for r in unit_rows} | set(node_map) & set(texts))
    summ_manifest = Manifest(
        models={"generator": ModelRef(id=model_name), **({"memory": manifest.models["memory"]}
                                                          if "memory" in manifest.models else {})},
        config={"generator": config.generator, "settings": settings.to_dict()},
        stats={"units": len(units), "unit_summaries": len(unit_rows), "documents": len(doc_rows),
               "skipped": len(skipped), "reduce_nodes": len(node_map)},
        extra={"source_collection": config.collection, "source_version": version, "source_units_sha256": digest,
               "run_key": run_key, "prompt_version": PROMPT_VERSION, "skipped": skipped,
               "failed_reduce": sorted(failed), "staged_keys": used_keys,
               "tables": [UNITS_TABLE, DOCUMENTS_TABLE, COLLECTION_TABLE], "report": REPORT})
    stats.summaries_version = writer.publish(summ_manifest)
    stats.location = f"{summaries.versions.url}/collections/{config.collection}/versions/{stats.summaries_version}"
    stats.seconds = time.perf_counter() - t0
    logger.info("published summaries %s/%s\n%s", config.collection, stats.summaries_version, stats.table())
    return stats


def _write(writer, name: str, rows: list[dict], pa) -> None:
    from memorag_core.store.schemas import SUMMARIES

    if rows:
        table = pa.Table.from_pylist(rows)
    else:
        table = SUMMARIES.empty_table()
    writer.write_table("summaries", name, table)


def _run_reduce(config, ctor, pending, texts, failed, stats) -> int:
    """Compute the reduce nodes in dependent waves on ``concurrency`` reduce actors; returns nodes computed."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from pipeline.summarize_stage import ReduceWorker

    _init_ray(config)
    remote = ray.remote(num_cpus=config.num_cpus, num_gpus=config.num_gpus)(ReduceWorker)
    actors = [remote.remote(*ctor) for _ in range(config.concurrency)]
    pool = ActorPool(actors)
    done = 0
    bar = tqdm(total=len(pending), desc="reduce", unit="summary", disable=None)
    try:
        while pending:
            ready = [n for n in pending if all(i in texts for i in n.inputs)]
            blocked = [n for n in pending if any(i in failed for i in n.inputs)]
            for n in blocked:
                failed.add(n.key)
            if not ready:
                break
            batches = [ready[i:i + config.batch_size] for i in range(0, len(ready), config.batch_size)]
            payloads = [[{"key": n.key, "inputs": n.inputs, "texts": [texts[i][0] for i in n.inputs],
                          "language": _majority([texts[i][1] for i in n.inputs]), "tree": n.tree} for n in b]
                        for b in batches]
            langs = {n.key: _majority([texts[i][1] for i in n.inputs]) for n in ready}
            for results in pool.map_unordered(lambda a, p: a.reduce.remote(p), payloads):
                for r in results:
                    if r["error"]:
                        failed.add(r["key"])
                        logger.warning("reduce step %s failed: %s", r["key"][:12], r["error"])
                    else:
                        texts[r["key"]] = (r["summary"], langs[r["key"]])
                        stats.generated_tokens += int(r["generated_tokens"])
                        done += 1
                    bar.update(1)
            pending = [n for n in pending if n.key not in texts and n.key not in failed]
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
    return done


def build_report(collection, source_version, summaries_version, model, coll_rows, doc_rows, unit_rows, errors,
                 stats: SummarizeStats, unit_limit: int = 200) -> str:
    """The Markdown report of a summaries version."""
    lines = [f"# Summaries of `{collection}`", "",
             f"* collection version: `{source_version}`", f"* summaries version: `{summaries_version}`",
             f"* generator: `{model}`", f"* written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"* units: {stats.units} ({stats.units_summarized} summarized by this run, {stats.units_cached} "
             f"reused, {stats.units_skipped} skipped)", "", "## Collection", ""]
    lines += [coll_rows[0]["summary"] if coll_rows else "_No collection summary (no unit could be summarized)._", ""]
    if doc_rows:
        lines += ["## Documents", ""]
        for r in doc_rows:
            lines += [f"### {r['doc_id']}", "", f"_{len(r['unit_ids'])} units_", "", r["summary"], ""]
    lines += ["## Units", ""]
    for r in unit_rows[:unit_limit]:
        docs = ", ".join(r["doc_ids"][:5]) + (" ..." if len(r["doc_ids"]) > 5 else "")
        lines += [f"* `{r['unit_id'][:12]}` ({docs}): " + " ".join(r["summary"].split())]
    if len(unit_rows) > unit_limit:
        lines += [f"* ... {len(unit_rows) - unit_limit} more in summaries/units.parquet"]
    if errors:
        lines += ["", "## Skipped units", "", "| unit | reason | detail |", "|---|---|---|"]
        lines += [f"| `{u}` | {c} | {d.replace('|', '/')[:200]} |" for u, (c, d) in sorted(errors.items())]
    return "\n".join(lines) + "\n"


def summary_preview(store_url: str, collection: str, storage_options: dict | None = None, rows: int = 8) -> str:
    """A short table of the live summaries (kind, id, start of the text) for the CLI."""
    from memorag_core.store.summaries import SummaryStore

    stored = SummaryStore(store_url, storage_options).open(collection)
    if stored is None:
        return "(no summaries)"
    out = []
    for kind, table, id_col in (("collection", stored.collection, "collection"), ("document", stored.documents,
                                                                                   "doc_id"),
                                ("unit", stored.units, "unit_id")):
        if table is None:
            continue
        for r in table.to_pylist():
            ident = str(r.get(id_col) or "")[:24]
            out.append((kind, ident, " ".join(str(r["summary"]).split())[:70]))
    shown = out[:rows]
    w0 = max([4] + [len(k) for k, _, _ in shown])
    w1 = max([2] + [len(i) for _, i, _ in shown])
    lines = [f"{'kind':<{w0}}  {'id':<{w1}}  summary", f"{'-' * w0}  {'-' * w1}  {'-' * 40}"]
    lines += [f"{k:<{w0}}  {i:<{w1}}  {s}" for k, i, s in shown]
    if len(out) > rows:
        lines.append(f"... {len(out) - rows} more")
    return "\n".join(lines)


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
    typer.echo(summary_preview(config.store, config.collection, config.storage_options or None))
    typer.echo(stats.table())


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.summarize`` (what ``ray job submit -- python -m jobs.summarize ...`` runs): the exit code."""
    return run_app(app, argv, prog_name="python -m jobs.summarize")


if __name__ == "__main__":
    sys.exit(main())
