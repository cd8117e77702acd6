"""A worker for apps: one thread owns the pipeline and runs queued `Recipe`s one at a time, in order.

Nothing here knows HTTP (the server, a GUI or a script use it alike). The worker thread loads the pipeline
(a `ZImagePipeline`, or anything with its `run`/`fast_preview`) and makes every call on it, because MLX
streams belong to the thread that made them; what it hands out is bytes (images encoded with their recipe
in their metadata) and plain data, never an mx.array.

Each job runs as one `pipeline.run(recipe, on_step=, cancel=, on_enhanced=)`: the recipe carries the
seed, the LoRAs and the prompt enhancement, so the worker has no rule of its own about them.

Events (`Job.events`, `Job.subscribe`, `Job.stream`): queued {position}, started {total}, step {step, total,
preview?}, partial {index, b64}, enhanced {index, seed, prompt}, done {images, seconds}, failed {error},
cancelled {}. The last three end a job.

    worker = Worker(lambda: ZImagePipeline.from_pretrained(model))
    worker.start()  # or start(wait=False): jobs submitted while it loads wait in the queue
    job = worker.submit(Recipe("a fox", width=512, height=512, seed=1), output_format="png")
    job.done.wait(); job.images  # PNG bytes, replayable with `zimage-mlx generate --from-image`
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
from dataclasses import dataclass, field as _field
from typing import Callable

from .errors import Cancelled, InputError, LoraError, ZImageError
from .metadata import exif
from .recipe import Recipe

log = logging.getLogger("zimage_mlx.worker")

TERMINAL = ("done", "failed", "cancelled")
FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PREVIEW_SIDE = 512  # step previews are at most this many pixels a side


class QueueFull(Exception):
    """The queue holds `queue_size` waiting jobs already."""


class ShuttingDown(Exception):
    """The worker is stopping (or its pipeline failed to load) and takes no new jobs."""


@dataclass
class Options:
    """How a job's images are handed out (nothing here changes the pixels)."""

    output_format: str = "png"
    output_compression: int | None = None  # 0..100 for jpeg/webp (quality); None: 100
    previews: bool = False  # a JPEG preview with every step event
    partial_steps: frozenset = frozenset()  # steps (1-based) after which a full-size partial image is sent
    batch_size: int | None = None  # images denoised at once (None: as many as fit, `auto_batch_size`)

    def __post_init__(self):
        if self.output_format not in FORMATS:
            raise ValueError(f"output_format must be one of {', '.join(FORMATS)}, got {self.output_format!r}")
        self.partial_steps = frozenset(self.partial_steps)


@dataclass
class JobError:
    """Why a job failed. kind: input (a ZImageError a user can fix; `field` names the Recipe field), lora,
    oom, shutdown, load (the pipeline never loaded) or bug (anything else: its traceback is logged)."""

    kind: str
    message: str
    field: str | None = None
    exception: BaseException | None = _field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "field": self.field}


class Job:
    """A recipe in the queue: its state, its results and its event log."""

    def __init__(self, recipe: Recipe, options: Options | None = None, model: str | None = None):
        self.id = "job_" + secrets.token_hex(8)
        self.recipe = recipe
        self.options = options or Options()
        self.model = model  # the name of the worker's loader it runs on (None: a one-model worker's)
        self.status = "queued"  # queued | running | completed | failed | cancelled
        self.cancel = threading.Event()
        self.cancel_reason: str | None = None  # the caller's word: user, disconnect, shutdown, interrupt...
        self.done = threading.Event()  # set when the job has ended, however
        self.position: int | None = None
        self.step = 0
        self.total = _denoising_steps(recipe)
        self.images: list[bytes] = []  # encoded, with metadata
        self.recipes: list[Recipe] = []  # each image's own recipe (what its metadata holds)
        self.revised_prompts: list[str] = []  # with enhance: the rewrite each image was made from
        self.history_ids: list[str] = []  # what `Worker.on_done` recorded them as (e.g. a history's ids)
        self.error: JobError | None = None
        self.preview_b64: str | None = None  # the newest step's JPEG preview
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.timings: dict = {}
        self.events: list[tuple[str, dict]] = []
        self._subs: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._lock = threading.RLock()

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.options.output_format]

    @property
    def is_finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.recipes]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [(r.width, r.height) for r in self.recipes]

    def image_entries(self) -> list[dict]:
        """What `done` reports of each image: index, seed, size, and its rewritten prompt with enhance."""
        entries = [{"index": k, "seed": r.seed, "width": r.width, "height": r.height}
                   for k, r in enumerate(self.recipes)]
        for entry, revised in zip(entries, self.revised_prompts):
            entry["revised_prompt"] = revised
        return entries

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
        if type_ in TERMINAL:
            self.done.set()

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


class Worker:
    """Owns the pipeline on one thread and runs queued jobs one at a time, in order.

    `load_pipeline()` runs on the worker thread and returns the pipeline: an object with ZImagePipeline's
    `run(recipe, on_step=, cancel=, on_enhanced=, batch_size=)` and `fast_preview(step, size=)`.
    `queue_size` bounds the jobs waiting (the running one not counted).

    Several models: `load_pipeline` may be a dict {name: loader}; the first is the default (loaded at start),
    a job names its model (`submit(..., model=name)`), and one pipeline is resident at a time: before a job
    on another model the worker drops the current one and loads that one (state "loading" meanwhile).
    `model` names the pipeline loaded last (resident while `pipeline` is set, or loading).

    `state`: idle (not started), loading, ready, unloaded, failed (`load_error` says why) or stopped. While
    it loads, `load_progress` is {"phase", "fraction"} as the load function reports it with `report_load`;
    jobs submitted meanwhile wait in the queue, and fail (kind "load") if the load fails.

    Memory: after `idle_unload` seconds without a job (None: never), or when `unload()` asks, the worker
    drops the pipeline and MLX's cache (state "unloaded"); the next job loads it again first ("loading").
    `on_done(job)`, if set, runs on the worker thread for every completed job before its `done` event.

    `omni`: whether the loaded pipeline is Z-Image-Omni (takes reference images: `siglip_processor` is set),
    read on the worker thread when a load succeeds; None until the first load has (kept while unloaded: the
    same load function loads the same kind). `wait_kind()` waits for it.
    """

    def __init__(self, load_pipeline: Callable[[], object] | dict[str, Callable[[], object]], queue_size: int = 8,
                 *, name: str = "zimage-worker", idle_unload: float | None = None):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.loaders: dict = dict(load_pipeline) if isinstance(load_pipeline, dict) else {None: load_pipeline}
        if not self.loaders:
            raise ValueError("no model to load")
        self.default_model = next(iter(self.loaders))
        self.load_pipeline = self.loaders[self.default_model]
        self.model = None  # the name of the pipeline loaded last (resident while `pipeline` is set)
        self.queue_size = queue_size
        self.pipeline = None
        self.running: Job | None = None
        self.stopping = False
        self.last_job_seconds = 0.0
        self.thread_ident: int | None = None
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self.load_error: BaseException | None = None
        self.load_progress: dict = {"phase": None, "fraction": None}
        self._state = "idle"
        self.idle_unload = idle_unload
        self.on_done: Callable[[Job], None] | None = None
        self.loads = 0  # how many times the pipeline was loaded
        self.omni: bool | None = None  # the loaded pipeline is Z-Image-Omni (None: not loaded yet)
        self._last_active = time.monotonic()
        self._unload_asked = False
        self._unloaded = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # -- life cycle -----------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """idle, loading, ready, failed or stopped."""
        return "stopped" if self.stopping and self._state in ("ready", "unloaded") else self._state

    def start(self, timeout: float | None = None, *, wait: bool = True) -> None:
        """Start the worker thread, which loads the pipeline. With `wait` (the default), wait until it has
        loaded and re-raise a load failure here; without, return at once (see `state`, `wait_loaded`)."""
        self._state = "loading"
        self._thread.start()
        if wait:
            self.wait_loaded(timeout)

    def wait_loaded(self, timeout: float | None = None) -> None:
        """Wait until the pipeline has loaded; re-raise a load failure. TimeoutError if it takes longer."""
        if not self._ready.wait(timeout):
            raise TimeoutError("the pipeline did not load in time")
        if self.load_error is not None:
            raise self.load_error

    async def wait_kind(self, poll: float = 0.05) -> bool:
        """(async) Whether the pipeline is Omni, waiting for its first load if need be; re-raises a load failure
        (ShuttingDown if the worker stopped before loading)."""
        while self.omni is None:
            if self.load_error is not None:
                raise self.load_error
            if self.stopping:
                raise ShuttingDown()
            await asyncio.sleep(poll)
        return self.omni

    def report_load(self, phase: str, fraction: float | None = None) -> None:
        """For the load function (any thread): what it is doing now (e.g. download, load) and how far."""
        self.load_progress = {"phase": phase, "fraction": fraction}

    def shutdown(self, wait: float | None = None) -> None:
        """Refuse new jobs, fail the queued ones (kind "shutdown"), cancel the running one, stop the thread."""
        with self._cond:
            self.stopping = True
            queued = list(self._queue)
            self._queue.clear()
            running = self.running
            self._cond.notify_all()
        for job in queued:
            job.cancel_reason = "shutdown"
            job.cancel.set()
            self._fail(job, JobError("shutdown", "the worker is shutting down"))
        if running is not None:
            running.cancel_reason = running.cancel_reason or "shutdown"
            running.cancel.set()
        if wait is not None and self._thread.is_alive():
            self._thread.join(wait)

    # -- any thread -----------------------------------------------------------------------------------
    def submit(self, recipe: Recipe, *, model: str | None = None, **options) -> Job:
        """Queue a recipe on `model` (a name of the loaders; None: the default); `options` are `Options` fields.
        Returns the job (`job.position`: 0 = next). Raises QueueFull or ShuttingDown, KeyError for an unknown
        model. The recipe is checked when it runs (a failed job, kind input)."""
        model = self.default_model if model is None else model
        if model not in self.loaders:
            raise KeyError(f"no model {model!r}")
        job = Job(recipe, Options(**options), model)
        with self._cond:
            if self.stopping:
                raise ShuttingDown()
            if len(self._queue) >= self.queue_size:
                raise QueueFull()
            self._queue.append(job)
            job.position = len(self._queue) - 1
            job.emit("queued", {"position": job.position})
            self._cond.notify_all()
        return job

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

    def unload(self, timeout: float | None = None) -> bool:
        """Ask the worker to free the pipeline as soon as it is idle (after the queued jobs). Waits up to
        `timeout` seconds (None: forever; 0: not at all); True once nothing is resident."""
        with self._cond:
            if self.pipeline is None and self._state != "loading":
                return True
            self._unloaded.clear()
            self._unload_asked = True
            self._cond.notify_all()
        return self._unloaded.wait(timeout) if timeout != 0 else False

    def queued(self) -> list[Job]:
        with self._cond:
            return list(self._queue)

    def retry_after(self) -> int:
        """Seconds a refused caller should wait: about the queue's length times the last job's time."""
        with self._cond:
            waiting = len(self._queue) + 1
        return int(min(120, max(1, round(waiting * (self.last_job_seconds or 1.0)))))

    # -- the worker thread ----------------------------------------------------------------------------
    def _main(self) -> None:
        self.thread_ident = threading.get_ident()
        if not self._load(self.default_model):
            return
        self._ready.set()
        while (job := self._take()) is not None:
            try:
                if self.pipeline is not None and job.model != self.model:  # another model: one at a time
                    log.info("swapping models: %s -> %s", self.model, job.model)
                    self._drop()
                if self.pipeline is None and not self._load(job.model):  # unloaded (idle, or swapped): load first
                    self._fail(job, JobError("load", f"the model failed to load: {self.load_error}", None,
                                             self.load_error))
                    return
                self._run(job)
            finally:
                with self._cond:
                    self.running = None
                self._last_active = time.monotonic()

    def _load(self, model) -> bool:
        self._state, self.model = "loading", model
        self.load_progress = {"phase": None, "fraction": None}
        try:
            self.pipeline = self.loaders[model]()
        except BaseException as e:  # noqa: BLE001 - handed to start() / wait_loaded(), and in `state`
            self._load_failed(e)
            return False
        self.loads += 1
        self.omni = getattr(self.pipeline, "siglip_processor", None) is not None
        self._state = "ready"
        self._last_active = time.monotonic()
        return True

    def _unload(self) -> None:
        """On the worker thread: drop the pipeline (its arrays are freed with it), MLX's buffer cache and the
        memory malloc keeps free (`release_memory`)."""
        if self.pipeline is not None:
            self._drop()
            log.info("models unloaded (%s)", "asked" if self._unload_asked else f"idle {self.idle_unload:g} s")
        self._state = "unloaded"
        self._unload_asked = False
        self._unloaded.set()

    def _drop(self) -> None:
        import gc

        self.pipeline = None
        gc.collect()
        release_memory()

    def _idle_wait(self) -> float | None:
        """How long the queue may stay empty before the pipeline is unloaded (0: now; None: never)."""
        if self.pipeline is None:
            return None
        if self._unload_asked:
            return 0.0
        if self.idle_unload is None:
            return None
        return max(0.0, self._last_active + self.idle_unload - time.monotonic())

    def _load_failed(self, e: BaseException) -> None:
        """No pipeline: refuse new jobs and fail the queued ones (kind "load")."""
        self.load_error = e
        with self._cond:
            self._state, self.stopping = "failed", True
            queued = list(self._queue)
            self._queue.clear()
        message = f"the model failed to load: {' '.join(str(e).split()) or type(e).__name__}"
        for job in queued:
            self._fail(job, JobError("load", message, None, e))
        self._ready.set()

    def _take(self) -> Job | None:
        """The next job, waiting for one; meanwhile unload the pipeline when `_idle_wait` says so."""
        while True:
            with self._cond:
                while not self._queue and not self.stopping and (wait := self._idle_wait()) != 0.0:
                    self._cond.wait(wait)
                if self.stopping:
                    return None
                if self._queue:
                    job = self._queue.popleft()
                    self.running = job
                    job.position = None
                    self._renumber()
                    return job
            self._unload()

    def _renumber(self) -> None:
        """Tell every queued job whose position changed (call with the lock held)."""
        for i, j in enumerate(self._queue):
            if j.position != i:
                j.position = i
                j.emit("queued", {"position": i})

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():
            self._finish_cancelled(job)
            return
        job.status, job.started = "running", time.time()
        job.timings["queue_s"] = round(job.started - job.created, 4)
        job.emit("started", {"total": job.total})
        t0 = time.perf_counter()
        try:
            images = self.pipeline.run(job.recipe, on_step=self._on_step(job), cancel=job.cancel,
                                       on_enhanced=lambda k, r: self._on_enhanced(job, k, r),
                                       batch_size=self._batch_size(job))
            t1 = time.perf_counter()
            recipes = [image_recipe(job.recipe, im) for im in images]
            encoded = [encode_image(im, job.options.output_format, job.options.output_compression, r)
                       for im, r in zip(images, recipes)]
            job.timings.update(generate_s=round(t1 - t0, 4), encode_s=round(time.perf_counter() - t1, 4))
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's error
            self._failed(job, e)
            return
        job.images, job.recipes = encoded, recipes
        if self.on_done is not None:
            try:
                self.on_done(job)
            except Exception:  # noqa: BLE001 - the images are made: a failure to record them is only logged
                log.error("job %s: recording its images failed:\n%s", job.id, traceback.format_exc())
        job.finished = time.time()
        self.last_job_seconds = job.finished - job.started
        job.status = "completed"
        job.emit("done", {"images": job.image_entries(), "seconds": round(job.finished - job.started, 4)})
        r = recipes[0] if recipes else job.recipe
        log.info("job %s done: %sx%s steps=%d images=%d seed=%s in %.2f s", job.id, r.width, r.height, r.steps,
                 len(recipes), r.seed, job.finished - job.started)

    def _batch_size(self, job: Job) -> int | None:
        """The job's batch_size, else as many images as fit (the pipeline's `auto_batch_size`, as the CLI
        does), else all at once."""
        auto = getattr(self.pipeline, "auto_batch_size", None)
        if job.options.batch_size is not None or auto is None:
            return job.options.batch_size
        try:
            r = job.recipe.settle()
            return auto(r.width, r.height)
        except Exception:  # noqa: BLE001 - a recipe the run will refuse: its error comes then
            return None

    def _on_step(self, job: Job):
        o, pipe = job.options, self.pipeline
        partials = sorted(o.partial_steps)

        def on_step(step) -> None:
            job.step, job.total = step.index + 1, step.total
            data = {"step": job.step, "total": step.total}
            partial = job.step in o.partial_steps
            if o.previews or partial:
                # A partial image is full size; a step preview is mapped straight to its wire size.
                full = pipe.fast_preview(step)[0] if partial else None
                if o.previews:
                    job.preview_b64 = preview_jpeg(full or pipe.fast_preview(step, size=preview_size(step))[0])
                    data["preview"] = job.preview_b64
                if partial:
                    b64 = base64.b64encode(encode_image(full, o.output_format, o.output_compression)).decode()
                    job.emit("partial", {"index": partials.index(job.step), "b64": b64})
            job.emit("step", data)

        return on_step

    def _on_enhanced(self, job: Job, k: int, recipe: Recipe) -> None:
        job.revised_prompts.append(recipe.prompt)
        job.emit("enhanced", {"index": k, "seed": recipe.seed, "prompt": recipe.prompt})

    def _failed(self, job: Job, e: Exception) -> None:
        if isinstance(e, Cancelled) or job.cancel.is_set():
            self._finish_cancelled(job)
        elif isinstance(e, LoraError):
            self._fail(job, JobError("lora", " ".join(str(e).split()), "loras", e))
        elif isinstance(e, ZImageError):  # what a user can fix; any other error is a bug
            field = e.field if isinstance(e, InputError) else None
            self._fail(job, JobError("input", " ".join(str(e).split()), field, e))
        elif is_out_of_memory(e):
            clear_cache()
            self._fail(job, JobError("oom", "out of memory: try a smaller size or fewer images, or load the model in low-memory mode",
                                     None, e))
        else:
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            self._fail(job, JobError("bug", f"the pipeline failed ({type(e).__name__})", None, e))

    def _finish_cancelled(self, job: Job) -> None:
        if job.is_finished:
            return
        job.status, job.finished, job.position = "cancelled", time.time(), None
        job.emit("cancelled", {})

    def _fail(self, job: Job, error: JobError) -> None:
        if job.is_finished:
            return
        job.status, job.finished, job.position, job.error = "failed", time.time(), None, error
        job.emit("failed", {"error": error.to_dict()})


# ---------------------------------------------------------------------------------------------------
# Helpers


def _denoising_steps(recipe: Recipe) -> int:
    try:
        return recipe.denoising_steps
    except Exception:  # noqa: BLE001 - a recipe the run will refuse: its error comes then
        return recipe.steps if isinstance(recipe.steps, int) else 0


def image_recipe(recipe: Recipe, image) -> Recipe:
    """The recipe an image was made with: the pipeline's (`image.info["recipe"]`), else the job's with the
    image's seed and size."""
    made = image.info.get("recipe")
    if isinstance(made, Recipe):
        return made
    return recipe.replace(seed=image.info.get("seed", recipe.seed), num_images=1, width=image.width,
                          height=image.height)


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


def release_memory() -> None:
    """After the models are dropped: MLX's buffer cache, then what malloc keeps free (Linux CPU runs keep
    freed memory, `kernels.keep_freed_memory`), back to the OS, so the resident set falls."""
    clear_cache()
    try:
        from . import kernels

        kernels.release_freed_memory()
    except Exception:  # noqa: BLE001 - best effort (no MLX: a fake engine)
        pass


def encode_image(image, fmt: str = "png", compression: int | None = None, recipe: Recipe | None = None) -> bytes:
    """A PIL image -> bytes with `recipe` in its metadata: PNG text chunks (`Recipe.to_png`), or A1111's
    infotext as the EXIF UserComment of a JPEG or WebP. Nothing else (no path from this disk) is written."""
    buf = io.BytesIO()
    if fmt == "png":  # lossless at any level; level 1 encodes ~2x faster than the default 6 for ~15 % more bytes
        image.save(buf, format="PNG", compress_level=1, pnginfo=recipe.to_png() if recipe is not None else None)
        return buf.getvalue()
    quality = 100 if compression is None else int(compression)
    extra = {"exif": exif(recipe.to_infotext())} if recipe is not None else {}
    image.convert("RGB").save(buf, format="JPEG" if fmt == "jpeg" else "WEBP", quality=quality, **extra)
    return buf.getvalue()


def preview_size(step) -> tuple[int, int]:
    """The step preview's (W, H): the image's size (8 pixels per latent) scaled down to at most PREVIEW_SIDE."""
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
