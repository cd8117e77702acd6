"""The server end to end on the reference checkpoint: a real uvicorn on 127.0.0.1 port 0, the real OpenAI SDK
and an A1111-shaped request get images pixel-identical to `ZImagePipeline.generate` with the same settings;
the `serve` command prints its listening line and exits 0 on SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server_fakes import LiveServer
from zimage_mlx.server import ServerConfig
from zimage_mlx.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
STEPS = 2


@pytest.fixture(scope="module")
def reference(reference_checkpoint):
    """The expected images come from a pipeline owned by the test's own thread."""
    from zimage_mlx.pipeline import ZImagePipeline

    return ZImagePipeline.from_pretrained(reference_checkpoint)


@pytest.fixture(scope="module")
def live(reference_checkpoint):
    from zimage_mlx.pipeline import ZImagePipeline

    loads = []

    def load():
        loads.append(1)
        return ZImagePipeline.from_pretrained(reference_checkpoint)

    runner = Worker(load, queue_size=4)
    runner.start(timeout=120)
    cfg = ServerConfig(model_id="z-image-tiny", max_side=256)
    with LiveServer(runner, cfg) as server:
        server.loads = loads
        yield server
    assert len(loads) == 1  # loaded once, at start, for every request


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def assert_identical(got: Image.Image, expected: Image.Image) -> None:
    assert got.format == "PNG" and got.size == expected.size
    assert got.convert("RGB").tobytes() == expected.convert("RGB").tobytes()


def test_openai_sdk_generate_is_pixel_identical(live, reference):
    from openai import OpenAI

    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a red fox in the snow", size=f"{SIZE}x{SIZE}", n=2,
                                    extra_body={"seed": 1234, "steps": STEPS})
    expected = reference.generate("a red fox in the snow", width=SIZE, height=SIZE, steps=STEPS, seed=1234, num_images=2)
    assert [d.model_extra["seed"] for d in result.data] == [1234, 1235]
    for d, e in zip(result.data, expected):
        assert_identical(decode(d.b64_json), e)
    assert result.usage.total_tokens == 0 and result.output_format == "png"
    assert live.worker.pipeline._owner == live.worker.thread_ident  # the worker thread owns the pipeline


def test_enhance_is_the_pipelines_rewrite_then_its_image(live, reference):
    """enhance: true runs the text encoder's Qwen3 on the worker thread, seeded by the image seed; the image is
    exactly the pipeline's for that rewrite and seed."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a lighthouse", size=f"{SIZE}x{SIZE}",
                                    extra_body={"seed": 77, "steps": STEPS, "enhance": True})
    rewrite = reference.enhance_prompt("a lighthouse", seed=77)
    assert result.data[0].revised_prompt == rewrite
    expected = reference.generate(rewrite, width=SIZE, height=SIZE, steps=STEPS, seed=77)[0]
    assert_identical(decode(result.data[0].b64_json), expected)


def test_openai_sdk_edit_with_mask_is_pixel_identical(live, reference):
    from openai import OpenAI

    image = Image.new("RGB", (SIZE, SIZE))
    image.putdata([((x * 4) % 256, (y * 4) % 256, 128) for y in range(SIZE) for x in range(SIZE)])
    openai_mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
    openai_mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # OpenAI: transparent = edit here
    white_mask = Image.new("L", (SIZE, SIZE), 0)
    white_mask.paste(255, (16, 16, 48, 48))  # the library: white = repaint

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    result = client.images.edit(image=("in.png", png(image), "image/png"), mask=("mask.png", png(openai_mask), "image/png"),
                                prompt="a cat", extra_body={"seed": 7, "steps": STEPS})
    expected = reference.generate("a cat", image=image, mask=white_mask, steps=STEPS, seed=7)
    assert_identical(decode(result.data[0].b64_json), expected[0])
    # without a mask: image to image at the default strength
    result = client.images.edit(image=("in.png", png(image), "image/png"), prompt="a cat",
                                extra_body={"seed": 7, "steps": 4, "strength": 0.5})
    assert_identical(decode(result.data[0].b64_json), reference.generate("a cat", image=image, steps=4, seed=7,
                                                                          strength=0.5)[0])


def test_openai_sdk_stream_with_partial_images(live, reference):
    from openai import OpenAI

    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    events = list(client.images.generate(prompt="a lighthouse", size=f"{SIZE}x{SIZE}", stream=True, partial_images=2,
                                         extra_body={"seed": 99, "steps": 4}))
    types = [e.type for e in events]
    assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], types
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events[:2]:  # the cheap previews are images of the requested size
        assert decode(e.b64_json).size == (SIZE, SIZE)
    expected = reference.generate("a lighthouse", width=SIZE, height=SIZE, steps=4, seed=99)
    assert_identical(decode(events[-1].b64_json), expected[0])


def test_openai_sdk_errors(live):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="p", size="100x100")
    assert e.value.param == "size" and e.value.code == "invalid_value"
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(prompt="p", model="flux-dev", size="64x64")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="p", size="64x64", extra_body={"negative_prompt": "blur"})
    assert e.value.param == "negative_prompt"
    models = client.models.list()
    assert [m.id for m in models.data] == ["z-image-tiny"]


def test_a1111_txt2img_is_pixel_identical(live, reference):
    r = httpx.post(f"{live.url}/sdapi/v1/txt2img", json={
        "prompt": "a watercolor harbor", "negative_prompt": "", "width": SIZE, "height": SIZE, "steps": STEPS,
        "seed": 31, "cfg_scale": 1, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1}, timeout=120)
    assert r.status_code == 200, r.text
    expected = reference.generate("a watercolor harbor", width=SIZE, height=SIZE, steps=STEPS, seed=31)
    assert_identical(decode(r.json()["images"][0]), expected[0])
    assert json.loads(r.json()["info"])["all_seeds"] == [31]


def test_sillytavern_default_sequence_is_pixel_identical(live, reference):
    """SillyTavern's connect calls and its default txt2img body (client_requests.py, from its source) with its
    Basic auth header; only the size (32x32) and the steps (2) are overridden, to stay cheap. Its CFG 7 is
    honoured: guidance 6 with its default negative prompt, as A1111 would run it."""
    from client_requests import SILLYTAVERN_NEGATIVE, basic, sillytavern_connect, sillytavern_txt2img

    with httpx.Client(base_url=live.url, timeout=120) as c:
        answers = []
        for method, path, headers, body in sillytavern_connect("user:pass"):
            r = c.request(method, path, headers=headers, json=body)
            assert r.status_code == 200, (path, r.text)
            answers.append(r.json())
        body = sillytavern_txt2img("user:pass", live.url, "a lighthouse", answers[1][0]["name"], width=32, height=32,
                                   steps=2)
        r = c.post("/sdapi/v1/txt2img", headers=basic("user:pass"), json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["cfg_scale"] == 7 and info["negative_prompt"] == SILLYTAVERN_NEGATIVE
    expected = reference.generate(body["prompt"], negative_prompt=SILLYTAVERN_NEGATIVE, width=32, height=32, steps=2,
                                  guidance=6.0, seed=info["seed"])
    assert_identical(decode(r.json()["images"][0]), expected[0])


def test_native_job_previews_and_image(live, reference):
    with httpx.Client(base_url=live.url, timeout=120) as c:
        job = c.post("/v1/jobs", json={"prompt": "a harbor", "size": f"{SIZE}x{SIZE}", "steps": 3, "seed": 5}).json()
        events = []
        with c.stream("GET", job["events_url"]) as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
        steps = [d for t, d in events if t == "step"]
        assert [d["step"] for d in steps] == [1, 2, 3] and all("preview" in d for d in steps)
        preview = decode(steps[0]["preview"])
        assert preview.format == "JPEG" and preview.size == (SIZE, SIZE)
        assert events[-1][0] == "done"
        got = Image.open(io.BytesIO(c.get(events[-1][1]["images"][0]["url"]).content))
    assert_identical(got, reference.generate("a harbor", width=SIZE, height=SIZE, steps=3, seed=5)[0])


def test_cancel_real_run_then_next_job_is_exact(live, reference):
    """Cancelled in the middle of a real run, the pipeline's next job is still exact."""
    with httpx.Client(base_url=live.url, timeout=120) as c:
        job = c.post("/v1/jobs", json={"prompt": "slow", "size": "128x128", "steps": 20, "seed": 1}).json()
        with c.stream("GET", job["events_url"]) as r:
            for line in r.iter_lines():
                if line == "event: step":
                    c.delete(f"/v1/jobs/{job['id']}")
                if line == "event: cancelled":
                    break
        state = c.get(f"/v1/jobs/{job['id']}").json()
        assert state["status"] == "cancelled" and state["step"] <= 2  # the step under way, at most
        r = c.post("/v1/images/generations", json={"prompt": "after", "size": f"{SIZE}x{SIZE}", "steps": STEPS, "seed": 2})
    assert_identical(decode(r.json()["data"][0]["b64_json"]),
                     reference.generate("after", width=SIZE, height=SIZE, steps=STEPS, seed=2)[0])


# ---------------------------------------------------------------------------------------------------
# The command


def cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("ZIMAGE_MLX_API_KEY", None)
    return subprocess.Popen([sys.executable, "-c", "from zimage_mlx.cli import main; main()", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_serve_command_prints_listening_line_and_exits_0_on_sigterm(reference_checkpoint):
    proc = cli("serve", "--model", str(reference_checkpoint), "--port", "0", "--api-key", "k", "--max-side", "256")
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[-1]
        assert int(url.rsplit(":", 1)[1]) > 0
        first = httpx.get(f"{url}/health", timeout=10).json()  # it listens before it loads
        assert first["status"] in ("loading", "ok"), first
        r = httpx.post(f"{url}/v1/images/generations", headers={"Authorization": "Bearer k"}, timeout=120,
                       json={"prompt": "queued while loading", "size": "32x32", "steps": 1})
        assert r.status_code == 200, r.text
        assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok", "model": "ready"}
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        r = httpx.get(f"{url}/v1/status", headers={"Authorization": "Bearer k"}, timeout=10)
        assert r.json()["limits"]["max_side"] == 256
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert proc.stdout.read() == ""  # exactly one line on stdout
        err = proc.stderr.read()
        assert "model ready in" in err and len([x for x in err.splitlines() if "loading" in x]) == 1, err
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("args,message", [
    (["--host", "0.0.0.0"], "--api-key"),
    (["--max-side", "1000"], "multiple of 16"),
    (["--queue-size", "0"], "queue-size"),
])
def test_serve_refuses_before_loading(args, message, tmp_path):
    proc = cli("serve", "--model", str(tmp_path / "no-such-model"), "--port", "0", *args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and message in err and out == ""


# ---------------------------------------------------------------------------------------------------
# Metadata: a PNG from any dialect replays to the same pixels (#24)


def replay(reference, png: bytes):
    from zimage_mlx.recipe import Recipe

    recipe = Recipe.from_png(png)
    return recipe, reference.run(recipe)[0]


def test_pngs_from_every_dialect_replay_to_the_same_pixels(live, reference, reference_checkpoint, tmp_path):
    from click.testing import CliRunner

    from zimage_mlx import cli

    with httpx.Client(base_url=live.url, timeout=120) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a fox", "size": "32x32", "steps": 2, "seed": 11})
        openai_png = base64.b64decode(r.json()["data"][0]["b64_json"])
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a boat", "width": 32, "height": 32, "steps": 2, "seed": 12,
                                              "cfg_scale": 2, "negative_prompt": "blur"})
        a1111_png = base64.b64decode(r.json()["images"][0])
        job = c.post("/v1/jobs", json={"prompt": "a hut", "size": "32x32", "steps": 2, "seed": 13}).json()
        c.get(job["events_url"])
        native_png = c.get(f"/v1/jobs/{job['id']}/images/0").content
    cases = {"openai": (openai_png, ("a fox", 11)), "a1111": (a1111_png, ("a boat", 12)),
             "native": (native_png, ("a hut", 13))}
    for name, (png, (prompt, seed)) in cases.items():
        recipe, image = replay(reference, png)
        assert (recipe.prompt, recipe.seed, recipe.width, recipe.height, recipe.steps) == (prompt, seed, 32, 32, 2)
        assert_identical(Image.open(io.BytesIO(png)), image)
        # and through the CLI, as a user would: the server's model is a local folder, named again with -m
        (tmp_path / f"{name}.png").write_bytes(png)
        r = CliRunner().invoke(cli.main, ["generate", "--from-image", str(tmp_path / f"{name}.png"),
                                          "-m", str(reference_checkpoint), "-o", str(tmp_path / f"{name}-again.png")])
        assert r.exit_code == 0, r.output
        assert_identical(Image.open(tmp_path / f"{name}-again.png"), Image.open(io.BytesIO(png)))
    assert replay(reference, a1111_png)[0].guidance == 1.0  # A1111's cfg_scale 2: guidance 1


def test_worker_example_runs(reference_checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "worker.py"), "--model", str(reference_checkpoint),
                           "--width", "32", "--height", "32", "--steps", "1", "--out-dir", str(tmp_path)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cancelled: cancelled" in proc.stdout and "done" in proc.stdout
    from zimage_mlx.recipe import Recipe

    assert sorted(Recipe.from_png(p).seed for p in tmp_path.glob("worker-*.png")) == [7, 8]
