"""The ingress's HTTP routes, one router per area. :data:`ROUTERS` is what :func:`pipeline.serve.app.create_api`
mounts; a new area (sessions, a web page) adds its router here. Routes reach the replica's
:class:`~pipeline.serve.app.Ingress` with ``Depends(get_ingress)``."""

from pipeline.serve.routes.native import router as native_router
from pipeline.serve.routes.openai_compat import router as openai_router
from pipeline.serve.routes.ops import router as ops_router
from pipeline.serve.routes.sessions import router as sessions_router
from pipeline.serve.routes.web import router as web_router

ROUTERS = [native_router, openai_router, ops_router, sessions_router, web_router]

__all__ = ["ROUTERS"]
