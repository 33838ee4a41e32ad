"""The ingress's guard middleware on its own (no Ray): the request deadline and the JSON body whatever its
content type, through a real FastAPI app and httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from pipeline.serve.http import GuardMiddleware, install_error_handlers


class Body(BaseModel):
    sleep: float = 0.0


def make_app(deadline_s: float) -> tuple[FastAPI, dict]:
    seen = {"cancelled": 0}
    api = FastAPI()

    @api.post("/v1/slow")
    async def slow(body: Body):
        try:
            await asyncio.sleep(body.sleep)
        except asyncio.CancelledError:
            seen["cancelled"] += 1  # the work under the route is cancelled, not left running
            raise
        return {"slept": body.sleep}

    install_error_handlers(api, 1)
    api.add_middleware(GuardMiddleware, max_body_bytes=4096, max_in_flight=4, retry_after_s=1, deadline_s=deadline_s)
    return api, seen


async def _post(api, body, headers=None):
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post("/v1/slow", content=json.dumps(body), headers=headers or {})


def test_a_request_over_the_deadline_gets_504_and_its_work_is_cancelled():
    api, seen = make_app(deadline_s=0.3)
    r = asyncio.run(_post(api, {"sleep": 5}, {"content-type": "application/json"}))
    assert r.status_code == 504 and r.json()["error"]["code"] == 504
    assert "deadline" in r.json()["error"]["message"] and seen["cancelled"] == 1
    ok = asyncio.run(_post(api, {"sleep": 0.01}, {"content-type": "application/json"}))
    assert ok.status_code == 200 and ok.json() == {"slept": 0.01}


@pytest.mark.parametrize("ctype", [None, "application/x-www-form-urlencoded", "text/plain; charset=utf-8"])
def test_a_json_body_is_read_as_json_whatever_its_content_type(ctype):
    api, _ = make_app(deadline_s=0)
    r = asyncio.run(_post(api, {"sleep": 0.0}, {"content-type": ctype} if ctype else {}))
    assert r.status_code == 200, r.text
