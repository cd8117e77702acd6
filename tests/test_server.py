"""The server with a fake engine: request mapping, every 4xx path, auth, Host check, body caps, the A1111 and
native dialects, queueing, cancellation (by id, by disconnect), a bounded load test, and schemathesis."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import struct
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient

from server_fakes import FakeEngine, LiveServer, fake_image
from zimage_mlx.errors import InputError
from zimage_mlx.server import ServerConfig, create_app, host_name, partial_steps
from zimage_mlx.worker import Worker

ENVELOPE_KEYS = {"message", "type", "param", "code"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(engine=None, queue_size=8, **cfg):
    engine = engine or FakeEngine()
    runner = Worker(lambda: engine, queue_size=queue_size)
    runner.start(timeout=10)
    cfg.setdefault("max_side", 512)
    cfg.setdefault("max_n", 4)  # the refusal tests' limit (the server's default is 8)
    config = ServerConfig(**cfg)
    return runner, config, engine


@pytest.fixture
def app_factory():
    runners = []

    def factory(engine=None, queue_size=8, **cfg):
        runner, config, engine = make(engine, queue_size, **cfg)
        runners.append(runner)
        client = TestClient(create_app(runner, config), base_url="http://localhost", raise_server_exceptions=False)
        return client, runner, engine

    yield factory
    for r in runners:
        r.shutdown(wait=5)


@pytest.fixture
def client(app_factory):
    return app_factory()[0]


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def error_of(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_KEYS, body
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in r.text
    return body["error"]


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# OpenAI generations


def test_generation_maps_fields_and_answers_openai_shape(app_factory):
    client, runner, engine = app_factory()
    r = client.post("/v1/images/generations", json={
        "prompt": "a fox", "size": "512x512", "n": 2, "seed": 7, "steps": 3, "model": "z-image-turbo",
        "quality": "high", "style": "vivid", "user": "u", "moderation": "low", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert engine.generated[-1] | {} == {**engine.generated[-1], "prompt": "a fox", "width": 512, "height": 512,
                                         "steps": 3, "seed": 7, "num_images": 2, "guidance": 0.0}
    assert [d["seed"] for d in body["data"]] == [7, 8]
    for k, d in enumerate(body["data"]):
        assert same_pixels(png(d["b64_json"]), fake_image("a fox", 7 + k, 512, 512))
        assert png(d["b64_json"]).format == "PNG"
    assert body["size"] == "512x512" and body["background"] == "opaque" and body["output_format"] == "png"
    assert body["usage"]["total_tokens"] == 0 and body["usage"]["input_tokens_details"]["image_tokens"] == 0
    assert body["zimage"]["width"] == 512 and body["zimage"]["steps"] == 3 and body["zimage"]["model"] == "z-image-turbo"
    assert isinstance(body["created"], int)


def test_generation_aliases_defaults_and_formats(app_factory):
    client, runner, engine = app_factory()
    r = client.post("/images/generations", json={"prompt": "p", "size": "64x48", "num_inference_steps": 2,
                                                 "guidance_scale": 2.5, "negative_prompt": "blur",
                                                 "output_format": "jpeg", "output_compression": 50})
    assert r.status_code == 200, r.text
    g = engine.generated[-1]
    assert (g["width"], g["height"], g["steps"], g["guidance"], g["negative_prompt"]) == (64, 48, 2, 2.5, "blur")
    assert 0 <= g["seed"] < 2**31  # drawn by the server, echoed back
    assert r.json()["data"][0]["seed"] == g["seed"]
    assert "size" not in r.json()  # 64x48 is no OpenAI enum value
    assert png(r.json()["data"][0]["b64_json"]).format == "JPEG"
    # any model on the ComfyUI path, seed -1 = random
    r = client.post("/proxy/openai/images/generations", json={"prompt": "p", "model": "gpt-image-1", "size": "64x64",
                                                              "seed": -1, "output_format": "webp"})
    assert r.status_code == 200 and png(r.json()["data"][0]["b64_json"]).format == "WEBP"
    # size auto = the default size, 1024x1024 capped by --max-side (512 here)
    client.post("/v1/images/generations", json={"prompt": "p", "size": "auto"})
    assert (engine.generated[-1]["width"], engine.generated[-1]["height"]) == (512, 512)


def test_client_replays(app_factory):
    """What the clients in docs/server.md section 1.8 send, field for field."""
    client, _, engine = app_factory()
    # Open WebUI's "openai" engine: always an Authorization header (ignored without --api-key), its params merged in
    r = client.post("/v1/images/generations", headers={"Authorization": "Bearer sk-dummy"}, json={
        "model": "z-image-turbo", "prompt": "a fox", "n": 1, "size": "512x512", "response_format": "b64_json",
        "steps": 4, "seed": 9})
    assert r.status_code == 200 and r.json()["data"][0]["seed"] == 9 and r.json()["size"] == "512x512"
    # ComfyUI's GPT Image node under --comfy-api-base: another model's name, size auto, no seed
    r = client.post("/proxy/openai/images/generations", json={
        "model": "gpt-image-1", "prompt": "a fox", "quality": "low", "background": "opaque", "size": "auto", "n": 1,
        "moderation": "low"})
    assert r.status_code == 200 and r.json()["usage"]["input_tokens"] == 0
    # ComfyUI's DALL-E 3 node
    r = client.post("/proxy/openai/images/generations", json={
        "model": "dall-e-3", "prompt": "a fox", "quality": "hd", "style": "natural", "size": "1024x1024", "n": 1})
    error_of(r, 400, "size")  # over this test server's --max-side 512: refused, not shrunk
    # SillyTavern's A1111 source
    r = client.post("/sdapi/v1/txt2img", json={
        "prompt": "a fox", "negative_prompt": "", "sampler_name": "Euler", "scheduler": "Automatic", "steps": 8,
        "cfg_scale": 1, "width": 512, "height": 512, "restore_faces": False, "enable_hr": False,
        "hr_upscaler": "Latent", "hr_scale": 2, "denoising_strength": 0.7, "hr_second_pass_steps": 0, "seed": -1,
        "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
        "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
        "do_not_save_samples": False})
    assert r.status_code == 200, r.text
    assert engine.generated[-1]["guidance"] == 0.0 and engine.generated[-1]["steps"] == 8


@pytest.mark.parametrize("body,status,param,code", [
    ({}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": 3}, 400, "prompt", None),
    ({"prompt": "p", "size": "100x100"}, 400, "size", None),
    ({"prompt": "p", "size": "1024x1024"}, 400, "size", None),  # over --max-side 512
    ({"prompt": "p", "size": "big"}, 400, "size", None),
    ({"prompt": "p", "n": 9}, 400, "n", None),
    ({"prompt": "p", "n": 0}, 400, "n", None),
    ({"prompt": "p", "model": "stable-diffusion-xl"}, 404, "model", "model_not_found"),  # dall-e-3 runs ours
    ({"prompt": "p", "negative_prompt": "ugly"}, 400, "negative_prompt", None),
    ({"prompt": "p", "response_format": "url"}, 400, "response_format", None),
    ({"prompt": "p", "background": "transparent"}, 400, "background", None),
    ({"prompt": "p", "seed": -2}, 400, "seed", None),
    ({"prompt": "p", "seed": 2**32}, 400, "seed", None),
    ({"prompt": "p", "seed": "1"}, 400, "seed", None),
    ({"prompt": "p", "steps": 0}, 400, "steps", None),
    ({"prompt": "p", "steps": 3, "num_inference_steps": 4}, 400, "num_inference_steps", None),
    ({"prompt": "p", "guidance": -1}, 400, "guidance", None),
    ({"prompt": "p", "output_format": "gif"}, 400, "output_format", None),
    ({"prompt": "p", "partial_images": 4, "stream": True}, 400, "partial_images", None),
    ({"prompt": "p", "sampler": "dpm"}, 400, "sampler", "unsupported_parameter"),
    ({"prompt": "p", "image": "abc"}, 400, "image", "unsupported_parameter"),
    ({"prompt": "p", "loras": [{"name": "x"}]}, 400, "loras", "lora_not_found"),  # no --lora-dir
])
def test_generation_refusals(client, body, status, param, code):
    error_of(client.post("/v1/images/generations", json=body), status, param, code)


def test_bad_json_media_type_routes_and_methods(client):
    error_of(client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"}),
             400, None, "invalid_json")
    error_of(client.post("/v1/images/generations", content=b"[1]", headers={"content-type": "application/json"}), 400)
    error_of(client.post("/v1/images/generations", content=b"prompt=x", headers={"content-type": "text/plain"}), 415)
    assert error_of(client.get("/v1/nothing"), 404)["type"] == "not_found_error"
    error_of(client.get("/v1/images/generations"), 405)
    error_of(client.post("/v1/images/variations"), 404, None, "unsupported_endpoint")


def test_engine_failures_are_500_and_507_without_retry(app_factory):
    client, _, _ = app_factory(FakeEngine(fail_with=RuntimeError("kaboom at /secret/path")))
    r = client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64"})
    err = error_of(r, 500)
    assert r.headers["x-should-retry"] == "false" and "/secret/path" not in r.text and err["type"] == "server_error"
    client, _, _ = app_factory(FakeEngine(fail_with=RuntimeError("[malloc] Unable to allocate 123 bytes")))
    r = client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64"})
    error_of(r, 507, None, "insufficient_memory")
    assert r.headers["x-should-retry"] == "false"


def test_models(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == "z-image-turbo"
    assert body["data"][0]["owned_by"] == "zimage-mlx"
    assert client.get("/v1/models/z-image-turbo").json()["id"] == "z-image-turbo"
    error_of(client.get("/v1/models/dall-e-2"), 404, "model", "model_not_found")


def test_partial_steps_spread_before_the_last():
    assert partial_steps(8, 3) == {2, 4, 6}
    assert partial_steps(4, 2) == {1, 3}
    assert partial_steps(2, 3) == {1}
    assert partial_steps(1, 3) == set()


def test_stream_events(app_factory):
    client, runner, engine = app_factory()
    r = client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", "steps": 4, "seed": 3,
                                                    "stream": True, "partial_images": 2})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e["partial_image_index"] for e in events[:2]] == [0, 1]
    assert same_pixels(png(events[-1]["b64_json"]), fake_image("p", 3, 64, 64))
    assert events[-1]["usage"]["total_tokens"] == 0


def test_stream_failure_ends_with_an_error_event(app_factory):
    client, _, _ = app_factory(FakeEngine(fail_with=InputError("width 64 is too small for this model")))
    r = client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert len(events) == 1 and events[0]["type"] == "error"  # the SDK raises APIError on a data object with "error"
    assert set(events[0]["error"]) == ENVELOPE_KEYS and "too small" in events[0]["error"]["message"]


# ---------------------------------------------------------------------------------------------------
# Auth, Host, body caps


def test_api_key(app_factory, tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html><title>page</title>")
    client, _, _ = app_factory(api_key="s3cret", static_dir=tmp_path)
    assert client.get("/health").json() == {"status": "ok", "model": "ready"}
    assert client.get("/").status_code == 200  # the static page; the calls it makes need the key
    error_of(client.get("/openapi.json"), 401)
    error_of(client.get("/v1/jobs/job_x/images/0"), 401)
    r = client.get("/v1/models")
    error_of(r, 401, None, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    error_of(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    error_of(client.post("/sdapi/v1/txt2img", json={"prompt": "p"}), 401)
    error_of(client.get("/v1/status"), 401)
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
    # ComfyUI rewrites 401 into a login message: 403 under /proxy/openai
    error_of(client.post("/proxy/openai/images/generations", json={"prompt": "p"}), 403, None, "invalid_api_key")
    r = client.post("/proxy/openai/images/generations", json={"prompt": "p", "size": "64x64"},
                    headers={"X-API-KEY": "s3cret"})
    assert r.status_code == 200


def test_no_key_configured_ignores_auth_headers(client):
    assert client.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_host_header_check(app_factory):
    client, _, _ = app_factory()
    for host in ("localhost:8000", "127.0.0.1:1", "[::1]:8000", "host.docker.internal"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host
    error_of(client.get("/v1/models", headers={"host": "evil.example:8000"}), 400, None, "invalid_host")
    error_of(client.get("/health", headers={"host": "attacker.test"}), 400, None, "invalid_host")
    client, _, _ = app_factory(allowed_hosts=frozenset({"localhost", "studio.lan"}))
    assert client.get("/health", headers={"host": "studio.lan:8000"}).status_code == 200
    assert host_name("[::1]:80") == "[::1]" and host_name("LocalHost:1") == "localhost"


def test_body_cap(app_factory):
    client, _, engine = app_factory(max_body=1000)
    error_of(client.post("/v1/images/generations", json={"prompt": "x" * 2000}), 413, None, "request_too_large")

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(10):
            yield b" " * 500

    r = client.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    error_of(r, 413, None, "request_too_large")
    assert engine.generated == []


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge size, with almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------------
# Edits


def openai_mask(size, box) -> Image.Image:
    """OpenAI's convention: transparent (alpha 0) where to edit."""
    m = Image.new("RGBA", size, (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), box)
    return m


def test_edit_multipart_with_mask(app_factory):
    client, _, engine = app_factory()
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    files = [("image", ("in.png", png_bytes(image), "image/png")),
             ("mask", ("m.png", png_bytes(openai_mask((64, 48), (16, 16, 48, 32))), "image/png"))]
    r = client.post("/v1/images/edits", files=files, data={"prompt": "a cat", "seed": "5", "steps": "4", "n": "1"})
    assert r.status_code == 200, r.text
    g = engine.generated[-1]
    assert g["steps"] == 4 and g["seed"] == 5 and g["strength"] is None and g["width"] is None
    assert same_pixels(g["image"], image)
    expected = Image.new("L", (64, 48), 0)
    expected.paste(255, (16, 16, 48, 32))
    assert g["mask"].mode == "L" and g["mask"].tobytes() == expected.tobytes()
    assert r.json()["zimage"]["width"] == 64 and r.json()["zimage"]["height"] == 48


def test_edit_alpha_image_as_mask_and_image_array(app_factory):
    client, _, engine = app_factory()
    rgba = Image.new("RGBA", (32, 32), (1, 2, 3, 255))
    rgba.paste((1, 2, 3, 0), (0, 0, 16, 32))
    r = client.post("/proxy/openai/images/edits", files=[("image[]", ("a.png", png_bytes(rgba), "image/png"))],
                    data={"prompt": "x", "model": "dall-e-2", "size": "64x64", "strength": "0.5"})
    assert r.status_code == 200, r.text
    g = engine.generated[-1]
    assert (g["width"], g["height"], g["strength"]) == (64, 64, 0.5)
    assert g["mask"].getpixel((0, 0)) == 255 and g["mask"].getpixel((20, 0)) == 0
    assert g["image"].mode == "RGB"
    # an opaque RGBA image is plain img2img
    client.post("/v1/images/edits", files=[("image", ("a.png", png_bytes(Image.new("RGBA", (32, 32))), "image/png"))],
                data={"prompt": "x"})
    opaque = Image.new("RGBA", (32, 32), (5, 5, 5, 255))
    client.post("/v1/images/edits", files=[("image", ("a.png", png_bytes(opaque), "image/png"))], data={"prompt": "x"})
    assert engine.generated[-1]["mask"] is None


def test_edit_json_with_data_url(app_factory):
    client, _, engine = app_factory()
    image = Image.new("RGB", (32, 32), (9, 9, 9))
    url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    r = client.post("/v1/images/edits", json={"prompt": "x", "image": url, "seed": 1})
    assert r.status_code == 200, r.text
    assert same_pixels(engine.generated[-1]["image"], image) and engine.generated[-1]["mask"] is None


def test_edit_stream_spreads_partials_over_the_steps_that_run(app_factory):
    client, _, engine = app_factory()
    files = [("image", ("a.png", png_bytes(Image.new("RGB", (32, 32))), "image/png"))]
    r = client.post("/v1/images/edits", files=files, data={"prompt": "x", "steps": "8", "strength": "0.5",
                                                           "stream": "true", "partial_images": "3", "seed": "3"})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["image_edit.partial_image"] * 3 + ["image_edit.completed"]
    assert engine.steps_run[-1] == 4  # strength 0.5 of 8 steps


def test_edit_refusals(app_factory):
    client, _, engine = app_factory(max_input_pixels=512 * 512)
    img = png_bytes(Image.new("RGB", (32, 32)))
    post = lambda files, data=None: client.post("/v1/images/edits", files=files, data=data or {"prompt": "x"})  # noqa
    error_of(post([("mask", ("m.png", img, "image/png"))]), 400, "image", "missing_required_parameter")
    error_of(post([("image", ("a.png", img, "image/png")), ("mask", ("m.png", img, "image/png")),
                   ("mask", ("n.png", img, "image/png"))]), 400, "mask")  # several image[]: see the client replays
    error_of(post([("image", ("a.png", b"not an image", "image/png"))]), 400, "image", "invalid_image")
    error_of(post([("image", ("a.png", img, "image/png")),
                   ("mask", ("m.png", png_bytes(openai_mask((16, 16), (0, 0, 8, 8))), "image/png"))]), 400, "mask")
    error_of(post([("image", ("a.png", img, "image/png")), ("mask", ("m.png", img, "image/png"))]), 400, "mask")
    error_of(post([("image", ("a.png", bomb_png(40000, 40000), "image/png"))]), 413, "image", "image_too_large")
    error_of(post([("image", ("a.png", img, "image/png"))], {"prompt": "x", "strength": "2"}), 400, "strength")
    error_of(client.post("/v1/images/edits", json={"prompt": "x", "image": "https://example.com/a.png"}), 400, "image")
    error_of(client.post("/v1/images/edits", json={"prompt": "x", "image": "%%%"}), 400, "image")
    big = png_bytes(Image.new("RGB", (700, 700)))  # under the pixel cap? no: 490000 > 262144
    error_of(post([("image", ("a.png", big, "image/png"))]), 413, "image", "image_too_large")
    assert engine.generated == []


# ---------------------------------------------------------------------------------------------------
# LoRAs


@pytest.fixture
def lora_dir(tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    (d / "style.safetensors").write_bytes(b"fake")
    (d / "broken.safetensors").write_bytes(b"bad")
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"fake")
    (d / "escape.safetensors").symlink_to(outside)
    return d


def test_loras_by_name_switch_between_jobs(app_factory, lora_dir):
    client, runner, engine = app_factory(lora_dir=lora_dir)
    assert client.get("/v1/status").json()["loras"] == ["broken", "style"]  # the escaping symlink is not listed
    r = client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64",
                                                    "loras": [{"name": "style", "scale": 0.5}]})
    assert r.status_code == 200, r.text
    assert engine.generated[-1]["loras"] == [("style", 0.5)]
    client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64",
                                                "loras": [{"name": "style.safetensors", "scale": 0.5}]})
    assert [c for c, _ in engine.calls].count("load_lora") == 1  # same set: not reloaded
    client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64"})
    assert engine.generated[-1]["loras"] == []
    error_of(client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64",
                                                         "loras": [{"name": "broken"}]}), 400, "loras", "invalid_lora")


@pytest.mark.parametrize("name,status,code", [
    ("../secret", 400, "invalid_lora"), ("/etc/passwd", 400, "invalid_lora"), ("sub/style", 400, "invalid_lora"),
    ("..\\style", 400, "invalid_lora"), ("escape", 400, "invalid_lora"), ("nope", 404, "lora_not_found"),
    ("http://x/y", 400, "invalid_lora"),
])
def test_lora_names_never_paths(app_factory, lora_dir, name, status, code):
    client, _, engine = app_factory(lora_dir=lora_dir)
    error_of(client.post("/v1/images/generations", json={"prompt": "p", "loras": [{"name": name}]}), status, "loras", code)
    assert engine.generated == []


# ---------------------------------------------------------------------------------------------------
# A1111


def test_a1111_txt2img(app_factory):
    client, _, engine = app_factory()
    r = client.post("/sdapi/v1/txt2img", json={
        "prompt": "a fox", "negative_prompt": "", "width": 64, "height": 32, "steps": 3, "seed": 11, "cfg_scale": 1,
        "batch_size": 2, "n_iter": 2, "sampler_name": "Euler", "scheduler": "Automatic", "restore_faces": False,
        "enable_hr": False, "denoising_strength": 0.7, "override_settings": {"CLIP_stop_at_last_layers": 1},
        "save_images": True, "send_images": True, "clip_skip": 1})
    assert r.status_code == 200, r.text
    g = engine.generated[-1]
    assert (g["width"], g["height"], g["steps"], g["seed"], g["num_images"], g["guidance"]) == (64, 32, 3, 11, 4, 0.0)
    body = r.json()
    assert len(body["images"]) == 4 and same_pixels(png(body["images"][1]), fake_image("a fox", 12, 64, 32))
    info = json.loads(body["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    assert body["parameters"]["prompt"] == "a fox"
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64, "cfg_scale": 5,
                                               "negative_prompt": "blur", "seed": -1})
    g = engine.generated[-1]
    assert g["guidance"] == 4.0 and g["negative_prompt"] == "blur" and 0 <= g["seed"] < 2**31
    assert json.loads(r.json()["info"])["seed"] == g["seed"]


@pytest.mark.parametrize("body,param", [
    ({"sampler_name": "Euler a"}, "sampler_name"), ({"sampler_name": "DPM++ 2M"}, "sampler_name"),
    ({"scheduler": "Karras"}, "scheduler"), ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ({"cfg_scale": 0.5}, "cfg_scale"),
    ({"width": 100}, "width"), ({"width": 4096}, "width"),
    ({"batch_size": 3, "n_iter": 2}, "batch_size"), ({"styles": ["s"]}, "styles"), ({"clip_skip": 2}, "clip_skip"),
    ({"override_settings": {"sd_model_checkpoint": "sdxl"}}, "override_settings"), ({"seed": -3}, "seed"),
    ({"subseed_strength": 0.5}, "subseed_strength"), ({"restore_faces": True}, "restore_faces"),
])
def test_a1111_refusals(client, body, param):
    error_of(client.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64, **body}), 400, param)


def test_a1111_img2img(app_factory):
    client, _, engine = app_factory()
    image = Image.new("RGB", (64, 64), (100, 0, 0))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    b64 = lambda im: base64.b64encode(png_bytes(im)).decode()  # noqa: E731
    r = client.post("/sdapi/v1/img2img", json={"prompt": "p", "init_images": [b64(image)], "mask": b64(mask),
                                               "denoising_strength": 0.9, "seed": 2, "steps": 4, "width": 64,
                                               "height": 64, "mask_blur": 0, "inpainting_fill": 1})
    assert r.status_code == 200, r.text
    g = engine.generated[-1]
    assert g["strength"] == 0.9 and g["mask"].tobytes() == mask.tobytes() and same_pixels(g["image"], image)
    error_of(client.post("/sdapi/v1/img2img", json={"prompt": "p"}), 400, "init_images")
    error_of(client.post("/sdapi/v1/img2img", json={"prompt": "p", "init_images": [b64(image)], "mask": b64(mask),
                                                    "mask_blur": 4}), 400, "mask_blur")


def test_a1111_options_models_samplers(client):
    opts = client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == "z-image-turbo"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "z-image-turbo"}).status_code == 200
    assert client.post("/sdapi/v1/options", json=opts).status_code == 200  # a no-op
    error_of(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "v1-5.ckpt"}), 400, "sd_model_checkpoint")
    error_of(client.post("/sdapi/v1/options", json={"samples_format": "jpg"}), 400, "samples_format")
    assert client.get("/sdapi/v1/sd-models").json()[0]["title"] == "z-image-turbo"
    assert client.get("/sdapi/v1/samplers").json()[0]["name"] == "Euler"
    p = client.get("/sdapi/v1/progress").json()
    assert p["progress"] == 0 and p["state"]["job_count"] == 0 and p["current_image"] is None
    assert client.post("/sdapi/v1/interrupt").status_code == 200


# ---------------------------------------------------------------------------------------------------
# Native jobs


def sse(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_native_job_lifecycle(app_factory):
    client, runner, engine = app_factory()
    r = client.post("/v1/jobs", json={"prompt": "p", "width": 64, "height": 32, "steps": 3, "seed": 4, "n": 2})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["queue_position"] == 0 and job["events_url"] == f"/v1/jobs/{job['id']}/events"
    events = sse(client.get(job["events_url"]).text)  # replays everything once the job is done
    types = [t for t, _ in events]
    assert types == ["queued", "started", "step", "step", "step", "done"], types
    assert events[1][1] == {"total": 3}
    assert [d["step"] for t, d in events if t == "step"] == [1, 2, 3]
    assert "preview" in events[-2][1]  # the newest step keeps its preview in the replay
    Image.open(io.BytesIO(base64.b64decode(events[-2][1]["preview"]))).verify()
    done = events[-1][1]
    assert [i["seed"] for i in done["images"]] == [4, 5] and done["images"][0]["width"] == 64
    got = client.get(done["images"][1]["url"])
    assert got.headers["content-type"] == "image/png"
    assert same_pixels(Image.open(io.BytesIO(got.content)), fake_image("p", 5, 64, 32))
    state = client.get(f"/v1/jobs/{job['id']}").json()
    assert state["status"] == "completed" and state["step"] == 3 and state["settings"]["seed"] == 4
    assert state["images"] == done["images"] and state["error"] is None
    error_of(client.get(f"/v1/jobs/{job['id']}/images/2"), 404)
    error_of(client.get("/v1/jobs/job_nope"), 404, None, "job_not_found")
    st = client.get("/v1/status").json()
    assert st["queue_size"] == 8 and st["limits"] == {"max_side": 512, "max_n": 4, "max_steps": 50}
    assert st["defaults"]["steps"] == 8 and st["running"] is None and st["queue"] == []


def test_native_without_previews_and_refusals(app_factory):
    client, runner, engine = app_factory()
    job = client.post("/v1/jobs", json={"prompt": "p", "size": "64x64", "steps": 2, "previews": False}).json()
    events = sse(client.get(job["events_url"]).text)
    assert all("preview" not in d for t, d in events if t == "step")
    assert "fast_preview" not in [c for c, _ in engine.calls]
    error_of(client.post("/v1/jobs", json={"prompt": "p", "stream": True}), 400, "stream", "unknown_parameter")
    error_of(client.post("/v1/jobs", json={"prompt": "p", "width": 63}), 400, "width")
    error_of(client.post("/v1/jobs", json={"width": 64}), 400, "prompt")
    error_of(client.post("/v1/jobs", json={"prompt": "p", "previews": "yes"}), 400, "previews")


def test_queue_full_is_503_with_retry_after_and_cancel_queued(app_factory):
    engine = FakeEngine(step_delay=0.05)
    client, runner, _ = app_factory(engine, queue_size=2)
    ids = [client.post("/v1/jobs", json={"prompt": f"p{i}", "size": "64x64", "steps": 20}).json()["id"] for i in range(3)]
    deadline = time.time() + 5
    while runner.running is None and time.time() < deadline:
        time.sleep(0.01)
    r = client.post("/v1/jobs", json={"prompt": "p", "size": "64x64"})
    while r.status_code == 202 and time.time() < deadline:  # the first job may not have started yet
        r = client.post("/v1/jobs", json={"prompt": "p", "size": "64x64"})
    error_of(r, 503, None, "queue_full")
    assert 1 <= int(r.headers["retry-after"]) <= 120
    st = client.get("/v1/status").json()
    assert st["running"] == ids[0] and st["queue"][:2] == ids[1:]
    # cancelling a queued job removes it and moves the next one up
    r = client.delete(f"/v1/jobs/{ids[1]}")
    assert r.json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{ids[2]}").json()["queue_position"] == 0
    events = sse(client.get(f"/v1/jobs/{ids[2]}/events").text)
    assert [d["position"] for t, d in events if t == "queued"][-1] == 0
    for i in ids + [j for j in st["queue"] if j not in ids]:
        client.delete(f"/v1/jobs/{i}")


# ---------------------------------------------------------------------------------------------------
# A real uvicorn: cancellation by id and by disconnect, shutdown, a bounded load test


def wait_for(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def test_cancel_running_job_by_id_stops_within_one_step(lora_dir):
    engine = FakeEngine(step_delay=0.05)
    runner, cfg, _ = make(engine)
    with LiveServer(runner, cfg) as s, httpx.Client(base_url=s.url, timeout=10) as c:
        job = c.post("/v1/jobs", json={"prompt": "slow", "size": "64x64", "steps": 40}).json()
        nxt = c.post("/v1/jobs", json={"prompt": "next", "size": "64x64", "steps": 2}).json()
        seen = []
        with c.stream("GET", job["events_url"]) as r:  # live SSE, read incrementally
            for line in r.iter_lines():
                if line.startswith("event: "):
                    seen.append(line[7:])
                if seen.count("step") == 3:
                    assert c.delete(f"/v1/jobs/{job['id']}").status_code == 200
                if line == "event: cancelled":
                    break
        assert seen[:2] == ["queued", "started"] and seen[-1] == "cancelled"
        assert engine.steps_run[0] <= 4  # cancelled after step 3: at most the step under way finished
        events = sse(c.get(nxt["events_url"]).text)
        assert events[-1][0] == "done"  # the next job ran
        assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_disconnect_cancels_running_and_queued_sync_requests():
    engine = FakeEngine(step_delay=0.05)
    runner, cfg, _ = make(engine)
    with LiveServer(runner, cfg) as s:
        errors = []

        def fire(prompt, timeout):
            try:
                r = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": prompt, "size": "64x64", "steps": 50},
                               timeout=timeout)
                errors.append(f"answered before the timeout: {r.status_code} {r.text[:200]}")
            except httpx.TimeoutException:
                pass  # the client gives up and closes the connection

        threads = [threading.Thread(target=fire, args=a) for a in (("running", 1.0), ("queued", 0.4))]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join()
        wait_for(lambda: runner.running is None and not runner.queued(), 5)
        assert errors == []
        assert len(engine.generated) == 1 and engine.generated[0]["prompt"] == "running"  # queued one never ran
        assert engine.steps_run[0] <= 22  # 1 s of 50 ms steps, plus one
        r = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "after", "size": "64x64", "steps": 2}, timeout=10)
        assert r.status_code == 200  # the next job runs


def test_stream_disconnect_cancels():
    engine = FakeEngine(step_delay=0.05)
    runner, cfg, _ = make(engine)
    with LiveServer(runner, cfg) as s, httpx.Client(base_url=s.url, timeout=10) as c:
        with c.stream("POST", "/v1/images/generations", json={"prompt": "p", "size": "64x64", "steps": 50,
                                                             "stream": True, "partial_images": 3}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # the first partial image, then hang up
        wait_for(lambda: runner.running is None, 5)
        assert engine.steps_run[0] < 30


def test_shutdown_answers_queued_503_and_cancels_running():
    engine = FakeEngine(step_delay=0.05)
    runner, cfg, _ = make(engine)
    results = {}
    with LiveServer(runner, cfg) as s:
        def fire(name):
            results[name] = httpx.post(f"{s.url}/v1/images/generations",
                                       json={"prompt": name, "size": "64x64", "steps": 50}, timeout=10)

        threads = [threading.Thread(target=fire, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
            time.sleep(0.15)
        runner.shutdown()
        for t in threads:
            t.join()
        r = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "late", "size": "64x64"}, timeout=10)
    for r in (results["a"], results["b"], r):
        error_of(r, 503, None, "shutting_down")
    assert engine.steps_run[0] < 20 and len(engine.generated) == 1


def test_sse_pings_and_a1111_progress_interrupt():
    engine = FakeEngine(step_delay=0.05)
    runner, cfg, _ = make(engine, ping_seconds=0.02)
    with LiveServer(runner, cfg) as s, httpx.Client(base_url=s.url, timeout=10) as c:
        job = c.post("/v1/jobs", json={"prompt": "p", "size": "64x64", "steps": 3}).json()
        text = c.get(job["events_url"]).text
        assert ": ping" in text and sse(text)[-1][0] == "done"  # pings between slow steps
        result = {}
        t = threading.Thread(target=lambda: result.update(r=c.post("/sdapi/v1/txt2img", json={
            "prompt": "p", "width": 64, "height": 64, "steps": 40})))
        t.start()
        wait_for(lambda: runner.running is not None and runner.running.step >= 2)
        p = c.get("/sdapi/v1/progress").json()
        assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 40 and p["state"]["job_count"] == 1
        assert p["state"]["sampling_step"] >= 2 and p["eta_relative"] > 0
        Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).verify()  # the cheap preview
        assert c.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["current_image"] is None
        assert c.post("/sdapi/v1/interrupt").status_code == 200
        t.join(10)
        error_of(result["r"], 400, None, "cancelled")
        assert engine.steps_run[-1] < 20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_bounded_load():
    engine = FakeEngine(step_delay=0.02)
    runner, cfg, _ = make(engine, queue_size=2)

    async def one(client, i):
        r = await client.post("/v1/images/generations", json={"prompt": f"p{i}", "size": "64x64", "steps": 2,
                                                              "seed": i})
        return i, r

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=20) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    with LiveServer(runner, cfg) as s:
        first = asyncio.run(burst(s.url))
        rss0 = rss_mb()
        rounds = [asyncio.run(burst(s.url)) for _ in range(3)]
        rss1 = rss_mb()
    runner._thread.join(5)
    assert not runner._thread.is_alive() and not s.thread.is_alive()  # nothing left running
    for results in [first] + rounds:
        assert len(results) == 16
        codes = sorted(r.status_code for _, r in results)
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= 2  # at least the queue of 2 (plus whatever the worker took meanwhile)
        for i, r in results:
            if r.status_code == 200:
                assert r.json()["data"][0]["seed"] == i
                assert same_pixels(png(r.json()["data"][0]["b64_json"]), fake_image(f"p{i}", i, 64, 64))
            else:
                assert r.json()["error"]["code"] == "queue_full" and "retry-after" in r.headers
    ok = sum(r.status_code == 200 for res in [first] + rounds for _, r in res)
    assert len(engine.generated) == ok  # none lost, none run twice
    assert engine.max_active == 1  # one job at a time
    assert engine.threads() == {runner.thread_ident}  # every engine call on the worker thread
    assert rss1 - rss0 < 30, (rss0, rss1)


def test_every_engine_call_on_the_worker_thread(app_factory, lora_dir):
    client, runner, engine = app_factory(lora_dir=lora_dir)
    client.post("/v1/jobs", json={"prompt": "p", "size": "64x64", "steps": 2, "loras": [{"name": "style"}]})
    client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", "steps": 2, "stream": True,
                                                "partial_images": 1})
    client.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64, "steps": 2})
    wait_for(lambda: runner.running is None and not runner.queued())
    assert {c for c, _ in engine.calls} >= {"run", "fast_preview", "load_lora", "unload_loras"}
    assert engine.threads() == {runner.thread_ident} and runner.thread_ident != threading.get_ident()


# ---------------------------------------------------------------------------------------------------
# The page and the OpenAPI document


def test_page_served_from_the_package_dir(app_factory, tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html><title>placeholder</title>")
    client, _, _ = app_factory(static_dir=tmp_path)
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "placeholder" in r.text
    client, _, _ = app_factory(static_dir=tmp_path / "missing")
    error_of(client.get("/"), 404)


def test_openapi_document_lists_every_route(client):
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/models", "/v1/jobs", "/v1/jobs/{job_id}",
                 "/v1/jobs/{job_id}/events", "/v1/status", "/health", "/sdapi/v1/txt2img", "/sdapi/v1/progress"):
        assert path in doc["paths"], path


# schemathesis against the hand-written OpenAPI document, on the fake engine (bounded examples).
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,  # noqa: E402
                                               status_code_conformance)

_runner, _cfg, _ = make(FakeEngine(), queue_size=64, allowed_hosts=None, max_side=256, max_body=2**20)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_runner, _cfg))


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_openapi_schemathesis(case):
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance])


# ---------------------------------------------------------------------------------------------------
# Prompt enhancement (issue 21)


def test_enhance_rewrites_per_image_seed_and_reports_the_rewrites(app_factory):
    engine = FakeEngine()
    client, _, _ = app_factory(engine)
    r = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "seed": 7, "n": 2,
                                                     "enhance": True})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    rewrites = ["a fox, rewritten with seed 7", "a fox, rewritten with seed 8"]
    assert [d["revised_prompt"] for d in data] == rewrites  # OpenAI's field for a rewritten prompt
    for d, rewrite, seed in zip(data, rewrites, (7, 8)):  # each image is made from its own rewrite and seed
        assert d["seed"] == seed and same_pixels(png(d["b64_json"]), fake_image(rewrite, seed, 64, 64))
    assert all(t == engine.calls[0][1] for _, t in engine.calls)  # on the worker thread, as everything

    job = client.post("/v1/jobs", json={"prompt": "a fox", "width": 64, "height": 64, "seed": 3, "enhance": True})
    events = client.get(job.json()["events_url"]).text
    assert "event: enhanced" in events and "a fox, rewritten with seed 3" in events
    done = client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert done["images"][0]["revised_prompt"] == "a fox, rewritten with seed 3"

    plain = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "seed": 7})
    assert plain.json()["data"][0]["revised_prompt"] is None
    bad = client.post("/v1/jobs", json={"prompt": "a fox", "enhance": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "enhance"


def test_step_previews_are_made_at_their_wire_size(app_factory):
    """A step preview is mapped straight to at most 512 a side (not upscaled to the image, then shrunk)."""
    engine = FakeEngine()
    client, _, _ = app_factory(engine, max_side=2048)
    job = client.post("/v1/jobs", json={"prompt": "p", "width": 512, "height": 256, "steps": 2}).json()
    events = [json.loads(line[6:]) for line in client.get(job["events_url"]).text.splitlines()
              if line.startswith("data: ") and '"preview"' in line]
    assert events and all(Image.open(io.BytesIO(base64.b64decode(e["preview"]))).size == (512, 256) for e in events)
    job = client.post("/v1/jobs", json={"prompt": "p", "width": 2048, "height": 1024, "steps": 2}).json()
    events = [json.loads(line[6:]) for line in client.get(job["events_url"]).text.splitlines()
              if line.startswith("data: ") and '"preview"' in line]
    assert events and all(Image.open(io.BytesIO(base64.b64decode(e["preview"]))).size == (512, 256) for e in events)



# ---------------------------------------------------------------------------------------------------
# The Recipe decides: metadata in every dialect's images, and its errors named the dialect's way (#24)

from zimage_mlx.recipe import Recipe  # noqa: E402
from zimage_mlx.metadata import user_comment  # noqa: E402

OPENAI_NAMES = {"num_images": "n"}
A1111_NAMES = {"guidance": "cfg_scale", "num_images": "batch_size", "strength": "denoising_strength",
               "image": "init_images"}
NATIVE_NAMES = {"num_images": "n"}


def library_error(names: dict, **recipe) -> tuple[str, str]:
    """(param, message) the server must answer for the InputError the Recipe raises."""
    with pytest.raises(InputError) as e:
        r = Recipe(**recipe).validate(max_side=512, max_images=4, max_steps=50)
        r.settle().validate(max_side=512, max_images=4, max_steps=50)
    return names.get(e.value.field, e.value.field), e.value.render(lambda f: names.get(f, f))


def test_pngs_of_every_dialect_carry_their_recipe(app_factory):
    client, _, _ = app_factory()
    r = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x32", "steps": 3, "seed": 7, "n": 2})
    for k, d in enumerate(r.json()["data"]):
        got = Recipe.from_png(base64.b64decode(d["b64_json"]))
        assert (got.prompt, got.seed, got.width, got.height, got.steps, got.model) == ("a fox", 7 + k, 64, 32, 3, "fake")
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a boat", "width": 32, "height": 48, "steps": 2, "seed": 5,
                                               "cfg_scale": 3, "negative_prompt": "blur"})
    got = Recipe.from_png(base64.b64decode(r.json()["images"][0]))
    assert (got.prompt, got.seed, got.width, got.height, got.guidance, got.negative_prompt) == ("a boat", 5, 32, 48,
                                                                                                2.0, "blur")
    assert json.loads(r.json()["info"])["infotexts"] == [got.to_infotext()]
    job = client.post("/v1/jobs", json={"prompt": "a hut", "size": "32x32", "steps": 2, "seed": 9}).json()
    client.get(job["events_url"])
    got = Recipe.from_png(client.get(f"/v1/jobs/{job['id']}/images/0").content)
    assert (got.prompt, got.seed, got.steps) == ("a hut", 9, 2)
    r = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "32x32", "seed": 3,
                                                    "output_format": "jpeg"})
    jpeg = base64.b64decode(r.json()["data"][0]["b64_json"])
    text = user_comment(Image.open(io.BytesIO(jpeg)))
    assert Recipe.from_infotext(text).seed == 3 and text.startswith("a fox")
    assert Recipe.from_png(jpeg).seed == 3  # a JPEG's infotext reads back as its recipe


def test_a1111_negative_prompt_at_cfg_1_is_left_out_and_said(app_factory):
    client, _, engine = app_factory()
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "negative_prompt": "x", "width": 32, "height": 32,
                                               "scheduler": "simple"})
    assert r.status_code == 200, r.text
    assert engine.generated[-1]["negative_prompt"] is None
    assert "negative_prompt has no effect" in json.loads(r.json()["info"])["comments"]


@pytest.mark.parametrize("body,recipe", [
    ({"negative_prompt": "ugly"}, dict(negative_prompt="ugly")),
    ({"size": "100x96"}, dict(width=100, height=96)),
    ({"steps": 0}, dict(steps=0)),
    ({"num_inference_steps": 0}, dict(steps=0)),
    ({"n": 9}, dict(num_images=9)),
])
def test_openai_errors_are_the_recipes_named_the_openai_way(client, body, recipe):
    names = {**OPENAI_NAMES, **({"width": "size", "height": "size"} if "size" in body else {}),
             **({"steps": "num_inference_steps"} if "num_inference_steps" in body else {})}
    param, message = library_error(names, prompt="p", **recipe)
    err = error_of(client.post("/v1/images/generations", json={"prompt": "p", **body}), 400, param)
    assert err["message"] == message


def test_openai_edit_errors_are_the_recipes(client):
    image = Image.new("RGB", (32, 32))
    files = [("image", ("a.png", png_bytes(image), "image/png"))]
    param, message = library_error(OPENAI_NAMES, prompt="x", init_image=image, strength=1.5)
    err = error_of(client.post("/v1/images/edits", files=files, data={"prompt": "x", "strength": "1.5"}), 400, param)
    assert err["message"] == message
    mask = Image.new("L", (16, 16))
    param, message = library_error(OPENAI_NAMES, prompt="x", init_image=image, init_mask=mask)
    files.append(("mask", ("m.png", png_bytes(openai_mask((16, 16), (0, 0, 8, 8))), "image/png")))
    err = error_of(client.post("/v1/images/edits", files=files, data={"prompt": "x"}), 400, "mask")
    assert err["message"] == message


def test_a1111_errors_are_the_recipes_named_the_a1111_way(client):
    b64 = lambda im: base64.b64encode(png_bytes(im)).decode()  # noqa: E731
    image = Image.new("RGB", (32, 32))
    cases = [({"width": 100}, dict(width=100, height=64)), ({"steps": 0}, dict(steps=0)),
             ({"batch_size": 5}, dict(num_images=5)),
             ({"cfg_scale": 1, "negative_prompt": ""}, None)]
    for body, recipe in cases[:3]:
        param, message = library_error(A1111_NAMES, prompt="p", **{"width": 64, "height": 64, **recipe})
        err = error_of(client.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64, **body}), 400,
                       param)
        assert err["message"] == message
    param, message = library_error(A1111_NAMES, prompt="p", init_image=image, strength=1.5)
    err = error_of(client.post("/sdapi/v1/img2img", json={"prompt": "p", "init_images": [b64(image)],
                                                          "denoising_strength": 1.5}), 400, "denoising_strength")
    assert err["message"] == message
    mask = Image.new("L", (16, 16))
    param, message = library_error(A1111_NAMES, prompt="p", init_image=image, init_mask=mask)
    err = error_of(client.post("/sdapi/v1/img2img", json={"prompt": "p", "init_images": [b64(image)],
                                                          "mask": b64(mask)}), 400, "mask")
    assert err["message"] == message and "init_images" in message


@pytest.mark.parametrize("body,recipe", [
    ({"negative_prompt": "ugly"}, dict(negative_prompt="ugly")), ({"width": 100}, dict(width=100, height=64)),
    ({"steps": 0}, dict(steps=0)), ({"n": 0}, dict(num_images=0)), ({"guidance": -1}, dict(guidance=-1)),
])
def test_native_errors_are_the_recipes(client, body, recipe):
    param, message = library_error(NATIVE_NAMES, prompt="p", **{"width": 64, "height": 64, **recipe})
    err = error_of(client.post("/v1/jobs", json={"prompt": "p", "width": 64, "height": 64, **body}), 400, param)
    assert err["message"] == message


def test_unknown_lora_name_is_404_in_every_dialect(app_factory, lora_dir):
    client, _, engine = app_factory(lora_dir=lora_dir)
    error_of(client.post("/v1/jobs", json={"prompt": "p", "loras": [{"name": "nope"}]}), 404, "loras", "lora_not_found")
    error_of(client.post("/v1/images/generations", json={"prompt": "p", "loras": [{"name": "nope"}]}), 404, "loras")
    assert engine.generated == []


# ---------------------------------------------------------------------------------------------------
# The hand-written OpenAPI document and the parsers agree field by field


def request_fields(doc: dict, path: str, content: str = "application/json") -> set[str]:
    schema = doc["paths"][path]["post"]["requestBody"]["content"][content]["schema"]
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return set(schema["properties"])


def test_openapi_request_schemas_are_the_parsers_fields(client):
    from zimage_mlx.server import a1111, jobs, openai

    doc = client.get("/openapi.json").json()
    assert request_fields(doc, "/v1/images/generations") == openai.GENERATION_FIELDS | openai.IGNORED
    assert request_fields(doc, "/v1/images/edits") == openai.EDIT_FIELDS | openai.IGNORED
    assert request_fields(doc, "/v1/images/edits", "multipart/form-data") == openai.EDIT_FIELDS | openai.IGNORED
    assert request_fields(doc, "/v1/jobs") == jobs.NATIVE_FIELDS
    assert request_fields(doc, "/sdapi/v1/txt2img") == a1111.TXT2IMG_FIELDS | a1111.TXT2IMG_IGNORED
    assert request_fields(doc, "/sdapi/v1/img2img") == a1111.IMG2IMG_FIELDS | a1111.IGNORED


def test_parsers_read_exactly_their_declared_fields(monkeypatch):
    """Each parser reads every field it declares (and reading an undeclared one fails: fields.Fields)."""
    from zimage_mlx.server import a1111, fields, jobs, openai

    seen = []
    real = fields.Fields.__init__

    def tracking(self, *a, **kw):
        real(self, *a, **kw)
        seen.append(self)

    monkeypatch.setattr(fields.Fields, "__init__", tracking)
    cfg = ServerConfig(max_side=512)
    image = Image.new("RGB", (32, 32))
    openai.parse_openai(fields.Fields({"prompt": "p"}, known=openai.EDIT_FIELDS | set(openai.REFUSED)), cfg,
                        any_model=False, edit=True, image=image)
    assert seen[0].seen - set(openai.REFUSED) == openai.EDIT_FIELDS - {"image", "mask"}  # files, read by the route
    seen.clear()
    jobs.parse_native({"prompt": "p"}, cfg)
    assert seen[0].seen == jobs.NATIVE_FIELDS
    seen.clear()
    b64 = base64.b64encode(png_bytes(image)).decode()
    a1111.parse_a1111({"prompt": "p", "init_images": [b64], "mask": b64}, cfg, img2img=True)
    assert seen[0].seen == a1111.IMG2IMG_FIELDS


# ---------------------------------------------------------------------------------------------------
# Real clients with their own defaults (issue 28): fixtures written from their source in client_requests.py


def replay(client, requests) -> list:
    out = []
    for method, path, headers, body in requests:
        r = client.request(method, path, headers=headers, json=body)
        assert r.status_code == 200, (path, r.text)
        out.append(r.json())
    return out


def test_sillytavern_default_sequence_with_basic_auth(app_factory):
    from client_requests import (SILLYTAVERN_NEGATIVE, sillytavern_connect, sillytavern_set_model,
                                 sillytavern_txt2img)

    client, _, engine = app_factory(api_key="s3cret")
    auth = "sillytavern:s3cret"  # A1111's --api-auth user:pass; the password is the key
    answers = replay(client, sillytavern_connect(auth))
    sampler = answers[1][0]["name"]  # the first listed sampler is what SillyTavern sends
    assert sampler == "Euler" and answers[4][0]["name"] == "None" and answers[5] == [] and answers[7] == []
    replay(client, sillytavern_set_model(auth, answers[3][0]["title"]))
    body = sillytavern_txt2img(auth, "http://localhost:8000", "a fox", sampler)
    r = client.post("/sdapi/v1/txt2img", headers={"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()},
                    json=body)
    assert r.status_code == 200, r.text
    g = engine.generated[-1]
    assert (g["guidance"], g["steps"], g["width"], g["negative_prompt"]) == (6.0, 20, 512, SILLYTAVERN_NEGATIVE)
    info = json.loads(r.json()["info"])
    assert info["cfg_scale"] == 7 and info["negative_prompt"] == SILLYTAVERN_NEGATIVE and info["sampler_name"] == "Euler"
    assert "auth" not in r.json()["parameters"] and "url" not in r.json()["parameters"]  # the credential not echoed
    # the whole credential may be the key; a wrong password or a bad header is 401
    assert client.get("/sdapi/v1/options", headers={"Authorization": "Basic " + base64.b64encode(b"s3cret").decode()}
                      ).status_code == 200
    for value in ("Basic " + base64.b64encode(b"u:wrong").decode(), "Basic !!!", "Basic "):
        error_of(client.get("/sdapi/v1/options", headers={"Authorization": value}), 401)


def test_a1111_negative_prompt_at_cfg_1_and_scheduler_and_sampler_messages(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64, "negative_prompt": "blur",
                                               "cfg_scale": 1, "scheduler": "NORMAL"})
    assert r.status_code == 200 and "no effect" in json.loads(r.json()["info"])["comments"]
    err = error_of(client.post("/sdapi/v1/txt2img", json={"prompt": "p", "scheduler": "Karras"}), 400, "scheduler")
    assert "'Karras'" in err["message"] and all(n in err["message"] for n in ("Automatic", "Simple", "Normal"))
    err = error_of(client.post("/sdapi/v1/txt2img", json={"prompt": "p", "sampler_name": "DDIM"}), 400, "sampler_name")
    assert "'DDIM'" in err["message"] and "'Euler'" in err["message"]


def test_openwebui_with_only_the_url(app_factory):
    from client_requests import openwebui_edit, openwebui_generation

    client, _, engine = app_factory(api_key="k")
    r = client.post("/v1/images/generations", headers={"Authorization": "Bearer k"}, json=openwebui_generation("a fox"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "z-image-turbo" and body["zimage"]["requested_model"] == "dall-e-2"
    assert "'dall-e-2' ran as 'z-image-turbo'" in body["zimage"]["comments"][0]
    a, b = png_bytes(Image.new("RGB", (32, 32), "red")), png_bytes(Image.new("RGB", (48, 48), "blue"))
    data, files = openwebui_edit("make it night", [a, b])
    r = client.post("/v1/images/edits", headers={"Authorization": "Bearer k"}, data=data, files=files)
    assert r.status_code == 200, r.text
    assert engine.generated[-1]["image"].size == (32, 32)  # the first image[] part
    assert r.json()["model"] == "z-image-turbo" and "first of the 2 images" in r.json()["zimage"]["comments"][-1]
    data, files = openwebui_edit("make it night", [a])
    assert client.post("/v1/images/edits", headers={"Authorization": "Bearer k"}, data=data, files=files
                       ).json()["zimage"]["comments"] == []


def test_comfyui_nodes_and_openai_default_names(app_factory):
    from client_requests import comfyui_requests

    client, _, engine = app_factory(max_side=1024, max_n=8)
    for body in comfyui_requests("a fox"):
        r = client.post("/proxy/openai/images/generations", json=body)
        assert r.status_code == 200, (body, r.text)
        assert r.json()["model"] == "z-image-turbo" and r.json()["zimage"]["requested_model"] == body["model"]
    assert client.post("/proxy/openai/images/generations", json={"model": "dall-e-2", "prompt": "p", "n": 8,
                                                                 "size": "256x256"}).status_code == 200
    for name in ("dall-e-3", "gpt-image-1", "gpt-image-1-mini", "GPT-IMAGE-1.5", None, ""):
        r = client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", "model": name})
        assert r.status_code == 200 and r.json()["model"] == "z-image-turbo", (name, r.text)
    err = error_of(client.post("/v1/images/generations", json={"prompt": "p", "model": "sdxl"}), 404, "model")
    assert "'sdxl'" in err["message"]
    assert ServerConfig().max_n == 8


def test_host_check_on_a_non_loopback_bind(app_factory):
    from zimage_mlx.server import allowed_hosts

    hosts = allowed_hosts("192.168.1.20", ("studio.lan",))
    client, _, _ = app_factory(allowed_hosts=hosts)
    for host in ("192.168.1.20:8000", "192.168.1.20", "localhost:8000", "studio.lan:1234"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host
    error_of(client.get("/health", headers={"host": "rebound.example:8000"}), 400, None, "invalid_host")
    assert "[fe80::1]" in allowed_hosts("fe80::1") and "localhost" in allowed_hosts("10.0.0.1")
    wildcard = allowed_hosts("0.0.0.0")
    assert "127.0.0.1" in wildcard and "evil.example" not in wildcard and len(wildcard) > len(allowed_hosts("10.0.0.1"))


# ---------------------------------------------------------------------------------------------------
# Serving while the model loads (issue 28)


def slow_worker(engine, delay: float, fail: Exception | None = None, queue_size: int = 8) -> Worker:
    def load():
        runner.report_load("load")
        time.sleep(delay)
        if fail is not None:
            raise fail
        return engine

    runner = Worker(load, queue_size=queue_size)
    return runner


def test_health_says_loading_then_ready_and_queued_requests_are_served(tmp_path):
    engine = FakeEngine()
    runner = slow_worker(engine, 1.5)
    with LiveServer(runner, ServerConfig(max_side=256, api_key="k")) as server:
        t0 = time.time()
        runner.start(wait=False)
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert time.time() - t0 < 1.0 and health.status_code == 200
        assert health.json() == {"status": "loading", "model": "loading", "phase": "load", "fraction": None}
        status = httpx.get(f"{server.url}/v1/status", headers={"Authorization": "Bearer k"}, timeout=5).json()
        assert status["state"] == "loading" and status["phase"] == "load" and status["queue"] == []
        r = httpx.post(f"{server.url}/v1/images/generations", headers={"Authorization": "Bearer k"},
                       json={"prompt": "early", "size": "64x64", "seed": 3}, timeout=30)
        assert r.status_code == 200 and time.time() - t0 >= 1.4  # waited in the queue for the model
        assert same_pixels(png(r.json()["data"][0]["b64_json"]), fake_image("early", 3, 64, 64))
        assert httpx.get(f"{server.url}/health", timeout=5).json() == {"status": "ok", "model": "ready"}


def test_load_failure_is_on_health_and_fails_queued_requests():
    runner = slow_worker(FakeEngine(), 0.5, fail=OSError("no weights in /models/x"))
    client = TestClient(create_app(runner, ServerConfig(max_side=256)), base_url="http://localhost")
    runner.start(wait=False)
    job = runner.submit(Recipe_of("queued"))
    with pytest.raises(OSError):
        runner.wait_loaded(10)
    assert job.status == "failed" and job.error.kind == "load"
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "failed", "model": "failed", "error": "no weights in /models/x"}
    r = client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64"})
    assert error_of(r, 503, None, "model_load_failed")["message"].startswith("the model failed to load: no weights")
    runner.shutdown(wait=5)


def Recipe_of(prompt: str):
    from zimage_mlx.recipe import Recipe

    return Recipe(prompt, width=64, height=64, steps=1, seed=1)


def test_serve_command_listens_first_then_reports_a_load_failure(tmp_path):
    import subprocess
    import sys

    model = tmp_path / "not-a-checkpoint"
    model.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("ZIMAGE_MLX_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-c", "from zimage_mlx.cli import main; main()", "serve", "--model",
                             str(model), "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        out, err = proc.communicate(timeout=60)
        assert proc.returncode not in (0, None) and out == ""
        errors = [x for x in err.splitlines() if x.lower().startswith("error")]
        assert len(errors) == 1 and "not-a-checkpoint" in errors[0] and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_queue_full_while_loading_is_503_with_retry_after():
    runner = slow_worker(FakeEngine(), 1.0, queue_size=1)
    client = TestClient(create_app(runner, ServerConfig(max_side=256)), base_url="http://localhost")
    runner.start(wait=False)
    runner.submit(Recipe_of("first"))
    r = client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64"})
    error_of(r, 503, None, "queue_full")
    assert int(r.headers["retry-after"]) >= 1 and client.get("/health").json()["status"] == "loading"
    runner.shutdown(wait=5)
