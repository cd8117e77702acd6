"""The documents the server hands out as they are: the web page at /, /openapi.json, and /health.

/health needs no key and carries no secret: {"status": "ok", "model": "ready"} once the model is loaded
({"status": "ok", "model": "unloaded"} after --idle-unload or POST /v1/unload freed it);
while it loads {"status": "loading", "model": "loading", "phase", "fraction"} (200: requests sent now wait in
the queue); {"status": "failed", "model": "failed", "error"} with 503 if the load failed."""

from __future__ import annotations

from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .core import PACKAGE_DIR, ApiError, Server, load_state

OPENAPI = PACKAGE_DIR / "openapi.json"


def routes(server: Server) -> list[Route]:
    static_dir = server.cfg.static_dir

    async def page(request):
        path = static_dir / "index.html"
        if not path.is_file():
            raise ApiError(404, "the web page is not installed")
        return FileResponse(path, media_type="text/html; charset=utf-8")

    async def health(request):
        state = load_state(server.worker)
        if state["state"] in ("ready", "unloaded"):  # unloaded: freed while idle; the next job loads it
            return JSONResponse({"status": "ok", "model": state["state"]})
        body = {"status": state["state"], "model": state["state"], **{k: v for k, v in state.items() if k != "state"}}
        return JSONResponse(body, 503 if state["state"] in ("failed", "stopped") else 200)

    async def openapi(request):
        return Response(OPENAPI.read_bytes(), media_type="application/json")

    return [Route("/", page), Route("/health", health), Route("/openapi.json", openapi)]
