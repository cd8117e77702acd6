"""The history of finished images and the memory routes: GET /v1/history (paged, newest first, `q` searches
prompts), GET/DELETE /v1/history/{id}, GET /v1/history/{id}/image, and POST /v1/unload.

The history is `zimage_mlx.history`: with --output-dir the images in that folder (they outlive the server),
else the last --history-keep in memory."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..memory import memory_info
from .core import ApiError, Server, bad, load_state

MAX_LIMIT = 200


def routes(server: Server) -> list[Route]:
    api = StudioRoutes(server)
    return [Route("/v1/history", api.list), Route("/v1/history/{item_id}", api.get),
            Route("/v1/history/{item_id}", api.delete, methods=["DELETE"]),
            Route("/v1/history/{item_id}/image", api.image), Route("/v1/unload", api.unload, methods=["POST"])]


def with_url(entry: dict) -> dict:
    return {**entry, "url": f"/v1/history/{entry['id']}/image"}


def query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    if not value.isdigit() or not lo <= int(value) <= hi:
        raise bad(name, f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
    return int(value)


class StudioRoutes:
    def __init__(self, server: Server):
        self.server = server
        self.history = server.history

    async def list(self, request: Request):
        limit = query_int(request, "limit", 50, 1, MAX_LIMIT)
        offset = query_int(request, "offset", 0, 0, 10**9)
        q = request.query_params.get("q") or None
        items, total = await asyncio.to_thread(self.history.list, q, offset, limit)
        return JSONResponse({"data": [with_url(e) for e in items], "total": total, "offset": offset, "limit": limit,
                             "persistent": self.history.folder is not None})

    def find(self, request: Request) -> dict:
        item_id = request.path_params["item_id"]
        entry = self.history.get(item_id)
        if entry is None:
            raise ApiError(404, f"no image {item_id!r} in the history", "id", "image_not_found")
        return entry

    async def get(self, request: Request):
        return JSONResponse(with_url(self.find(request)))

    async def image(self, request: Request):
        entry = self.find(request)
        found = self.history.read(entry["id"])
        if found is None:
            raise ApiError(404, f"the file of {entry['id']!r} is gone", "id", "image_not_found")
        return Response(found[0], media_type=found[1],
                        headers={"Content-Disposition": f'inline; filename="{entry["id"]}"'})

    async def delete(self, request: Request):
        entry = self.find(request)
        await asyncio.to_thread(self.history.delete, entry["id"])
        return JSONResponse({"id": entry["id"], "deleted": True})

    async def unload(self, request: Request):
        """Free the models now (or, if jobs are running or queued, once they are done); answers when freed or
        after 60 s with what is resident then."""
        worker = self.server.worker
        if worker.state in ("failed", "stopped"):
            raise ApiError(503, f"the model is {worker.state}", None, "unavailable", "server_error")
        freed = await asyncio.to_thread(worker.unload, 60)
        return JSONResponse({"unloaded": freed, "resident": worker.pipeline is not None, **load_state(worker),
                             "memory": memory_info()})
