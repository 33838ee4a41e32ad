"""Operations: liveness and readiness. (Metrics are exported by Ray's metrics agent, not by a route.)"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from pipeline.serve.routes.deps import get_ingress

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz():
    """The ingress replica is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(ingress=Depends(get_ingress)):
    """The store is reachable and every stage deployment answers (503 otherwise)."""
    checks = await ingress.ready()
    try:
        await asyncio.wait_for(asyncio.to_thread(ingress.catalog.store.list_collections), timeout=10)
        checks["store"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported
        checks["store"] = f"unavailable: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)
