"""The memorag Ray Serve application: a FastAPI ingress over the memory worker, retriever and generator.

``build_app(args)`` is the application builder that ``serve run``, ``memorag serve`` and a KubeRay RayService
import (``import_path: pipeline.serve.app:build_app``); ``args`` is a :class:`~pipeline.serve.config.ServeAppConfig`.

A request: the ingress checks the body (limits), the key (per collection) and resolves the collection's live
version once (the catalog re-reads the pointer at most every ``refresh_s``); then it calls the deployments with
that ``(collection, version)``, through the one query composition that every door runs
(:class:`memorag_core.query.QueryComposition`, over :class:`HandleStages`)::

    memory.session_prepare -> retriever.stored_summary -> retriever.units -> memory.clues (batched)
    -> retriever.retrieve -> generator.generate | generator.stream -> memory.session_record

so a query in flight finishes on the version it started on, and a version published meanwhile serves the next
request without a restart. The deployments hold leases on the versions they have loaded, so the store's gc keeps
them.

Extending the API: routes live in routers (``pipeline/serve/routes/*.py``) that reach this replica's
:class:`Ingress` through the ``ingress`` dependency (:func:`pipeline.serve.routes.deps.get_ingress`); add a
router to :data:`ROUTERS` (or pass ``extra_routers`` to :func:`create_api`) to add endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from memorag_core.errors import InvalidInputError
from memorag_core.query.compose import QueryComposition, Stages
from memorag_core.query.types import QueryRequest, QueryResult, StreamEvent
from pipeline.serve.auth import KeyGate, RateLimiter
from pipeline.serve.config import ServeAppConfig
from pipeline.serve.deployments import Generator, MemoryWorker, Retriever
from pipeline.serve.http import ApiError, GuardMiddleware, install_error_handlers

logger = logging.getLogger("memorag.serve")

STAGES = ("route", "clues", "retrieve", "generate", "total")


class IngressMetrics:
    """Prometheus metrics of the ingress, exported by Ray's metrics agent (names get Ray's ``ray_`` prefix)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("memorag_requests_total", description="HTTP requests by route and status",
                                tag_keys=("route", "status"))
        self.errors = Counter("memorag_request_errors_total", description="HTTP requests answered with an error "
                              "status (4xx, 5xx), by route and status", tag_keys=("route", "status"))
        self.stage = Histogram("memorag_stage_seconds", description="seconds per query stage (route, clues, "
                               "retrieve, generate, total)", boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10,
                                                                          20, 60, 120], tag_keys=("stage",))

    def request(self, route: str, status: int) -> None:
        tags = {"route": route, "status": str(status)}
        self.requests.inc(tags=tags)
        if status >= 400:
            self.errors.inc(tags=tags)

    def stages(self, timings: dict[str, float]) -> None:
        for k, v in timings.items():
            if k in STAGES:
                self.stage.observe(v, tags={"stage": k})


def create_api(ingress: "Ingress", extra_routers: list | None = None) -> FastAPI:
    """The FastAPI app of one ingress replica: routers, error handlers and the guard middleware."""
    from pipeline.serve.routes import ROUTERS

    cfg = ingress.config
    api = FastAPI(title="memorag", version="0.1.0", description="MemoRAG over published collections: native "
                  "query API, OpenAI-compatible chat completions (model = collection), health and metrics.")
    api.state.ingress = ingress
    for router in list(ROUTERS) + list(extra_routers or []):
        api.include_router(router)
    install_error_handlers(api, cfg.limits.retry_after_s)
    api.add_middleware(GuardMiddleware, max_body_bytes=cfg.limits.max_body_bytes,
                       max_in_flight=cfg.limits.max_in_flight, retry_after_s=cfg.limits.retry_after_s,
                       metrics=ingress.metrics, deadline_s=cfg.limits.deadline_s)
    return api


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP front door: limits, auth, version resolution, and the composition of the stage deployments.

    Args:
        config: the application config. memory, retriever, generator: handles of the stage deployments.
    """

    def __init__(self, config: ServeAppConfig, memory, retriever, generator) -> None:
        from memorag_core.query import CollectionCatalog
        from memorag_core.store.keys import ApiKeyStore

        self.config = config
        self.limits = config.limits.query_limits()
        # The ingress reads pointers and manifests only (no views, no leases): deployments load versions.
        self.catalog = CollectionCatalog(config.store, config.storage_options, refresh_s=config.refresh_s,
                                         lease_ttl_s=config.lease_ttl_s)
        self.keys = ApiKeyStore(self.catalog.store)
        self.gate = KeyGate(self.keys, cache_s=config.ingress.key_cache_s,
                            index_refresh_s=config.ingress.key_index_refresh_s)
        self.rates = RateLimiter(config.limits.key_rate_per_s, config.limits.key_burst)
        self._collections: tuple[list, float] | None = None
        self.memory, self.retriever, self.generator = memory, retriever, generator
        self.composition = QueryComposition(HandleStages(memory, retriever, generator,
                                                         plan=config.retriever.plan_config()))
        self.metrics = IngressMetrics()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    # -- auth ------------------------------------------------------------------------------------------------
    async def identify(self, authorization: str | None):
        """The :class:`~pipeline.serve.auth.Identity` of the request's key; ApiError 401 when it has none.
        Keys that certainly do not exist are refused here, in the event loop, without a thread or a store call
        (see :class:`~pipeline.serve.auth.KeyGate`)."""
        key = bearer(authorization)
        if key is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        ident = None if self.gate.refused(key) else await asyncio.to_thread(self.gate.identify, key)
        if ident is None:
            raise ApiError(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        wait = self.rates.take(ident.key_id)
        if wait is not None:
            raise ApiError(429, f"this API key is over its rate of {self.config.limits.key_rate_per_s:g} requests/s "
                                f"(bursts of {self.config.limits.key_burst}); retry later",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return ident

    async def authorize(self, collection: str, authorization: str | None) -> None:
        """Raise ApiError 401 (missing/unknown key), 403 (a key of another collection) or 429 (the key's rate)
        unless the request's bearer key opens ``collection``. Verdicts are cached for ``ingress.key_cache_s``."""
        check_collection_name(collection)
        if not self.config.auth:
            return
        ident = await self.identify(authorization)
        if ident.collection != collection:
            raise ApiError(403, f"this API key does not open collection {collection!r}")

    async def visible_collections(self, authorization: str | None) -> list[str] | None:
        """Collections a caller may list: all without auth, else the key's own (401 without a valid key)."""
        if not self.config.auth:
            return None
        return [(await self.identify(authorization)).collection]

    async def caller_owner(self, authorization: str | None, collection: str | None) -> str:
        """The owner token of the caller without naming a collection in the path: their key's tenant in the
        key's collection (401 without a valid key) or, without auth, the ``collection`` they name (422 without)."""
        from memorag_core.query.sessions import owner_of, tenant_owner

        if self.config.auth:
            ident = await self.identify(authorization)
            return tenant_owner(ident.tenant, ident.collection)
        if not collection:
            raise ApiError(422, "collection: name the session's collection (query parameter) when the service "
                                "runs without API keys", param="collection")
        return owner_of(None, check_collection_name(collection))

    async def collections(self) -> list:
        """The store's collections with their live version (cached for ``ingress.list_cache_s``)."""
        from memorag_core.errors import StoreAccessError, StoreUnavailableError

        now = time.monotonic()
        if self._collections is None or now - self._collections[1] >= self.config.ingress.list_cache_s:
            try:
                self._collections = (await asyncio.to_thread(self.catalog.collections), now)
            except (StoreUnavailableError, StoreAccessError):
                if self._collections is None:
                    raise
                self._collections = (self._collections[0], now)  # the store does not answer: the last list
        return self._collections[0]

    # -- queries ---------------------------------------------------------------------------------------------
    async def resolve_version(self, name: str, version: str | None) -> str:
        """The version a request runs on: the one it names (checked) or the live one, resolved once here."""
        if version is not None:
            from memorag_core.store.collection import is_version_id

            if not is_version_id(version):
                raise ApiError(422, f"version {version!r} is not a version id (e.g. "
                                    "20260101T120000.000000Z-1a2b3c4d)", param="version")
            return version
        return await asyncio.to_thread(self.catalog.live_version, name)

    def owner(self, name: str, authorization: str | None) -> str:
        """Whose sessions and user memories a request reads (after :meth:`authorize`): its key's tenant in
        ``name`` (so a rotated key of the same tenant reads the same ones), the collection's without auth."""
        from memorag_core.query.sessions import owner_of, tenant_owner

        if not self.config.auth:
            return owner_of(None, name)
        ident = self.gate.cached(bearer(authorization))
        if ident is None:  # authorize ran a moment ago; only a cache cleared in between lands here
            raise ApiError(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        return tenant_owner(ident.tenant, name)

    async def answer(self, name: str, request: QueryRequest, version: str | None = None, *, stream: bool = False,
                     owner: str | None = None) -> AsyncIterator[StreamEvent]:
        """Answer ``request`` over ``name``: ``token`` events (only when ``stream``), then a ``final`` event.

        The one query composition (:class:`memorag_core.query.QueryComposition`) runs over the deployment handles;
        the ingress only validates, resolves the version once and records the stage timings.
        """
        from memorag_core.query.sessions import owner_of

        request.validate(self.limits)
        t = time.perf_counter()
        version = await self.resolve_version(name, version)
        timings = {"open": time.perf_counter() - t}
        owner = owner or owner_of(None, name)
        async for event in self.composition.run(name, version, request, owner=owner, stream=stream,
                                                timings=timings):
            if event.kind == "final":
                self.metrics.stages(event.result.timings)
                yield event
            elif stream:
                yield event

    async def query(self, name: str, request: QueryRequest, version: str | None = None, *,
                    owner: str | None = None) -> QueryResult:
        """The whole answer (see :meth:`answer`)."""
        async for event in self.answer(name, request, version, owner=owner):
            if event.kind == "final":
                return event.result
        raise RuntimeError("answer ended without a final event")  # pragma: no cover

    async def ready(self) -> dict:
        """Each stage deployment answers (used by /readyz)."""
        checks = {"memory": self.memory.stats.remote(), "generator": self.generator.name.remote()}
        out = {}
        for k, resp in checks.items():
            try:
                await asyncio.wait_for(resp, timeout=5.0)
                out[k] = "ok"
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                out[k] = f"unavailable: {type(exc).__name__}"
        return out


class HandleStages(Stages):
    """The composition's stages over deployment handles: each call is one ``.remote`` awaited."""

    def __init__(self, memory, retriever, generator, plan=None) -> None:
        super().__init__(retriever=_RetrieverCalls(retriever), memory=_MemoryCalls(memory),
                         generator=_GeneratorCalls(generator), sessions=_SessionCalls(memory), plan=plan)


class _RetrieverCalls:
    def __init__(self, handle) -> None:
        self.h = handle

    async def stored_summary(self, name, version, request):
        return await self.h.stored_summary.remote(name, version, request)

    async def units(self, name, version, request):
        return await self.h.units.remote(name, version, request)

    async def retrieve(self, name, version, query, clues, top_k, doc_id=None, extra=None):
        return await self.h.retrieve.remote(name, version, query, clues, top_k, doc_id, extra)


class _MemoryCalls:
    def __init__(self, handle) -> None:
        self.h = handle

    async def clues(self, name, version, unit_ids, query, max_new_tokens, with_draft=False):
        return await self.h.clues.remote(name, version, unit_ids, query, max_new_tokens, with_draft)

    async def key_points(self, name, version, unit_ids, max_new_tokens):
        return await self.h.key_points.remote(name, version, unit_ids, max_new_tokens)

    async def rerank(self, name, version, question, lines, dense_scores, prefix_unit=None, max_tokens=None,
                     bridge_slots=0, bridge_width=2):
        return await self.h.rerank.remote(name, version, question, lines, dense_scores, prefix_unit, max_tokens,
                                          bridge_slots, bridge_width)


class _SessionCalls:
    def __init__(self, handle) -> None:
        self.h = handle

    async def prepare(self, name, owner, query, session_id, user_id):
        return await self.h.session_prepare.remote(name, owner, query, session_id, user_id)

    async def record(self, name, owner, session_id, question, answer, doc_ids, standalone):
        return await self.h.session_record.remote(name, owner, session_id, question, answer, doc_ids, standalone)


class _GeneratorCalls:
    def __init__(self, handle) -> None:
        self.h = handle

    async def generate(self, task, query, evidence, max_new_tokens):
        return await self.h.generate.remote(task, query, evidence, max_new_tokens)

    async def stream(self, task, query, evidence, max_new_tokens):
        async for piece in self.h.options(stream=True).stream.remote(task, query, evidence, max_new_tokens):
            yield piece


def bearer(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def check_collection_name(name: str) -> str:
    """A collection name that stays inside the store (422 naming ``collection`` otherwise)."""
    from memorag_core.store.collection import COLLECTION_PATTERN, is_collection_name

    if not is_collection_name(name):
        raise ApiError(422, f"collection name {name!r} must match {COLLECTION_PATTERN}", param="collection")
    return name


def build_app(args: ServeAppConfig) -> Application:
    """The application builder (``import_path: pipeline.serve.app:build_app``); ``args`` as ServeAppConfig."""
    cfg = args if isinstance(args, ServeAppConfig) else ServeAppConfig.model_validate(args)
    memory = MemoryWorker.options(**cfg.memory.deployment.serve_options()).bind(cfg)
    retriever = Retriever.options(**cfg.retriever.deployment.serve_options()).bind(cfg)
    generator = Generator.options(**cfg.generator.deployment.serve_options()).bind(cfg)
    if cfg.ingress.deployment.max_ongoing_requests <= cfg.limits.max_in_flight:
        raise InvalidInputError("ingress.deployment.max_ongoing_requests must exceed limits.max_in_flight, or Serve "
                                "queues requests that the ingress should answer with 429")
    return Ingress.options(**cfg.ingress.deployment.serve_options()).bind(cfg, memory, retriever, generator)
