"""Reading a request: JSON bodies and forms, typed values, uploaded images, LoRA names, and the Recipe's check.

The dialects read what only the server decides (strings, switches, choices, formats) with `Fields`, and
hand every value that decides the image to a `Recipe` unchecked: `check_recipe` runs the Recipe's own rules
with this server's limits and turns an `InputError` into a 400 that names the field the dialect's way.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import warnings
from pathlib import Path

from ..errors import InputError
from ..recipe import LoraRef, Recipe
from .core import ApiError, ServerConfig, bad, input_error

LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ +-]*$")
MAX_LORAS = 4
RANDOM_SEED_BOUND = 2**31  # drawn seeds fit a signed 32-bit int (ComfyUI, A1111 widgets)


class Fields:
    """The values of a JSON body or a form (`strings`: numbers and switches arrive as text). `known` lists
    every name a parser may read: reading another is a bug (the OpenAPI test relies on it); `seen` records
    the names read."""

    def __init__(self, data: dict, *, strings: bool = False, known: frozenset | None = None):
        self.data = data
        self.strings = strings
        self.known = known
        self.seen: set[str] = set()

    def _look(self, name: str):
        if self.known is not None and name not in self.known:
            raise AssertionError(f"the parser reads {name!r}, which its field list does not declare")
        self.seen.add(name)
        return self.data.get(name)

    def has(self, name: str) -> bool:
        return self._look(name) is not None

    def first(self, *names: str):
        """(name, value) of the first of `names` present; refuses two aliases with different values."""
        found = [(n, v) for n in names if (v := self._look(n)) is not None]
        if len({json.dumps(v, sort_keys=True, default=str) for _, v in found}) > 1:
            raise bad(found[1][0], f"{found[0][0]} and {found[1][0]} are the same setting: give one of them")
        return found[0] if found else (names[0], None)

    def raw(self, *names: str):
        """A value for the Recipe to check: a form's text made a number when it reads as one."""
        name, v = self.first(*names)
        if self.strings and isinstance(v, str):
            v = _number(v)
        return name, v

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

    def int(self, name: str, default=None, lo=None, hi=None):
        """An integer the server itself decides with (not a Recipe field)."""
        _, v = self.raw(name)
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise bad(name, f"{name} must be an integer between {lo} and {hi}, got {v!r}")
        return v

    def float(self, name: str, default=None):
        _, v = self.raw(name)
        if v is None:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise bad(name, f"{name} must be a finite number, got {v!r}")
        return float(v)

    def bool(self, name: str, default: bool = False) -> bool:
        v = self._look(name)
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

    def seed(self, *names: str):
        """(name, seed): -1 or none means a random one (drawn later by `Recipe.with_seed`)."""
        name, v = self.raw(*names)
        if isinstance(v, (list, tuple, dict)):  # a Recipe may take a list of seeds; these dialects take one
            raise bad(name, f"{name} must be one integer (-1: random), got {type(v).__name__}")
        return name, None if v == -1 else v


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            pass
    return text


async def read_json(request) -> dict:
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


def parse_size(value: str, param: str = "size") -> tuple[int, int] | None:
    """'WxH' -> (W, H) (checked by the Recipe); 'auto' -> None (the caller's default)."""
    if value == "auto":
        return None
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value.strip())
    if not m:
        raise bad(param, f"{param} must be 'WIDTHxHEIGHT' (e.g. 1024x1024) or 'auto', got {value!r}")
    return int(m[1]), int(m[2])


# ---------------------------------------------------------------------------------------------------
# The Recipe's check, named the dialect's way


def check_recipe(recipe: Recipe, cfg: ServerConfig, names: dict[str, str]) -> Recipe:
    """The recipe checked by its own rules with this server's limits, as given and as it will be settled
    (an input image decides the size); an InputError becomes a 400 naming `names.get(field, field)`. The
    recipe comes back unsettled, with a drawn seed when it had none."""
    limits = dict(max_side=cfg.max_side, max_images=cfg.max_n, max_steps=cfg.max_steps)
    try:
        recipe.validate(**limits)
        recipe.settle().validate(**limits)
    except InputError as e:
        raise input_error(e, names) from None
    return recipe.with_seed(bound=RANDOM_SEED_BOUND)


# ---------------------------------------------------------------------------------------------------
# Variety and the hires fix (OpenAI and native dialects)

HIRES_KEYS = {"scale": "hires_scale", "strength": "hires_strength", "steps": "hires_steps", "upscaler": "hires_upscaler"}


def read_extras(f: Fields, names: dict) -> dict:
    """The `variety` number and the `hires` object ({scale, strength, steps, upscaler}; a JSON text in a form)
    as Recipe fields, unchecked (the Recipe checks them); `names` learns how errors name them."""
    out = {}
    variety = f.raw("variety")[1]
    if variety is not None:
        out["variety"] = variety
    hires = f.first("hires")[1]
    if hires is None:
        return out
    if isinstance(hires, str) and f.strings:
        try:
            hires = json.loads(hires)
        except ValueError:
            raise bad("hires", "hires must be a JSON object {\"scale\", \"strength\", \"steps\", \"upscaler\"}") from None
    if not isinstance(hires, dict) or "scale" not in hires:
        raise bad("hires", "hires must be an object with a scale: {\"scale\": 2, \"strength\": 0.35, \"steps\": 8, "
                  "\"upscaler\": \"lanczos\"}")
    unknown = sorted(set(hires) - set(HIRES_KEYS))
    if unknown:
        raise bad("hires", f"hires has scale, strength, steps and upscaler, not {', '.join(unknown)}")
    for key, field in HIRES_KEYS.items():
        names[field] = f"hires.{key}"
        if hires.get(key) is not None:
            out[field] = hires[key]
    return out


# ---------------------------------------------------------------------------------------------------
# LoRAs: names inside --lora-dir, never paths


def read_loras(value, cfg: ServerConfig, *, strings: bool = False) -> list[LoraRef]:
    """A request's `loras` ([{name, scale}]) -> LoraRefs whose source is the file in --lora-dir ([] when none,
    so that the LoRAs of an earlier job are taken off). Scales are the Recipe's to check."""
    if value is None or value == []:
        return []
    if isinstance(value, str) and strings:
        try:
            value = json.loads(value)
        except ValueError:
            raise bad("loras", "loras must be a JSON list of {\"name\", \"scale\"}") from None
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise bad("loras", "loras must be a list of {\"name\": ..., \"scale\": ...}")
    if len(value) > MAX_LORAS:
        raise bad("loras", f"at most {MAX_LORAS} LoRAs, got {len(value)}")
    out = []
    for item in value:
        unknown = set(item) - {"name", "scale"}
        if unknown:
            raise bad("loras", f"a LoRA has name and scale, not {', '.join(sorted(unknown))}")
        name = Fields(item).str("name", required=True, max_len=200)
        path = resolve_lora(name, cfg)
        out.append(LoraRef(path.stem, item.get("scale", 1.0), source=path))
    return out


def resolve_lora(name: str, cfg: ServerConfig) -> Path:
    """A LoRA name -> its file inside --lora-dir; never a path, never outside the folder."""
    if cfg.lora_dir is None:
        raise bad("loras", "this server has no LoRAs (start it with --lora-dir DIR)", "lora_not_found")
    if "/" in name or "\\" in name or ".." in name or not LORA_NAME.match(name):
        raise bad("loras", f"LoRAs are chosen by name (see GET /v1/status), not by path: {name!r}", "invalid_lora")
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    root = cfg.lora_dir.resolve()
    real = (cfg.lora_dir / f"{stem}.safetensors").resolve()
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
