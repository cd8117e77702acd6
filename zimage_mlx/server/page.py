"""The documents the server hands out as they are: the web page at /, /openapi.json, and /health."""

from __future__ import annotations

from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .core import PACKAGE_DIR, ApiError, Server

OPENAPI = PACKAGE_DIR / "openapi.json"


def routes(server: Server) -> list[Route]:
    static_dir = server.cfg.static_dir

    async def page(request):
        path = static_dir / "index.html"
        if not path.is_file():
            raise ApiError(404, "the web page is not installed")
        return FileResponse(path, media_type="text/html; charset=utf-8")

    async def health(request):
        return JSONResponse({"status": "ok", "model": "ready"})

    async def openapi(request):
        return Response(OPENAPI.read_bytes(), media_type="application/json")

    return [Route("/", page), Route("/health", health), Route("/openapi.json", openapi)]
