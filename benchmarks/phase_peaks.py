"""Measured peak memory of each phase of a full-size generation, on whatever device MLX runs on.

memory_estimate.py adds activation peaks measured at full width on the CPU, in float32, to weight bytes
computed from the module shapes. This script measures the phases themselves instead, with the release-size
modules (the 6.15B DiT, Qwen3-4B as we run it, the VAE) and random weights in the converter's precision
policies: each component is built, cast and quantized, materialised one parameter at a time, then
`mx.reset_peak_memory()`, its phase runs, and `mx.get_peak_memory()` is that phase's peak, weights
included. Components are built one after another and freed in between, as a single-shot `zimage-mlx
generate` holds them. On a GPU the attention is MLX's fused kernel, as on a Mac; on the CPU it is
kernels.attention.

    python benchmarks/phase_peaks.py --size 1024 --precision 4 8 bfloat16 [--time]

--time also times the DiT forward, plain and under mx.compile (on the CPU use few layers: a full-size
bfloat16 forward takes hours there). Smaller smoke run: --dit-layers 1 --te-layers 1 --size 256.
"""

from __future__ import annotations

import argparse
import gc
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from memory_estimate import QWEN3_4B
from mlx.utils import tree_flatten

from zimage_mlx import kernels
from zimage_mlx.pipeline import LOW_MEMORY_TILE  # the low-memory VAE tile (latent pixels)
from zimage_mlx import text_encoder as te
from zimage_mlx import transformer as dit
from zimage_mlx.vae import VAE, VAEArgs, auto_tile_size

GB = 1e9


def materialise(model: nn.Module) -> int:
    """Evaluate the parameters one at a time (a float32 init is cast/quantized as it goes); returns bytes."""
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def free():
    gc.collect()
    mx.clear_cache()


def measure(fn, out: list | None = None) -> tuple[float, float]:
    """(peak bytes, seconds) of fn() evaluated (appended to `out` if given); the peak includes what was
    in use before."""
    mx.synchronize()
    mx.reset_peak_memory()
    t = time.perf_counter()
    result = fn()
    mx.eval(result)
    mx.synchronize()
    if out is not None:
        out.append(result)
    return mx.get_peak_memory(), time.perf_counter() - t


def bits_of(precision: str) -> int | None:
    return None if precision == "bfloat16" else int(precision)


def text_phase(precision: str, n_tokens: int, n_layers: int | None):
    config = dict(QWEN3_4B, num_hidden_layers=(n_layers or 35) + 1)  # the encoder builds all but the last
    model = te.Qwen3Encoder(te.model_args(config))
    model.set_dtype(mx.bfloat16)
    bits = te.default_bits(bits_of(precision))  # the pipeline's: 8 bits when the model is quantized to 4
    if bits:
        nn.quantize(model, class_predicate=te.quant_predicate(bits))
    weights = materialise(model)
    ids = mx.array(np.random.default_rng(0).integers(0, 151000, (1, n_tokens)), dtype=mx.int32)
    out = []
    peak, secs = measure(lambda: model(ids), out)
    feats = out[0][0]
    del model, out
    free()
    return weights, peak, secs, feats


def dit_phase(precision: str, size: int, feats: mx.array, n_layers: int | None, timing: bool):
    model = dit.ZImageTransformer(dit.TransformerArgs(n_layers=n_layers or 30))
    model.set_dtype(mx.bfloat16)
    if bits_of(precision):
        nn.quantize(model, class_predicate=dit.quant_predicate(bits_of(precision)))
    weights = materialise(model)
    h = w = size // 8
    x = mx.random.normal((1, h, w, 16))
    t = mx.array([0.5])
    mx.eval(x, t)

    def step():  # one sampler step as ZImagePipeline.denoise runs it
        pred = model(x, t, [feats]).astype(mx.float32)
        return x + (0.0 - 0.5) * pred

    peak, secs = measure(step)
    times = {}
    if timing:
        times["plain"] = min(measure(step)[1] for _ in range(3))
        compiled = mx.compile(lambda x, t, c: model(x, t, [c]))
        mx.eval(compiled(x, t, feats))
        times["mx.compile"] = min(measure(lambda: compiled(x, t, feats))[1] for _ in range(3))
    del model
    free()
    return weights, peak, secs, times


def vae_phase(size: int, tile: int | None):
    vae = VAE(VAEArgs())
    weights = materialise(vae)
    z = mx.random.normal((1, size // 8, size // 8, 16))
    mx.eval(z)
    peak, secs = measure(lambda: vae.decode(z, tile_size=tile))
    del vae
    free()
    return weights, peak, secs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--precision", nargs="+", default=["4", "8", "bfloat16"], choices=["4", "8", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=64, help="prompt tokens (chat template included)")
    ap.add_argument("--dit-layers", type=int, help="main DiT layers (default 30, the release model)")
    ap.add_argument("--te-layers", type=int, help="text encoder layers run (default 35 of Qwen3-4B's 36)")
    ap.add_argument("--time", action="store_true", help="also time the DiT forward, plain and mx.compile'd")
    ap.add_argument("--no-cut", action="store_true", help="kernels.CUT_GRAPHS = False: each phase one lazy graph")
    args = ap.parse_args()
    kernels.CUT_GRAPHS = not args.no_cut
    print(f"device {mx.default_device()}, mlx {mx.__version__}, {args.size}x{args.size}, {args.tokens} prompt "
          f"tokens, DiT layers {args.dit_layers or 30}, text encoder layers {args.te_layers or 35}; graphs cut per block: "
          f"{kernels.CUT_GRAPHS}; GB = 1e9 bytes")

    h = w = args.size // 8
    vae_rows = []
    for label, tile in (("whole" if auto_tile_size(h, w) is None else f"tiles of {auto_tile_size(h, w)}",
                         auto_tile_size(h, w)), (f"low memory, tiles of {LOW_MEMORY_TILE}", LOW_MEMORY_TILE)):
        if tile is not None and tile >= max(h, w) and vae_rows:
            continue
        weights, peak, secs = vae_phase(args.size, tile)
        vae_rows.append((label, weights, peak, secs))
    print("\n| VAE decode (float32) | weights GB | phase peak GB | seconds |\n|---|---|---|---|")
    for label, weights, peak, secs in vae_rows:
        print(f"| {label} | {weights / GB:.2f} | {peak / GB:.2f} | {secs:.2f} |")

    print("\n| precision | text encoder weights / phase peak GB | DiT weights / step peak GB | CLI single-shot peak "
          "GB (low-memory VAE) | DiT step seconds |\n|---|---|---|---|---|")
    low_vae_peak = vae_rows[-1][2]
    for precision in args.precision:
        te_w, te_peak, _, feats = text_phase(precision, args.tokens, args.te_layers)
        d_w, d_peak, d_secs, times = dit_phase(precision, args.size, feats, args.dit_layers, args.time)
        timing = ", ".join(f"{k} {v:.3f}" for k, v in times.items()) or f"{d_secs:.2f} (first, incl. warm-up)"
        label = precision if precision == "bfloat16" else f"{precision}-bit"
        print(f"| {label} | {te_w / GB:.2f} / {te_peak / GB:.2f} | {d_w / GB:.2f} / {d_peak / GB:.2f} | "
              f"**{max(te_peak, d_peak, low_vae_peak) / GB:.2f}** | {timing} |", flush=True)
        del feats
        free()


if __name__ == "__main__":
    main()
