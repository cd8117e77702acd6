"""A fake engine for the server's tests: ZImagePipeline's calling convention without MLX.

Images are deterministic functions of (prompt, seed, size), tiny to encode; each step sleeps `step_delay`
seconds; cancel is checked before the first step, after every step and before "decoding", like the
library; every call records the thread it ran on, and `active` counts concurrent run calls.
"""

from __future__ import annotations

import hashlib
import threading
from types import SimpleNamespace
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from zimage_mlx.errors import Cancelled, LoraError
from zimage_mlx.recipe import LoraRef


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
        self.generated: list[dict] = []  # the recipe of every run call, as given
        self.loras: list[tuple[str, float]] = []
        self.applied: list[tuple[str, float]] = []
        self.active = 0
        self.max_active = 0
        self.steps_run: list[int] = []  # per generate call: how many steps ran
        self.lock = threading.Lock()

    def _record(self, name):
        self.calls.append((name, threading.get_ident()))

    def run(self, recipe, *, on_step=None, cancel=None, on_enhanced=None, batch_size=None, **kw):
        """ZImagePipeline.run's contract: check and settle the recipe, sync its LoRAs, rewrite its prompts with
        enhance, then one step loop; images carry info["seed"] and info["recipe"]."""
        self._record("run")
        entry = dict(prompt=recipe.prompt, negative_prompt=recipe.negative_prompt, width=recipe.width,
                     height=recipe.height, steps=recipe.steps, guidance=recipe.guidance, seed=recipe.seed,
                     num_images=recipe.num_images, image=recipe.init_image, mask=recipe.init_mask,
                     strength=recipe.strength, loras=list(self.loras))
        self.generated.append(entry)
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        ran = 0
        try:
            if self.fail_with is not None:
                raise self.fail_with
            recipe = recipe.validate().settle().validate().with_seed()
            self._sync_loras(recipe.loras)
            entry["loras"] = list(self.loras)
            items = recipe.images()
            if recipe.enhance:
                items = [r.replace(prompt=self.enhance_prompt(r.prompt, seed=r.seed), original_prompt=r.prompt)
                         for r in items]
                for k, r in enumerate(items):
                    on_enhanced and on_enhanced(k, r)
            total = recipe.denoising_steps
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            for i in range(total):
                time.sleep(self.step_delay)
                ran += 1
                if on_step is not None:
                    latents = SimpleNamespace(shape=(len(items), recipe.height // 8, recipe.width // 8, 16))
                    on_step(FakeStep(i, total, 1.0 - i / total, latents, latents))
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
            images = []
            for r in items:
                im = fake_image(r.prompt, r.seed, recipe.width, recipe.height)
                im.info["seed"] = r.seed
                im.info["recipe"] = r.replace(model="fake", dtype="float32",
                                              loras=[LoraRef(n, s) for n, s in self.loras])
                images.append(im)
            return images
        finally:
            self.steps_run.append(ran)
            with self.lock:
                self.active -= 1

    def _sync_loras(self, loras):
        if loras is None:
            return
        want = [(str(x.load), float(x.scale)) for x in loras]
        if want == self.applied:
            return
        self.unload_loras()
        try:
            for ref in loras:
                self.load_lora(ref.load, ref.scale, fuse=False)
        except Exception:
            self.unload_loras()
            raise
        self.applied = want

    def fast_preview(self, step, size=None):
        self._record("fast_preview")
        return [Image.new("RGB", size or (64, 64), (step.index * 20 % 256, 0, 0))]

    def load_lora(self, path, scale=1.0, *, fuse=True):
        self._record("load_lora")
        if Path(path).read_bytes() == b"bad":
            raise LoraError(f"cannot read LoRA {path}: not a LoRA file")
        self.loras.append((Path(path).stem, float(scale)))

    def unload_loras(self):
        self._record("unload_loras")
        self.loras.clear()
        self.applied = []

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
    """A real uvicorn on 127.0.0.1, port 0, in a background thread, around a started worker."""

    def __init__(self, worker, cfg):
        import uvicorn

        from zimage_mlx.server import bind_socket, create_app

        self.worker = worker
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(worker, cfg), log_level="warning", lifespan="off",
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
        self.worker.shutdown()
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
