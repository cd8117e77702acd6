"""The job runner behind `zimage-mlx serve`: one worker thread, one engine, a bounded FIFO queue.

Transport-agnostic: nothing here knows HTTP. The worker thread creates the engine (a `ZImagePipeline`, or
a fake one in tests) and makes every call on it, because MLX streams belong to the thread that made
them; everything the worker hands out is a PIL image turned into bytes, never an mx.array. Each `Job`
keeps a log of events; a subscriber on an asyncio loop gets the log so far and then every new event,
delivered with `loop.call_soon_threadsafe`.

Event types (the native job API's SSE stream): queued {position}, started {total}, step {step, total,
preview?}, partial {index, b64} (an OpenAI partial image), done {images, seconds}, failed {error},
cancelled {}. The last three end a job.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import secrets
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("zimage_mlx.server")

from .errors import ZImageError
from .pipeline import MAX_SEED, Cancelled

TERMINAL = ("done", "failed", "cancelled")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PREVIEW_SIDE = 512  # previews sent over the wire are at most this many pixels a side


class QueueFull(Exception):
    """The queue holds `queue_size` waiting jobs already."""


class ShuttingDown(Exception):
    """The runner is stopping and takes no new jobs."""


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Params:
    """One checked generation request: what `generate` gets, plus how to encode and report it."""

    prompt: str
    width: int | None  # None (edits without a size): the image's size, rounded down to multiples of 16
    height: int | None
    steps: int
    seed: int
    n: int = 1
    guidance: float = 0.0
    negative_prompt: str | None = None
    image: object = None  # PIL RGB image (img2img / inpainting)
    mask: object = None  # PIL "L" image, white = repaint
    strength: float | None = None
    loras: list = field(default_factory=list)  # [(name, path, scale)]
    output_format: str = "png"
    output_compression: int | None = None  # 0..100 for jpeg/webp
    previews: bool = False  # a JPEG preview with every step event
    partial_steps: frozenset = frozenset()  # steps (1-based) after which a partial image is sent
    enhance: bool = False  # rewrite the prompt first with the text encoder's Qwen3 (one rewrite per image seed)

    def generate_kwargs(self) -> dict:
        kw = dict(width=self.width, height=self.height, steps=self.steps, guidance=self.guidance, seed=self.seed,
                  num_images=self.n)
        if self.negative_prompt:
            kw["negative_prompt"] = self.negative_prompt
        if self.image is not None:
            kw.update(image=self.image, mask=self.mask, strength=self.strength)
        return kw

    def denoising_steps(self) -> int:
        """How many steps run: all of them, or ceil(strength x steps) from an image (sampler.strength_start)."""
        if self.image is None:
            return self.steps
        from .sampler import strength_start

        strength = self.strength if self.strength is not None else (1.0 if self.mask is not None else 0.6)
        return self.steps - strength_start(self.steps, strength)

    def settings(self) -> dict:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "width": self.width,
                "height": self.height, "steps": self.steps, "seed": self.seed, "n": self.n,
                "guidance": self.guidance, "loras": [{"name": n, "scale": s} for n, _, s in self.loras],
                "output_format": self.output_format, "previews": self.previews, "enhance": self.enhance}


class Job:
    """A request in the queue: its parameters, its state and its event log."""

    def __init__(self, params: Params, kind: str = "native"):
        self.id = "job_" + secrets.token_hex(8)
        self.params = params
        self.kind = kind
        self.status = "queued"  # queued | running | completed | failed | cancelled
        self.cancel = threading.Event()
        self.cancel_reason: str | None = None  # user | disconnect | shutdown | interrupt
        self.position: int | None = None
        self.step = 0
        self.total = params.denoising_steps()
        self.images: list[bytes] = []
        self.revised_prompts: list[str] = []  # with enhance: the rewrite each image was made from
        self.seeds: list[int] = []
        self.sizes: list[tuple[int, int]] = []
        self.error: dict | None = None  # the envelope's inner object
        self.error_status: int | None = None
        self.preview_b64: str | None = None  # the latest step's JPEG preview
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.timings: dict = {}
        self.events: list[tuple[str, dict]] = []
        self._subs: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._lock = threading.RLock()

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.params.output_format]

    @property
    def is_finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    # -- events ---------------------------------------------------------------------------------------
    def emit(self, type_: str, data: dict) -> None:
        """Append an event and hand it to every subscriber's loop; safe from any thread."""
        with self._lock:
            if type_ == "step":  # only the newest step keeps its preview in the log (bounded replay)
                self.events = [(t, {k: v for k, v in d.items() if k != "preview"}) if t == "step" else (t, d)
                               for t, d in self.events]
            self.events.append((type_, data))
            subs = list(self._subs)
        for loop, q in subs:
            try:
                loop.call_soon_threadsafe(q.put_nowait, (type_, data))
            except RuntimeError:  # that loop is closed
                self.unsubscribe(q)

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> tuple[list, asyncio.Queue]:
        """The events so far and a queue that receives every later one (no gap, no repeat)."""
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            past = list(self.events)
            self._subs.append((loop, q))
        return past, q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        with self._lock:
            self._subs = [(lp, s) for lp, s in self._subs if s is not q]

    async def stream(self, ping: float | None = None):
        """Async iterator of (type, data) from the first event until the job ends; ("ping", {}) every
        `ping` seconds without an event."""
        past, q = self.subscribe(asyncio.get_running_loop())
        try:
            for ev in past:
                yield ev
                if ev[0] in TERMINAL:
                    return
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), ping) if ping else await q.get()
                except asyncio.TimeoutError:
                    yield ("ping", {})
                    continue
                yield ev
                if ev[0] in TERMINAL:
                    return
        finally:
            self.unsubscribe(q)

    async def wait(self) -> None:
        """Until the job has ended."""
        async for type_, _ in self.stream():
            if type_ in TERMINAL:
                return

    # -- views ----------------------------------------------------------------------------------------
    def image_entries(self) -> list[dict]:
        entries = [{"url": f"/v1/jobs/{self.id}/images/{k}", "seed": s, "width": w, "height": h}
                   for k, (s, (w, h)) in enumerate(zip(self.seeds, self.sizes))]
        for entry, revised in zip(entries, self.revised_prompts):
            entry["revised_prompt"] = revised
        return entries

    def to_json(self) -> dict:
        return {"id": self.id, "status": self.status, "queue_position": self.position, "step": self.step,
                "total": self.total, "settings": self.params.settings(), "images": self.image_entries(),
                "error": self.error}


class JobRunner:
    """Owns the engine on one worker thread and runs queued jobs one at a time, in order.

    engine_factory() runs on the worker thread and returns the engine: an object with ZImagePipeline's
    `generate(prompt, ..., cancel=, on_step=)`, `fast_preview(step)`, `load_lora(path, scale, fuse=)` and
    `unload_loras()`. queue_size bounds the jobs waiting (the running one not counted).
    """

    def __init__(self, engine_factory: Callable[[], object], queue_size: int = 8, *, name: str = "zimage-engine"):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.engine_factory = engine_factory
        self.queue_size = queue_size
        self.engine = None
        self.running: Job | None = None
        self.stopping = False
        self.last_job_seconds = 0.0
        self.thread_ident: int | None = None
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._applied_loras: list = []  # [(path, scale)] on the engine now
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # -- life cycle -----------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Start the worker and wait until it has loaded the engine; re-raise a load failure here."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the engine did not load in time")
        if self._load_error is not None:
            raise self._load_error

    def shutdown(self, wait: float | None = None) -> None:
        """Refuse new jobs, fail the queued ones (503), cancel the running one, stop the worker."""
        with self._cond:
            self.stopping = True
            queued = list(self._queue)
            self._queue.clear()
            running = self.running
            self._cond.notify_all()
        for job in queued:
            job.cancel_reason = "shutdown"
            job.cancel.set()
            self._fail(job, 503, error_body("the server is shutting down", "server_error", None, "shutting_down"))
        if running is not None:
            running.cancel_reason = running.cancel_reason or "shutdown"
            running.cancel.set()
        if wait is not None and self._thread.is_alive():
            self._thread.join(wait)

    # -- the asyncio side -----------------------------------------------------------------------------
    def submit(self, job: Job) -> int:
        """Queue a job; returns its position (0 = next). Raises QueueFull or ShuttingDown."""
        with self._cond:
            if self.stopping:
                raise ShuttingDown()
            if len(self._queue) >= self.queue_size:
                raise QueueFull()
            self._queue.append(job)
            job.position = len(self._queue) - 1
            job.emit("queued", {"position": job.position})
            self._cond.notify_all()
            return job.position

    def cancel(self, job: Job, reason: str = "user") -> bool:
        """Cancel a job: a queued one leaves the queue now, a running one stops after its current step.
        False if it had already ended."""
        with self._cond:
            if job.is_finished:
                return False
            job.cancel_reason = job.cancel_reason or reason
            job.cancel.set()
            if job in self._queue:
                self._queue.remove(job)
                self._finish_cancelled(job)
                self._renumber()
        return True

    def queued(self) -> list[Job]:
        with self._cond:
            return list(self._queue)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about the queue's length times the last job's time."""
        with self._cond:
            waiting = len(self._queue) + 1
        return int(min(120, max(1, round(waiting * (self.last_job_seconds or 1.0)))))

    # -- the worker -----------------------------------------------------------------------------------
    def _main(self) -> None:
        self.thread_ident = threading.get_ident()
        try:
            self.engine = self.engine_factory()
        except BaseException as e:  # noqa: BLE001 - handed to start()
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._take()
            if job is None:
                return
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.running = None

    def _take(self) -> Job | None:
        with self._cond:
            while not self._queue and not self.stopping:
                self._cond.wait()
            if self.stopping:
                return None
            job = self._queue.popleft()
            self.running = job
            job.position = None
            self._renumber()
            return job

    def _renumber(self) -> None:
        """Tell every queued job whose position changed (call with the lock held)."""
        for i, j in enumerate(self._queue):
            if j.position != i:
                j.position = i
                j.emit("queued", {"position": i})

    def _run(self, job: Job) -> None:
        p = job.params
        if job.cancel.is_set():
            self._finish_cancelled(job)
            return
        job.status = "running"
        job.started = time.time()
        job.timings["queue_s"] = round(job.started - job.created, 4)
        job.emit("started", {"total": job.total})
        engine = self.engine

        def on_step(step) -> None:
            job.step = step.index + 1
            job.total = step.total
            data = {"step": job.step, "total": step.total}
            partial = job.step in p.partial_steps
            if p.previews or partial:
                # A partial image is full size; a step preview is mapped straight to its wire size (at most
                # PREVIEW_SIDE a side), not upscaled to the image's size and then shrunk, on every step.
                full = engine.fast_preview(step)[0] if partial else None
                if p.previews:
                    job.preview_b64 = preview_jpeg(full or engine.fast_preview(step, size=preview_size(step))[0])
                    data["preview"] = job.preview_b64
                if partial:
                    job.emit("partial", {"index": sorted(p.partial_steps).index(job.step),
                                         "b64": base64.b64encode(encode_image(full, p.output_format,
                                                                              p.output_compression)).decode()})
            job.emit("step", data)

        t0 = time.perf_counter()
        try:
            self._apply_loras(p.loras)
            if p.enhance:
                images = self._enhanced(job, engine, on_step)
            else:
                images = engine.generate(p.prompt, **p.generate_kwargs(), cancel=job.cancel, on_step=on_step)
            t1 = time.perf_counter()
            encoded = [encode_image(im, p.output_format, p.output_compression) for im in images]
            job.timings.update(generate_s=round(t1 - t0, 4), encode_s=round(time.perf_counter() - t1, 4))
        except Cancelled:
            self._finish_cancelled(job)
            return
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's error
            if job.cancel.is_set():
                self._finish_cancelled(job)
            elif isinstance(e, LoraLoadError):
                self._fail(job, 400, error_body(str(e), "invalid_request_error", "loras", "invalid_lora"))
            elif isinstance(e, ZImageError):  # what a user can fix (zimage_mlx.errors); any other error is a bug: 500
                self._fail(job, 400, error_body(" ".join(str(e).split()), "invalid_request_error"))
            elif is_out_of_memory(e):
                clear_cache()
                self._fail(job, 507, error_body("out of memory: try a smaller size, fewer images or --low-memory",
                                                "server_error", None, "insufficient_memory"))
            else:
                log.error("job %s failed:\n%s", job.id, traceback.format_exc())
                self._fail(job, 500, error_body(f"the engine failed ({type(e).__name__}); see the server log",
                                                "server_error"))
            return
        job.images = encoded
        job.seeds = [im.info.get("seed", p.seed + k) for k, im in enumerate(images)]
        job.sizes = [im.size for im in images]
        job.finished = time.time()
        self.last_job_seconds = job.finished - job.started
        job.status = "completed"
        job.emit("done", {"images": job.image_entries(), "seconds": round(job.finished - job.started, 4)})
        log.info("job %s done: %dx%d steps=%d n=%d seed=%d in %.2f s", job.id, *job.sizes[0], p.steps, p.n,
                 p.seed, job.finished - job.started)

    def _enhanced(self, job: Job, engine, on_step) -> list:
        """Rewrite the prompt once per image, seeded by that image's seed (as `zimage-mlx generate --enhance`),
        and make each image from its rewrite; an `enhanced` event carries each rewrite as it is ready."""
        p, images = job.params, []
        kwargs = dict(p.generate_kwargs(), num_images=1)
        for k in range(p.n):
            seed = (p.seed + k) % (MAX_SEED + 1)
            if job.cancel.is_set():
                raise Cancelled("generation cancelled")
            revised = engine.enhance_prompt(p.prompt, seed=seed)
            job.revised_prompts.append(revised)
            job.emit("enhanced", {"index": k, "seed": seed, "prompt": revised})
            images += engine.generate(revised, **dict(kwargs, seed=seed), cancel=job.cancel, on_step=on_step)
        return images

    def _apply_loras(self, loras: list) -> None:
        want = [(str(path), float(scale)) for _, path, scale in loras]
        if want == self._applied_loras:
            return
        if self._applied_loras:
            self.engine.unload_loras()
            self._applied_loras = []
        try:
            for path, scale in want:
                self.engine.load_lora(path, scale, fuse=False)
        except Exception as e:  # noqa: BLE001 - the LoRA's own message, as a 400
            self.engine.unload_loras()
            raise LoraLoadError(f"cannot apply LoRA {Path(path).stem}: {' '.join(str(e).split())}") from None
        self._applied_loras = want

    def _finish_cancelled(self, job: Job) -> None:
        if job.is_finished:
            return
        job.status = "cancelled"
        job.finished = time.time()
        job.position = None
        job.emit("cancelled", {})

    def _fail(self, job: Job, status: int, body: dict) -> None:
        if job.is_finished:
            return
        job.status = "failed"
        job.finished = time.time()
        job.position = None
        job.error = body["error"]
        job.error_status = status
        job.emit("failed", body)


class LoraLoadError(Exception):
    pass


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("malloc" in text or "out of memory" in text)


def clear_cache() -> None:
    try:
        import mlx.core as mx

        mx.clear_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


def encode_image(image, fmt: str = "png", compression: int | None = None) -> bytes:
    """PIL image -> bytes, without metadata (nothing from the server's disk leaks into an image)."""
    buf = io.BytesIO()
    if fmt == "png":  # lossless at any level; level 1 encodes ~2x faster than the default 6 for ~15 % more bytes
        image.save(buf, format="PNG", compress_level=1)
    else:
        quality = 100 if compression is None else int(compression)
        image.convert("RGB").save(buf, format="JPEG" if fmt == "jpeg" else "WEBP", quality=quality)
    return buf.getvalue()


def preview_size(step) -> tuple[int, int]:
    """The step preview's (W, H): the image's size (8 pixels per latent, the FLUX VAE's factor) scaled down
    to at most PREVIEW_SIDE a side."""
    h, w = (8 * n for n in step.denoised.shape[1:3])
    f = min(1.0, PREVIEW_SIDE / max(w, h))
    return max(1, round(w * f)), max(1, round(h * f))


def preview_jpeg(image) -> str:
    """A step preview as base64 JPEG, at most PREVIEW_SIDE a side."""
    if max(image.size) > PREVIEW_SIDE:
        image = image.copy()
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()
