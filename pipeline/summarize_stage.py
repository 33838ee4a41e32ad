"""The summarize stages: actors that hold a query engine (memory model, embedder, generator) across batches.

:class:`UnitSummaryStage` is a Ray Data callable class run with ``compute=ActorPoolStrategy(size=N)``: each actor
builds one :class:`~memorag_core.query.QueryEngine` (the memory model and the embedder load once, unit memories
are cached by bytes, the generator loads once) and, per batch of unit rows, runs
:meth:`~memorag_core.query.summarize.UnitSummarizer.summarize_units`: key points and passages unit by unit, then
one batched generation for the whole batch. Each finished unit summary is staged in the store by the actor,
atomically and under its content key, before the batch returns, so a run killed at any point keeps every unit it
finished and a rerun does not summarize it again.

:class:`ReduceWorker` is the same engine behind a plain Ray actor for the reduce steps (document and collection
summaries), which come in dependent waves that are too small to be worth a Ray Data execution each.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa

logger = logging.getLogger(__name__)

UNIT_OUT_SCHEMA = pa.schema([
    ("unit_id", pa.string()), ("key", pa.string()), ("ok", pa.bool_()), ("error", pa.string()),
    ("detail", pa.string()), ("language", pa.string()), ("generated_tokens", pa.int64()),
    ("seconds", pa.float64()), ("staged", pa.bool_()),
])


def build_engine(store_url: str, storage_options: dict | None, generator: str | None, device: str | None,
                 generator_batch_size: int):
    """The actor's query engine. ``generator``: None = the memory model itself (shared weights), else a spec for
    :func:`memorag_core.generators.load_generator` (``hf:...``, ``vllm:...``, ``openai:...``)."""
    from memorag_core.query import QueryEngine

    gen = None
    if generator is not None:
        from memorag_core.generators import load_generator

        kwargs = {"batch_size": generator_batch_size} if not generator.startswith(("vllm:", "openai:")) else {}
        gen = load_generator(generator, **kwargs)
    return QueryEngine(store_url, storage_options, generator=gen, device=device, refresh_s=60.0)


def _memory_generator(engine, view, batch_size: int):
    """The memory model as the generator (no second copy of the weights), with our batch size."""
    return engine.answerer_for(view, batch_size=batch_size)


class UnitSummaryStage:
    """Ray Data callable class: rows ``unit_id, key`` -> :data:`UNIT_OUT_SCHEMA` rows (summaries are staged).

    Args:
        store_url, storage_options: the store of the collection (summaries are staged under it).
        collection, version: the collection version being summarized.
        settings: a :class:`~memorag_core.query.summarize.SummarySettings` as a dict.
        generator: generator spec (None = the memory model). model_name: what the tables record as the model.
        device: where models run. generator_batch_size: prompts per transformers ``generate`` call.
    """

    def __init__(self, store_url: str, storage_options: dict | None, collection: str, version: str,
                 settings: dict, generator: str | None, model_name: str, device: str | None = None,
                 generator_batch_size: int = 8) -> None:
        from memorag_core.query.summarize import SummarySettings, UnitSummarizer
        from memorag_core.store.summaries import SummaryStore

        t0 = time.perf_counter()
        self.collection, self.version, self.model_name = collection, version, model_name
        self.engine = build_engine(store_url, storage_options, generator, device, generator_batch_size)
        view = self.engine.catalog.view(collection, version)
        if generator is None:
            _memory_generator(self.engine, view, generator_batch_size)
        self.summarizer = UnitSummarizer(self.engine, SummarySettings(**settings))
        self.summaries = SummaryStore(self.engine.catalog.store)
        logger.info("summarize actor ready for %s/%s in %.1f s", collection, version, time.perf_counter() - t0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from memorag_core.query.summarize import PROMPT_VERSION

        rows = batch.to_pylist()
        results = self.summarizer.summarize_units(self.collection, self.version, [r["unit_id"] for r in rows])
        out = []
        for row, rec in zip(rows, results):
            staged = False
            if rec.error is None:
                staged = self.summaries.stage("units", row["key"], {
                    "unit_id": rec.unit_id, "summary": rec.summary, "key_points": rec.key_points,
                    "language": rec.language, "evidence": rec.evidence, "model": self.model_name,
                    "prompt_version": PROMPT_VERSION, "source_version": self.version,
                    "generated_tokens": rec.generated_tokens, "seconds": rec.seconds,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            logger.info("unit %s: %s, %.2f s", rec.unit_id[:12], rec.error or "summarized", rec.seconds)
            out.append({"unit_id": rec.unit_id, "key": row["key"], "ok": rec.error is None, "error": rec.error,
                        "detail": rec.detail, "language": rec.language, "generated_tokens": rec.generated_tokens,
                        "seconds": rec.seconds, "staged": staged})
        return pa.Table.from_pylist(out, schema=UNIT_OUT_SCHEMA)


class ReduceWorker:
    """A reduce actor (wrap with ``ray.remote``): summaries of groups of summaries, staged under their keys.

    Same arguments as :class:`UnitSummaryStage`.
    """

    def __init__(self, store_url: str, storage_options: dict | None, collection: str, version: str,
                 settings: dict, generator: str | None, model_name: str, device: str | None = None,
                 generator_batch_size: int = 8) -> None:
        from memorag_core.query.summarize import SummarySettings, UnitSummarizer
        from memorag_core.store.summaries import SummaryStore

        self.collection, self.version, self.model_name = collection, version, model_name
        self.engine = build_engine(store_url, storage_options, generator, device, generator_batch_size)
        view = self.engine.catalog.view(collection, version)
        if generator is None:
            _memory_generator(self.engine, view, generator_batch_size)
        self.summarizer = UnitSummarizer(self.engine, SummarySettings(**settings))
        self.summaries = SummaryStore(self.engine.catalog.store)

    def reduce(self, nodes: list[dict]) -> list[dict]:
        """``nodes``: ``{key, texts, language, tree}`` -> ``{key, summary, generated_tokens, seconds, error}``;
        each summary is staged before returning."""
        from memorag_core.query.summarize import PROMPT_VERSION

        t0 = time.perf_counter()
        try:
            outs = self.summarizer.reduce(self.collection, self.version, [(n["texts"], n["language"]) for n in nodes])
        except Exception as exc:  # noqa: BLE001 - reported per node by the driver
            return [{"key": n["key"], "summary": "", "generated_tokens": 0, "seconds": 0.0,
                     "error": f"{type(exc).__name__}: {exc}"} for n in nodes]
        share = (time.perf_counter() - t0) / max(1, len(nodes))
        res = []
        for n, (text, tokens) in zip(nodes, outs):
            err = None if text else "empty_summary"
            if err is None:
                self.summaries.stage("reduce", n["key"], {
                    "summary": text, "inputs": n["inputs"], "language": n["language"], "tree": n["tree"],
                    "model": self.model_name, "prompt_version": PROMPT_VERSION, "source_version": self.version,
                    "generated_tokens": tokens, "seconds": share,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            res.append({"key": n["key"], "summary": text, "generated_tokens": tokens, "seconds": share,
                        "error": err})
        return res

    def ping(self) -> str:
        return json.dumps({"collection": self.collection, "version": self.version})


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


def run_reduce(ctor: tuple, pending: list, texts: dict, failed: set, stats: SummarizeStats, *, concurrency: int,
               batch_size: int, num_cpus: float, num_gpus: float) -> int:
    """Compute the reduce nodes ``pending`` in dependent waves on ``concurrency`` :class:`ReduceWorker` actors
    (built with ``ctor``; Ray must be initialized). ``texts`` (key -> (summary, language)) gains every computed
    node; ``failed`` gains the keys of failed nodes and of nodes with a failed input. Returns nodes computed."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from memorag_core.query.summarize import majority_language

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(ReduceWorker)
    actors = [remote.remote(*ctor) for _ in range(concurrency)]
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
            batches = [ready[i:i + batch_size] for i in range(0, len(ready), batch_size)]
            payloads = [[{"key": n.key, "inputs": n.inputs, "texts": [texts[i][0] for i in n.inputs],
                          "language": majority_language([texts[i][1] for i in n.inputs]), "tree": n.tree} for n in b]
                        for b in batches]
            langs = {n.key: majority_language([texts[i][1] for i in n.inputs]) for n in ready}
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


def run_unit_summaries(rows: list[dict], ctor: tuple, *, concurrency: int, batch_size: int, num_cpus: float,
                       num_gpus: float) -> list[dict]:
    """Summarize units ``rows`` (``{unit_id, key}``) on a pool of :class:`UnitSummaryStage` actors built with
    ``ctor`` (Ray must be initialized); each actor stages its summaries as it goes. Returns the stage's output rows
    (``ok``, ``error``, ``detail``, ``generated_tokens`` per unit)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    blocks = max(1, min(len(rows), -(-len(rows) // batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        UnitSummaryStage, fn_constructor_args=ctor,
        compute=ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1),
        batch_size=batch_size, num_cpus=num_cpus, num_gpus=num_gpus, batch_format="pyarrow")
    return ds.take_all()
