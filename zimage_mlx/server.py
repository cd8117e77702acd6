"""`zimage-mlx serve`: one resident model behind the OpenAI images API, an A1111 subset and a native job API.

Layers: `server_engine.JobRunner` owns the model on one worker thread and runs one job at a time from a
bounded FIFO queue; this module is the HTTP boundary (Starlette): it checks every request by hand, turns
it into `server_engine.Params`, queues a job, and answers from the job's events. Errors always use
OpenAI's envelope {"error": {"message", "type", "param", "code"}}, produced in one place (`ApiError`).

Policy (docs: notes/server-readme.md):
- A parameter that would change the image and cannot be honoured is refused with a 400 naming it;
  fields that change nothing visible (user, quality, style, moderation) are accepted and ignored.
- Sizes are refused, never snapped: multiples of 16, at most --max-side a side.
- A request never names a file or URL: LoRAs are names of .safetensors files in --lora-dir.
- A synchronous request (OpenAI, A1111) whose client disconnects cancels its job, queued or running.
- Security: loopback bind by default, optional key (Bearer or X-API-Key; 401, or 403 under /proxy/openai
  where ComfyUI rewrites 401) on every route but /health and the static page at /, Host header allow-list
  against DNS rebinding, body cap, pixel cap.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import ipaddress
import json
import logging
import math
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .server_engine import Job, JobRunner, Params, QueueFull, ShuttingDown, error_body

log = logging.getLogger("zimage_mlx.server")

PACKAGE_DIR = Path(__file__).parent
MAX_SEED = 2**32 - 1  # the pipeline's seed range
RANDOM_SEED_BOUND = 2**31  # drawn seeds fit a signed 32-bit int (ComfyUI, A1111 widgets)
OPENAI_SIZES = {"256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792"}
STREAM_SIZES = {"1024x1024", "1024x1536", "1536x1024"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "host.docker.internal"}
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ +-]*$")
MAX_LORAS = 4
ZERO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
              "output_tokens": 0, "total_tokens": 0}
# Known keys that would change the image and that the OpenAI routes cannot honour.
OPENAI_REFUSED = ("sampler", "sampler_name", "scheduler", "cfg_normalization", "cfg_truncation", "latents",
                  "clip_skip", "lora", "image_latents")
# A1111 samplers: ours is the flow-match Euler sampler; "Euler a" (ancestral) and others would differ.
A1111_SAMPLERS = {"euler", "euler (flow match)", "flow match euler", "euler flow match"}
A1111_SCHEDULERS = {"automatic", "simple"}
NATIVE_FIELDS = {"prompt", "negative_prompt", "width", "height", "size", "steps", "seed", "n", "guidance", "loras", "enhance",
                 "output_format", "previews"}


# ---------------------------------------------------------------------------------------------------
# Configuration and errors


@dataclass
class ServerConfig:
    model_id: str = "z-image-turbo"
    model_aliases: tuple = ()
    api_key: str | None = None
    allowed_hosts: frozenset | None = frozenset(LOOPBACK_NAMES)  # None: no Host check
    max_side: int = 2048
    max_n: int = 4
    max_steps: int = 50
    max_body: int = 64 * 2**20
    max_input_pixels: int = 4096 * 4096
    lora_dir: Path | None = None
    default_width: int = 1024
    default_height: int = 1024
    default_steps: int = 8
    ping_seconds: float = 15.0
    keep_jobs: int = 64  # finished native jobs kept for GET /v1/jobs/{id}
    static_dir: Path = field(default_factory=lambda: PACKAGE_DIR / "static")

    def __post_init__(self):
        self.default_width = min(self.default_width, self.max_side // 16 * 16)
        self.default_height = min(self.default_height, self.max_side // 16 * 16)

    def model_ids(self) -> set[str]:
        return {m.lower() for m in (self.model_id, *self.model_aliases, "z-image-turbo", "x/z-image-turbo",
                                    "zimage-mlx") if m}


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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, self.status, headers=self.headers)


def bad(param: str | None, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


# ---------------------------------------------------------------------------------------------------
# Reading fields (JSON values, or strings from a multipart form)


class Fields:
    def __init__(self, data: dict, *, strings: bool = False):
        self.data = data
        self.strings = strings  # values came from a form: parse numbers and booleans from text

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def first(self, *names: str):
        """(name, value) of the first of `names` present; refuses two aliases with different values."""
        found = [(n, self.data[n]) for n in names if self.data.get(n) is not None]
        if len({json.dumps(v, sort_keys=True, default=str) for _, v in found}) > 1:
            raise bad(found[1][0], f"{found[0][0]} and {found[1][0]} are the same setting: give one of them")
        return found[0] if found else (names[0], None)

    def str(self, *names: str, default=None, required: bool = False, max_len: int = 32000):
        name, v = self.first(*names)
        if v is None:
            if required:
                raise bad(name, f"{name} is required", "missing_required_parameter")
            return default
        if not isinstance(v, str):
            raise bad(name, f"{name} must be a string")
        if len(v) > max_len:
            raise bad(name, f"{name} is longer than {max_len} characters")
        return v

    def int(self, *names: str, default=None, lo=None, hi=None):
        name, v = self.first(*names)
        if v is None:
            return default
        if self.strings and isinstance(v, str):
            try:
                v = int(v.strip())
            except ValueError:
                raise bad(name, f"{name} must be an integer, got {v!r}") from None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad(name, f"{name} must be an integer, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise bad(name, f"{name} must be between {lo} and {hi}, got {v}")
        return v

    def float(self, *names: str, default=None, lo=None, hi=None):
        name, v = self.first(*names)
        if v is None:
            return default
        if self.strings and isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise bad(name, f"{name} must be a number, got {v!r}") from None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise bad(name, f"{name} must be a finite number, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise bad(name, f"{name} must be between {lo} and {hi}, got {v}")
        return float(v)

    def bool(self, name: str, default: bool = False) -> bool:
        v = self.data.get(name)
        if v is None:
            return default
        if self.strings and isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
            return v.lower() in ("true", "1")
        if not isinstance(v, bool):
            raise bad(name, f"{name} must be true or false, got {v!r}")
        return v

    def choice(self, name: str, options, default=None):
        v = self.str(name)
        if v is None:
            return default
        if v not in options:
            raise bad(name, f"{name} must be one of {', '.join(options)}, got {v!r}")
        return v


def parse_size(value: str, cfg: ServerConfig, param: str = "size") -> tuple[int, int] | None:
    """'WxH' -> (W, H); 'auto' -> None (the caller's default)."""
    if value == "auto":
        return None
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value.strip())
    if not m:
        raise bad(param, f"{param} must be 'WIDTHxHEIGHT' (e.g. 1024x1024) or 'auto', got {value!r}")
    return check_size(int(m[1]), int(m[2]), cfg, param)


def check_size(width, height, cfg: ServerConfig, param: str = "size") -> tuple[int, int]:
    for name, v in (("width", width), ("height", height)):
        p = param if param == "size" else name
        if v < 16 or v % 16:
            raise bad(p, f"{name} must be a positive multiple of 16, got {v} (sizes are refused, not rounded)")
        if v > cfg.max_side:
            raise bad(p, f"{name} {v} is above this server's limit of {cfg.max_side} pixels a side (--max-side)")
    return width, height


def draw_seed(value: int | None) -> int:
    return random.randrange(RANDOM_SEED_BOUND) if value is None or value == -1 else value


def read_seed(f: Fields, *names: str) -> int:
    return draw_seed(f.int(*names, lo=-1, hi=MAX_SEED))


def check_model(f: Fields, cfg: ServerConfig, any_model: bool) -> None:
    model = f.str("model")
    if model is None or model == "" or any_model:
        return
    if model.lower() not in cfg.model_ids():
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {cfg.model_id!r}", "model",
                       "model_not_found", "invalid_request_error")


def read_loras(f: Fields, cfg: ServerConfig) -> list:
    v = f.data.get("loras")
    if v is None or v == []:
        return []
    if isinstance(v, str) and f.strings:
        try:
            v = json.loads(v)
        except ValueError:
            raise bad("loras", "loras must be a JSON list of {\"name\", \"scale\"}") from None
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise bad("loras", "loras must be a list of {\"name\": ..., \"scale\": ...}")
    if len(v) > MAX_LORAS:
        raise bad("loras", f"at most {MAX_LORAS} LoRAs, got {len(v)}")
    out = []
    for item in v:
        unknown = set(item) - {"name", "scale"}
        if unknown:
            raise bad("loras", f"a LoRA has name and scale, not {', '.join(sorted(unknown))}")
        sub = Fields(item)
        name = sub.str("name", required=True, max_len=200)
        scale = sub.float("scale", default=1.0, lo=-10.0, hi=10.0)
        out.append((name, resolve_lora(name, cfg), scale))
    return out


def resolve_lora(name: str, cfg: ServerConfig) -> Path:
    """A LoRA name -> its file inside --lora-dir; never a path, never outside the folder."""
    if cfg.lora_dir is None:
        raise bad("loras", "this server has no LoRAs (start it with --lora-dir DIR)", "lora_not_found")
    if "/" in name or "\\" in name or ".." in name or not LORA_NAME.match(name):
        raise bad("loras", f"LoRAs are chosen by name (see GET /v1/status), not by path: {name!r}", "invalid_lora")
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    root = cfg.lora_dir.resolve()
    path = (cfg.lora_dir / f"{stem}.safetensors")
    real = path.resolve()
    if real.parent != root and root not in real.parents:
        raise bad("loras", f"the LoRA {name!r} points outside the LoRA folder", "invalid_lora")
    if not real.is_file():
        raise ApiError(404, f"no LoRA named {stem!r}; available: {', '.join(list_loras(cfg)) or 'none'}", "loras",
                       "lora_not_found", "invalid_request_error")
    return real


def list_loras(cfg: ServerConfig) -> list[str]:
    if cfg.lora_dir is None or not cfg.lora_dir.is_dir():
        return []
    root = cfg.lora_dir.resolve()
    names = []
    for p in sorted(cfg.lora_dir.glob("*.safetensors")):
        real = p.resolve()
        if real.is_file() and (real.parent == root or root in real.parents):
            names.append(p.stem)
    return names


# ---------------------------------------------------------------------------------------------------
# Uploaded images


def decode_image(data: bytes, param: str, cfg: ServerConfig):
    """Bytes -> a PIL image, loaded, EXIF orientation applied; 400 if unreadable, 413 if too many pixels."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > cfg.max_input_pixels:
                raise ApiError(413, f"{param} is {w}x{h} pixels, over this server's limit of {cfg.max_input_pixels} "
                               "pixels", param, "image_too_large")
            im.load()
        return ImageOps.exif_transpose(im)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, f"{param} has too many pixels", param, "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise bad(param, f"{param} is not an image this server can read (PNG, JPEG or WebP)", "invalid_image") from None


def decode_base64_image(value, param: str, cfg: ServerConfig):
    if not isinstance(value, str) or not value:
        raise bad(param, f"{param} must be a base64 image or a data: URL")
    if re.match(r"^[a-z][a-z0-9+.-]*://", value, re.I):
        raise bad(param, f"{param} must be the image itself (base64 or a data: URL); this server never fetches URLs",
                  "invalid_image")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if ";base64" not in head:
            raise bad(param, f"{param} must be a base64 data: URL", "invalid_image")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad(param, f"{param} is not valid base64", "invalid_image") from None
    return decode_image(data, param, cfg)


def has_alpha(im) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def alpha_mask(im):
    """OpenAI's convention (transparent = repaint) -> ours: an "L" mask, white where to repaint."""
    from PIL import ImageOps

    return ImageOps.invert(im.convert("RGBA").getchannel("A"))


def make_edit_inputs(image, mask, cfg: ServerConfig):
    """The RGB image and the white-is-repaint mask (or None) for an OpenAI edit."""
    if mask is not None:
        if not has_alpha(mask):
            raise bad("mask", "the mask must have an alpha channel: fully transparent pixels mark where to edit",
                      "invalid_mask")
        if mask.size != image.size:
            raise bad("mask", f"the mask is {mask.width}x{mask.height} but the image is "
                      f"{image.width}x{image.height}: they must have the same size", "invalid_mask")
        mask = alpha_mask(mask)
    elif has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 128:  # some transparency: the image's alpha is the mask (DALL-E 2 style)
            mask = alpha_mask(image)
    return image.convert("RGB"), mask


def edit_size(image, size, cfg: ServerConfig) -> tuple[int | None, int | None]:
    """The output size of an edit: the requested one, or the image's rounded down to multiples of 16."""
    if size is not None:
        return size
    w, h = image.width // 16 * 16, image.height // 16 * 16
    if w < 16 or h < 16:
        raise bad("image", f"the image is {image.width}x{image.height}; it must be at least 16x16")
    if max(w, h) > cfg.max_side:
        raise bad("size", f"the image is {image.width}x{image.height}, above this server's limit of {cfg.max_side} "
                  "a side: give a size to resize it to")
    return None, None


# ---------------------------------------------------------------------------------------------------
# Request -> Params


def parse_openai(f: Fields, cfg: ServerConfig, *, any_model: bool, edit: bool = False) -> tuple[Params, dict]:
    """OpenAI generations/edits fields -> Params (images for edits are added by the caller)."""
    for name in OPENAI_REFUSED + (() if edit else ("image", "mask", "strength", "denoising_strength")):
        if f.has(name):
            raise bad(name, f"{name} is not supported on this route" + (
                "; use /v1/images/edits for images" if name in ("image", "mask", "strength") else ""), "unsupported_parameter")
    prompt = f.str("prompt", required=True)
    if not prompt.strip():
        raise bad("prompt", "prompt must not be empty", "missing_required_parameter")
    check_model(f, cfg, any_model)
    if f.str("response_format") not in (None, "b64_json"):
        raise bad("response_format", "only response_format b64_json is supported (images are returned inline)",
                  "unsupported_value")
    if f.str("background") not in (None, "auto", "opaque"):
        raise bad("background", "background must be auto or opaque: this model cannot make transparent images",
                  "unsupported_value")
    output_format = f.choice("output_format", ("png", "jpeg", "webp"), "png")
    compression = f.int("output_compression", lo=0, hi=100)
    n = f.int("n", default=1, lo=1, hi=cfg.max_n)
    size = None
    if f.has("size"):
        if f.has("width") or f.has("height"):
            raise bad("size", "give size or width and height, not both")
        size = parse_size(f.str("size"), cfg)
    elif f.has("width") or f.has("height"):
        size = check_size(f.int("width", default=cfg.default_width), f.int("height", default=cfg.default_height),
                          cfg, "width")
    if size is None and not edit:
        size = (cfg.default_width, cfg.default_height)
    steps = f.int("steps", "num_inference_steps", default=cfg.default_steps, lo=1, hi=cfg.max_steps)
    guidance = f.float("guidance", "guidance_scale", default=0.0, lo=0.0, hi=100.0)
    negative = f.str("negative_prompt")
    if negative and guidance <= 0:
        raise bad("negative_prompt", "negative_prompt needs guidance > 0 (Turbo runs without CFG, so it would be "
                  "ignored); send guidance too, or leave negative_prompt out")
    stream = f.bool("stream")
    partial = f.int("partial_images", default=0, lo=0, hi=3)
    params = Params(prompt=prompt, width=size[0] if size else None, height=size[1] if size else None, steps=steps,
                    seed=read_seed(f, "seed", "rng_seed"), n=n, guidance=guidance, negative_prompt=negative or None,
                    loras=read_loras(f, cfg), output_format=output_format, output_compression=compression,
                    enhance=f.bool("enhance"))
    if edit:
        params.strength = f.float("strength", "denoising_strength", lo=0.0, hi=1.0)
    if stream and partial:
        params.partial_steps = partial_steps(params.steps, partial)
    return params, {"stream": stream, "size": f.str("size"), "partial_images": partial}


def partial_steps(steps: int, count: int) -> frozenset:
    """The steps (1-based, before the last) after which `count` partial images are sent, evenly spread."""
    return frozenset(s for s in (round(steps * (i + 1) / (count + 1)) for i in range(count)) if 1 <= s < steps)


def parse_native(body: dict, cfg: ServerConfig) -> Params:
    unknown = sorted(set(body) - NATIVE_FIELDS)
    if unknown:
        raise bad(unknown[0], f"unknown field {unknown[0]!r}; the fields are {', '.join(sorted(NATIVE_FIELDS))}",
                  "unknown_parameter")
    f = Fields(body)
    prompt = f.str("prompt", required=True)
    if f.has("size"):
        if f.has("width") or f.has("height"):
            raise bad("size", "give size or width and height, not both")
        size = parse_size(f.str("size"), cfg) or (cfg.default_width, cfg.default_height)
    else:
        size = check_size(f.int("width", default=cfg.default_width), f.int("height", default=cfg.default_height),
                          cfg, "width")
    guidance = f.float("guidance", default=0.0, lo=0.0, hi=100.0)
    negative = f.str("negative_prompt")
    if negative and guidance <= 0:
        raise bad("negative_prompt", "negative_prompt needs guidance > 0 (Turbo runs without CFG)")
    return Params(prompt=prompt, width=size[0], height=size[1],
                  steps=f.int("steps", default=cfg.default_steps, lo=1, hi=cfg.max_steps), seed=read_seed(f, "seed"),
                  n=f.int("n", default=1, lo=1, hi=cfg.max_n), guidance=guidance, negative_prompt=negative or None,
                  loras=read_loras(f, cfg), output_format=f.choice("output_format", ("png", "jpeg", "webp"), "png"),
                  previews=f.bool("previews", True), enhance=f.bool("enhance"))


def parse_a1111(body: dict, cfg: ServerConfig, *, img2img: bool) -> Params:
    """A1111's txt2img/img2img fields. cfg_scale is the classic scale (1 = no guidance): guidance = cfg_scale - 1."""
    f = Fields(body)
    sampler = f.str("sampler_name") or f.str("sampler_index")
    if sampler and sampler.lower() not in A1111_SAMPLERS:
        raise bad("sampler_name", f"sampler {sampler!r} is not available; this model samples with 'Euler' "
                  "(flow-match Euler, see /sdapi/v1/samplers)", "unsupported_value")
    scheduler = f.str("scheduler")
    if scheduler and scheduler.lower() not in A1111_SCHEDULERS:
        raise bad("scheduler", f"scheduler {scheduler!r} is not available; use 'Automatic'", "unsupported_value")
    for name in ("enable_hr", "restore_faces", "tiling"):
        if f.bool(name):
            raise bad(name, f"{name} is not supported by this server", "unsupported_parameter")
    for name in ("subseed_strength", "s_churn"):
        if f.float(name, default=0.0):
            raise bad(name, f"{name} must be 0 (not supported by this server)", "unsupported_parameter")
    for name in ("styles", "alwayson_scripts", "script_args"):
        if body.get(name):
            raise bad(name, f"{name} is not supported by this server", "unsupported_parameter")
    if f.str("script_name"):
        raise bad("script_name", "scripts are not supported by this server", "unsupported_parameter")
    clip_skip = f.int("clip_skip", default=1)
    if clip_skip > 1:
        raise bad("clip_skip", "clip_skip must be 1 (this model has no CLIP)", "unsupported_value")
    check_override_settings(body.get("override_settings"), cfg)
    cfg_scale = f.float("cfg_scale", default=1.0, lo=1.0, hi=101.0)
    guidance = cfg_scale - 1.0
    negative = f.str("negative_prompt")
    if negative and guidance <= 0:
        raise bad("negative_prompt", "negative_prompt needs cfg_scale > 1 (Turbo runs without CFG at cfg_scale 1)")
    n = f.int("batch_size", default=1, lo=1, hi=cfg.max_n) * f.int("n_iter", default=1, lo=1, hi=cfg.max_n)
    if n > cfg.max_n:
        raise bad("batch_size", f"batch_size x n_iter must be at most {cfg.max_n}, got {n}")
    width, height = f.int("width"), f.int("height")
    params = Params(prompt=f.str("prompt", default=""), width=None, height=None,
                    steps=f.int("steps", default=cfg.default_steps, lo=1, hi=cfg.max_steps),
                    seed=read_seed(f, "seed"), n=n, guidance=guidance, negative_prompt=negative or None,
                    previews=True)
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or len(images) != 1:
            raise bad("init_images", "init_images must be a list with one base64 image")
        image = decode_base64_image(images[0], "init_images", cfg).convert("RGB")
        mask = None
        if body.get("mask"):
            mask = decode_base64_image(body["mask"], "mask", cfg).convert("L")
            if mask.size != image.size:
                raise bad("mask", f"the mask is {mask.width}x{mask.height} but the image is "
                          f"{image.width}x{image.height}: they must have the same size", "invalid_mask")
            if f.int("inpainting_mask_invert", default=0, lo=0, hi=1):
                from PIL import ImageOps

                mask = ImageOps.invert(mask)
            if f.float("mask_blur", default=0.0):
                raise bad("mask_blur", "mask_blur must be 0: the mask is used as given (binarised at 50%)",
                          "unsupported_parameter")
            if f.bool("inpaint_full_res"):
                raise bad("inpaint_full_res", "inpaint_full_res is not supported: the whole image is repainted "
                          "at its size", "unsupported_parameter")
            if f.int("inpainting_fill", default=1, lo=0, hi=3) != 1:
                raise bad("inpainting_fill", "inpainting_fill must be 1 ('original'): the masked area starts from "
                          "the image", "unsupported_value")
        params.image, params.mask = image, mask
        params.strength = f.float("denoising_strength", default=0.75, lo=0.0, hi=1.0)
        if width is None and height is None:
            params.width, params.height = edit_size(image, None, cfg)
        else:
            params.width, params.height = check_size(width or image.width, height or image.height, cfg, "width")
    else:
        params.width, params.height = check_size(width or cfg.default_width, height or cfg.default_height, cfg, "width")
    return params


def check_override_settings(settings, cfg: ServerConfig, param: str | None = "override_settings") -> None:
    """Accept settings that change nothing; refuse the rest (400 naming `param`, or the key when None)."""
    if not settings:
        return
    if not isinstance(settings, dict):
        raise bad(param, f"{param or 'the body'} must be an object")
    current = a1111_options(cfg)
    for key, value in settings.items():
        if key == "sd_model_checkpoint" and isinstance(value, str) and value.lower() in cfg.model_ids():
            continue
        if key == "CLIP_stop_at_last_layers" and value in (0, 1):
            continue
        if key in current and current[key] == value:
            continue
        if key in ("sd_vae",) and value in ("Automatic", "None", None):
            continue
        raise bad(param or key, f"cannot change the setting {key!r} on this server", "unsupported_value")


def a1111_options(cfg: ServerConfig) -> dict:
    return {"sd_model_checkpoint": cfg.model_id, "sd_checkpoint_hash": None, "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1, "samples_format": "png", "eta_noise_seed_delta": 0}


# ---------------------------------------------------------------------------------------------------
# The app


class Server:
    """The Starlette app and its state around one JobRunner."""

    def __init__(self, runner: JobRunner, cfg: ServerConfig):
        self.runner = runner
        self.cfg = cfg
        self.jobs: dict[str, Job] = {}  # native jobs, by id (finished ones kept up to cfg.keep_jobs)
        self.app = self._build()

    # -- plumbing -------------------------------------------------------------------------------------
    def _build(self) -> Starlette:
        r = []

        def route(path, endpoint, methods=("GET",), aliases=()):
            for p in (path, *aliases):
                r.append(Route(p, endpoint, methods=list(methods)))

        openai_aliases = lambda p: (f"/images/{p}", f"/proxy/openai/images/{p}")  # noqa: E731
        route("/", self.page)
        route("/health", self.health)
        route("/openapi.json", self.openapi)
        route("/v1/models", self.models, aliases=("/models",))
        route("/v1/models/{model_id:path}", self.model, aliases=("/models/{model_id:path}",))
        route("/v1/images/generations", self.generations, ("POST",), openai_aliases("generations"))
        route("/v1/images/edits", self.edits, ("POST",), openai_aliases("edits"))
        route("/v1/images/variations", self.variations, ("POST",), openai_aliases("variations"))
        route("/v1/jobs", self.create_job, ("POST",))
        route("/v1/jobs/{job_id}", self.get_job)
        route("/v1/jobs/{job_id}", self.delete_job, ("DELETE",))
        route("/v1/jobs/{job_id}/events", self.job_events)
        route("/v1/jobs/{job_id}/images/{index:int}", self.job_image)
        route("/v1/status", self.status)
        route("/sdapi/v1/txt2img", self.txt2img, ("POST",))
        route("/sdapi/v1/img2img", self.img2img, ("POST",))
        route("/sdapi/v1/progress", self.progress)
        route("/sdapi/v1/interrupt", self.interrupt, ("POST",))
        route("/sdapi/v1/sd-models", self.sd_models)
        route("/sdapi/v1/samplers", self.samplers)
        route("/sdapi/v1/schedulers", self.schedulers)
        route("/sdapi/v1/options", self.get_options)
        route("/sdapi/v1/options", self.set_options, ("POST",))

        async def api_error(request, exc: ApiError):
            return exc.response()

        async def http_error(request, exc: HTTPException):
            status = exc.status_code
            if status == 404:
                msg = f"no route {request.method} {request.url.path}"
            elif status == 405:
                msg = f"{request.method} is not allowed on {request.url.path}"
            else:
                msg = exc.detail if isinstance(exc.detail, str) else "invalid request"
            return ApiError(status, msg, None, None).response()

        app = Starlette(routes=r, exception_handlers={ApiError: api_error, HTTPException: http_error})
        app.add_middleware(Guard, cfg=self.cfg)
        app.state.server = self
        return app

    def submit(self, job: Job) -> None:
        try:
            self.runner.submit(job)
        except QueueFull:
            raise ApiError(503, f"the queue is full ({self.runner.queue_size} waiting); retry later", None,
                           "queue_full", "server_error", {"Retry-After": str(self.runner.retry_after())}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", None, "shutting_down", "server_error",
                           {"x-should-retry": "false"}) from None

    async def run_sync(self, request: Request, job: Job) -> bool:
        """Queue a job and wait for it; a client disconnect cancels it. False if the client left."""
        self.submit(job)

        async def disconnected():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        waiter = asyncio.ensure_future(job.wait())
        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiter, watcher):
                t.cancel()
            if not job.is_finished:
                self.runner.cancel(job, "disconnect")
        return waiter.done() and not waiter.cancelled()

    def job_error(self, job: Job) -> ApiError:
        if job.status == "failed":
            e = job.error or {}
            return ApiError(job.error_status or 500, e.get("message", "failed"), e.get("param"), e.get("code"),
                            e.get("type"))
        if job.cancel_reason == "shutdown":
            return ApiError(503, "the server is shutting down", None, "shutting_down", "server_error",
                            {"x-should-retry": "false"})
        return ApiError(400, "the job was cancelled", None, "cancelled")

    # -- misc routes ----------------------------------------------------------------------------------
    async def page(self, request):
        path = self.cfg.static_dir / "index.html"
        if not path.is_file():
            raise ApiError(404, "the web page is not installed")
        return FileResponse(path, media_type="text/html; charset=utf-8")

    async def health(self, request):
        return JSONResponse({"status": "ok", "model": "ready"})

    async def openapi(self, request):
        return Response((PACKAGE_DIR / "openapi.json").read_bytes(), media_type="application/json")

    def model_entry(self) -> dict:
        return {"id": self.cfg.model_id, "object": "model", "created": 0, "owned_by": "zimage-mlx"}

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [self.model_entry()]})

    async def model(self, request):
        model_id = request.path_params["model_id"]
        if model_id.lower() not in self.cfg.model_ids():
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {self.cfg.model_id!r}",
                           "model", "model_not_found", "invalid_request_error")
        return JSONResponse(self.model_entry())

    async def variations(self, request):
        raise ApiError(404, "image variations are not supported; use /v1/images/edits with a prompt", None,
                       "unsupported_endpoint")

    # -- OpenAI ---------------------------------------------------------------------------------------
    async def read_json(self, request: Request) -> dict:
        ctype = request.headers.get("content-type", "")
        if ctype and "json" not in ctype:
            raise ApiError(415, f"expected application/json, got {ctype.split(';')[0]}", None, "unsupported_media_type")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            raise bad(None, "the body is not valid JSON", "invalid_json") from None
        if not isinstance(body, dict):
            raise bad(None, "the body must be a JSON object", "invalid_json")
        return body

    async def generations(self, request: Request):
        body = await self.read_json(request)
        proxy = request.url.path.startswith("/proxy/")
        params, meta = parse_openai(Fields(body), self.cfg, any_model=proxy)
        return await self.openai_run(request, params, meta, "image_generation")

    async def edits(self, request: Request):
        proxy = request.url.path.startswith("/proxy/")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            fields, image, mask = await self.read_edit_form(request)
        elif "json" in ctype:
            body = await self.read_json(request)
            fields = Fields({k: v for k, v in body.items() if k not in ("image", "mask")})
            images = body.get("image")
            if isinstance(images, list):
                if len(images) != 1:
                    raise bad("image", f"give one image to edit, got {len(images)}")
                images = images[0]
            if images is None:
                raise bad("image", "image is required", "missing_required_parameter")
            image = decode_base64_image(images, "image", self.cfg)
            mask = decode_base64_image(body["mask"], "mask", self.cfg) if body.get("mask") else None
        else:
            raise ApiError(415, "send multipart/form-data (or JSON with a base64 image)", None, "unsupported_media_type")
        params, meta = parse_openai(fields, self.cfg, any_model=proxy, edit=True)
        params.image, params.mask = make_edit_inputs(image, mask, self.cfg)
        size = (params.width, params.height) if params.width else None
        params.width, params.height = edit_size(params.image, size, self.cfg)
        if params.partial_steps:  # spread over the steps an edit really runs (fewer below strength 1)
            params.partial_steps = partial_steps(params.denoising_steps(), meta["partial_images"])
        return await self.openai_run(request, params, meta, "image_edit")

    async def read_edit_form(self, request: Request):
        try:
            form = await request.form(max_files=4, max_fields=64, max_part_size=1024 * 1024)
        except ApiError:
            raise
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
            if len(uploads) > 1:
                raise bad("image", f"give one image to edit, got {len(uploads)}")
            image = decode_image(await uploads[0].read(), "image", self.cfg)
            masks = files.get("mask", [])
            if len(masks) > 1:
                raise bad("mask", "give one mask")
            mask = decode_image(await masks[0].read(), "mask", self.cfg) if masks else None
            for key in ("image", "image[]", "mask"):
                if key in values:
                    raise bad(key, f"{key} must be a file part")
        finally:
            await form.close()  # the spooled upload files
        return Fields(values, strings=True), image, mask

    def openai_body(self, job: Job, meta: dict) -> dict:
        p = job.params
        w, h = job.sizes[0]
        revised = job.revised_prompts or [None] * len(job.images)  # OpenAI's own field for a rewritten prompt
        data = [{"b64_json": base64.b64encode(b).decode(), "revised_prompt": r, "seed": s}
                for b, s, r in zip(job.images, job.seeds, revised)]
        out = {"created": int(time.time()), "data": data, "background": "opaque", "output_format": p.output_format,
               "usage": ZERO_USAGE}
        if f"{w}x{h}" in OPENAI_SIZES:
            out["size"] = f"{w}x{h}"
        out["zimage"] = self.zimage_info(job)
        return out

    def zimage_info(self, job: Job) -> dict:
        p = job.params
        w, h = job.sizes[0] if job.sizes else (p.width, p.height)
        return {"width": w, "height": h, "steps": p.steps, "guidance": p.guidance, "strength": p.strength
                if p.image is not None else None, "model": self.cfg.model_id, "seeds": job.seeds,
                "timings": job.timings}

    async def openai_run(self, request: Request, params: Params, meta: dict, prefix: str):
        job = Job(params, kind="openai")
        if meta["stream"]:
            self.submit(job)
            return JobStream(self.openai_stream(job, prefix), job, self.runner)
        if not await self.run_sync(request, job):
            return Response(status_code=499)  # nobody is listening
        if job.status != "completed":
            raise self.job_error(job)
        return JSONResponse(self.openai_body(job, meta))

    async def openai_stream(self, job: Job, prefix: str):
        p = job.params
        created = int(time.time())

        def event(name: str, data: dict) -> str:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n"

        def common(w, h) -> dict:
            size = f"{w}x{h}"
            return {"background": "opaque", "created_at": created, "output_format": p.output_format,
                    "quality": "auto", "size": size if size in STREAM_SIZES else "auto"}

        try:
            async for type_, data in job.stream(ping=self.cfg.ping_seconds):
                if type_ == "ping":
                    yield ": ping\n\n"
                elif type_ == "partial":
                    yield event(f"{prefix}.partial_image", {"type": f"{prefix}.partial_image", "b64_json": data["b64"],
                                                           "partial_image_index": data["index"],
                                                           **common(p.width or 0, p.height or 0)})
                elif type_ == "done":
                    for b, s, (w, h) in zip(job.images, job.seeds, job.sizes):
                        yield event(f"{prefix}.completed", {"type": f"{prefix}.completed",
                                                            "b64_json": base64.b64encode(b).decode(), "seed": s,
                                                            **common(w, h), "usage": ZERO_USAGE,
                                                            "zimage": self.zimage_info(job)})
                elif type_ in ("failed", "cancelled"):
                    err = self.job_error(job)
                    yield event("error", {"type": "error", **err.body})
        finally:
            if not job.is_finished:
                self.runner.cancel(job, "disconnect")

    # -- native jobs ----------------------------------------------------------------------------------
    def find_job(self, request) -> Job:
        job = self.jobs.get(request.path_params["job_id"])
        if job is None:
            raise ApiError(404, f"no job {request.path_params['job_id']!r}", "id", "job_not_found")
        return job

    def remember(self, job: Job) -> None:
        self.jobs[job.id] = job
        finished = [j for j in self.jobs.values() if j.is_finished]
        for old in finished[: max(0, len(finished) - self.cfg.keep_jobs)]:
            del self.jobs[old.id]

    async def create_job(self, request: Request):
        params = parse_native(await self.read_json(request), self.cfg)
        job = Job(params, kind="native")
        self.submit(job)
        self.remember(job)
        return JSONResponse({"id": job.id, "status": "queued", "queue_position": job.position,
                             "events_url": f"/v1/jobs/{job.id}/events"}, 202)

    async def get_job(self, request):
        return JSONResponse(self.find_job(request).to_json())

    async def delete_job(self, request):
        job = self.find_job(request)
        self.runner.cancel(job, "user")
        return JSONResponse(job.to_json())

    async def job_events(self, request):
        job = self.find_job(request)

        async def events():
            async for type_, data in job.stream(ping=self.cfg.ping_seconds):
                if type_ == "ping":
                    yield ": ping\n\n"
                elif type_ != "partial":
                    yield f"event: {type_}\ndata: {json.dumps(data)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def job_image(self, request):
        job = self.find_job(request)
        k = request.path_params["index"]
        if job.status != "completed" or not 0 <= k < len(job.images):
            raise ApiError(404, f"job {job.id} has no image {k}" + ("" if job.status == "completed" else
                                                                     f" (it is {job.status})"), "index", "image_not_found")
        ext = {"png": "png", "jpeg": "jpg", "webp": "webp"}[job.params.output_format]
        return Response(job.images[k], media_type=job.media_type,
                        headers={"Content-Disposition": f'inline; filename="zimage-{job.seeds[k]}.{ext}"'})

    async def status(self, request):
        running = self.runner.running
        return JSONResponse({
            "model": self.cfg.model_id, "running": running.id if running else None,
            "queue": [j.id for j in self.runner.queued()], "queue_size": self.runner.queue_size,
            "limits": {"max_side": self.cfg.max_side, "max_n": self.cfg.max_n, "max_steps": self.cfg.max_steps},
            "defaults": {"width": self.cfg.default_width, "height": self.cfg.default_height,
                         "steps": self.cfg.default_steps},
            "loras": list_loras(self.cfg)})

    # -- A1111 ----------------------------------------------------------------------------------------
    async def a1111_run(self, request: Request, img2img: bool):
        body = await self.read_json(request)
        params = parse_a1111(body, self.cfg, img2img=img2img)
        job = Job(params, kind="a1111")
        if not await self.run_sync(request, job):
            return Response(status_code=499)
        if job.status != "completed":
            raise self.job_error(job)
        p = job.params
        w, h = job.sizes[0]
        info = {"prompt": p.prompt, "all_prompts": [p.prompt] * len(job.seeds), "negative_prompt": p.negative_prompt or "",
                "seed": job.seeds[0], "all_seeds": job.seeds, "subseed": -1, "all_subseeds": [-1] * len(job.seeds),
                "width": w, "height": h, "sampler_name": "Euler", "cfg_scale": p.guidance + 1.0, "steps": p.steps,
                "batch_size": len(job.seeds), "sd_model_name": self.cfg.model_id,
                "denoising_strength": p.strength if p.image is not None else None,
                "job_timestamp": time.strftime("%Y%m%d%H%M%S")}
        parameters = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
        return JSONResponse({"images": [base64.b64encode(b).decode() for b in job.images], "parameters": parameters,
                             "info": json.dumps(info)})

    async def txt2img(self, request):
        return await self.a1111_run(request, img2img=False)

    async def img2img(self, request):
        return await self.a1111_run(request, img2img=True)

    async def progress(self, request):
        job = self.runner.running
        queued = len(self.runner.queued())
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
        job = self.runner.running
        if job is not None:
            self.runner.cancel(job, "interrupt")
        return JSONResponse({})

    async def sd_models(self, request):
        return JSONResponse([{"title": self.cfg.model_id, "model_name": self.cfg.model_id, "hash": None,
                              "sha256": None, "filename": self.cfg.model_id, "config": None}])

    async def samplers(self, request):
        return JSONResponse([{"name": "Euler", "aliases": ["euler", "Euler (flow match)"], "options": {}}])

    async def schedulers(self, request):
        return JSONResponse([{"name": "automatic", "label": "Automatic", "aliases": None,
                              "default_rho": -1, "need_inner_model": False}])

    async def get_options(self, request):
        return JSONResponse(a1111_options(self.cfg))

    async def set_options(self, request):
        check_override_settings(await self.read_json(request), self.cfg, param=None)
        return JSONResponse({})


class JobStream(StreamingResponse):
    """An SSE response whose job is cancelled when the response ends early, however it ends (a client that
    hangs up even before the first event included)."""

    def __init__(self, content, job: Job, runner: JobRunner):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job, self.runner = job, runner

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.is_finished:
                self.runner.cancel(self.job, "disconnect")


# ---------------------------------------------------------------------------------------------------
# Middleware: Host check, key, body cap, and the last-resort 500


class Guard:
    def __init__(self, app, cfg: ServerConfig):
        self.app = app
        self.cfg = cfg
        self.key = cfg.api_key.encode() if cfg.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        proxy = path.startswith("/proxy/")
        try:
            if self.cfg.allowed_hosts is not None:
                host = host_name(headers.get("host", ""))
                if host not in self.cfg.allowed_hosts:
                    raise ApiError(400, f"the Host header {headers.get('host', '')!r} is not allowed (DNS rebinding "
                                   "protection); start the server with --allowed-host NAME to allow it", None,
                                   "invalid_host")
            # /health, and the page itself (a static file with no data; every call it makes needs the key)
            public = path == "/health" or (path == "/" and scope["method"] in ("GET", "HEAD"))
            if self.key is not None and not public and not self.authorized(headers):
                raise ApiError(403 if proxy else 401, "a valid API key is required (Authorization: Bearer KEY or "
                               "X-API-Key: KEY)", None, "invalid_api_key",
                               headers={} if proxy else {"WWW-Authenticate": "Bearer"})
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    raise bad(None, "invalid Content-Length")
                if int(length) > self.cfg.max_body:
                    raise too_large(self.cfg)
        except ApiError as e:
            return await e.response()(scope, receive, send)

        seen = 0
        cap = self.cfg.max_body

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise too_large(self.cfg)
            return message

        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except ClientDisconnect:  # the client left while sending its body: nobody to answer
            return
        except Exception:  # noqa: BLE001 - the one place an unexpected error becomes a 500
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if not started:
                await ApiError(500, "internal server error; see the server log", None, "internal_error") \
                    .response()(scope, receive, send)

    def authorized(self, headers: dict) -> bool:
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not given:
            return False
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.key)


def too_large(cfg: ServerConfig) -> ApiError:
    return ApiError(413, f"the request body is over this server's limit of {cfg.max_body / 2**20:g} MB (--max-body)",
                    None, "request_too_large")


def host_name(host: str) -> str:
    """'Host' header -> the name without the port, lower case: 'localhost', '127.0.0.1', '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, extra: tuple = ()) -> frozenset | None:
    """The Host names accepted: the loopback names, the bound address, and --allowed-host; None (no check) when
    bound to a non-loopback address on purpose without any --allowed-host."""
    if not is_loopback(bind) and not extra:
        return None
    bound = f"[{bind}]" if ":" in bind else bind
    return frozenset(LOOPBACK_NAMES | {bound.lower()} | {host_name(h) for h in extra})


def create_app(runner: JobRunner, cfg: ServerConfig | None = None) -> Starlette:
    """The ASGI app around a started runner."""
    return Server(runner, cfg or ServerConfig()).app


# ---------------------------------------------------------------------------------------------------
# Running it


def bind_socket(host: str, port: int):
    """A listening socket on (host, port); port 0 picks a free one."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(runner: JobRunner, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000, *,
          announce=print, log_level: str = "warning") -> None:
    """Serve until SIGINT/SIGTERM. The runner must be started (model loaded). Prints `listening on
    http://HOST:PORT` once connections are accepted. On a signal: the queued jobs are answered 503, the
    running one is cancelled at its next step, new requests get 503, and the function returns."""
    import sys
    import threading

    import uvicorn

    if not log.handlers:  # one line per job on stderr (stdout carries only the listening line)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    app = create_app(runner, cfg)
    sock = bind_socket(host, port)
    real_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                announce(f"listening on http://{shown}:{real_port}")

        def handle_exit(self, sig, frame):
            # queued jobs: 503; the running one stops at its next step; new ones: 503. On its own thread: a
            # signal handler must not wait for a lock the interrupted main thread may hold.
            threading.Thread(target=runner.shutdown, name="zimage-shutdown").start()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # uvicorn would re-raise the signal after shutting down: exit 0 instead

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=30,
                            lifespan="off")
    server = _Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        runner.shutdown(wait=30)
        sock.close()
