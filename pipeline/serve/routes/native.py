"""The native API: ``POST /v1/collections/{name}/query`` (whole or server-sent events) and the collection list."""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends, Header
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from memorag_core.query.types import QueryRequest
from pipeline.serve.http import to_api_error
from pipeline.serve.routes.deps import get_ingress, sse

router = APIRouter(prefix="/v1", tags=["collections"])


class QueryBody(BaseModel):
    """A question to a collection. Bounds come from the service's limits (a 400 names the field beyond them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: Optional[str] = Field(None, description="the question (may be omitted for task=summarize)")
    task: str = Field("memorag", description="memorag (clues from unit memories drive retrieval), qa (plain RAG: "
                                             "the question alone retrieves), summarize (key points -> summary)")
    max_new_tokens: Optional[int] = Field(None, description="most tokens of the answer (default: 256, or the "
                                                            "service's limit when lower)")
    units: Optional[int] = Field(None, description="most unit memories that write clues (default 4)")
    top_k: Optional[int] = Field(None, description="evidence passages handed to the generator (default 5)")
    clue_max_new_tokens: Optional[int] = Field(None, description="most tokens per clue generation (default 64)")
    doc_id: Optional[str] = Field(None, description="summarize: the document to summarize (None: the collection)")
    use_draft: bool = Field(False, description="memorag: also ask each memory for a draft answer")
    stream: bool = Field(False, description="answer as server-sent events: token events, then a final event")
    version: Optional[str] = Field(None, description="a published version id to query (None: the live one)")
    session_id: Optional[str] = Field(None, description="a conversation session (POST /v1/collections/{name}/"
                                                        "sessions): earlier turns resolve follow-ups")
    user_id: Optional[str] = Field(None, description="a user whose lifelong memory joins retrieval")
    candidates: int = Field(0, description="also return the final ranking's first N passages (the re-ranked "
                                           "candidates of memorag) in `ranking`; the generator still reads top_k")

    def request(self, limits) -> QueryRequest:
        """The engine's request; fields left out take their default, capped by the service's ``limits``."""
        return QueryRequest(query=self.query, task=self.task, doc_id=self.doc_id, use_draft=self.use_draft,
                            session_id=self.session_id, user_id=self.user_id, candidates=self.candidates,
                            **defaults(limits, max_new_tokens=self.max_new_tokens, units=self.units,
                                       top_k=self.top_k, clue_max_new_tokens=self.clue_max_new_tokens))


DEFAULTS = {"max_new_tokens": (256, "max_new_tokens"), "units": (4, "max_units"), "top_k": (5, "max_top_k"),
            "clue_max_new_tokens": (64, "max_clue_tokens")}


def defaults(limits, **given) -> dict:
    """``given`` with None replaced by the default, capped by the matching limit."""
    return {k: v if v is not None else min(DEFAULTS[k][0], getattr(limits, DEFAULTS[k][1]))
            for k, v in given.items()}


class EvidenceOut(BaseModel):
    doc_id: str
    unit_id: str
    chunk_id: str
    score: float
    text: str
    sources: list[str] = []
    query: str = ""
    start: Optional[int] = None
    end: Optional[int] = None


class RankedOut(BaseModel):
    doc_id: str
    unit_id: str
    chunk_id: str
    score: float


class QueryOut(BaseModel):
    """The answer, with what led to it: ``timings`` in seconds per stage (route, clues, retrieve, generate,
    total); ``version`` is the version the query ran on from start to end."""

    answer: str
    collection: str
    version: str
    task: str
    units: list[dict]
    clues: list[dict]
    evidence: list[EvidenceOut]
    timings: dict[str, float]
    retrieval_queries: list[dict]
    session: Optional[dict] = None
    question: Optional[str] = None
    warnings: list[str] = []
    ranking: list[RankedOut] = []


class CollectionOut(BaseModel):
    name: str
    version: Optional[str]
    documents: int
    tokens: int
    units: int
    chunks: int
    created_at: Optional[str]


class CollectionsOut(BaseModel):
    collections: list[CollectionOut]


@router.post("/collections/{name}/query", response_model=QueryOut,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or with stream=true server-sent events: `event: token` "
                                             "({text}) ..., then `event: final` (the JSON body), or `event: error`"}})
async def query_collection(name: str, body: QueryBody, authorization: Optional[str] = Header(None),
                           ingress=Depends(get_ingress)):
    """Answer a question over collection ``name`` (its live version unless ``version`` is given)."""
    await ingress.authorize(name, authorization)
    request = body.request(ingress.limits)
    owner = ingress.owner(name, authorization)
    if not body.stream:
        return (await ingress.query(name, request, body.version, owner=owner)).to_api()
    events = ingress.answer(name, request, body.version, stream=True, owner=owner)
    first = await events.__anext__()  # errors before the first token still get their own status code

    async def body_iter():
        try:
            event = first
            while True:
                if event.kind == "token":
                    yield sse({"text": event.text}, "token")
                else:
                    yield sse(event.result.to_api(), "final")
                    return
                event = await events.__anext__()
        except StopAsyncIteration:
            return
        except Exception as exc:  # noqa: BLE001 - the status line is gone: report it as an event
            err = to_api_error(exc, ingress.config.limits.retry_after_s)
            yield sse({"error": {"message": err.message, "type": err.kind, "param": err.param,
                                 "code": err.status}}, "error")

    return StreamingResponse(body_iter(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/collections", response_model=CollectionsOut)
async def list_collections(authorization: Optional[str] = Header(None), ingress=Depends(get_ingress)):
    """Collections with their live version and counts (with auth on: the collection of the caller's key)."""
    import dataclasses

    visible = await ingress.visible_collections(authorization)
    infos = await ingress.collections()
    return {"collections": [dataclasses.asdict(i) for i in infos if visible is None or i.name in visible]}
