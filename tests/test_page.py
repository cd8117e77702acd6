"""The page of `zimage-mlx serve` in a real browser: Debian's Chromium driven by Playwright, against uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import re
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")
pytest.importorskip("uvicorn", reason="uvicorn (the serve extra) is not installed")

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


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


def live_server(engine_factory, **cfg):
    """The real app around a started Worker, served by uvicorn on 127.0.0.1 port 0 (tests/server_fakes.py)."""
    from server_fakes import LiveServer

    from zimage_mlx.server import ServerConfig
    from zimage_mlx.worker import Worker

    runner = Worker(engine_factory, queue_size=8)
    runner.start(timeout=120)
    return LiveServer(runner, ServerConfig(default_width=64, default_height=64, default_steps=4, **cfg))


def get(server, path, key=None):
    return httpx.get(server.url + path, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10).json()


@pytest.fixture(scope="module")
def server(reference_checkpoint):
    """The real app with the real pipeline on the tiny reference checkpoint."""
    from zimage_mlx.pipeline import ZImagePipeline

    with live_server(lambda: ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32")) as s:
        yield s


@pytest.fixture(scope="module")
def slow_server():
    """The real app with a fake engine whose steps take 0.25 s, so the live test's timing does not depend on how
    fast this machine is."""
    from server_fakes import FakeEngine

    with live_server(lambda: FakeEngine(step_delay=0.25)) as s:
        yield s


def posted_jobs(page):
    """Every POST /v1/jobs the page makes: (request body, response JSON), in order."""
    seen = []

    def on_response(resp):
        if resp.request.method == "POST" and resp.url.endswith("/v1/jobs"):
            seen.append((json.loads(resp.request.post_data), resp.json()))
    page.on("response", on_response)
    return seen


def last_post(page, jobs):
    """The page's latest POST /v1/jobs (body, response), waiting for it: the gallery may already show the server's
    earlier images, so a card appearing says nothing about this job."""
    for _ in range(600):
        if jobs:
            return jobs[-1]
        page.wait_for_timeout(100)
    raise AssertionError("the page posted no job")


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
    errors, requests = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
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
    sync_api.expect(card).to_have_count(1, timeout=120_000)  # the first preview may fit the latent->RGB map
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
    assert get(server, f"/v1/jobs/{created['id']}")["status"] == "completed"
    sync_api.expect(page.locator("#error")).to_have_text("")
    assert not errors
    assert requests and all(u.startswith(server.url + "/") for u in requests), requests  # no CDN, works offline
    screenshot(page, tmp_path, "page-generate.png")


def test_live_mode_keeps_only_the_last_text(page, slow_server, tmp_path):
    """Typing twice quickly in live mode: the first text's job is cancelled, one finished image for the last text.
    Drafts (half size, half steps) only feed the preview; the full settings follow after a pause."""
    jobs = posted_jobs(page)
    page.goto(slow_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent !== 'connecting…'")
    page.select_option("#width", "128")
    page.select_option("#height", "128")
    page.fill("#steps", "6")
    page.check("#live")
    assert page.input_value("#seed") != ""  # live mode fixes the seed so only the prompt changes the image
    first, second = "a red fox in snow", "a blue bird on a wire"
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/v1/jobs")):
        page.fill("#prompt", first)  # the draft for the first text goes out after the debounce ...
    page.fill("#prompt", second)  # ... and typing on cancels it
    card = page.locator("#gallery .card")
    sync_api.expect(card).to_have_count(1)
    page.wait_for_timeout(500)  # nothing else arrives: no card, and the server has nothing left to run
    sync_api.expect(card).to_have_count(1)
    assert get(slow_server, "/v1/status")["queue"] == []
    assert card.get_attribute("data-prompt") == second
    status = {created["id"]: get(slow_server, f"/v1/jobs/{created['id']}") for _, created in jobs}
    firsts = [status[c["id"]] for b, c in jobs if b["prompt"] == first]
    assert firsts and all(j["status"] == "cancelled" for j in firsts)
    full = [status[c["id"]] for b, c in jobs if b["prompt"] == second and b["width"] == 128 and b["steps"] == 6]
    assert [j["status"] for j in full] == ["completed"]
    drafts = [b for b, _ in jobs if b["prompt"] == second and b["width"] != 128]
    assert all(b["width"] == b["height"] == 64 and b["steps"] == 3 for b in drafts)  # half size, half steps
    assert get(slow_server, "/v1/status")["running"] is None
    screenshot(page, tmp_path, "page-live.png")


def test_enhance_toggle_shows_the_rewrite(page, slow_server, tmp_path):
    """The Enhance switch sends enhance: true; the rewrite appears under the preview and on the gallery card."""
    jobs = posted_jobs(page)
    page.goto(slow_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent !== 'connecting…'")
    page.fill("#steps", "2")
    page.fill("#seed", "11")
    page.fill("#prompt", "a quiet harbour")
    page.check("#enhance")
    page.click("#generate")
    rewrite = "a quiet harbour, rewritten with seed 11"  # the fake engine's rewrite (tests/server_fakes.py)
    sync_api.expect(page.locator("#revised")).to_contain_text(rewrite)
    card = page.locator("#gallery .card").first  # the newest (the gallery also lists the server's history)
    sync_api.expect(card.locator(".prompt")).to_have_text(rewrite)
    assert jobs[0][0]["enhance"] is True
    screenshot(page, tmp_path, "page-enhance.png")


def test_api_key_and_cancel(page, tmp_path):
    """With a key configured the page reads it from its field (kept in localStorage) and sends it on every call,
    event stream and image included. Generate while a job runs queues another (the queue is shown); Cancel
    stops the running one."""
    from server_fakes import FakeEngine

    with live_server(lambda: FakeEngine(step_delay=0.25), api_key="sesame") as s:
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
        page.fill("#steps", "2")
        page.fill("#prompt", "a paper plane")
        page.click("#generate")  # the page stays usable: a second job queues behind the first
        queue = page.locator("#queue li")
        sync_api.expect(queue).to_have_count(2)
        sync_api.expect(queue.nth(1)).to_contain_text("queued · next")
        sync_api.expect(page.locator("#progress")).to_contain_text(re.compile(r"step \d+/20 · 1 more queued"))
        page.click("#cancel")  # stops the running job; the queued one runs next
        card = page.locator("#gallery .card")
        sync_api.expect(card).to_have_count(1)
        assert card.get_attribute("data-prompt") == "a paper plane"
        (_, boat), (_, plane) = jobs
        boat = get(s, f"/v1/jobs/{boat['id']}", key="sesame")
        assert boat["status"] == "cancelled" and boat["step"] < 20
        assert get(s, f"/v1/jobs/{plane['id']}", key="sesame")["status"] == "completed"
        # The image came through fetch() with the key, as a blob.
        assert page.evaluate("document.querySelector('#gallery .card img').naturalWidth") == 64
        assert card.locator("a[download]").get_attribute("href").startswith("blob:")
        screenshot(page, tmp_path, "page-api-key.png")


# ---------------------------------------------------------------------------------------------------
# Issue 29: image to image and inpainting from the page, the form and the gallery across a reload


@pytest.fixture()
def studio_server(reference_checkpoint, tmp_path):
    from zimage_mlx.pipeline import ZImagePipeline

    with live_server(lambda: ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32"),
                     output_dir=tmp_path / "outputs") as s:
        yield s


def finished_image(server, job_id) -> bytes:
    import time

    for _ in range(600):
        job = get(server, f"/v1/jobs/{job_id}")
        if job["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert job["status"] == "completed", job
    return httpx.get(server.url + job["images"][0]["url"], timeout=10).content


def api_image(server, body) -> bytes:
    r = httpx.post(server.url + "/v1/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    return finished_image(server, r.json()["id"])


def same_pixels(a: bytes, b: bytes) -> bool:
    import io

    import numpy as np
    from PIL import Image

    return np.array_equal(np.asarray(Image.open(io.BytesIO(a)).convert("RGB")),
                          np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))


def test_image_to_image_and_inpainting_from_the_page_equal_the_api(page, studio_server, tmp_path):
    import base64

    import numpy as np
    from PIL import Image

    start = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(start)
    b64 = base64.b64encode(start.read_bytes()).decode()
    jobs = posted_jobs(page)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(studio_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent !== 'connecting…'")
    page.fill("#prompt", "a harbour at night")
    page.fill("#steps", "2")
    page.fill("#seed", "11")
    page.set_input_files("#image", str(start))
    sync_api.expect(page.locator("#edit")).to_be_visible()
    page.wait_for_function("document.getElementById('width').value === '64'")
    page.fill("#strength", "0.5")
    page.click("#generate")
    sync_api.expect(page.locator("#gallery .card")).to_have_count(1, timeout=120_000)
    body, created = jobs[0]
    assert body["image"] == "data:image/png;base64," + b64 and body["strength"] == 0.5 and "mask" not in body
    settings = {"prompt": "a harbour at night", "size": "64x64", "steps": 2, "seed": 11, "strength": 0.5}
    assert same_pixels(finished_image(studio_server, created["id"]), api_image(studio_server, {**settings, "image": b64}))
    screenshot(page, tmp_path, "page-img2img.png")

    box = page.locator("#mask").bounding_box()  # paint two strokes with the mouse, then one erased dab
    page.fill("#brush-size", "20")
    for y in (0.3, 0.7):
        page.mouse.move(box["x"] + 0.1 * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.9 * box["width"], box["y"] + y * box["height"], steps=8)
        page.mouse.up()
    page.click("#eraser")
    page.mouse.click(box["x"] + 0.5 * box["width"], box["y"] + 0.3 * box["height"])
    mask = page.evaluate("document.getElementById('mask').toDataURL('image/png')")
    painted = np.asarray(Image.open(__import__("io").BytesIO(base64.b64decode(mask.split(",")[1]))).convert("L"))
    assert 0.1 < (painted > 127).mean() < 0.9  # some painted, some not
    page.click("#generate")
    sync_api.expect(page.locator("#gallery .card")).to_have_count(2, timeout=120_000)
    body, created = jobs[1]
    assert body["mask"] == mask
    assert same_pixels(finished_image(studio_server, created["id"]),
                       api_image(studio_server, {**settings, "image": b64, "mask": mask.split(",")[1]}))
    screenshot(page, tmp_path, "page-inpaint.png")

    page.reload()  # the form (image and mask too) and the gallery (--output-dir) are still there
    page.wait_for_function("document.getElementById('model').textContent !== 'connecting…'")
    assert page.input_value("#prompt") == "a harbour at night" and page.input_value("#seed") == "11"
    assert page.input_value("#strength") == "0.5" and page.input_value("#steps") == "2"
    sync_api.expect(page.locator("#edit")).to_be_visible()
    sync_api.expect(page.locator("#gallery .card")).to_have_count(4)  # the page's two and the API's two
    page.fill("#seed", "99")
    page.locator("#gallery .card .reuse").first.click()  # Reuse puts the newest image's settings back
    assert page.input_value("#seed") == "11"
    screenshot(page, tmp_path, "page-reloaded.png")
    assert not errors


def test_hires_and_variety_from_the_page_equal_the_api(page, server, tmp_path):
    """The More panel's Hires fix and Seed variety reach the native job as the API's `hires` and `variety`."""
    jobs = posted_jobs(page)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent !== 'connecting…'")
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#steps", "2")
    page.fill("#seed", "5")
    page.evaluate("document.querySelector('details.more').open = true")
    page.select_option("#hires", "2")
    page.fill("#hires-strength", "0.5")
    page.fill("#variety", "0.5")
    page.click("#generate")
    body, created = last_post(page, jobs)
    assert body["hires"] == {"scale": 2, "strength": 0.5} and body["variety"] == 0.5
    settings = {"prompt": "a lighthouse at dusk", "size": f"{body['width']}x{body['height']}", "steps": 2, "seed": 5,
                "hires": {"scale": 2, "strength": 0.5}, "variety": 0.5}
    assert same_pixels(finished_image(server, created["id"]), api_image(server, settings))
    screenshot(page, tmp_path, "page-hires.png")
    assert not errors


# ----------------------------------------------------------------------------------------------
# ControlNet (serve --controlnet): the page's control section against the API and the library


@pytest.fixture(scope="module")
def controlnet_file(tmp_path_factory):
    """A random Union 2.1-layout ControlNet for the reference DiT (2 layers: control blocks at 0 and 1), written
    as alibaba-pai ships one (as tests/test_controlnet.py builds them)."""
    pytest.importorskip("torch")
    from diffusers import ZImageControlNetModel
    from safetensors.torch import save_file

    import reference

    model = ZImageControlNetModel(add_control_noise_refiner="control_noise_refiner", control_in_dim=33,
                                  control_layers_places=[0, 1], control_refiner_layers_places=[0, 1], dim=96,
                                  n_refiner_layers=2, n_heads=3, n_kv_heads=3, norm_eps=1e-5, qk_norm=True)
    reference.randomize_(model, 21)
    path = tmp_path_factory.mktemp("cn") / "union-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture()
def control_server(reference_checkpoint, controlnet_file):
    """The real app with serve's own loader: the pipeline, then the ControlNet beside it, on the worker's thread."""
    from zimage_mlx.cli.serve import load_model

    class Runner:
        def report_load(self, *a):
            pass

    with live_server(lambda: load_model(Runner(), str(reference_checkpoint), "float32", None, False,
                                        str(controlnet_file), "union-tiny.safetensors"),
                     controlnet="union-tiny.safetensors") as s:
        yield s


def photo(width, height):
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 7 + y * 3) % 256, ((x // 5 + y // 4) % 2) * 200 + 20, (y * 9) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def test_control_image_from_the_page_equals_the_api_and_the_library(page, control_server, controlnet_file,
                                                                    reference_checkpoint, tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image

    pytest.importorskip("cv2")
    from zimage_mlx.controlnet import control_map
    from zimage_mlx.pipeline import ZImagePipeline

    start = tmp_path / "photo.png"
    photo(96, 64).save(start)  # the size follows it: 96x64
    b64 = base64.b64encode(start.read_bytes()).decode()
    assert get(control_server, "/v1/status")["controlnet"] == "union-tiny.safetensors"
    jobs = posted_jobs(page)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(control_server.url + "/")
    sync_api.expect(page.locator("#control")).to_be_visible()
    assert page.text_content("#controlnet-name") == "union-tiny.safetensors"
    page.fill("#prompt", "a glass house")
    page.fill("#steps", "2")
    page.fill("#seed", "3")
    page.set_input_files("#control-image", str(start))
    page.wait_for_function("document.getElementById('width').value === '96'")
    assert page.input_value("#height") == "64"
    page.select_option("#control-type", "canny")
    page.fill("#control-scale", "0.8")
    page.click("#generate")
    sync_api.expect(page.locator("#gallery .card")).to_have_count(1, timeout=120_000)
    body, created = jobs[0]
    assert body["control"] == "data:image/png;base64," + b64
    assert body["control_type"] == "canny" and body["control_scale"] == 0.8
    got = finished_image(control_server, created["id"])
    settings = {"prompt": "a glass house", "size": "96x64", "steps": 2, "seed": 3}
    api = api_image(control_server, {**settings, "control": b64, "control_type": "canny", "control_scale": 0.8})
    assert same_pixels(got, api)
    plain = api_image(control_server, settings)
    assert not same_pixels(got, plain)  # the control changes the image

    pipe = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32")
    pipe.load_controlnet(controlnet_file)
    edges = control_map(Image.open(start), "canny", 96, 64)
    want = pipe.generate("a glass house", width=96, height=64, steps=2, seed=3, control_image=edges,
                         control_scale=0.8)[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(got)).convert("RGB")), np.asarray(want))
    screenshot(page, tmp_path, "page-control.png")

    page.reload()  # the control image, type and scale are kept with the form
    sync_api.expect(page.locator("#control-shown")).to_be_visible()
    assert page.input_value("#control-type") == "canny" and page.input_value("#control-scale") == "0.8"
    assert page.evaluate("control.image") == "data:image/png;base64," + b64
    # control fields without a control image are refused, naming the field
    r = httpx.post(control_server.url + "/v1/jobs", json={**settings, "control_type": "canny"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "control_type", r.text
    r = httpx.post(control_server.url + "/v1/jobs", json={**settings, "control": b64, "control_scale": 5}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "control_scale", r.text
    assert not errors


def test_control_fields_need_a_controlnet(page, server):
    import base64

    b64 = base64.b64encode(b"\x89PNG").decode()
    assert get(server, "/v1/status")["controlnet"] is None
    for field, value in (("control", b64), ("control_type", "canny"), ("control_scale", 0.8)):
        r = httpx.post(server.url + "/v1/jobs", json={"prompt": "p", field: value}, timeout=10)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and "--controlnet" in error["message"], error
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent !== 'connecting…'")
    assert page.locator("#control").is_hidden()


def test_a_lora_chosen_on_the_page_equals_the_api(page, reference_checkpoint, tmp_path):
    """A LoRA from --lora-dir, ticked with a scale on the page: the job carries it by name, and its image is the
    API's with that LoRA (and not the image without it)."""
    import numpy as np
    from safetensors.numpy import save_file

    from zimage_mlx.pipeline import ZImagePipeline

    rng = np.random.default_rng(3)
    dim = 96  # the test DiT's width (tests/reference.py)
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file({"transformer.layers.0.attention.to_q.lora_A.weight": rng.normal(0, 0.5, (4, dim)).astype(np.float32),
               "transformer.layers.0.attention.to_q.lora_B.weight": rng.normal(0, 0.5, (dim, 4)).astype(np.float32)},
              str(loras / "style.safetensors"))
    with live_server(lambda: ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32"),
                     lora_dir=loras) as server:
        jobs = posted_jobs(page)
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent !== 'connecting…'")
        lora = page.locator("#loras .lora[data-name='style']")
        sync_api.expect(lora).to_be_visible()
        lora.locator("input[type=checkbox]").check()
        lora.locator("input[type=number]").fill("0.7")
        page.fill("#prompt", "a lighthouse at dusk")
        page.fill("#steps", "2")
        page.fill("#seed", "8")
        page.click("#generate")
        body, created = last_post(page, jobs)
        assert body["loras"] == [{"name": "style", "scale": 0.7}]
        settings = {"prompt": "a lighthouse at dusk", "size": f"{body['width']}x{body['height']}", "steps": 2, "seed": 8}
        made = finished_image(server, created["id"])
        assert same_pixels(made, api_image(server, {**settings, "loras": [{"name": "style", "scale": 0.7}]}))
        assert not same_pixels(made, api_image(server, settings))  # the LoRA acts
        screenshot(page, tmp_path, "page-lora.png")
