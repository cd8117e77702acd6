"""What every route shares: the configuration, the error envelope (`ApiError`, one place), and `Server`, the
state around one worker (submitting, waiting for a job, a failed job as an HTTP error)."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request

from ..errors import InputError
from ..worker import Job, QueueFull, ShuttingDown, Worker

log = logging.getLogger("zimage_mlx.server")

PACKAGE_DIR = Path(__file__).parent
OPENAI_DEFAULT_MODELS = re.compile(r"^(dall-e-[23]|gpt-image(-[a-z0-9.]+)*)$")  # what clients send unasked
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "host.docker.internal"}


@dataclass
class ServerConfig:
    model_id: str = "z-image-turbo"
    model_aliases: tuple = ()
    models: dict = field(default_factory=dict)  # the other served models: {name: (aliases...)}; model_id is the default
    api_key: str | None = None
    allowed_hosts: frozenset | None = frozenset(LOOPBACK_NAMES)  # None: no Host check
    max_side: int = 2048
    max_n: int = 8  # ComfyUI's OpenAI nodes allow n up to 8; the worker batches as many as fit
    max_steps: int = 50
    max_body: int = 64 * 2**20
    max_input_pixels: int = 4096 * 4096
    lora_dir: Path | None = None
    controlnet: str | None = None  # the name (no path) of the ControlNet loaded beside the model (serve --controlnet)
    default_width: int = 1024
    default_height: int = 1024
    default_steps: int = 8
    ping_seconds: float = 15.0
    keep_jobs: int = 64  # finished native jobs kept for GET /v1/jobs/{id}
    output_dir: Path | None = None  # every finished image written here and indexed (None: the last few in memory)
    history_keep: int = 200  # without output_dir: images kept in memory for GET /v1/history
    static_dir: Path = field(default_factory=lambda: PACKAGE_DIR / "static")

    def __post_init__(self):
        self.default_width = min(self.default_width, self.max_side // 16 * 16)
        self.default_height = min(self.default_height, self.max_side // 16 * 16)

    def model_ids(self) -> set[str]:
        return {m.lower() for m in (self.model_id, *self.model_aliases, "z-image-turbo", "x/z-image-turbo",
                                    "zimage-mlx") if m}

    def model_names(self) -> list[str]:
        """The served models' names, the default first."""
        return [self.model_id, *self.models]

    def find_model(self, name: str | None) -> str | None:
        """The served model that `name` is the name (or an alias) of, any case; None if none."""
        if not name:
            return None
        if name.lower() in self.model_ids():
            return self.model_id
        for served, aliases in self.models.items():
            if name.lower() in {m.lower() for m in (served, *aliases) if m}:
                return served
        return None

    def resolve_model(self, name: str | None) -> str | None:
        """The served model a request's `model` names, or None (unknown: 404). A served model's names, and for
        the default model no name and the names OpenAI clients send by default (dall-e-2, dall-e-3,
        gpt-image-*)."""
        if not name or OPENAI_DEFAULT_MODELS.match(name.lower()):
            return self.model_id
        return self.find_model(name)

    def unknown_model(self, name: str, param: str | None = "model") -> "ApiError":
        served = ", ".join(repr(m) for m in self.model_names())
        return ApiError(404, f"the model {name!r} does not exist; this server serves {served}", param,
                        "model_not_found", "invalid_request_error")


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    """An HTTP error in OpenAI's envelope."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_ or self.TYPES.get(status, "server_error"), param, code)
        self.headers = dict(headers or {})
        if status in (500, 507):
            self.headers.setdefault("x-should-retry", "false")

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse(self.body, self.status, headers=self.headers)


def bad(param: str | None, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def input_error(e: InputError, names: dict[str, str]) -> ApiError:
    """A Recipe's InputError as a 400 naming its field (and the fields its message names) as `names` says."""
    name = lambda f: names.get(f, f)  # noqa: E731
    return ApiError(400, " ".join(e.render(name).split()), name(e.field) if e.field else None, "invalid_value")


def load_failed(worker: Worker) -> ApiError:
    return ApiError(503, f"the model failed to load: {load_reason(worker)}; see the server log", None,
                    "model_load_failed", "server_error", {"x-should-retry": "false"})


def load_reason(worker: Worker) -> str | None:
    e = worker.load_error
    return None if e is None else (" ".join(str(e).split()) or type(e).__name__)


def load_state(worker: Worker) -> dict:
    """The model's state for /health and /v1/status: state (loading, ready, failed, stopped), and while
    loading the phase and fraction the loader reported, or when it failed the reason."""
    state = worker.state
    out = {"state": "loading" if state == "idle" else state}  # unloaded: freed while idle, loaded by the next job
    if out["state"] == "loading":
        out.update(phase=worker.load_progress.get("phase"), fraction=worker.load_progress.get("fraction"))
    if state == "failed":
        out["error"] = load_reason(worker)
    return out


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", None, "shutting_down", "server_error",
                    {"x-should-retry": "false"})


# ---------------------------------------------------------------------------------------------------
# The state the routes share


class Server:
    """One worker, the config, the native jobs kept by id, and the history of finished images."""

    def __init__(self, worker: Worker, cfg: ServerConfig):
        from ..history import open_history

        self.worker = worker
        self.cfg = cfg
        self.jobs: dict[str, Job] = {}
        self.history = open_history(cfg.output_dir, cfg.history_keep)
        worker.on_done = self.record

    def record(self, job: Job) -> None:
        """On the worker thread, before the job's `done`: each image into the history (job.history_ids)."""
        for data, recipe in zip(job.images, job.recipes):
            job.history_ids.append(self.history.add(data, recipe, job.options.output_format)["id"])

    def submit(self, recipe, model: str | None = None, **options) -> Job:
        """Queue a recipe on `model` (a served name; None or the default's name: the worker's default)."""
        try:
            return self.worker.submit(recipe, model=None if model in (None, self.cfg.model_id) else model, **options)
        except QueueFull:
            raise ApiError(503, f"the queue is full ({self.worker.queue_size} waiting); retry later", None,
                           "queue_full", "server_error", {"Retry-After": str(self.worker.retry_after())}) from None
        except ShuttingDown:
            raise (load_failed(self.worker) if self.worker.state == "failed" else shutting_down()) from None

    async def omni(self) -> bool:
        """Whether the served model is Z-Image-Omni (its edits take references). Until the model's first load
        has finished this is unknown: the request waits for it, as its job would wait in the queue anyway."""
        try:
            return await self.worker.wait_kind()
        except ShuttingDown:
            raise shutting_down() from None
        except BaseException:
            if self.worker.load_error is not None:
                raise load_failed(self.worker) from None
            raise

    async def run_sync(self, request: Request, job: Job) -> bool:
        """Wait for a submitted job; a client disconnect cancels it. False if the client left."""
        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        waiter = asyncio.ensure_future(job.wait())
        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiter, watcher):
                t.cancel()
            if not job.is_finished:
                self.worker.cancel(job, "disconnect")
        return waiter.done() and not waiter.cancelled()

    def job_error(self, job: Job, names: dict[str, str] | None = None) -> ApiError:
        """A failed or cancelled job as an HTTP error; an input error names its field by `names`."""
        if job.status == "cancelled":
            return shutting_down() if job.cancel_reason == "shutdown" else ApiError(400, "the job was cancelled",
                                                                                    None, "cancelled")
        e = job.error
        if e.kind == "input" and isinstance(e.exception, InputError):
            return input_error(e.exception, names or {})
        if e.kind == "input":
            return bad(None, e.message)
        if e.kind == "lora":
            message = e.message.replace(f"{self.cfg.lora_dir.resolve()}/", "") if self.cfg.lora_dir else e.message
            return bad((names or {}).get("loras", "loras"), f"cannot apply the LoRA: {message}", "invalid_lora")
        if e.kind == "oom":
            return ApiError(507, e.message, None, "insufficient_memory", "server_error")
        if e.kind == "shutdown":
            return shutting_down()
        if e.kind == "load":
            return load_failed(self.worker)
        return ApiError(500, f"{e.message}; see the server log", None, None, "server_error")
