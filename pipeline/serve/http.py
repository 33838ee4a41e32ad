"""HTTP plumbing of the ingress shared by every router: JSON errors, request limits, metrics labels.

Errors always come back as JSON in OpenAI's shape (the ``openai`` client reads it), never as a traceback::

    {"error": {"message": "top_k must be between 1 and 50, got 99", "type": "invalid_request_error",
               "param": "top_k", "code": 400}}

================================  ======  =====================================================================
cause                             status  notes
================================  ======  =====================================================================
malformed JSON                    400     ``param`` = ``body``
wrong type, unknown field         422     ``param`` = the field (pydantic's location)
value out of bounds, unknown task 400     ``param`` = the field (from :class:`InvalidInputError`'s message)
missing or unknown API key        401     ``WWW-Authenticate: Bearer``
a key of another collection       403
unknown collection or version     404
body over ``max_body_bytes``      413
over ``max_in_flight``            429     ``Retry-After``
over the key's rate               429     ``Retry-After`` (token bucket per key, ``limits.key_rate_per_s``)
over a tenant's quota             429     type ``insufficient_quota`` (sessions, stored bytes)
a stage unavailable (replica      503     ``Retry-After``; Serve replaces the replica
restarting, back-pressure)
past ``limits.deadline_s``        504     the request's work is cancelled
anything else                     500     logged with its traceback; the client gets a generic message
================================  ======  =====================================================================

No message shows a store URL or a filesystem path (:func:`scrub`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from memorag_core.errors import (
    ArtifactNotFoundError,
    InvalidInputError,
    MemoRAGError,
    PayloadTooLargeError,
    QuotaExceededError,
    StoreAccessError,
    StoreUnavailableError,
)

logger = logging.getLogger("memorag.serve")

REQUEST_FIELDS = ("query", "task", "max_new_tokens", "units", "top_k", "clue_max_new_tokens", "doc_id",
                  "use_draft", "stream", "version", "messages", "model", "max_tokens", "collection", "session_id",
                  "user_id")


class ApiError(Exception):
    """An error the ingress answers with ``status`` (``param``: the field at fault; ``headers``: extra headers)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}
        self.kind = kind or _kind(status)


def _kind(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            429: "rate_limit_error", 503: "service_unavailable"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, param: str | None = None, kind: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind or _kind(status), "param": param, "code": status}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.kind), status_code=err.status,
                        headers=err.headers)


def field_of(message: str) -> str | None:
    """The request field an :class:`InvalidInputError` message starts with (``"top_k must be ..."``)."""
    m = re.match(r"^([a-z_]+)\b", message)
    return m.group(1) if m and m.group(1) in REQUEST_FIELDS else None


def _unwrap(exc: BaseException) -> BaseException:
    """The user exception inside a Ray task error (errors raised in a deployment arrive wrapped)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _unavailable(exc: BaseException) -> bool:
    """A replica died, is restarting, or Serve shed the request: the client should retry."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"RayActorError", "ActorDiedError", "ActorUnavailableError", "BackPressureError",
                         "DeploymentUnavailableError", "RayServeException", "WorkerCrashedError",
                         "ObjectLostError", "NodeDiedError", "GetTimeoutError", "RequestCancelledError"})


_LOCATION = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"),]+|(?<![\w.])(?:[A-Za-z]:)?(?:/[^\s/'\"),:]+){2,}/?")


def scrub(message: str) -> str:
    """``message`` without store URLs or filesystem paths (each becomes ``<store>``): an error body names the
    cause, never where the service keeps its data."""
    return _LOCATION.sub("<store>", message)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return scrub(text.splitlines()[0] if text else "")


def to_api_error(exc: BaseException, retry_after_s: int = 1) -> ApiError:
    """Map any exception raised while answering to the :class:`ApiError` the client sees (messages scrubbed of
    store URLs and paths, see :func:`scrub`)."""
    if isinstance(exc, ApiError):
        exc.message = scrub(exc.message)
        return exc
    inner = _unwrap(exc)
    if isinstance(inner, PayloadTooLargeError):
        return ApiError(413, _first_line(inner), param="messages")
    if isinstance(inner, QuotaExceededError):
        return ApiError(429, _first_line(inner), kind="insufficient_quota")
    if isinstance(inner, InvalidInputError):
        msg = _first_line(inner)
        return ApiError(400, msg, param=field_of(msg))
    if isinstance(inner, ArtifactNotFoundError):
        return ApiError(404, _first_line(inner))
    if isinstance(inner, (StoreUnavailableError, StoreAccessError)) or _unavailable(inner) or _unavailable(exc):
        logger.warning("unavailable: %s: %s", type(inner).__name__, str(inner).split("\n")[0])
        return ApiError(503, "a stage of the service is unavailable (restarting or overloaded); retry",
                        headers={"Retry-After": str(retry_after_s)})
    if isinstance(inner, MemoRAGError):
        logger.error("server-side error: %s: %s", type(inner).__name__, inner)
        return ApiError(500, f"{type(inner).__name__}: {_first_line(inner)}")
    logger.error("internal error", exc_info=(type(exc), exc, exc.__traceback__))
    return ApiError(500, "internal error (logged on the server)")


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """JSON errors for validation failures, HTTP errors, ApiError and everything else."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(ApiError(400, f"malformed JSON: {first.get('msg', '')}", param="body"))
        loc = [str(p) for p in first.get("loc", ())]
        if loc and loc[0] in ("body", "path", "query", "header"):  # where it was, not which field
            loc = loc[1:]
        param = ".".join(loc) or None
        msg = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more)"
        return error_response(ApiError(422, msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(to_api_error(exc))

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc, retry_after_s))


def route_label(path: str) -> str:
    """A low-cardinality metrics label for a request path."""
    if path.startswith("/v1/chat/completions"):
        return "chat"
    if path.startswith("/v1/models"):
        return "models"
    if re.match(r"^/v1/collections/[^/]+/query$", path):
        return "query"
    if path.startswith("/v1/collections"):
        return "collections"
    if path in ("/healthz", "/readyz"):
        return path[1:]
    return "other"


def as_json(scope: dict) -> dict:
    """``scope`` with its body declared JSON: every ``/v1/`` body is JSON, and ``curl -d '{...}'`` (which sends
    ``application/x-www-form-urlencoded``) or a client that names no type would otherwise get 422."""
    if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
        return scope
    headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() != b"content-type"]
    ctype = dict(scope.get("headers") or []).get(b"content-type", b"")
    if ctype.split(b";")[0].strip().lower().endswith(b"json"):
        return scope
    return {**scope, "headers": headers + [(b"content-type", b"application/json")]}


class GuardMiddleware:
    """ASGI middleware in front of every route: body-size bound (413), in-flight bound per replica (429 with
    Retry-After, for ``/v1/`` routes), the request deadline (504, ``/v1/`` routes; the route's work is cancelled,
    and with it the deployment calls it waits for), and request / error counters by route and status.

    In-flight counts a request until its response has been sent completely (streams included).
    """

    def __init__(self, app, *, max_body_bytes: int, max_in_flight: int, retry_after_s: int, metrics=None,
                 deadline_s: float = 0.0) -> None:
        self.app = app
        self.max_body_bytes, self.max_in_flight, self.retry_after_s = max_body_bytes, max_in_flight, retry_after_s
        self.deadline_s = deadline_s
        self.in_flight = 0
        self.metrics = metrics

    async def _send_error(self, send, err: ApiError) -> None:
        body = json.dumps(error_body(err.status, err.message, err.param, err.kind)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), str(v).encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, scope, receive, send):
        """The request body, read here with its bound before any route sees it: a body without Content-Length
        (chunked) that grows past the limit gets 413 too (raised inside FastAPI's body parsing it became a 400).
        Returns a ``receive`` that replays it, or None when a 413 was sent or the client went away."""
        chunks, size = [], 0
        more = scope.get("method") not in ("GET", "HEAD", "DELETE", "OPTIONS")
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None  # client went away
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                await self._send_error(send, ApiError(413, f"request body exceeds {self.max_body_bytes} bytes",
                                                      param="body"))
                return None
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        buffered = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return buffered.pop() if buffered else await receive()

        return replay

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = route_label(path)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
            await send(message)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                await self._send_error(send_wrapper, ApiError(413, f"request body is {int(length)} bytes; the "
                                                                   f"limit is {self.max_body_bytes}", param="body"))
                return
            limited = path.startswith("/v1/")
            if limited:
                scope = as_json(scope)
            if limited and self.in_flight >= self.max_in_flight:
                await self._send_error(send_wrapper, ApiError(
                    429, f"this replica is working on {self.in_flight} requests (limit {self.max_in_flight}); "
                    "retry later", headers={"Retry-After": str(self.retry_after_s)}))
                return
            # Counted in flight before the first await, so that concurrent arrivals cannot all pass the check.
            if limited:
                self.in_flight += 1
            try:
                receive_limited = await self._read_body(scope, receive, send_wrapper)
                if receive_limited is not None:
                    if limited and self.deadline_s > 0:
                        await asyncio.wait_for(self.app(scope, receive_limited, send_wrapper), self.deadline_s)
                    else:
                        await self.app(scope, receive_limited, send_wrapper)
            except asyncio.TimeoutError:
                # The route's task (and the deployment calls it awaited) was cancelled by wait_for.
                logger.warning("deadline: %s over %.0f s", label, self.deadline_s)
                if not status.get("started"):
                    await self._send_error(send_wrapper, ApiError(
                        504, f"the request took longer than the service's deadline of {self.deadline_s:g} s",
                        kind="timeout_error"))
                else:
                    status["code"] = 504  # a stream cut short: counted, the connection is closed
            except ApiError as err:
                await self._send_error(send_wrapper, err)
            finally:
                if limited:
                    self.in_flight -= 1
        finally:
            if self.metrics is not None:
                self.metrics.request(label, status["code"])
