"""The hires fix: a second, image-to-image pass over a first image at a larger size (A1111's "Hires. fix").

The second pass is exactly our image-to-image: the first image (8-bit, as decoded) is resized to the target
size with Lanczos (each side the first's times `hires_scale`, rounded to a multiple of 16), then denoised
with strength `hires_strength` over a `hires_steps`-step schedule (default: the first pass's steps), with the
same prompt, negative prompt, guidance, LoRAs and seed. Its noise is noise(seed) at the target size and its
VAE posterior sample image_key(seed)'s, as any image-to-image run of that seed. Variety does not apply to
it: the composition is the first pass's. A second pass larger than `tile` (default 1024) pixels a side is
denoised in MultiDiffusion tiles (zimage_mlx.tiles).

`hires_control` runs the second pass under the loaded ControlNet (a Union Tile one, made for this) with one
control image, the upscaled first image itself, at `hires_control_scale` (default: the ControlNet's
recommended scale) over all its steps: it holds the composition at higher strengths. The first pass keeps
its own controls (none unless given). A pass under ControlNet is never tiled (one DiT call over the whole
image), so `tile` does not apply to it.

The "latent" upscaler skips the decode and the encode: the first pass's final latents are resized to the
target's latent grid by bilinear interpolation with half-pixel centres (torch's `interpolate(mode="bilinear",
align_corners=False)`, A1111's "Latent"), and the second pass starts from them as `image_latents`.

`upscale_recipe` makes the same second pass for any image (`zimage-mlx upscale`, `ZImagePipeline.upscale`).
"""

from __future__ import annotations

from .errors import InputError
from .inputs import MAX_SIDE, check_number, open_image
from .recipe import DEFAULT_TILE, MAX_HIRES_SCALE, ControlRef, Recipe, file_name, scaled_size as target_size

DEFAULT_STRENGTH = 0.35  # Recipe.hires_strength's default, for upscale


def upscale_image(image, width: int, height: int):
    """An 8-bit PIL image resized to (width, height) with Lanczos, as RGB."""
    from PIL import Image

    return image.convert("RGB").resize((width, height), resample=Image.Resampling.LANCZOS)


def upscale_latents(z, height: int, width: int):
    """Latents (B, h, w, C) resized to (B, height, width, C): bilinear, half-pixel centres, edges clamped
    (torch's interpolate(mode="bilinear", align_corners=False) without antialiasing)."""
    import mlx.core as mx

    def axis(n_in: int, n_out: int):
        src = mx.maximum((mx.arange(n_out, dtype=mx.float32) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = mx.minimum(mx.floor(src).astype(mx.int32), n_in - 1)
        hi = mx.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo.astype(mx.float32)

    y0, y1, fy = axis(z.shape[1], height)
    x0, x1, fx = axis(z.shape[2], width)
    fy, fx = fy[None, :, None, None], fx[None, None, :, None]
    rows = z[:, y0] * (1 - fy) + z[:, y1] * fy  # (B, height, w, C)
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def second_pass(r: Recipe, first) -> Recipe:
    """The second pass's recipe (settled) from a one-image recipe with hires and its first result: a PIL image,
    or with the latent upscaler its latents (1, h, w, 16)."""
    width, height = r.hires_size
    common = dict(width=width, height=height, strength=r.hires_strength, steps=r.hires_steps or r.steps,
                  hires_scale=None, hires_steps=None, variety=0.0, mask=None, init_mask=None, image="hires.png",
                  tile=r.tile or DEFAULT_TILE)
    if r.hires_upscaler == "latent":
        z = upscale_latents(first, height // 8, width // 8)
        return r.replace(init_image=None, init_latents=z, **common).settle()
    big = upscale_image(first, width, height)
    control = {}
    if r.hires_control:
        control = dict(controlnet=r.hires_control if isinstance(r.hires_control, str) else None,
                       controls=[ControlRef("hires.png", r.hires_control_scale, big)], control_type="none",
                       control_start=0.0, control_end=1.0, hires_control=None, hires_control_scale=None)
    return r.replace(init_image=big, init_latents=None, **common, **control).settle()


def run_second_passes(pipe, batch: list[Recipe], made, *, prompts: list[str], release: bool,
                      release_transformer: bool, on_step, cancel) -> list:
    """The second pass of each image of a batch, one at a time (`made`: the first images, or the latents with
    the latent upscaler; `prompts`: the run's, as the first pass has them); the DiT is freed before the last
    decode when `release_transformer`."""
    out = []
    for k, r in enumerate(batch):
        first = made[k: k + 1] if r.hires_upscaler == "latent" else made[k]
        r2 = second_pass(r, first)
        out += pipe._make([r2], None, prompts=prompts, release=release,
                          release_transformer=release_transformer and k == len(batch) - 1, on_step=on_step,
                          cancel=cancel)
    return out


def upscale_recipe(image, *, scale: float = 2.0, prompt: str | None = None, strength: float | None = None,
                   steps: int | None = None, seed: int | None = None, tile: int | None = None,
                   max_side: int = MAX_SIDE) -> Recipe:
    """The recipe of a second pass over any image (a path or a PIL image): Lanczos to its size times `scale`
    (multiples of 16), image-to-image at `strength` (default 0.35). One of ours (its metadata) gives the
    default prompt, seed and steps; else the prompt is empty, the seed drawn and the steps 8. Larger than
    `tile` (default 1024) pixels a side, it is denoised in MultiDiffusion tiles. Checked here,
    before anything loads: InputError naming the field."""
    check_number("scale", scale, 1, MAX_HIRES_SCALE)
    if not scale > 1:
        raise InputError(f"{{scale}} must be above 1, got {scale!r}", "scale", ("scale",))
    opened = open_image(image, "image")
    stored = stored_recipe(opened)
    width, height = target_size(opened.width, opened.height, scale)
    if max(width, height) > max_side:
        raise InputError(f"{{scale}} {scale:g} makes {width}x{height} pixels from {opened.width}x{opened.height}, "
                         f"above the limit of {max_side} a side", "scale", ("scale",))
    r = Recipe(prompt=prompt if prompt is not None else stored.prompt if stored else "",
               seed=seed if seed is not None else stored.seed if stored else None,
               steps=steps if steps is not None else stored.steps if stored else 8,
               strength=DEFAULT_STRENGTH if strength is None else strength, width=width, height=height,
               image=file_name(image) or "image.png", init_image=opened.convert("RGB"), tile=tile or DEFAULT_TILE)
    return r.validate(max_side=max_side)


def stored_recipe(image) -> Recipe | None:
    """The recipe an image's metadata holds (ours, or an A1111 infotext), or None."""
    try:
        return Recipe.from_png(image)
    except (InputError, TypeError, ValueError):
        return None
