"""What a step preview costs: the fitted latent -> RGB map (`fast_preview`) against one DiT step, and how well
our fitted map and the published FLUX factors explain the VAE's decode.

1. Cost. The map's time at 512x512 and 1024x1024 (mx matmul at latent size, conversion to 8-bit, bilinear
   upscale with PIL: everything `fast_preview` does) against one full-width DiT block (dim 3840, 30 heads,
   random weights, float32) at the 512x512 token count, times 34 (30 layers plus the 2 + 2 refiner blocks
   at about the same cost) for a step: a lower bound of the step, since the refiners run on fewer tokens
   but the final layer and embedders are left out.
2. Fit. With --model, the map is fitted from that checkpoint's VAE (the real FLUX VAE of Z-Image when you
   have the weights), then ours and ComfyUI's published FLUX factors (comfy/latent_formats.py, class Flux,
   the same scaled latent space) are scored on held-out images: R^2 of the decode averaged per latent
   cell. On the random-weight reference VAE of the tests the published factors mean nothing; run it on
   the real weights to compare.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/preview_cost.py
    python benchmarks/preview_cost.py --model Tongyi-MAI/Z-Image-Turbo --skip-step   # on a Mac with the weights
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_speed import timeit  # noqa: E402

# ComfyUI's published FLUX.1 latent -> RGB factors and bias (comfy/latent_formats.py, class Flux), for
# scaled latents (z - 0.1159) * 0.3611, the space the DiT works in. Quoted to compare against, not used.
PUBLISHED_FLUX_WEIGHT = np.array([
    [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778],
], np.float32)
PUBLISHED_FLUX_BIAS = np.array([-0.0329, -0.0718, -0.0851], np.float32)


def preview_seconds(size: int, repeat: int) -> float:
    from zimage_mlx.preview import LatentRGB

    rng = np.random.default_rng(0)
    m = LatentRGB(rng.normal(size=(16, 3)).astype(np.float32) * 0.1, np.zeros(3, np.float32))
    latents = mx.random.normal((1, size // 8, size // 8, 16))
    mx.eval(latents)
    return timeit(lambda: m.to_pil(latents), repeat)


def block_seconds(tokens: int, repeat: int) -> float:
    from zimage_mlx import kernels
    from zimage_mlx import transformer as T

    kernels.keep_freed_memory()
    targs = T.TransformerArgs(dim=3840, n_heads=30, n_layers=1, n_refiner_layers=1)
    blk = T.TransformerBlock(targs, modulation=True)
    blk.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.02, blk.parameters()))
    mx.eval(blk.parameters())
    x, adaln = mx.random.normal((1, tokens, 3840)), mx.random.normal((1, 256))
    cos, sin = T.rope_angles(np.zeros((1, tokens, 3), np.int64), targs.axes_dims, targs.rope_theta)
    cos, sin = mx.array(cos), mx.array(sin)
    return timeit(lambda: mx.eval(blk(x, (cos, sin), None, adaln)), repeat)


def r2(vae, weight, bias, images) -> float:
    ys, ps = [], []
    for im in images:
        z = vae.scale_latents(vae.posterior(mx.array(im[None]))[0])
        d = np.array(vae.decode(z))[0]
        h, w = z.shape[1:3]
        ys.append(d.reshape(h, vae.scale, w, vae.scale, 3).mean(axis=(1, 3)))
        ps.append(np.array(z)[0] @ weight + bias)
    y, p = np.stack(ys), np.stack(ps)
    return float(1 - ((y - p) ** 2).sum() / ((y - y.mean(axis=(0, 1, 2))) ** 2).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model", help="fit the map from this checkpoint's VAE and compare with the published factors")
    ap.add_argument("--skip-step", action="store_true", help="do not time the DiT block")
    args = ap.parse_args()

    print(f"device: {mx.default_device()}")
    costs = {size: preview_seconds(size, args.repeat) for size in (512, 1024)}
    for size, s in costs.items():
        print(f"fast_preview {size}x{size}: {s * 1e3:.1f} ms")
    if not args.skip_step:
        tokens = (512 // 16) ** 2 + 32  # image tokens + a padded 32-token caption
        blk = block_seconds(tokens, max(2, args.repeat // 2))
        step = 34 * blk
        print(f"full-width block at {tokens} tokens: {blk:.2f} s; a 512x512 step >= 34 blocks = {step:.1f} s")
        print(f"fast_preview / step at 512x512: {costs[512] / step:.5%}")
        print(f"fast_preview 1024x1024 / the 512x512 step (a 1024 step costs > 4x more): {costs[1024] / step:.5%}")
    if args.model:
        from zimage_mlx.preview import fit, fit_images
        from zimage_mlx.vae import VAE
        from zimage_mlx.sources import resolve_model

        vae = VAE.from_pretrained(resolve_model(args.model) / "vae")
        t = time.perf_counter()
        ours = fit(vae)
        print(f"fit: {time.perf_counter() - t:.1f} s, R^2 on its own images {ours.r2:.3f}")
        held_out = fit_images(count=4, size=128, seed=123)
        print(f"held-out R^2: ours {r2(vae, ours.weight, ours.bias, held_out):.3f}, "
              f"published FLUX factors {r2(vae, PUBLISHED_FLUX_WEIGHT, PUBLISHED_FLUX_BIAS, held_out):.3f}")
        print("ours (weight rows per latent channel, then bias):")
        print(np.array2string(ours.weight, precision=4, suppress_small=True))
        print(np.array2string(ours.bias, precision=4))


if __name__ == "__main__":
    main()
