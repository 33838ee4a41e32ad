"""Conversation sessions and user memories over HTTP.

=====================================================  ==========================================================
route                                                  what
=====================================================  ==========================================================
``POST /v1/collections/{name}/sessions``               a new session (``{user_id?}``) -> 201 and its state
``GET /v1/sessions/{id}``                              the session's state: collection, user, turns, expiry
``DELETE /v1/sessions/{id}``                           end it: its turns reach the user memory, then it is deleted
``DELETE /v1/users/{id}``                              delete the user: their memory and every session naming them
=====================================================  ==========================================================

A session belongs to the tenant of the API key that created it (keys of one tenant, a rotated one too, share
them): another tenant's key (or none) gets 404, as for a session that does not exist or has expired; malformed ids get 400 naming the rule. Without authentication (``auth: false``),
sessions belong to their collection, which the ``collection`` query parameter then names.
Queries use a session with ``session_id`` (native API) or a message history (chat completions).
"""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pipeline.serve.routes.deps import get_ingress

router = APIRouter(prefix="/v1", tags=["sessions"])


class SessionBody(BaseModel):
    """A new session; ``user_id`` names whose lifelong memory it reads and feeds."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: Optional[str] = Field(None, description="1-64 characters of letters, digits, '_', '.', '@', '-'")


async def caller(ingress, authorization: Optional[str], collection: Optional[str]) -> str:
    """The owner token of the caller: their key's tenant (401 without a valid key) or, without auth, the
    collection's (named by the ``collection`` query parameter)."""
    return await ingress.caller_owner(authorization, collection)


@router.post("/collections/{name}/sessions", status_code=201)
async def create_session(name: str, body: Optional[SessionBody] = None, authorization: Optional[str] = Header(None),
                         ingress=Depends(get_ingress)):
    """Start a conversation over collection ``name``: later queries with its ``session_id`` remember it."""
    from memorag_core.query.sessions import check_user_id

    await ingress.authorize(name, authorization)
    await ingress.resolve_version(name, None)  # 404 for a collection that is not published
    user_id = body.user_id if body else None
    if user_id is not None:
        check_user_id(user_id)
    state = await ingress.memory.session_create.remote(name, ingress.owner(name, authorization), user_id)
    return JSONResponse(state, status_code=201)


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, collection: Optional[str] = Query(None),
                      authorization: Optional[str] = Header(None), ingress=Depends(get_ingress)):
    """The session's collection, user, turns (question, answer, cited titles, standalone question), expiry."""
    from memorag_core.query.sessions import check_session_id

    check_session_id(session_id)
    owner = await caller(ingress, authorization, collection)
    return await ingress.memory.session_get.remote(session_id, owner)


@router.delete("/sessions/{session_id}")
async def delete_session(session_id: str, collection: Optional[str] = Query(None),
                         authorization: Optional[str] = Header(None), ingress=Depends(get_ingress)):
    """End a session: what it revealed reaches its user's memory, then its memory and state are deleted."""
    from memorag_core.query.sessions import check_session_id

    check_session_id(session_id)
    owner = await caller(ingress, authorization, collection)
    state = await ingress.memory.session_end.remote(session_id, owner)
    return {"id": state["id"], "deleted": True, "turn_count": state["turn_count"]}


@router.delete("/users/{user_id}")
async def delete_user(user_id: str, collection: Optional[str] = Query(None),
                      authorization: Optional[str] = Header(None), ingress=Depends(get_ingress)):
    """Delete the caller's user ``user_id``: the lifelong memory and every session that carries the id (states,
    turns, memory files); 404 when there is nothing of that user."""
    from memorag_core.query.sessions import check_user_id

    check_user_id(user_id)
    owner = await caller(ingress, authorization, collection)
    return await ingress.memory.user_delete.remote(user_id, owner)
