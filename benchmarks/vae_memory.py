"""Peak activation memory (and time) of the VAE decoder at the real FLUX.1 widths, tiled and untiled.

Random weights at the released config (block_out_channels [128, 256, 512, 512], 32 groups, 16 latent
channels): memory depends on shapes, not values. Peak activation memory = mx.get_peak_memory() during
decode minus what was allocated before it (the weights). Prints a markdown table.

    python benchmarks/vae_memory.py                        # 1024 and 2048, float32 (~4 min with MKL on 2 idle cores)
    python benchmarks/vae_memory.py --untiled-at 1024 --dtypes float32 bfloat16   # where time and RAM allow

A tiled decode evaluates one tile at a time and all tiles of a run have the same size, so its peak is one
tile's decode plus the output canvas: the tiled rows decode a single tile untiled and add the canvas bytes,
because decoding 1024x1024 or 2048x2048 in full takes far too long on a small CPU; one full tiled decode
(--check-tiled) checks that reasoning. Untiled peaks above --untiled-at are extrapolated linearly in pixel
count (the convolutions' buffers scale with the area and dominate; the mid-block attention's score matrix
grows with its square, 16 GiB at 2048x2048, but peaks at another time). Rows say which is which.

On Linux, the mlx[cpu] wheel links the reference BLAS (~2 GFLOP/s here); a decode at 1024x1024 (~10 TFLOP)
then takes over an hour. Preloading MKL (`pip install mkl`, then LD_PRELOAD=<prefix>/lib/libmkl_rt.so.3
MKL_THREADING_LAYER=GNU) makes it ~30x faster and does not change MLX's memory accounting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zimage_mlx.vae import VAE, VAEArgs  # noqa: E402

GiB = 1024**3


def decode_peak(vae: VAE, latent_hw: tuple[int, int], tile_size: int | None) -> tuple[float, float]:
    """(peak activation bytes, seconds) of one decode of a (1, h, w, 16) latent."""
    latents = mx.random.normal((1, *latent_hw, 16), key=mx.random.key(0))
    mx.eval(latents)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    start = time.perf_counter()
    mx.eval(vae.decode(latents, tile_size=tile_size))
    seconds = time.perf_counter() - start
    return mx.get_peak_memory() - before, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="square image sizes to report (pixels)")
    p.add_argument("--tile-sizes", type=int, nargs="+", default=[32, 64], help="latent pixels (64 = 512 image pixels)")
    p.add_argument("--untiled-at", type=int, default=512,
                   help="image size decoded untiled; larger sizes are extrapolated from it (linear in pixels)")
    p.add_argument("--check-tiled", type=int, nargs=2, metavar=("SIZE", "TILE"), default=[384, 32],
                   help="one full tiled decode, to check that its peak is one tile's plus the canvas (0 0 to skip)")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    a = p.parse_args()

    rows = []
    for dtype in a.dtypes:
        vae = VAE(VAEArgs())
        vae.set_dtype(getattr(mx, dtype))
        mx.eval(vae.parameters())
        weight_gib = sum(w.nbytes for _, w in tree_flatten(vae.decoder.parameters())) / GiB
        print(f"decoder weights ({dtype}): {weight_gib:.2f} GiB", file=sys.stderr)
        measured = {}  # square image size -> (peak bytes, seconds) of an untiled decode

        def untiled(size):
            if size not in measured:
                measured[size] = decode_peak(vae, (size // 8, size // 8), None)
                peak, sec = measured[size]
                rows.append((size, "untiled", dtype, peak / GiB, f"{sec:.0f}", "measured"))
            return measured[size]

        base_peak, _ = untiled(a.untiled_at)
        for size in sorted(a.sizes):
            if size <= a.untiled_at:
                untiled(size)
            else:
                f = (size / a.untiled_at) ** 2
                rows.append((size, "untiled", dtype, base_peak * f / GiB, "-", f"extrapolated: {a.untiled_at}px x {f:.0f}"))
            for tile in a.tile_sizes:
                if size // 8 <= tile:
                    continue  # one tile is the whole image
                peak, sec = untiled(tile * 8)
                canvas = size * size * 3 * 4
                rows.append((size, f"tiled {tile}", dtype, (peak + canvas) / GiB, f"{sec:.0f}/tile",
                             f"derived: {tile * 8}px tile (measured) + {canvas / 2**20:.0f} MiB canvas"))
        size, tile = a.check_tiled
        if size:
            peak, sec = decode_peak(vae, (size // 8, size // 8), tile)
            rows.append((size, f"tiled {tile}", dtype, peak / GiB, f"{sec:.0f}", "measured (full tiled decode)"))

    print("| image | decode | dtype | peak activations (GiB) | time (s) | how |")
    print("|---|---|---|---|---|---|")
    for size, mode, dtype, gib, sec, how in sorted(rows, key=lambda r: (r[2], r[0], r[1])):
        print(f"| {size}x{size} | {mode} | {dtype} | {gib:.2f} | {sec} | {how} |")


if __name__ == "__main__":
    main()
