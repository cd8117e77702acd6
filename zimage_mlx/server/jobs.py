"""The native job API: POST /v1/jobs (202), GET/DELETE /v1/jobs/{id}, its SSE events, its images, /v1/status.

Strict where the OpenAI routes are lenient: an unknown field is a 400 naming it. Fields are the Recipe's
names, but `n` (num_images) and `size` (width x height).
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..memory import memory_info
from ..omni import MAX_REFERENCES
from ..errors import InputError
from ..recipe import CONTROL_TYPES, Recipe
from ..worker import FORMATS, Job
from .core import ApiError, Server, ServerConfig, bad, input_error, load_state
from .fields import Fields, check_recipe, list_loras, parse_size, read_json, read_loras
from .fields import decode_base64_image, read_extras

NATIVE_FIELDS = frozenset({"prompt", "negative_prompt", "width", "height", "size", "steps", "seed", "n", "guidance",
                           "loras", "enhance", "output_format", "previews", "variety", "hires",
                           "image", "mask", "strength", "reference_images", "model",
                           "control", "control_type", "control_scale"})
CONTROL_FIELDS = ("control", "control_type", "control_scale")
NAMES = {"num_images": "n"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def parse_native(body: dict, cfg: ServerConfig, omni: bool = False) -> tuple[Recipe, dict]:
    """A job's body -> (the checked Recipe, the worker's options with `model`: the served model that runs it);
    `omni`: the served model is Z-Image-Omni (it takes reference_images)."""
    unknown = sorted(set(body) - NATIVE_FIELDS)
    if unknown:
        raise bad(unknown[0], f"unknown field {unknown[0]!r}; the fields are {', '.join(sorted(NATIVE_FIELDS))}",
                  "unknown_parameter")
    f = Fields(body, known=NATIVE_FIELDS)
    prompt = f.str("prompt", required=True)
    names = dict(NAMES)
    image, mask, strength = read_images(f, cfg)
    references = read_references(f, cfg, omni)
    control = read_control(f, cfg)
    if f.has("size"):
        if f.has("width") or f.has("height"):
            raise bad("size", "give size or width and height, not both")
        names.update(width="size", height="size")
        size = parse_size(f.str("size")) or (cfg.default_width, cfg.default_height)
    else:
        given_image = image is not None or control is not None  # the size follows the image (or control image)
        default = (None, None) if given_image else (cfg.default_width, cfg.default_height)
        size = (f.raw("width")[1] or default[0], f.raw("height")[1] or default[1])
    given = {k: v for k, v in (("steps", f.raw("steps")[1]), ("guidance", f.raw("guidance")[1]),
                               ("num_images", f.raw("n")[1])) if v is not None}
    recipe = Recipe(prompt=prompt, negative_prompt=f.str("negative_prompt") or None, width=size[0], height=size[1],
                    seed=f.seed("seed")[1], loras=read_loras(f.first("loras")[1], cfg), enhance=f.bool("enhance"),
                    **{"steps": cfg.default_steps, **given, **read_extras(f, names)})
    if references:
        recipe = recipe.replace(reference_images=[f"reference-{k + 1}.png" for k in range(len(references))],
                                reference_pixels=references)
    if image is not None:
        recipe = recipe.replace(image="image.png", init_image=image, init_mask=mask, strength=strength,
                                mask="mask.png" if mask is not None else None)
    if control is not None:
        recipe = with_control(recipe, control, cfg, names)
    model = cfg.resolve_model(f.str("model"))  # a served model's name; none: the default
    if model is None:
        raise cfg.unknown_model(f.str("model"))
    options = {"output_format": f.choice("output_format", FORMATS, "png"), "previews": f.bool("previews", True),
               "model": model}
    return check_recipe(recipe, cfg, names), options


def read_images(f: Fields, cfg: ServerConfig):
    """image (base64 or a data: URL), mask (the same; white = repaint) and strength: (image, mask, strength)."""
    image, mask, strength = f.first("image")[1], f.first("mask")[1], f.raw("strength")[1]
    if image is None:
        for name, value in (("mask", mask), ("strength", strength)):
            if value is not None:
                raise bad(name, f"{name} needs an image")
        return None, None, None
    image = decode_base64_image(image, "image", cfg).convert("RGB")
    mask = None if mask is None else decode_base64_image(mask, "mask", cfg).convert("L")
    return image, mask, strength


def read_control(f: Fields, cfg: ServerConfig):
    """control (base64 or a data: URL), control_type (none, canny, lines) and control_scale (default: the
    ControlNet's recommended one): (image, type, scale), or None without a control image. The ControlNet is
    the server's (serve --controlnet), never named by the request."""
    image, kind, scale = f.first("control")[1], f.choice("control_type", CONTROL_TYPES), f.raw("control_scale")[1]
    given = [name for name, v in zip(CONTROL_FIELDS, (image, kind, scale)) if v is not None]
    if given and cfg.controlnet is None:
        raise bad(given[0], f"{given[0]} needs a ControlNet: start the server with --controlnet FILE",
                  "unsupported_parameter")
    if image is None:
        for name in given:
            raise bad(name, f"{name} needs a control image (control)")
        return None
    return decode_base64_image(image, "control", cfg).convert("RGB"), kind or "none", scale


def with_control(recipe: Recipe, control, cfg: ServerConfig, names: dict) -> Recipe:
    """The recipe with its control: the map (control_type) computed at the output size, as the CLI makes it."""
    from ..controlnet import control_refs

    image, kind, scale = control
    names.update(controls="control_scale", control_type="control_type")
    init = None if recipe.init_image is None else recipe.init_image.size
    try:
        controls = control_refs([("control.png", scale, image)], kind, recipe.width, recipe.height, init)
    except InputError as e:
        if e.field is None:  # the map needs OpenCV, which this server lacks
            raise bad("control_type", " ".join(str(e).split()), "unsupported_parameter") from None
        raise input_error(e, {**names, "image": "image" if init else "control"}) from None
    return recipe.replace(controls=controls, control_type=kind)


def read_references(f: Fields, cfg: ServerConfig, omni: bool) -> list:
    """reference_images (a list of base64 images or data: URLs, at most MAX_REFERENCES; Z-Image-Omni only),
    opened; their sizes are the Recipe's to check."""
    value = f.first("reference_images")[1]
    if value is None:
        return []
    if not omni:
        raise bad("reference_images", "reference_images need a Z-Image-Omni model; this server's model takes an "
                  "image (image to image) instead", "unsupported_parameter")
    if not isinstance(value, list) or not value:
        raise bad("reference_images", "reference_images must be a list of 1 to 4 base64 images or data: URLs")
    if len(value) > MAX_REFERENCES:
        raise bad("reference_images", f"{len(value)} reference images: at most {MAX_REFERENCES}")
    return [decode_base64_image(v, "reference_images", cfg) for v in value]


def settings(job: Job) -> dict:
    r = job.recipe
    return {"prompt": r.prompt, "negative_prompt": r.negative_prompt, "width": r.width, "height": r.height,
            "steps": r.steps, "seed": r.seed, "n": r.num_images, "guidance": r.guidance,
            "loras": [{"name": x.name, "scale": x.scale} for x in r.loras or []],
            "output_format": job.options.output_format, "previews": job.options.previews, "enhance": r.enhance,
            "variety": r.variety, "control_type": r.control_type if r.controls else None,
            "control_scale": r.controls[0].scale if r.controls else None, "strength": r.strength if r.has_image else None, "hires": None if r.hires_scale is None else {
                "scale": r.hires_scale, "strength": r.hires_strength, "steps": r.hires_steps or r.steps,
                "upscaler": r.hires_upscaler}}


def image_entries(job: Job) -> list[dict]:
    entries = [{"url": f"/v1/jobs/{job.id}/images/{e.pop('index')}", **e} for e in job.image_entries()]
    for entry, history_id in zip(entries, job.history_ids):
        entry["history_id"] = history_id
    return entries


def routes(server: Server) -> list[Route]:
    api = JobRoutes(server)
    return [Route("/v1/jobs", api.create, methods=["POST"]), Route("/v1/jobs/{job_id}", api.get),
            Route("/v1/jobs/{job_id}", api.delete, methods=["DELETE"]), Route("/v1/jobs/{job_id}/events", api.events),
            Route("/v1/jobs/{job_id}/images/{index:int}", api.image), Route("/v1/status", api.status)]


class JobRoutes:
    def __init__(self, server: Server):
        self.server = server
        self.cfg = server.cfg

    def to_json(self, job: Job) -> dict:
        error = self.server.job_error(job, NAMES).body["error"] if job.status == "failed" else None
        return {"id": job.id, "status": job.status, "queue_position": job.position, "step": job.step,
                "total": job.total, "settings": settings(job), "images": image_entries(job), "error": error}

    def find(self, request) -> Job:
        job = self.server.jobs.get(request.path_params["job_id"])
        if job is None:
            raise ApiError(404, f"no job {request.path_params['job_id']!r}", "id", "job_not_found")
        return job

    def remember(self, job: Job) -> None:
        jobs = self.server.jobs
        jobs[job.id] = job
        finished = [j for j in jobs.values() if j.is_finished]
        for old in finished[: max(0, len(finished) - self.cfg.keep_jobs)]:
            del jobs[old.id]

    async def create(self, request: Request):
        body = await read_json(request)
        omni = await self.server.omni() if body.get("reference_images") is not None else False  # waits for the load
        recipe, options = parse_native(body, self.cfg, omni)
        job = self.server.submit(recipe, **options)
        self.remember(job)
        return JSONResponse({"id": job.id, "status": "queued", "queue_position": job.position,
                             "events_url": f"/v1/jobs/{job.id}/events"}, 202)

    async def get(self, request):
        return JSONResponse(self.to_json(self.find(request)))

    async def delete(self, request):
        job = self.find(request)
        self.server.worker.cancel(job, "user")
        return JSONResponse(self.to_json(job))

    async def events(self, request):
        job = self.find(request)

        async def stream():
            async for type_, data in job.stream(ping=self.cfg.ping_seconds):
                if type_ == "ping":
                    yield ": ping\n\n"
                elif type_ != "partial":
                    yield f"event: {type_}\ndata: {json.dumps(self.event_data(job, type_, data))}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def event_data(self, job: Job, type_: str, data: dict) -> dict:
        """The worker's event as this API shows it: images with their URLs, errors in the envelope."""
        if type_ == "done":
            return {**data, "images": image_entries(job)}
        if type_ == "failed":
            return self.server.job_error(job, NAMES).body
        return data

    async def image(self, request):
        job = self.find(request)
        k = request.path_params["index"]
        if job.status != "completed" or not 0 <= k < len(job.images):
            raise ApiError(404, f"job {job.id} has no image {k}" + ("" if job.status == "completed" else
                                                                     f" (it is {job.status})"), "index", "image_not_found")
        ext = EXTENSIONS[job.options.output_format]
        return Response(job.images[k], media_type=job.media_type,
                        headers={"Content-Disposition": f'inline; filename="zimage-{job.seeds[k]}.{ext}"'})

    async def status(self, request):
        worker, cfg = self.server.worker, self.cfg
        running = worker.running
        return JSONResponse({
            "model": cfg.model_id, "models": cfg.model_names(),
            "loaded_model": None if worker.pipeline is None and worker.state != "loading" else
            (cfg.model_id if worker.model is None else worker.model), **load_state(worker), "running": running.id if running else None,
            "queue": [j.id for j in worker.queued()], "queue_size": worker.queue_size,
            "limits": {"max_side": cfg.max_side, "max_n": cfg.max_n, "max_steps": cfg.max_steps},
            "defaults": {"width": cfg.default_width, "height": cfg.default_height, "steps": cfg.default_steps},
            "loras": list_loras(cfg), "controlnet": cfg.controlnet, "resident": worker.pipeline is not None, "loads": worker.loads,
            "idle_unload": worker.idle_unload, "memory": memory_info(), "output_dir": cfg.output_dir is not None})
