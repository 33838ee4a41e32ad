"""The web page at ``/``: static files shipped in the package (``pipeline/serve/static``), no CDN, no build step.

Only the page's own files are served (a fixed list, no path from the request reaches the filesystem), with a
Content-Security-Policy that allows nothing but this origin: the page talks to the same ingress's ``/v1`` API.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from pipeline.serve.http import ApiError

router = APIRouter(tags=["web"])

FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def static_file(name: str) -> bytes:
    """The bytes of one of the page's files (KeyError for any other name)."""
    if name not in FILES:
        raise KeyError(name)
    return (resources.files("pipeline.serve") / "static" / name).read_bytes()


def _response(name: str) -> Response:
    try:
        body = static_file(name)
    except KeyError:
        raise ApiError(404, f"no static file {name!r}") from None
    return Response(body, media_type=FILES[name], headers={
        "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
async def index() -> Response:
    """The page: pick a collection, paste a key, ask."""
    return _response("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    return _response(name)
