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
    """``ready`` (200): the store answers and every stage deployment does. ``degraded`` (200): the stages answer
    but the store does not; the loaded live versions (``serving``) are still answered from, while sessions,
    new versions and keys not seen before wait for the store. ``not ready`` (503): a stage does not answer."""
    checks = await ingress.ready()
    try:
        await asyncio.wait_for(asyncio.to_thread(ingress.catalog.store.list_collections), timeout=10)
        checks["store"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported
        checks["store"] = f"unavailable: {type(exc).__name__}"
    stages_ok = all(v == "ok" for k, v in checks.items() if k != "store")
    status = ("ready" if checks["store"] == "ok" else "degraded") if stages_ok else "not ready"
    return JSONResponse({"status": status, "checks": checks, "serving": ingress.catalog.known_versions()},
                        status_code=200 if stages_ok else 503)
