"""The A1111 dialect (/sdapi/v1/*): txt2img, img2img, progress, interrupt, models, samplers, schedulers, options,
and the lists a client reads on connect (upscalers, latent-upscale-modes, sd-vae: what this server really has).

A request parses into a `Recipe`: cfg_scale is the classic scale (1 = no guidance), so guidance = cfg_scale - 1;
at cfg_scale 1 a negative prompt has no effect, as in A1111 itself: it is left out (and `info` says so).
Options this server cannot honour are refused with a 400 naming them; the Recipe's fields are named the A1111
way in errors (cfg_scale, batch_size, denoising_strength, init_images). Responses carry each image's infotext.
"""

from __future__ import annotations

import base64
import json
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..recipe import Recipe, scaled_size
from .core import Server, ServerConfig, bad
from .fields import Fields, check_recipe, decode_base64_image, read_json

NAMES = {"guidance": "cfg_scale", "num_images": "batch_size", "strength": "denoising_strength", "image": "init_images"}
SAMPLERS = {"euler", "euler (flow match)", "flow match euler", "euler flow match"}  # ours: flow-match Euler
SCHEDULERS = {"automatic", "simple", "normal"}
# Read (and honoured, or refused unless off); accepted and ignored (they change nothing here).
TXT2IMG_FIELDS = frozenset({
    "prompt", "negative_prompt", "width", "height", "steps", "seed", "cfg_scale", "batch_size", "n_iter",
    "sampler_name", "sampler_index", "scheduler", "enable_hr", "restore_faces", "tiling", "subseed_strength", "s_churn",
    "styles", "alwayson_scripts", "script_args", "script_name", "clip_skip", "override_settings"})
# The hires fix (txt2img only): honoured with enable_hr; img2img ignores them as A1111 does.
HIRES_FIELDS = frozenset({"hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler", "hr_second_pass_steps"})
HIRES_NAMES = {"hires_scale": "hr_scale", "hires_strength": "denoising_strength", "hires_steps": "hr_second_pass_steps",
               "hires_upscaler": "hr_upscaler"}
UPSCALERS = {"lanczos": "lanczos", "latent": "latent"}  # A1111's names, lowercased -> ours
IMG2IMG_FIELDS = TXT2IMG_FIELDS | {"init_images", "mask", "denoising_strength", "inpainting_mask_invert", "mask_blur",
                                   "inpaint_full_res", "inpainting_fill"}
IGNORED = frozenset({"hr_upscaler", "hr_scale", "hr_second_pass_steps", "override_settings_restore_afterwards",
                     "save_images", "send_images", "do_not_save_grid", "do_not_save_samples", "subseed"})
TXT2IMG_IGNORED = IGNORED - HIRES_FIELDS
TXT2IMG_FIELDS = TXT2IMG_FIELDS | HIRES_FIELDS | {"denoising_strength"}  # the hires pass's strength


def parse_a1111(body: dict, cfg: ServerConfig, *, img2img: bool) -> tuple[Recipe, list[str]]:
    """txt2img/img2img fields -> (the checked Recipe, comments for `info`)."""
    f = Fields(body, known=(IMG2IMG_FIELDS | IGNORED) if img2img else (TXT2IMG_FIELDS | TXT2IMG_IGNORED))
    refuse_unsupported(f, cfg)
    cfg_scale = f.float("cfg_scale", 1.0)
    if cfg_scale < 1:
        raise bad("cfg_scale", f"cfg_scale must be at least 1 (1 = no guidance), got {cfg_scale:g}")
    negative, comments = f.str("negative_prompt") or None, []
    if negative and cfg_scale <= 1:
        negative = None
        comments.append("negative_prompt has no effect at cfg_scale 1 (Turbo runs without CFG): it was not used")
    batch = f.raw("batch_size")[1]
    n_iter = f.int("n_iter", 1, 1, cfg.max_n)
    width, height = f.raw("width")[1], f.raw("height")[1]
    recipe = Recipe(prompt=f.str("prompt", default=""), negative_prompt=negative, guidance=cfg_scale - 1.0,
                    steps=cfg.default_steps if (s := f.raw("steps")[1]) is None else s, seed=f.seed("seed")[1],
                    num_images=batch * n_iter if isinstance(batch, int) and not isinstance(batch, bool) else
                    1 if batch is None else batch, loras=[])
    if img2img:
        if f.bool("enable_hr"):
            raise bad("enable_hr", "enable_hr is a txt2img option (upscale an image with hires on txt2img or with "
                      "zimage-mlx upscale)", "unsupported_parameter")
        recipe = read_images(f, body, cfg, recipe)
    elif f.bool("enable_hr"):
        recipe = read_hires(f, recipe, width or cfg.default_width, height or cfg.default_height)
    if not img2img or width is not None or height is not None:
        recipe = recipe.replace(width=width or (None if img2img else cfg.default_width),
                                height=height or (None if img2img else cfg.default_height))
    return check_recipe(recipe, cfg, {**NAMES, **HIRES_NAMES} if not img2img else NAMES), comments


def refuse_unsupported(f: Fields, cfg: ServerConfig) -> None:
    sampler = f.str("sampler_name") or f.str("sampler_index")
    if sampler and sampler.lower() not in SAMPLERS:
        raise bad("sampler_name", f"sampler {sampler!r} is not available; this model samples with 'Euler' "
                  "(flow-match Euler, see /sdapi/v1/samplers)", "unsupported_value")
    scheduler = f.str("scheduler")
    if scheduler and scheduler.lower() not in SCHEDULERS:
        raise bad("scheduler", f"scheduler {scheduler!r} is not available; this model's flow-match schedule is "
                  "'Automatic' (also accepted as 'Simple' or 'Normal')", "unsupported_value")
    for name in ("restore_faces", "tiling"):
        if f.bool(name):
            raise bad(name, f"{name} is not supported by this server", "unsupported_parameter")
    for name in ("subseed_strength", "s_churn"):
        if f.float(name, 0.0):
            raise bad(name, f"{name} must be 0 (not supported by this server)", "unsupported_parameter")
    for name in ("styles", "alwayson_scripts", "script_args"):
        if f.has(name) and f.data[name]:
            raise bad(name, f"{name} is not supported by this server", "unsupported_parameter")
    if f.str("script_name"):
        raise bad("script_name", "scripts are not supported by this server", "unsupported_parameter")
    if f.int("clip_skip", 1) > 1:
        raise bad("clip_skip", "clip_skip must be 1 (this model has no CLIP)", "unsupported_value")
    check_override_settings(f.first("override_settings")[1], cfg)


def read_hires(f: Fields, recipe: Recipe, width, height) -> Recipe:
    """enable_hr's second pass: hr_scale (A1111's default 2), or hr_resize_x/y (a target of the same aspect
    ratio), hr_upscaler (Lanczos or Latent; A1111's other upscalers are refused), hr_second_pass_steps (0: the
    first pass's), denoising_strength (our default 0.35 when absent)."""
    upscaler = f.str("hr_upscaler")
    if upscaler is not None and upscaler.lower() not in UPSCALERS:
        raise bad("hr_upscaler", f"hr_upscaler {upscaler!r} is not available here; use Lanczos or Latent",
                  "unsupported_value")
    scale = f.raw("hr_scale")[1]
    resize = [f.raw("hr_resize_x")[1] or 0, f.raw("hr_resize_y")[1] or 0]
    if any(resize) and all(isinstance(v, int) and not isinstance(v, bool) for v in [*resize, width, height]):
        scales = [v / side for v, side in zip(resize, (width, height)) if v]
        if len(scales) == 2 and scaled_size(width, height, scales[0]) != tuple(resize):
            raise bad("hr_resize_x", f"hr_resize_x and hr_resize_y ({resize[0]}x{resize[1]}) must keep the "
                      f"{width}x{height} aspect ratio (this server does not crop)", "unsupported_value")
        scale = scales[0]
    steps = f.raw("hr_second_pass_steps")[1]
    strength = f.raw("denoising_strength")[1]
    return recipe.replace(hires_scale=2.0 if scale is None else scale, hires_steps=steps or None,
                          hires_upscaler=UPSCALERS[(upscaler or "lanczos").lower()],
                          **({} if strength is None else {"hires_strength": strength}))


def read_images(f: Fields, body: dict, cfg: ServerConfig, recipe: Recipe) -> Recipe:
    """img2img's image, mask (white = repaint, or inverted) and strength (A1111's default 0.75)."""
    images = f.first("init_images")[1]
    if not isinstance(images, list) or len(images) != 1:
        raise bad("init_images", "init_images must be a list with one base64 image")
    image = decode_base64_image(images[0], "init_images", cfg).convert("RGB")
    mask = None
    if f.first("mask")[1]:
        mask = decode_base64_image(body["mask"], "mask", cfg).convert("L")
        if f.int("inpainting_mask_invert", 0, 0, 1):
            from PIL import ImageOps

            mask = ImageOps.invert(mask)
        if f.float("mask_blur", 0.0):
            raise bad("mask_blur", "mask_blur must be 0: the mask is used as given (binarised at 50%)",
                      "unsupported_parameter")
        if f.bool("inpaint_full_res"):
            raise bad("inpaint_full_res", "inpaint_full_res is not supported: the whole image is repainted at its "
                      "size", "unsupported_parameter")
        if f.int("inpainting_fill", 1, 0, 3) != 1:
            raise bad("inpainting_fill", "inpainting_fill must be 1 ('original'): the masked area starts from the "
                      "image", "unsupported_value")
    strength = f.raw("denoising_strength")[1]
    return recipe.replace(image="init_image.png", init_image=image, init_mask=mask,
                          mask="mask.png" if mask is not None else None, strength=0.75 if strength is None else strength)


def check_override_settings(settings, cfg: ServerConfig, param: str | None = "override_settings") -> str | None:
    """Accept settings that change nothing and a served model's name as sd_model_checkpoint (returned: the
    model that runs); refuse the rest (400 naming `param`, or the key when None)."""
    if not settings:
        return None
    if not isinstance(settings, dict):
        raise bad(param, f"{param or 'the body'} must be an object")
    current = options(cfg)
    checkpoint = None
    for key, value in settings.items():
        if key == "sd_model_checkpoint" and isinstance(value, str) and cfg.find_model(value):
            checkpoint = cfg.find_model(value)
            continue
        if key == "CLIP_stop_at_last_layers" and value in (0, 1):
            continue
        if (key in current and current[key] == value) or (key == "sd_vae" and value in ("Automatic", "None", None)):
            continue
        raise bad(param or key, f"cannot change the setting {key!r} on this server", "unsupported_value")
    return checkpoint


def options(cfg: ServerConfig, checkpoint: str | None = None) -> dict:
    return {"sd_model_checkpoint": checkpoint or cfg.model_id, "sd_checkpoint_hash": None, "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1, "samples_format": "png", "eta_noise_seed_delta": 0}


# ---------------------------------------------------------------------------------------------------
# Routes


def routes(server: Server) -> list[Route]:
    api = A1111Routes(server)
    return [Route("/sdapi/v1/txt2img", api.txt2img, methods=["POST"]),
            Route("/sdapi/v1/img2img", api.img2img, methods=["POST"]),
            Route("/sdapi/v1/progress", api.progress), Route("/sdapi/v1/interrupt", api.interrupt, methods=["POST"]),
            Route("/sdapi/v1/sd-models", api.sd_models), Route("/sdapi/v1/samplers", api.samplers),
            Route("/sdapi/v1/schedulers", api.schedulers), Route("/sdapi/v1/options", api.get_options),
            Route("/sdapi/v1/options", api.set_options, methods=["POST"]),
            Route("/sdapi/v1/upscalers", api.upscalers), Route("/sdapi/v1/latent-upscale-modes", api.latent_modes),
            Route("/sdapi/v1/sd-vae", api.vaes)]


class A1111Routes:
    def __init__(self, server: Server):
        self.server = server
        self.cfg = server.cfg
        self.checkpoint = server.cfg.model_id  # the model sd_model_checkpoint names (POST /sdapi/v1/options)

    async def run(self, request: Request, img2img: bool):
        body = await read_json(request)
        recipe, comments = parse_a1111(body, self.cfg, img2img=img2img)
        settings = body.get("override_settings") if isinstance(body, dict) else None
        model = check_override_settings(settings, self.cfg) or self.checkpoint  # checked by parse_a1111 already
        job = self.server.submit(recipe, model, previews=True)
        if not await self.server.run_sync(request, job):
            return Response(status_code=499)
        if job.status != "completed":
            raise self.server.job_error(job, NAMES)
        # A1111 echoes its validated request: the known fields only (SillyTavern also sends its url and auth)
        known = (IMG2IMG_FIELDS | IGNORED) if img2img else (TXT2IMG_FIELDS | TXT2IMG_IGNORED)
        parameters = {k: v for k, v in body.items() if k in known and k not in ("init_images", "mask")}
        return JSONResponse({"images": [base64.b64encode(b).decode() for b in job.images], "parameters": parameters,
                             "info": json.dumps(self.info(job, comments))})

    def info(self, job, comments: list[str]) -> dict:
        r, seeds = job.recipes[0], job.seeds
        prompts = [x.prompt for x in job.recipes]
        return {"prompt": job.recipe.prompt, "all_prompts": prompts, "negative_prompt": r.negative_prompt or "",
                "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
                "width": r.width, "height": r.height, "sampler_name": "Euler", "cfg_scale": r.guidance + 1.0,
                "steps": r.steps, "batch_size": len(seeds), "sd_model_name": job.model or self.cfg.model_id,
                "denoising_strength": r.strength if r.has_image else r.hires_strength if r.hires_scale else None,
                "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "infotexts": [x.to_infotext() for x in job.recipes],
                "comments": "".join(f"{c}\n" for c in comments)}

    async def txt2img(self, request):
        return await self.run(request, img2img=False)

    async def img2img(self, request):
        return await self.run(request, img2img=True)

    async def progress(self, request):
        job = self.server.worker.running
        queued = len(self.server.worker.queued())
        state = {"skipped": False, "interrupted": False, "job": job.id if job else "",
                 "job_count": queued + (1 if job else 0), "job_timestamp": "", "job_no": 0,
                 "sampling_step": job.step if job else 0, "sampling_steps": job.total if job else 0}
        if job is None or not job.started:
            return JSONResponse({"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                                 "textinfo": None})
        progress = job.step / job.total if job.total else 0.0
        elapsed = time.time() - job.started
        eta = elapsed / progress - elapsed if progress > 0 else 0.0
        skip = request.query_params.get("skip_current_image", "false").lower() == "true"
        return JSONResponse({"progress": progress, "eta_relative": max(0.0, eta), "state": state,
                             "current_image": None if skip else job.preview_b64, "textinfo": None})

    async def interrupt(self, request):
        job = self.server.worker.running
        if job is not None:
            self.server.worker.cancel(job, "interrupt")
        return JSONResponse({})

    async def sd_models(self, request):
        return JSONResponse([{"title": m, "model_name": m, "hash": None, "sha256": None, "filename": m, "config": None}
                             for m in self.cfg.model_names()])

    async def samplers(self, request):
        return JSONResponse([{"name": "Euler", "aliases": ["euler", "Euler (flow match)"], "options": {}}])

    async def schedulers(self, request):
        return JSONResponse([{"name": name.lower(), "label": name, "aliases": None, "default_rho": -1,
                              "need_inner_model": False} for name in ("Automatic", "Simple", "Normal")])

    async def upscalers(self, request):
        # A1111's UpscalerItem list; "None" is the only one here (hires fix, enable_hr, is refused)
        return JSONResponse([{"name": "None", "model_name": None, "model_path": None, "model_url": None,
                              "scale": 4}])

    async def latent_modes(self, request):
        return JSONResponse([])  # A1111's [{"name"}]; no latent upscaling here

    async def vaes(self, request):
        return JSONResponse([])  # A1111's [{"model_name", "filename"}]: only the checkpoint's own VAE ("Automatic")

    async def get_options(self, request):
        return JSONResponse(options(self.cfg, self.checkpoint))

    async def set_options(self, request):
        """sd_model_checkpoint set here chooses the model of later requests that do not override it (as A1111)."""
        self.checkpoint = check_override_settings(await read_json(request), self.cfg, param=None) or self.checkpoint
        return JSONResponse({})
