"""What an image records of how it was made: PNG text chunks and A1111's infotext, both ways.

Works on `Recipe.to_dict()`'s form (a plain dict), so that `recipe.Recipe` is the one place that knows the
fields; this module knows the spellings: our chunks (one per setting: `prompt`, `seed`, `loras` as JSON...)
and the `parameters` text A1111 and Forge write (`prompt\\nNegative prompt: ...\\nSteps: 8, Sampler: ...`).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from ._version import __version__
from .errors import InputError

SAMPLER_NAME = "Euler (flow match)"
# Our chunks read back by from_text, in the order they are written.
KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "cfg_normalization", "cfg_truncation", "width",
        "height", "model", "transformer", "quantization", "text_encoder_quantization", "quantize", "dtype", "image",
        "strength", "mask", "original_prompt", "loras", "controlnet", "controls", "control_type", "control_start",
        "control_end", "controlnet_graph", "variety", "variety_until", "hires_scale", "hires_strength",
        "hires_steps", "hires_upscaler", "hires_control", "hires_control_scale", "tile", "reference_images")
INTS = ("seed", "steps", "width", "height", "hires_steps", "tile")
FLOATS = ("guidance", "cfg_normalization", "cfg_truncation", "strength", "control_start", "control_end", "variety",
          "variety_until", "hires_scale", "hires_strength", "hires_control_scale")
UPSCALER_NAMES = {"lanczos": "Lanczos", "latent": "Latent"}  # A1111's names
BITS = ("quantization", "text_encoder_quantization", "quantize")
USER_COMMENT = 0x9286  # EXIF UserComment, where A1111 writes its infotext in a JPEG or WebP
EXIF_IFD = 0x8769


def number(x: float) -> str:
    """A number as written in metadata: `0.35`, `4`, and full precision only where it is needed."""
    return f"{float(x):g}" if float(x) == round(float(x), 6) else repr(float(x))


def _bits(b) -> str:
    return str(b) if b else "none"


def png_text(r: dict) -> dict[str, str]:
    """One image's text chunks from a recipe dict (one prompt, one seed)."""
    text = {"prompt": r["prompt"], "negative_prompt": r["negative_prompt"] or "", "seed": str(r["seed"]),
            "steps": str(r["steps"]), "guidance": number(r["guidance"]),
            "cfg_normalization": number(r["cfg_normalization"]), "cfg_truncation": number(r["cfg_truncation"]),
            "width": str(r["width"]), "height": str(r["height"]), "model": r["model"] or "",
            "quantization": _bits(r["quantization"]), "text_encoder_quantization": _bits(r["text_encoder_quantization"]),
            "quantize": _bits(r["quantize"]), "dtype": r["dtype"] or ""}
    if r["transformer"]:
        text["transformer"] = r["transformer"]
    if r["image"]:
        text.update(image=r["image"], strength=number(r["strength"]))
    if r["mask"]:
        text["mask"] = r["mask"]
    if r["original_prompt"] is not None:
        text["original_prompt"] = r["original_prompt"]
    if r["loras"]:
        text["loras"] = json.dumps(r["loras"], ensure_ascii=False)
    if r["controlnet"]:
        text.update(controlnet=r["controlnet"], controls=json.dumps(r["controls"], ensure_ascii=False),
                    control_type=r["control_type"], control_start=number(r["control_start"]),
                    control_end=number(r["control_end"]), controlnet_graph=r["controlnet_graph"] or "authors")
    if r.get("variety"):
        text.update(variety=number(r["variety"]), variety_until=number(r["variety_until"]))
    if r.get("hires_scale"):
        text.update(hires_scale=number(r["hires_scale"]), hires_strength=number(r["hires_strength"]),
                    hires_upscaler=r["hires_upscaler"])
        if r["hires_steps"]:
            text["hires_steps"] = str(r["hires_steps"])
        if r.get("hires_control"):
            text["hires_control"] = str(r["hires_control"])
            if r.get("hires_control_scale") is not None:
                text["hires_control_scale"] = number(r["hires_control_scale"])
    if r.get("tile"):
        text["tile"] = str(r["tile"])
    if r.get("reference_images"):  # Omni: the references' file names (JSON list)
        text["reference_images"] = json.dumps(r["reference_images"], ensure_ascii=False)
    text.update(version=__version__, Software=f"zimage-mlx {__version__}", parameters=infotext(r))
    return text


def infotext(r: dict) -> str:
    """A1111's `parameters` text of one image's recipe dict."""
    fields = {"Steps": r["steps"], "Sampler": SAMPLER_NAME, "CFG scale": number(r["guidance"]), "Seed": r["seed"],
              "Size": f"{r['width']}x{r['height']}", "Model": r["model"] or ""}
    if r["transformer"]:
        fields["DiT file"] = r["transformer"]
    if r["guidance"] > 0 and r["cfg_normalization"]:
        fields["CFG normalization"] = number(r["cfg_normalization"])
    if r["guidance"] > 0 and r["cfg_truncation"] != 1.0:
        fields["CFG truncation"] = number(r["cfg_truncation"])
    if r["quantization"]:
        fields["Quantization"] = f"{r['quantization']}-bit"
    if r["text_encoder_quantization"] and r["text_encoder_quantization"] != r["quantization"]:
        fields["Text encoder quantization"] = f"{r['text_encoder_quantization']}-bit"
    if r["loras"]:
        fields["LoRA"] = ", ".join(f"{x['name']}:{number(x['scale'])}" for x in r["loras"])
    if r["image"]:
        fields["Denoising strength"] = number(r["strength"])
    fields.update(_extra_infotext(r))
    if r["controlnet"]:
        fields["ControlNet"] = r["controlnet"]
        fields["Control"] = ", ".join(f"{Path(c['image'] or 'image').name}:{number(c['scale'])}"
                                      for c in r["controls"])
    fields["Dtype"] = r["dtype"] or ""
    fields["Version"] = f"zimage-mlx {__version__}"
    lines = [r["prompt"]]
    if r["negative_prompt"]:
        lines.append(f"Negative prompt: {r['negative_prompt']}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def _extra_infotext(r: dict) -> dict:
    """Variety, and the hires fix under A1111's keys. A1111 writes the hires pass's strength as `Denoising
    strength` (its txt2img has no other); from an image, where that key is the image's strength, the hires
    pass's goes under `Hires strength`, whose presence says which is which."""
    out = {}
    if r.get("variety"):
        out.update({"Variety": number(r["variety"]), "Variety until": number(r["variety_until"])})
    if r.get("hires_scale"):
        key = "Hires strength" if r["image"] else "Denoising strength"
        out.update({key: number(r["hires_strength"]), "Hires upscale": number(r["hires_scale"])})
        if r["hires_steps"]:
            out["Hires steps"] = r["hires_steps"]
        out["Hires upscaler"] = UPSCALER_NAMES[r["hires_upscaler"]]
        if r.get("hires_control"):
            out["Hires ControlNet"] = str(r["hires_control"])
            if r.get("hires_control_scale") is not None:
                out["Hires control scale"] = number(r["hires_control_scale"])
    if r.get("tile"):
        out["Tile"] = r["tile"]
    return out


def _hires_from_infotext(a: dict, steps: bool) -> dict:
    """The hires fields of an infotext (ours or A1111's): A1111's other upscalers (ESRGAN...) are pixel-space
    ones, run here as Lanczos; its `Latent (...)` variants as our latent one. Hires steps 0 means the first
    pass's; they apply when `steps` (the infotext's steps apply)."""
    if "Hires upscale" not in a:
        return {}
    hires = "Hires strength" if "Hires strength" in a else "Denoising strength"
    out = {"hires_scale": a["Hires upscale"], "hires_strength": a.get(hires),
           "hires_upscaler": "latent" if a.get("Hires upscaler", "").lower().startswith("latent") else "lanczos"}
    if steps and a.get("Hires steps") not in (None, "0"):
        out["hires_steps"] = a["Hires steps"]
    return {k: v for k, v in out.items() if v is not None}


def _quote(v) -> str:
    v = str(v)
    return json.dumps(v, ensure_ascii=False) if any(c in v for c in ',:"\n') else v


def parse_infotext(text: str) -> dict:
    """The prompt, negative prompt and `Key: value` fields of an infotext, as strings."""
    lines = text.strip("\n").split("\n")
    fields = {}
    if re.match(r"\s*Steps: ", lines[-1]):
        for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', lines.pop()):
            fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields["prompt"] = "\n".join(prompt)
    fields["negative_prompt"] = "\n".join(negative)
    return fields


def from_infotext(text: str) -> dict:
    """A recipe dict from an infotext. Ours (Version: zimage-mlx): all of it. Another tool's (A1111, Forge):
    the prompt, seed and size always; its steps and CFG scale (classic: 1 = no guidance, so guidance = CFG
    scale - 1) only when its model is a Z-Image one (Forge runs Z-Image), since for another model they were
    chosen for that model. A negative prompt comes with guidance only; the input image of an img2img run is
    not named, so its denoising strength cannot apply."""
    a = parse_infotext(text)
    raw = {"prompt": a["prompt"], "negative_prompt": a["negative_prompt"], "seed": a.get("Seed")}
    if "Size" in a:
        raw["width"], _, raw["height"] = a["Size"].partition("x")
    if "zimage-mlx" in a.get("Version", ""):
        raw.update(steps=a.get("Steps"), guidance=a.get("CFG scale"), cfg_normalization=a.get("CFG normalization"),
                   cfg_truncation=a.get("CFG truncation"), model=a.get("Model"), dtype=a.get("Dtype"),
                   transformer=a.get("DiT file"),
                   quantization=a.get("Quantization", "none").removesuffix("-bit"),
                   strength=a.get("Denoising strength"), variety=a.get("Variety"),
                   variety_until=a.get("Variety until"), tile=a.get("Tile"))
        if "Hires upscale" in a and "Hires strength" not in a:
            raw.pop("strength")  # A1111's way: the hires pass's strength
        raw.update(_hires_from_infotext(a, True), hires_control=a.get("Hires ControlNet"),
                   hires_control_scale=a.get("Hires control scale"))
        if a.get("LoRA"):
            raw["loras"] = json.dumps([{"name": n, "scale": float(s)} for n, _, s in
                                       (x.strip().rpartition(":") for x in a["LoRA"].split(","))])
    elif re.search(r"z[-_ ]?image", a.get("Model", ""), re.I):
        raw["steps"] = a.get("Steps")  # (its model name is another tool's file name: not a model to load here)
        if a.get("CFG scale") is not None:
            raw["guidance"] = str(max(float(a["CFG scale"]) - 1, 0.0))
    if "zimage-mlx" not in a.get("Version", ""):
        raw.update(_hires_from_infotext(a, "steps" in raw))
    out = _typed({k: v for k, v in raw.items() if v is not None}, "parameters")
    if not out.get("guidance", 0) > 0:
        out["negative_prompt"] = None  # without guidance a negative prompt has no effect
    return out


def read_text(source) -> dict[str, str]:
    """The text chunks of an image: a path, bytes or a PIL image. InputError (field "image") when it cannot
    be read."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        text = {k: v for k, v in (getattr(source, "text", None) or source.info).items() if isinstance(v, str)}
        comment = None if text else user_comment(source)
        return {"parameters": comment} if comment else text
    what = "the image" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray))
                        else Path(source).expanduser()) as im:
            im.load()
            return read_text(im)
    except FileNotFoundError:
        raise InputError(f"{what}: no such file", "image") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} is not an image Pillow can read", "image") from None
    except OSError as e:
        raise InputError(f"cannot read {what}: {e.strerror or e}", "image") from None


def from_text(text: dict[str, str]) -> dict:
    """A recipe dict from an image's text chunks: ours, else an A1111 `parameters` chunk."""
    if "prompt" in text and "seed" in text:
        raw = {k: text[k] for k in KEYS if k in text}
        if "quantize" not in raw and "quantization" in raw:  # written before the on-the-fly bits had a chunk
            raw["quantize"] = raw["quantization"]
        return _typed(raw, "metadata")
    if "parameters" in text:
        return from_infotext(text["parameters"])
    raise InputError("the image has no generation settings in its metadata (no prompt and seed)", "image")


def _typed(raw: dict[str, str], where: str) -> dict:
    out = {}
    for key, value in raw.items():
        try:
            out[key] = _value(key, value)
        except (ValueError, TypeError, KeyError):
            raise InputError(f"the {where}'s {key} {value!r} is not what it should be", "image") from None
    if out.get("dtype") not in ("bfloat16", "float16", "float32"):
        out.pop("dtype", None)
    if out.get("model") == "":
        out.pop("model")
    out["negative_prompt"] = out.get("negative_prompt") or None
    return out


def _value(key: str, value: str):
    if key in INTS:
        return int(value)
    if key in FLOATS:
        return float(value)
    if key in BITS:
        return None if value in ("", "none") else int(value)
    if key == "loras":
        return [{"name": str(x["name"]), "scale": float(x["scale"])} for x in json.loads(value)]
    if key == "controls":
        return [{"image": str(x["image"]), "scale": float(x["scale"])} for x in json.loads(value)]
    if key == "reference_images":
        return [None if x is None else str(x) for x in json.loads(value)]
    return value


def exif(infotext: str) -> bytes:
    """EXIF bytes holding an infotext as the UserComment (UTF-16), for `save(..., exif=...)` of a JPEG or WebP."""
    from PIL import Image

    data = Image.Exif()
    data.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + infotext.encode("utf-16-be")
    return data.tobytes()


def user_comment(image) -> str | None:
    """The EXIF UserComment of a PIL image (A1111's infotext in a JPEG or WebP), or None."""
    raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if not raw:
        return None
    if isinstance(raw, str):
        return raw
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):
        return body.decode("utf-16-be", "replace")  # what A1111 (piexif's "unicode") and `exif` write
    return body.decode("latin-1", "replace")
