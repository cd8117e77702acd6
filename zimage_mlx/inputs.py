"""What `generate` is given, checked and prepared: sizes, steps, seeds and strengths, input images and masks.

The resize policy for image-to-image and inpainting lives here too, so that the CLI and the server can check a
request (and open its files) before any model loads.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

LATENT_CHANNELS = 16
MAX_SEED = 2**32 - 1
MAX_SIDE = 8192  # the model's limit (RoPE axes), before any face's own


@dataclass
class ImageInput:
    """An image-to-image or inpainting request, checked and sized by `image_input`."""

    image: object  # PIL image as given (resized when encoded); None when only latents were given
    mask: object  # PIL image of the image's size, or None
    latents: object  # the caller's image_latents (an mx.array), or None
    width: int  # output size
    height: int
    strength: float


def image_input(image, mask=None, strength: float | None = None, width: int | None = None,
                height: int | None = None, image_latents=None) -> ImageInput:
    """Check an image-to-image / inpainting request and settle the output size by generate's resize policy.

    Opens paths (no model needed: the CLI calls it before loading one); raises InputError or TypeError with a
    one-line reason: no image, an unreadable file, a mask of another size, a strength outside [0, 1].
    """
    if image is None and image_latents is None:
        name = "mask" if mask is not None else "strength"
        raise InputError(f"{{{name}}} needs an image to start from ({{image}})", name, (name, "image"))
    validate(width=width, height=height, strength=strength)
    image = open_image(image, "image") if image is not None else None
    mask = open_image(mask, "mask") if mask is not None else None
    if image is not None:
        size = image.size
    elif getattr(image_latents, "ndim", None) != 4 or image_latents.shape[-1] != LATENT_CHANNELS:
        raise TypeError(f"image_latents must be an mx.array of shape (1 or B, h, w, {LATENT_CHANNELS})")
    else:
        size = (image_latents.shape[2] * 8, image_latents.shape[1] * 8)
    if mask is not None and mask.size != size:
        raise InputError(f"the {{mask}} is {mask.width}x{mask.height} but the {{image}} is {size[0]}x{size[1]}: "
                         "they must have the same size", "mask", ("mask", "image"))
    width, height = output_size(size, width, height)
    if image_latents is not None and tuple(image_latents.shape[1:]) != (height // 8, width // 8, LATENT_CHANNELS):
        raise InputError(f"image_latents must have shape (1 or B, {height // 8}, {width // 8}, {LATENT_CHANNELS}) "
                         f"for a {width}x{height} image, got {tuple(image_latents.shape)}", "image_latents")
    if strength is None:
        strength = 1.0 if mask is not None else 0.6  # diffusers' defaults
    return ImageInput(image, mask, image_latents, width, height, float(strength))


def output_size(size: tuple[int, int], width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """The output (width, height) for an input image of `size` (W, H): both given, as given; neither, the
    image's size rounded down to multiples of 16; one, the other from the aspect ratio (nearest multiple of 16)."""
    W, H = size
    if width is None and height is None:
        width, height = W // 16 * 16, H // 16 * 16
        if not width or not height:
            raise InputError(f"the {{image}} is {W}x{H} pixels; it must be at least 16x16", "image", ("image",))
        if max(width, height) > MAX_SIDE:
            raise InputError(f"the {{image}} is {W}x{H} pixels, above the model's limit of {MAX_SIDE} a side: give a "
                             "smaller width and height", "image", ("image",))
    elif height is None:
        height = max(16, round(width * H / W / 16) * 16)
    elif width is None:
        width = max(16, round(height * W / H / 16) * 16)
    validate(width=width, height=height)
    return width, height


def open_image(value, what: str = "image", field: str | None = None):
    """A PIL image as is, or a path opened like diffusers' load_image (EXIF orientation applied); InputError
    for a missing or unreadable file, TypeError for anything else. `what` names it in messages, `field` is the
    parameter at fault (default: `what`)."""
    field = field or what
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path or a PIL image, got {type(value).__name__}")
    path = Path(value).expanduser()
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file", field) from None
    except UnidentifiedImageError:
        raise InputError(f"{what} {path} is not an image Pillow can read", field) from None
    except (OSError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}", field) from None


def mask_latents(mask, width: int, height: int, scale: int = 8):
    """A PIL mask -> (1, height / scale, width / scale, 1) float32 of 0 (keep) and 1 (repaint), as diffusers'
    inpainting prepares it: resized to (width, height) with Lanczos, greyscale, 1 where >= 50% (binarised at
    full size), then torch's 'nearest' down to the latent grid, which is the top-left pixel of each block."""
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.Resampling.LANCZOS)
    m = (np.asarray(mask.convert("L"), dtype=np.float32) / np.float32(255) >= 0.5).astype(np.float32)
    return mx.array(m[::scale, ::scale][None, :, :, None])  # (1, h, w, 1)


def validate(*, width=None, height=None, steps=None, guidance=None, num_images=None, seed=None, strength=None) -> None:
    """Check user-facing generation arguments; raise InputError naming the field."""
    for name in ("width", "height"):
        check_side(name, locals()[name], MAX_SIDE)
    if steps is not None:
        check_int("steps", steps, 1)
    if guidance is not None:
        check_number("guidance", guidance, 0)
    if num_images is not None:
        check_int("num_images", num_images, 1)
    if seed is not None:
        check_int("seed", seed, 0, MAX_SEED)
    if strength is not None:
        check_number("strength", strength, 0, 1)


def check_side(name: str, v, max_side: int = MAX_SIDE) -> None:
    """A width or height: a multiple of 16 up to `max_side` (None passes); InputError naming `name`."""
    if v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v % 16:
        raise InputError(f"{{{name}}} must be a positive multiple of 16, got {v!r}", name, (name,))
    if v > max_side:
        limit = "the model's limit" if max_side == MAX_SIDE else "the limit"
        raise InputError(f"{{{name}}} {v} is above {limit} of {max_side} pixels", name, (name,))


def check_int(name: str, v, lo: int, hi: int | None = None) -> None:
    """An integer in [lo, hi]; InputError naming `name` otherwise."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi):
        return
    rule = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    raise InputError(f"{{{name}}} must be {rule}, got {v!r}", name, (name,))


def check_number(name: str, v, lo: float, hi: float | None = None, what: str | None = None) -> None:
    """A finite number in [lo, hi]; InputError naming `name` (or described by `what`) otherwise."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= lo
    if ok and (hi is None or v <= hi):
        return
    rule = f"a number >= {lo:g}" if hi is None else f"a number in [{lo:g}, {hi:g}]"
    raise InputError(f"{what or '{' + name + '}'} must be {rule}, got {v!r}", name, () if what else (name,))
