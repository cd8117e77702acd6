"""The page of `zimage-mlx serve` in a real browser: Debian's Chromium driven by Playwright, against uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn (the serve extra) is not installed")

STATIC = Path(__file__).resolve().parent.parent / "zimage_mlx" / "static" / "index.html"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


# ---- A throwaway server that follows notes/server-contract.md with a fake engine (until server.py exists).
def mock_app(step_delay: float, api_key: str | None = None):
    from PIL import Image
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    jobs: dict[str, dict] = {}
    order: list[str] = []
    wake = asyncio.Event()

    def err(status, message, param=None):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": None}}, status)

    def view(j):
        return {k: j[k] for k in ("id", "status", "step", "total", "settings", "images", "error")} | {
            "queue_position": order.index(j["id"]) if j["id"] in order else None}

    def emit(j, type_, data):
        j["events"].append((type_, data))
        for q in j["subs"]:
            q.put_nowait((type_, data))

    def jpeg(color, size=(32, 32), fmt="JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, fmt)
        return buf.getvalue()

    async def worker():
        while True:
            while not order:
                wake.clear()
                await wake.wait()
            j = jobs[order.pop(0)]
            for i, other in enumerate(order):
                emit(jobs[other], "queued", {"position": i})
            j["status"] = "running"
            emit(j, "started", {"total": j["total"]})
            t0 = time.perf_counter()
            for k in range(1, j["total"] + 1):
                await asyncio.sleep(step_delay)
                if j["cancel"]:
                    break
                j["step"] = k
                prev = base64.b64encode(jpeg((40 * k % 255, 90, 160))).decode()
                emit(j, "step", {"step": k, "total": j["total"], "preview": prev})
            if j["cancel"]:
                j["status"] = "cancelled"
                emit(j, "cancelled", {})
                continue
            s = j["settings"]
            seed = s.get("seed") if s.get("seed") not in (None, -1) else 1234
            j["png"] = jpeg((200, 120, 60), (s["width"], s["height"]), "PNG")
            j["images"] = [{"url": f"/v1/jobs/{j['id']}/images/0", "seed": seed, "width": s["width"],
                            "height": s["height"]}]
            j["status"] = "completed"
            emit(j, "done", {"images": j["images"], "seconds": time.perf_counter() - t0})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.get_running_loop().create_task(worker())
        yield
        task.cancel()

    async def create(request):
        body = await request.json()
        known = {"prompt", "negative_prompt", "width", "height", "steps", "seed", "guidance", "previews"}
        for k in body:
            if k not in known:
                return err(400, f"unknown field {k}", k)
        if not body.get("prompt"):
            return err(400, "prompt is required", "prompt")
        if body.get("negative_prompt") and not body.get("guidance"):
            return err(400, "negative_prompt needs guidance > 0", "negative_prompt")
        jid = uuid.uuid4().hex[:12]
        s = {"prompt": body["prompt"], "width": body.get("width", 64), "height": body.get("height", 64),
             "steps": body.get("steps", 4), "seed": body.get("seed")}
        jobs[jid] = {"id": jid, "status": "queued", "step": 0, "total": s["steps"], "settings": s, "images": [],
                     "error": None, "events": [], "subs": [], "cancel": False}
        order.append(jid)
        emit(jobs[jid], "queued", {"position": len(order) - 1})
        wake.set()
        return JSONResponse({"id": jid, "status": "queued", "queue_position": len(order) - 1,
                             "events_url": f"/v1/jobs/{jid}/events"}, 202)

    async def job(request):
        j = jobs.get(request.path_params["id"])
        if j is None:
            return err(404, "no such job", "id")
        if request.method == "DELETE" and j["status"] in ("queued", "running"):
            j["cancel"] = True
            if j["id"] in order:
                order.remove(j["id"])
                j["status"] = "cancelled"
                emit(j, "cancelled", {})
        return JSONResponse(view(j))

    async def events(request):
        j = jobs[request.path_params["id"]]
        q: asyncio.Queue = asyncio.Queue()
        backlog = list(j["events"])
        j["subs"].append(q)

        async def gen():
            try:
                for type_, data in backlog:
                    yield f"event: {type_}\r\ndata: {json.dumps(data)}\r\n\r\n"
                    if type_ in ("done", "failed", "cancelled"):
                        return
                while True:
                    type_, data = await q.get()
                    yield f"event: {type_}\r\ndata: {json.dumps(data)}\r\n\r\n"
                    if type_ in ("done", "failed", "cancelled"):
                        return
            finally:
                j["subs"].remove(q)
        return StreamingResponse(gen(), media_type="text/event-stream")

    async def image(request):
        return Response(jobs[request.path_params["id"]]["png"], media_type="image/png")

    async def status(request):
        running = next((j["id"] for j in jobs.values() if j["status"] == "running"), None)
        return JSONResponse({"model": "mock", "running": running, "queue": list(order), "queue_size": 8,
                             "limits": {"max_side": 512, "max_n": 4, "max_steps": 50},
                             "defaults": {"width": 64, "height": 64, "steps": 4}, "loras": []})

    async def page(request):
        return FileResponse(STATIC)

    async def auth(request, call_next):
        if api_key and request.url.path != "/" and request.headers.get("authorization") != f"Bearer {api_key}":
            return err(401, "missing or invalid API key")
        return await call_next(request)

    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    return Starlette(middleware=[Middleware(BaseHTTPMiddleware, dispatch=auth)], routes=[Route("/", page), Route("/v1/jobs", create, methods=["POST"]),
                             Route("/v1/jobs/{id}", job, methods=["GET", "DELETE"]),
                             Route("/v1/jobs/{id}/events", events), Route("/v1/jobs/{id}/images/{k}", image),
                             Route("/v1/status", status)], lifespan=lifespan)


class Served:
    """uvicorn in a thread on 127.0.0.1, port 0."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path, key=None):
        import httpx
        return httpx.get(self.url + path, timeout=10, headers={"Authorization": f"Bearer {key}"} if key else {}).json()

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    yield pg
    ctx.close()


@pytest.fixture(scope="module")
def server():
    s = Served(mock_app(step_delay=0.05))
    yield s
    s.close()


@pytest.fixture(scope="module")
def slow_server():
    """Steps that take 0.25 s each, so the live test's timing does not depend on how fast this machine is."""
    s = Served(mock_app(step_delay=0.25))
    yield s
    s.close()


def posted_jobs(page):
    """Every POST /v1/jobs the page makes: (request body, response JSON), in order."""
    seen = []

    def on_response(resp):
        if resp.request.method == "POST" and resp.url.endswith("/v1/jobs"):
            seen.append((json.loads(resp.request.post_data), resp.json()))
    page.on("response", on_response)
    return seen


def screenshot(page, tmp_path, name):
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    if os.environ.get("ZIMAGE_SCREENSHOT_DIR"):
        out = Path(os.environ["ZIMAGE_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
    return path


def test_generate_shows_previews_and_gallery(page, server, tmp_path):
    jobs = posted_jobs(page)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent !== 'connecting…'")
    page.fill("#prompt", "a lighthouse at dusk")
    page.select_option("#width", "64")
    page.select_option("#height", "64")
    page.fill("#steps", "4")
    page.fill("#seed", "7")
    # Record every src the preview takes, from inside the page.
    page.evaluate("""() => { window.srcs = []; new MutationObserver(() => window.srcs.push(
        document.getElementById('preview').getAttribute('src'))).observe(document.getElementById('preview'),
        {attributes: true, attributeFilter: ['src']}); }""")
    page.click("#generate")
    card = page.locator("#gallery .card")
    sync_api.expect(card).to_have_count(1)
    srcs = page.evaluate("window.srcs")
    assert any(s.startswith("data:image/jpeg;base64,") for s in srcs), srcs  # at least one step preview
    assert len(set(srcs)) >= 2  # the preview changed (steps, then the final image)
    assert card.get_attribute("data-prompt") == "a lighthouse at dusk"
    assert card.get_attribute("data-seed") == "7"
    sync_api.expect(card.locator(".nums")).to_contain_text("64×64 · 4 steps · seed 7")
    ((body, created),) = jobs
    assert body == {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4, "seed": 7, "previews": True}
    link = card.locator("a[download]")
    assert link.get_attribute("href") == f"/v1/jobs/{created['id']}/images/0"
    assert link.get_attribute("download").endswith(".png")
    # The gallery image really loaded from the server.
    assert page.evaluate("document.querySelector('#gallery .card img').naturalWidth") == 64
    assert server.get(f"/v1/jobs/{created['id']}")["status"] == "completed"
    sync_api.expect(page.locator("#error")).to_have_text("")
    assert not errors
    screenshot(page, tmp_path, "page-generate.png")


def test_live_mode_keeps_only_the_last_text(page, slow_server, tmp_path):
    jobs = posted_jobs(page)
    page.goto(slow_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent !== 'connecting…'")
    page.select_option("#width", "128")
    page.select_option("#height", "128")
    page.fill("#steps", "4")
    page.check("#live")
    assert page.input_value("#seed") != ""  # live mode fixes the seed so only the prompt changes the image
    first, second = "a red fox in snow", "a blue bird on a wire"
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/v1/jobs")):
        page.fill("#prompt", first)  # the draft for the first text goes out after the debounce ...
    page.fill("#prompt", second)  # ... and typing on cancels it
    card = page.locator("#gallery .card")
    sync_api.expect(card).to_have_count(1)
    page.wait_for_timeout(1500)  # nothing else arrives
    sync_api.expect(card).to_have_count(1)
    assert card.get_attribute("data-prompt") == second
    status = {created["id"]: slow_server.get(f"/v1/jobs/{created['id']}") for _, created in jobs}
    firsts = [status[c["id"]] for b, c in jobs if b["prompt"] == first]
    assert firsts and all(j["status"] == "cancelled" for j in firsts)
    full = [status[c["id"]] for b, c in jobs if b["prompt"] == second and b["width"] == 128 and b["steps"] == 4]
    assert [j["status"] for j in full] == ["completed"]
    drafts = [b for b, c in jobs if b["prompt"] == second and b not in [x for x, _ in jobs if x["width"] == 128]]
    assert all(b["width"] == 64 and b["steps"] == 2 for b in drafts)
    assert slow_server.get("/v1/status")["running"] is None
    screenshot(page, tmp_path, "page-live.png")


def test_api_key_and_cancel(page, tmp_path):
    """With a key configured the page reads it from its field (kept in localStorage) and sends it on every call,
    event stream and image included; Cancel stops the running job."""
    s = Served(mock_app(step_delay=0.25, api_key="sesame"))
    try:
        jobs = posted_jobs(page)
        page.goto(s.url + "/")
        sync_api.expect(page.locator("#error")).to_contain_text("API key")  # the envelope's message, no alert
        page.click("header summary")
        page.fill("#apikey", "sesame")
        page.click("#prompt")  # leaving the field commits it (a change event)
        sync_api.expect(page.locator("#error")).to_have_text("")
        assert page.evaluate("localStorage.getItem('zimage-mlx.apiKey')") == "sesame"
        page.select_option("#width", "64")
        page.select_option("#height", "64")
        page.fill("#steps", "20")
        page.fill("#prompt", "a paper boat")
        page.click("#generate")
        sync_api.expect(page.locator("#progress")).to_contain_text("step 1/20")
        page.click("#cancel")
        sync_api.expect(page.locator("#progress")).to_contain_text("cancelled")
        ((_, created),) = jobs
        record = s.get(f"/v1/jobs/{created['id']}", key="sesame")
        assert record["status"] == "cancelled" and record["step"] < 20
        # A short job with the key: the gallery image is fetched with the header too.
        page.fill("#steps", "2")
        page.click("#generate")
        sync_api.expect(page.locator("#gallery .card")).to_have_count(1)
        assert page.evaluate("document.querySelector('#gallery .card img').naturalWidth") == 64
        assert page.locator("#gallery .card a[download]").get_attribute("href").startswith("blob:")
        screenshot(page, tmp_path, "page-api-key.png")
    finally:
        s.close()
