"""The OpenAI Images dialect: /v1/images/generations and /v1/images/edits (JSON, forms, SSE streams) and /v1/models.

A request parses into a `Recipe` (checked by its own rules: `fields.check_recipe`) and the output options;
what only this dialect decides is checked here: the model name, response_format, background, output formats,
partial images, and the fields it refuses. Recipe fields are named as the client named them: num_images is
`n`, steps `steps` or `num_inference_steps`, a size given as `size` is `size`.
"""

from __future__ import annotations

import base64
import json
import time

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..omni import MAX_REFERENCES
from ..recipe import Recipe, file_name as recorded_name
from ..worker import FORMATS, Job
from .core import ApiError, Server, ServerConfig, bad
from .fields import Fields, check_recipe, decode_base64_image, decode_image, parse_size, read_json, read_loras
from .fields import read_extras

OPENAI_SIZES = {"256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792"}
STREAM_SIZES = {"1024x1024", "1024x1536", "1536x1024"}
ZERO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
              "output_tokens": 0, "total_tokens": 0}
# Read and honoured; accepted and ignored (they change nothing visible); refused with a 400 naming them.
GENERATION_FIELDS = frozenset({
    "prompt", "negative_prompt", "model", "n", "size", "width", "height", "steps", "num_inference_steps", "guidance",
    "guidance_scale", "seed", "rng_seed", "loras", "enhance", "response_format", "background", "output_format",
    "output_compression", "stream", "partial_images", "variety", "hires"})
EDIT_FIELDS = GENERATION_FIELDS | {"image", "mask", "strength", "denoising_strength"}
IGNORED = frozenset({"quality", "style", "user", "moderation"})
REFUSED = ("sampler", "sampler_name", "scheduler", "cfg_normalization", "cfg_truncation", "latents", "clip_skip",
           "lora", "image_latents")
IMAGE_ONLY = ("image", "mask", "strength", "denoising_strength")  # refused on generations


def partial_steps(steps: int, count: int) -> frozenset:
    """The steps (1-based, before the last) after which `count` partial images are sent, evenly spread."""
    return frozenset(s for s in (round(steps * (i + 1) / (count + 1)) for i in range(count)) if 1 <= s < steps)


# ---------------------------------------------------------------------------------------------------
# Request -> Recipe


def parse_openai(f: Fields, cfg: ServerConfig, *, any_model: bool, edit: bool = False, image=None, mask=None,
                 image_name: str | None = None, mask_name: str | None = None,
                 references: tuple | None = None) -> tuple[Recipe, dict, dict]:
    """OpenAI fields (and for edits the opened image and mask, or with a Z-Image-Omni model `references`:
    (param, file names, opened images), the prompt their instruction) -> (the checked Recipe, the worker's
    options, what the response needs: stream, partial_images)."""
    for name in REFUSED + (() if edit else IMAGE_ONLY):
        if f.has(name):
            raise bad(name, f"{name} is not supported on this route" + (
                "; use /v1/images/edits for images" if name in IMAGE_ONLY else ""), "unsupported_parameter")
    prompt = f.str("prompt", required=True)
    if not prompt.strip():
        raise bad("prompt", "prompt must not be empty", "missing_required_parameter")
    served = check_openai_only(f, cfg, any_model)
    names = {"num_images": "n"}
    if references is not None:
        for name in ("strength", "denoising_strength"):
            if f.has(name):
                raise bad(name, f"{name} does not apply to a Z-Image-Omni edit: the images given are references "
                          "and the prompt says what to make of them", "unsupported_parameter")
        names["reference_images"] = references[0]
    width, height = read_size(f, cfg, names, edit)
    fields = {}
    for field, aliases in (("steps", ("steps", "num_inference_steps")), ("guidance", ("guidance", "guidance_scale")),
                           ("num_images", ("n",)), *((("strength", ("strength", "denoising_strength")),) if edit else ())):
        name, value = f.raw(*aliases)
        names[field] = name
        if value is not None:
            fields[field] = value
    names["seed"], seed = f.seed("seed", "rng_seed")
    recipe = Recipe(prompt=prompt, negative_prompt=f.str("negative_prompt") or None, width=width, height=height,
                    seed=seed, loras=read_loras(f.first("loras")[1], cfg, strings=f.strings), enhance=f.bool("enhance"),
                    **{"steps": cfg.default_steps, **fields, **read_extras(f, names)})
    if references is not None:
        recipe = recipe.replace(reference_images=list(references[1]), reference_pixels=list(references[2]))
    elif edit:
        recipe = recipe.replace(image=image_name or "image.png", init_image=image, init_mask=mask,
                                mask=(mask_name or "mask.png") if mask is not None else None)
    recipe = check_recipe(recipe, cfg, names)
    stream, partial = f.bool("stream"), f.int("partial_images", 0, 0, 3)
    options = {"output_format": f.choice("output_format", FORMATS, "png"),
               "output_compression": f.int("output_compression", None, 0, 100),
               "partial_steps": partial_steps(recipe.denoising_steps, partial) if stream and partial else frozenset()}
    return recipe, options, {"stream": stream, "names": names, "model": served, "requested_model": f.str("model"),
                             "comments": []}


def check_openai_only(f: Fields, cfg: ServerConfig, any_model: bool) -> str:
    """The fields only this dialect has: the model's name (-> the served model that runs), response_format,
    background. Under /proxy/openai (ComfyUI's nodes) a name that is no served model's runs the default one."""
    model = f.str("model")
    served = cfg.resolve_model(model) or (cfg.model_id if any_model else None)
    if served is None:
        e = cfg.unknown_model(model)
        e.body["error"]["message"] += " (the first also as dall-e-2, dall-e-3 or gpt-image-*)"
        raise e
    if f.str("response_format") not in (None, "b64_json"):
        raise bad("response_format", "only response_format b64_json is supported (images are returned inline)",
                  "unsupported_value")
    if f.str("background") not in (None, "auto", "opaque"):
        raise bad("background", "background must be auto or opaque: this model cannot make transparent images",
                  "unsupported_value")
    return served


def read_size(f: Fields, cfg: ServerConfig, names: dict, edit: bool) -> tuple:
    """(width, height) from `size` or width/height (None, None: an edit's image decides; a generation's default)."""
    if f.has("size"):
        if f.has("width") or f.has("height"):
            raise bad("size", "give size or width and height, not both")
        names.update(width="size", height="size")
        size = parse_size(f.str("size"))
    elif f.has("width") or f.has("height"):
        size = (f.raw("width")[1] or cfg.default_width, f.raw("height")[1] or cfg.default_height)
    else:
        size = None
    return size or ((None, None) if edit else (cfg.default_width, cfg.default_height))


def refuse_mask(mask) -> None:
    if mask:
        raise bad("mask", "this server's model is Z-Image-Omni: its edits take reference images and a prompt, not "
                  "a mask", "unsupported_parameter")


def check_count(n: int, param: str) -> None:
    if n > MAX_REFERENCES:
        raise bad(param, f"{n} images: a Z-Image-Omni edit takes at most {MAX_REFERENCES} (its references)")


def has_alpha(im) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def alpha_mask(im):
    """OpenAI's convention (transparent = repaint) -> ours: an "L" mask, white where to repaint."""
    from PIL import ImageOps

    return ImageOps.invert(im.convert("RGBA").getchannel("A"))


def edit_inputs(image, mask):
    """The RGB image and the white-is-repaint mask (or None) of an OpenAI edit: the mask's alpha, else the
    image's own transparency (DALL-E 2 style). The mask's size is the Recipe's to check."""
    if mask is not None:
        if not has_alpha(mask):
            raise bad("mask", "the mask must have an alpha channel: fully transparent pixels mark where to edit",
                      "invalid_mask")
        mask = alpha_mask(mask)
    elif has_alpha(image) and image.convert("RGBA").getchannel("A").getextrema()[0] < 128:
        mask = alpha_mask(image)
    return image.convert("RGB"), mask


# ---------------------------------------------------------------------------------------------------
# Routes


def routes(server: Server) -> list[Route]:
    api = OpenAIRoutes(server)
    out = []
    for path, endpoint, methods in (("/v1/images/generations", api.generations, ["POST"]),
                                    ("/v1/images/edits", api.edits, ["POST"]),
                                    ("/v1/images/variations", api.variations, ["POST"])):
        name = path.rsplit("/", 1)[1]
        out += [Route(p, endpoint, methods=methods) for p in (path, f"/images/{name}", f"/proxy/openai/images/{name}")]
    for path in ("/v1/models", "/models"):
        out.append(Route(path, api.models))
    for path in ("/v1/models/{model_id:path}", "/models/{model_id:path}"):
        out.append(Route(path, api.model))
    return out


class OpenAIRoutes:
    def __init__(self, server: Server):
        self.server = server
        self.cfg = server.cfg

    async def generations(self, request: Request):
        f = Fields(await read_json(request), known=GENERATION_FIELDS | frozenset(REFUSED + IMAGE_ONLY))
        recipe, options, meta = parse_openai(f, self.cfg, any_model=request.url.path.startswith("/proxy/"))
        return await self.run(request, recipe, options, meta, "image_generation")

    async def edits(self, request: Request):
        ctype = request.headers.get("content-type", "")
        form = ctype.startswith("multipart/form-data")
        if not form and "json" not in ctype:
            raise ApiError(415, "send multipart/form-data (or JSON with a base64 image)", None, "unsupported_media_type")
        omni = await self.server.omni()  # waits for the model's first load: the job would wait for it anyway
        if form:
            f, image, mask, names, count = await self.read_edit_form(request, omni)
        else:
            f, image, mask, count = self.read_edit_json(await read_json(request), omni)
            names = (None, None)
        if omni:  # Z-Image-Omni: every image is a reference, the prompt the instruction
            recipe, options, meta = parse_openai(f, self.cfg, any_model=request.url.path.startswith("/proxy/"),
                                                 edit=True, references=image)
            return await self.run(request, recipe, options, meta, "image_edit")
        image, mask = edit_inputs(image, mask)
        recipe, options, meta = parse_openai(f, self.cfg, any_model=request.url.path.startswith("/proxy/"), edit=True,
                                             image=image, mask=mask, image_name=names[0], mask_name=names[1])
        if count > 1:  # Open WebUI sends a chat's images as image[] parts, ComfyUI a batch: the first is edited
            meta["comments"].append(f"edited the first of the {count} images given; this model edits one image")
        return await self.run(request, recipe, options, meta, "image_edit")

    def read_edit_json(self, body: dict, omni: bool = False):
        images, count = body.get("image"), 1
        if omni:  # (param, names, opened images) of every image: Z-Image-Omni's references
            refuse_mask(body.get("mask"))
            images = images if isinstance(images, list) else [] if images is None else [images]
            if not images:
                raise bad("image", "image is required", "missing_required_parameter")
            check_count(len(images), "image")
            opened = [decode_base64_image(x, "image", self.cfg) for x in images]
            refs = ("image", [f"image-{k + 1}.png" for k in range(len(opened))], opened)
            rest = {k: v for k, v in body.items() if k not in ("image", "mask")}
            return Fields(rest, known=EDIT_FIELDS | frozenset(REFUSED)), refs, None, len(opened)
        if isinstance(images, list):
            if not images:
                raise bad("image", "image is required", "missing_required_parameter")
            images, count = images[0], len(images)
        if images is None:
            raise bad("image", "image is required", "missing_required_parameter")
        image = decode_base64_image(images, "image", self.cfg)
        mask = decode_base64_image(body["mask"], "mask", self.cfg) if body.get("mask") else None
        rest = {k: v for k, v in body.items() if k not in ("image", "mask")}
        return Fields(rest, known=EDIT_FIELDS | frozenset(REFUSED)), image, mask, count

    async def read_edit_form(self, request: Request, omni: bool = False):
        try:
            form = await request.form(max_files=17, max_fields=64, max_part_size=1024 * 1024)
        except Exception as e:  # noqa: BLE001 - Starlette's MultiPartException / HTTPException
            raise bad(None, f"cannot read the form: {getattr(e, 'detail', None) or e}", "invalid_form") from None
        try:
            values, files = {}, {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    files.setdefault(key, []).append(value)
                else:
                    values[key] = value
            uploads = files.get("image", []) + files.get("image[]", [])
            if not uploads:
                raise bad("image", "image is required (a file part named image or image[])", "missing_required_parameter")
            if len(files.get("mask", [])) > 1:
                raise bad("mask", "give at most one mask")
            for key in ("image", "image[]", "mask"):
                if key in values:
                    raise bad(key, f"{key} must be a file part")
            if omni:  # (param, file names, opened images) of every upload: Z-Image-Omni's references
                param = "image[]" if files.get("image[]") else "image"
                refuse_mask(files.get("mask") or values.get("mask"))
                check_count(len(uploads), param)
                refs = (param, [file_name(u) for u in uploads], [decode_image(await u.read(), param, self.cfg)
                                                                 for u in uploads])
                return (Fields(values, strings=True, known=EDIT_FIELDS | frozenset(REFUSED)), refs, None, (None, None),
                        len(uploads))
            image = decode_image(await uploads[0].read(), "image", self.cfg)
            masks = files.get("mask", [])
            mask = decode_image(await masks[0].read(), "mask", self.cfg) if masks else None
            names = (file_name(uploads[0]), file_name(masks[0]) if masks else None)
        finally:
            await form.close()  # the spooled upload files
        return Fields(values, strings=True, known=EDIT_FIELDS | frozenset(REFUSED)), image, mask, names, len(uploads)

    async def variations(self, request):
        raise ApiError(404, "image variations are not supported; use /v1/images/edits with a prompt", None,
                       "unsupported_endpoint")

    def model_entry(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "zimage-mlx"}

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [self.model_entry(m) for m in self.cfg.model_names()]})

    async def model(self, request):
        model_id = request.path_params["model_id"]
        served = self.cfg.find_model(model_id)
        if served is None:
            raise self.cfg.unknown_model(model_id)
        return JSONResponse(self.model_entry(served))

    # -- answering ------------------------------------------------------------------------------------
    async def run(self, request: Request, recipe: Recipe, options: dict, meta: dict, prefix: str):
        job = self.server.submit(recipe, meta["model"], **options)
        if meta["stream"]:
            return JobStream(self.stream(job, prefix, meta), job, self.server)
        if not await self.server.run_sync(request, job):
            return Response(status_code=499)  # nobody is listening
        if job.status != "completed":
            raise self.server.job_error(job, meta["names"])
        return JSONResponse(self.body(job, meta))

    def body(self, job: Job, meta: dict) -> dict:
        revised = job.revised_prompts or [None] * len(job.images)  # OpenAI's own field for a rewritten prompt
        data = [{"b64_json": base64.b64encode(b).decode(), "revised_prompt": r, "seed": s}
                for b, s, r in zip(job.images, job.seeds, revised)]
        out = {"created": int(time.time()), "model": meta["model"], "data": data, "background": "opaque",
               "output_format": job.options.output_format, "usage": ZERO_USAGE}
        w, h = job.sizes[0]
        if f"{w}x{h}" in OPENAI_SIZES:
            out["size"] = f"{w}x{h}"
        out["zimage"] = zimage_info(job, self.cfg, meta)
        return out

    async def stream(self, job: Job, prefix: str, meta: dict):
        created = int(time.time())

        def event(name: str, data: dict) -> str:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n"

        def common(w, h) -> dict:
            size = f"{w}x{h}"
            return {"background": "opaque", "created_at": created, "output_format": job.options.output_format,
                    "quality": "auto", "size": size if size in STREAM_SIZES else "auto"}

        async for type_, data in job.stream(ping=self.cfg.ping_seconds):
            if type_ == "ping":
                yield ": ping\n\n"
            elif type_ == "partial":
                yield event(f"{prefix}.partial_image", {"type": f"{prefix}.partial_image", "b64_json": data["b64"],
                                                       "partial_image_index": data["index"],
                                                       **common(job.recipe.width or 0, job.recipe.height or 0)})
            elif type_ == "done":
                for b, s, (w, h) in zip(job.images, job.seeds, job.sizes):
                    yield event(f"{prefix}.completed", {"type": f"{prefix}.completed",
                                                        "b64_json": base64.b64encode(b).decode(), "seed": s,
                                                        **common(w, h), "usage": ZERO_USAGE,
                                                        "zimage": zimage_info(job, self.cfg, meta)})
            elif type_ in ("failed", "cancelled"):
                yield event("error", {"type": "error", **self.server.job_error(job, meta["names"]).body})


def file_name(upload: UploadFile) -> str:
    """An upload's file name without any folder (what the image's metadata records), or image.png."""
    return recorded_name((upload.filename or "").replace("\\", "/")) or "image.png"


def zimage_info(job: Job, cfg: ServerConfig, meta: dict) -> dict:
    """What ran: the settled settings, the served model (and the name the request gave, when another), and
    comments on what the request asked that this server read its own way."""
    r = job.recipes[0] if job.recipes else job.recipe
    requested = meta.get("requested_model")
    comments = list(meta.get("comments", []))
    if requested and requested.lower() != meta["model"].lower():
        comments.insert(0, f"the model {requested!r} ran as {meta['model']!r}, a model this server serves")
    return {"width": r.width, "height": r.height, "steps": r.steps, "guidance": r.guidance,
            "strength": r.strength if r.has_image else None, "model": meta["model"], "requested_model": requested,
            "seeds": job.seeds, "timings": job.timings, "comments": comments}


class JobStream(StreamingResponse):
    """An SSE response whose job is cancelled when the response ends early, however it ends (a client that
    hangs up even before the first event included)."""

    def __init__(self, content, job: Job, server: Server):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job, self.server = job, server

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.is_finished:
                self.server.worker.cancel(self.job, "disconnect")
