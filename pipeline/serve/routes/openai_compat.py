"""OpenAI-compatible API: ``POST /v1/chat/completions`` and ``GET /v1/models`` (a model is a collection).

The last ``user`` message is the query; the earlier (user, assistant) turns are a conversation: they are appended
to a session memory kept for this history (only the turns not yet recorded, see
:meth:`memorag_core.query.sessions.Conversations.sync_history`), which resolves follow-ups; OpenAI's ``user``
field names the user whose lifelong memory joins retrieval. A history over the service's bounds gets 413. The task
and the retrieval settings may be passed as extra body fields (``extra_body={"task": "qa", "top_k": 3}`` in the
``openai`` client). ``max_completion_tokens`` (or the older ``max_tokens``) bounds the answer. Sampling fields
(``temperature``, ``top_p``, ...) are accepted and ignored: answers are greedy. The response carries the usual
fields plus a ``memorag`` object (version, clues, evidence, timings); a stream sends ``chat.completion.chunk``
events and ``data: [DONE]``, with the ``memorag`` object on the last chunk.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional, Union

from fastapi import APIRouter, Depends, Header
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from memorag_core.query.types import QueryRequest
from pipeline.serve.http import ApiError, to_api_error
from pipeline.serve.routes.deps import get_ingress, sse

router = APIRouter(prefix="/v1", tags=["openai"])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatBody(BaseModel):
    """OpenAI chat-completion request; unknown OpenAI fields are accepted and ignored. The fields it reads are
    typed as strictly as the native API's (``"top_k": true`` or ``"5"`` is a 422 naming the field, not 1 or 5)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(..., description="the collection to ask")
    messages: list[ChatMessage] = Field(..., description="the last user message is the question")
    max_completion_tokens: Optional[int] = Field(None, description="most tokens of the answer")
    max_tokens: Optional[int] = Field(None, description="older name of max_completion_tokens")
    stream: Optional[bool] = Field(False, description="stream chat.completion.chunk events")
    task: Optional[str] = Field(None, description="memorag | qa | summarize (default: the service's)")
    units: Optional[int] = Field(None, description="most unit memories that write clues")
    top_k: Optional[int] = Field(None, description="evidence passages handed to the generator")
    clue_max_new_tokens: Optional[int] = Field(None, description="most tokens per clue generation")
    user: Optional[str] = Field(None, description="the end user: their lifelong memory joins retrieval")
    candidates: int = Field(0, description="also return the final ranking's first N passages (memorag.ranking)")


def message_text(m: ChatMessage) -> str:
    """The text of a chat message: its string content, or its ``text`` parts joined by newlines."""
    if isinstance(m.content, str):
        return m.content
    if isinstance(m.content, list):
        return "\n".join(str(p.get("text", "")) for p in m.content if p.get("type") == "text")
    return ""


def last_user_text(messages: list[ChatMessage]) -> str:
    """The text of the last user message (400 naming ``messages`` when it has none)."""
    for m in reversed(messages):
        if m.role == "user":
            if m.content is not None:
                return message_text(m)
            break
    raise ApiError(400, "messages holds no user message with text", param="messages")


def _request(body: ChatBody, default_task: str, limits) -> QueryRequest:
    from pipeline.serve.routes.native import defaults

    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return QueryRequest(query=last_user_text(body.messages), task=body.task or default_task,
                        candidates=body.candidates, **defaults(limits, max_new_tokens=max_new, units=body.units, top_k=body.top_k,
                                   clue_max_new_tokens=body.clue_max_new_tokens))


def _memorag_extra(result) -> dict:
    d = result.to_dict()
    return {k: d[k] for k in ("version", "task", "clues", "evidence", "timings", "session", "ranking")}


async def _with_history(ingress, body: ChatBody, request: QueryRequest, owner: str) -> None:
    """Earlier turns -> the history's session (``request.session_id``); ``user`` -> ``request.user_id``."""
    if not any(m.role == "assistant" for m in body.messages):
        return
    messages = [{"role": m.role, "content": message_text(m)} for m in body.messages if m.role in ("system", "user",
                                                                                           "assistant")]
    sid, _ = await ingress.memory.session_sync.remote(body.model, owner, messages, request.user_id)
    request.session_id = sid or None


def checked_request(body: ChatBody, ingress) -> QueryRequest:
    """The engine's request of ``body``, every field and the history's bounds checked: nothing is written
    (the history's session) before the whole request is known to be valid."""
    from memorag_core.query.sessions import check_user_id, history_turns

    request = _request(body, ingress.config.default_task, ingress.limits)
    if body.user is not None:
        request.user_id = check_user_id(body.user)
    request.validate(ingress.limits)
    if any(m.role == "assistant" for m in body.messages):
        history_turns([{"role": m.role, "content": message_text(m)} for m in body.messages
                       if m.role in ("system", "user", "assistant")], ingress.config.sessions.session_config())
    return request


@router.post("/chat/completions")
async def chat_completions(body: ChatBody, authorization: Optional[str] = Header(None),
                           ingress=Depends(get_ingress)):
    """Answer the last user message from collection ``model``."""
    await ingress.authorize(body.model, authorization)
    request = checked_request(body, ingress)
    owner = ingress.owner(body.model, authorization)
    await _with_history(ingress, body, request, owner)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        result = await ingress.query(body.model, request, owner=owner)
        return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                "memorag": _memorag_extra(result)}
    events = ingress.answer(body.model, request, stream=True, owner=owner)
    first = await events.__anext__()

    def chunk(delta: dict, finish: str | None = None, extra: dict | None = None) -> bytes:
        d = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if extra:
            d["memorag"] = extra
        return sse(d)

    async def body_iter():
        yield chunk({"role": "assistant", "content": ""})
        try:
            event = first
            while True:
                if event.kind == "token":
                    if event.text:
                        yield chunk({"content": event.text})
                else:
                    yield chunk({}, "stop", _memorag_extra(event.result))
                    break
                event = await events.__anext__()
        except StopAsyncIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - the status line is gone: an error object in the stream
            err = to_api_error(exc, ingress.config.limits.retry_after_s)
            yield sse({"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.status}})
        yield sse("[DONE]")

    return StreamingResponse(body_iter(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models")
async def list_models(authorization: Optional[str] = Header(None), ingress=Depends(get_ingress)):
    """The collections (with a live version) as OpenAI models."""
    visible = await ingress.visible_collections(authorization)
    infos = await ingress.collections()
    data = []
    for i in infos:
        if i.version is None or (visible is not None and i.name not in visible):
            continue
        data.append({"id": i.name, "object": "model", "created": created_of(i.created_at), "owned_by": "memorag"})
    return {"object": "list", "data": data}


def created_of(iso: str | None) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso).timestamp()) if iso else 0
    except ValueError:
        return 0
