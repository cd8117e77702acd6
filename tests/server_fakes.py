"""A fake engine for the server's tests: ZImagePipeline's calling convention without MLX.

Images are deterministic functions of (prompt, seed, size), tiny to encode; each step sleeps `step_delay`
seconds; cancel is checked before the first step, after every step and before "decoding", like the
library; every call records the thread it ran on, and `active` counts concurrent generate calls.
"""

from __future__ import annotations

import hashlib
import threading
from types import SimpleNamespace
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from zimage_mlx.errors import InputError
from zimage_mlx.server_engine import Cancelled


@dataclass
class FakeStep:
    index: int
    total: int
    sigma: float
    latents: object = None
    denoised: object = None


class FakeEngine:
    def __init__(self, step_delay: float = 0.0, fail_with: Exception | None = None):
        self.step_delay = step_delay
        self.fail_with = fail_with
        self.calls: list[tuple[str, int]] = []  # (method, thread ident)
        self.generated: list[dict] = []  # the kwargs of every generate call
        self.loras: list[tuple[str, float]] = []
        self.active = 0
        self.max_active = 0
        self.steps_run: list[int] = []  # per generate call: how many steps ran
        self.lock = threading.Lock()

    def _record(self, name):
        self.calls.append((name, threading.get_ident()))

    def generate(self, prompt, negative_prompt=None, width=None, height=None, steps=8, guidance=0.0, seed=None,
                 num_images=1, image=None, mask=None, strength=None, cancel=None, on_step=None, **kw):
        self._record("generate")
        self.generated.append(dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                                   steps=steps, guidance=guidance, seed=seed, num_images=num_images, image=image,
                                   mask=mask, strength=strength, loras=list(self.loras), **kw))
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        ran = 0
        try:
            if self.fail_with is not None:
                raise self.fail_with
            if negative_prompt and guidance <= 0:
                raise InputError("negative_prompt needs guidance > 0")
            if image is not None:
                width = width or image.width // 16 * 16
                height = height or image.height // 16 * 16
            width, height = width or 1024, height or 1024
            total = steps
            if image is not None:
                s = strength if strength is not None else (1.0 if mask is not None else 0.6)
                total = steps - int(max(steps - min(steps * s, steps), 0))
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            for i in range(total):
                time.sleep(self.step_delay)
                ran += 1
                if on_step is not None:
                    latents = SimpleNamespace(shape=(num_images, height // 8, width // 8, 16))  # shape only
                    on_step(FakeStep(i, total, 1.0 - i / total, latents, latents))
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
            images = []
            for k in range(num_images):
                im = fake_image(prompt, seed + k, width, height)
                im.info["seed"] = seed + k
                images.append(im)
            return images
        finally:
            self.steps_run.append(ran)
            with self.lock:
                self.active -= 1

    def fast_preview(self, step, size=None):
        self._record("fast_preview")
        return [Image.new("RGB", size or (64, 64), (step.index * 20 % 256, 0, 0))]

    def load_lora(self, path, scale=1.0, *, fuse=True):
        self._record("load_lora")
        if Path(path).read_bytes() == b"bad":
            raise ValueError("not a LoRA file")
        self.loras.append((Path(path).stem, float(scale)))

    def unload_loras(self):
        self._record("unload_loras")
        self.loras.clear()

    def enhance_prompt(self, prompt, *, seed=None, **kw):
        self._record("enhance_prompt")
        return f"{prompt}, rewritten with seed {seed}"

    def threads(self) -> set[int]:
        return {t for _, t in self.calls}


def fake_image(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """A deterministic image: colour from (prompt, seed), a square marking the seed."""
    h = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
    im = Image.new("RGB", (width, height), tuple(h[:3]))
    im.paste(tuple(h[3:6]), (0, 0, min(width, 8 + seed % 8), min(height, 8)))
    return im


class LiveServer:
    """A real uvicorn on 127.0.0.1, port 0, in a background thread, around a started runner."""

    def __init__(self, runner, cfg):
        import uvicorn

        from zimage_mlx.server import bind_socket, create_app

        self.runner = runner
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(runner, cfg), log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.runner.shutdown()
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
