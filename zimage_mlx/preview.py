"""Cheap step previews: the 16 latent channels mapped to RGB by an affine map fitted from the VAE itself.

A full VAE decode of a step's x0 estimate costs about as much as a step. An affine map of the latents,
rgb = z @ weight + bias at latent resolution, then upscaled, costs a few milliseconds and shows the
colours and layout of what is forming. Published maps (ComfyUI's and others' FLUX factors) are fitted
once for one VAE; ours is fitted from whatever VAE is loaded, so it holds for any checkpoint:

1. a fixed set of synthetic images (smooth colour fields and solid blocks that cover the RGB gamut) is
   encoded to latents (the posterior mean, scaled as the DiT sees it);
2. the latents are decoded, and the decoded pixels are averaged over each latent cell;
3. least squares of those pixel means on the latents (plus a constant) gives the 16x3 weight and bias.

The fit costs one encode and one decode of a few small images, once per VAE: it is cached as JSON beside
a local VAE folder, or in the user cache (keyed by a fingerprint of the VAE's weights).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

FIT_VERSION = 1  # bump when the fit's images or method change: cached maps are then refitted
CACHE_NAME = "latent_rgb.json"


@dataclass
class LatentRGB:
    """An affine map from latents (B, h, w, C) to RGB in about [-1, 1]: rgb = latents @ weight + bias."""

    weight: np.ndarray  # (C, 3) float32
    bias: np.ndarray  # (3,) float32
    r2: float = float("nan")  # fraction of the decoded pixels' variance the map explains on its fit data

    def __call__(self, latents: mx.array) -> mx.array:
        """(B, h, w, C) -> (B, h, w, 3) float32, lazy."""
        return latents.astype(mx.float32) @ mx.array(self.weight) + mx.array(self.bias)

    def to_pil(self, latents: mx.array, size: tuple[int, int] | None = None, scale: int = 8) -> list:
        """PIL images of the mapped latents, resized (bilinear) to `size` (W, H) or to `scale` x the latents."""
        from PIL import Image

        rgb = np.array(self(latents))  # (B, h, w, 3)
        pixels = (np.clip(rgb / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)
        h, w = pixels.shape[1:3]
        size = size or (w * scale, h * scale)
        return [Image.fromarray(p).resize(size, resample=Image.Resampling.BILINEAR) for p in pixels]

    def to_json(self, fingerprint: str) -> str:
        return json.dumps({"version": FIT_VERSION, "fingerprint": fingerprint, "weight": self.weight.tolist(),
                           "bias": self.bias.tolist(), "r2": self.r2})

    @classmethod
    def from_json(cls, text: str, fingerprint: str) -> "LatentRGB | None":
        """The map stored in `text` if it was fitted by this version for this VAE, else None."""
        try:
            data = json.loads(text)
            if data.get("version") != FIT_VERSION or data.get("fingerprint") != fingerprint:
                return None
            weight, bias = np.asarray(data["weight"], np.float32), np.asarray(data["bias"], np.float32)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if weight.ndim != 2 or weight.shape[1] != 3 or bias.shape != (3,):
            return None
        return cls(weight, bias, float(data.get("r2", float("nan"))))


def fit_images(count: int = 4, size: int = 96, seed: int = 0) -> np.ndarray:
    """The synthetic images the map is fitted on: (count, size, size, 3) float32 in [-1, 1]. Each is a smooth
    field of random colours (a 3x3 grid, bicubic-upsampled) with a few solid blocks of saturated, grey and
    random colours, so the fit sees the whole gamut, flat regions and edges."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1], [0, 0, 0],
                        [0.5, 0.5, 0.5]], np.float32)
    out = []
    for _ in range(count):
        grid = (rng.uniform(0, 255, (3, 3, 3))).astype(np.uint8)
        im = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
        im = im.copy()
        for _ in range(4):
            y, x = rng.integers(0, size - size // 4, 2)
            hh, ww = rng.integers(size // 8, size // 3, 2)
            colour = palette[rng.integers(len(palette))] if rng.random() < 0.6 else rng.uniform(0, 1, 3)
            im[y: y + hh, x: x + ww] = colour
        out.append(im * 2 - 1)
    return np.stack(out).astype(np.float32)


def fit(vae, images: np.ndarray | None = None) -> LatentRGB:
    """Fit the latent -> RGB map of `vae` (anything with posterior, scale_latents, decode and scale, as
    vae.VAE): least squares of the decoded pixels, averaged per latent cell, on the encoded latents."""
    images = fit_images() if images is None else images
    s = vae.scale
    zs, ys = [], []
    for im in images:  # one image at a time: a small, flat peak
        mean, _ = vae.posterior(mx.array(im[None]))
        z = vae.scale_latents(mean)  # (1, h, w, C)
        decoded = vae.decode(z)  # (1, H, W, 3)
        mx.eval(z, decoded)
        _, h, w, c = z.shape
        cells = np.array(decoded, np.float64).reshape(h, s, w, s, 3).mean(axis=(1, 3))  # (h, w, 3)
        zs.append(np.array(z, np.float64).reshape(h * w, c))
        ys.append(cells.reshape(h * w, 3))
    z, y = np.concatenate(zs), np.concatenate(ys)
    a = np.concatenate([z, np.ones((len(z), 1))], axis=1)  # (N, C + 1)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    residual = y - a @ coef
    r2 = 1.0 - float((residual**2).sum() / ((y - y.mean(axis=0)) ** 2).sum())
    return LatentRGB(coef[:-1].astype(np.float32), coef[-1].astype(np.float32), r2)


def fingerprint(vae) -> str:
    """A short hash of the VAE's weights (names, shapes, dtypes and a few values and sums of each), so a
    cached map is used only for the weights it was fitted on."""
    from mlx.utils import tree_flatten

    h = hashlib.sha256()
    params = sorted(tree_flatten(vae.parameters()), key=lambda kv: kv[0])
    sums = mx.stack([p.astype(mx.float32).sum() for _, p in params])
    heads = [p.reshape(-1)[:8].astype(mx.float32) for _, p in params]
    mx.eval(sums, *heads)
    for (name, p), total, head in zip(params, np.array(sums).tolist(), heads):
        h.update(f"{name}{tuple(p.shape)}{p.dtype}{total:.6e}".encode())
        h.update(np.array(head).tobytes())
    return h.hexdigest()[:16]


def user_cache_dir() -> Path:
    """Where fitted maps go when the VAE's own folder cannot hold them: $ZIMAGE_MLX_CACHE, else
    $XDG_CACHE_HOME/zimage-mlx, else ~/.cache/zimage-mlx."""
    if os.environ.get("ZIMAGE_MLX_CACHE"):
        return Path(os.environ["ZIMAGE_MLX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zimage-mlx"


def _writable_folder(folder: Path | None) -> bool:
    # Not inside the Hugging Face cache: its snapshot folders belong to huggingface_hub.
    if folder is None or not folder.is_dir() or "huggingface" in folder.resolve().parts:
        return False
    return os.access(folder, os.W_OK)


def load_or_fit(vae, folder: Path | None = None) -> LatentRGB:
    """The cached map for this VAE (beside it in `folder`, or in the user cache), else a new fit, saved
    beside the VAE when its folder is writable (and not the Hugging Face cache), else in the user cache.
    A cache that cannot be written is not an error: the map is then fitted again next time."""
    key = fingerprint(vae)
    candidates = ([folder / CACHE_NAME] if folder is not None else []) + [user_cache_dir() / f"latent_rgb-{key}.json"]
    for path in candidates:
        try:
            found = LatentRGB.from_json(path.read_text(), key)
        except OSError:
            continue
        if found is not None:
            return found
    result = fit(vae)
    path = candidates[0] if _writable_folder(folder) else candidates[-1]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(result.to_json(key))
        os.replace(tmp, path)
    except OSError:
        pass
    return result
