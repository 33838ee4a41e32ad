"""Dependencies shared by the routers."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from pipeline.serve.app import Ingress


def get_ingress(request: Request) -> "Ingress":
    """This replica's :class:`~pipeline.serve.app.Ingress` (set by ``create_api``)."""
    return request.app.state.ingress


def sse(data: dict | str, event: str | None = None) -> bytes:
    """One server-sent event: an optional ``event:`` line and a ``data:`` line (JSON unless a str)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return ((f"event: {event}\n" if event else "") + f"data: {payload}\n\n").encode()
