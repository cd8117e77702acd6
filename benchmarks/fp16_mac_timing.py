"""Time the float16 scaled DiT against bfloat16, per denoising step at 1024x1024, dense and 8/4-bit: for a Mac
owner (float16 should pay on M1/M2, which have no native bfloat16, and not from M3 on).

One step of Turbo is one DiT forward (no CFG) over 4096 image tokens and the caption (128 tokens here).
Without --model the DiT has random weights at full width (dim 3840, 30 heads, FFN 10240) and --layers main
blocks (2+2 refiners), so that it fits any Mac; the time per main block and the estimate for the release's
30 are printed. With --model (a checkpoint folder or its transformer/ folder, e.g. one converted by
`zimage-mlx convert`) the real DiT is timed. Modes alternate (A B A B ...) so that thermal drift hits both.

    python3 benchmarks/fp16_mac_timing.py                   # random weights, 4 main blocks, dense/q8/q4
    python3 benchmarks/fp16_mac_timing.py --layers 30       # the full depth (needs ~12 GB free for dense)
    python3 benchmarks/fp16_mac_timing.py --model ~/z-image-turbo-mlx --quantize 0 4

Please report the whole output (it starts with the chip) in an issue.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zimage_mlx import fp16  # noqa: E402
from zimage_mlx.transformer import TransformerArgs, ZImageTransformer, quant_predicate  # noqa: E402
from zimage_mlx.weights import quantize_model  # noqa: E402


def random_dit(layers: int, dtype: str, bits: int, dim: int = 3840) -> ZImageTransformer:
    model = ZImageTransformer(TransformerArgs(n_layers=layers, dim=dim, n_heads=dim // 128))
    model.x_pad_token = mx.random.normal(model.x_pad_token.shape)
    model.cap_pad_token = mx.random.normal(model.cap_pad_token.shape)
    model.set_dtype(mx.float16 if dtype == "float16" else mx.bfloat16)
    if bits:
        quantize_model(model, quant_predicate(bits))
    mx.eval(model.parameters())
    return model


def load(args, dtype: str, bits: int) -> ZImageTransformer:
    if args.model is None:
        return random_dit(args.layers, dtype, bits, args.dim)
    folder = Path(args.model).expanduser()
    folder = folder / "transformer" if (folder / "transformer").is_dir() else folder
    model = ZImageTransformer.from_pretrained(folder, dtype=dtype, quantize=bits or None)
    mx.eval(model.parameters())
    return model


def time_steps(model, inputs, steps: int) -> list[float]:
    x, t, caps = inputs
    mx.eval(model(x, t, caps))  # warm-up (kernels compiled, buffers cached)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(x, t, caps)
        mx.eval(out, mx.isfinite(out).all())  # with the pipeline's per-step finite check
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a checkpoint (or transformer/) folder; default: random weights")
    ap.add_argument("--layers", type=int, default=4, help="main blocks of the random DiT (the release has 30)")
    ap.add_argument("--quantize", type=int, nargs="+", default=[0, 8, 4], help="0 = dense")
    ap.add_argument("--dim", type=int, default=3840, help="width of the random DiT (smoke tests only)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    gpu = fp16.gpu_name()
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    print(f"chip: {gpu[0] if gpu else info.get('device_name', '?')} ({info.get('architecture', '?')}), "
          f"memory {info.get('memory_size', 0) / 2**30:.0f} GiB; macOS {platform.mac_ver()[0] or '-'}; MLX {mx.__version__}")
    print(f"M1/M2 (float16 candidate): {bool(gpu and fp16.is_m1_or_m2(*gpu))}; device {mx.default_device()}")
    if gpu is None:
        print("note: not an Apple GPU; these numbers say nothing about Macs")
    what = args.model or f"random weights, dim {args.dim}, 2+2 refiners + {args.layers} main blocks"
    print(f"DiT: {what}; {args.size}x{args.size} (4096 image tokens at 1024), 128-token caption")

    rng = np.random.default_rng(0)
    lat = args.size // 8
    x = mx.array(rng.standard_normal((1, lat, lat, 16)).astype(np.float32))
    t = mx.array([0.5], dtype=mx.float32)
    caps = [mx.array(rng.standard_normal((128, 2560)).astype(np.float32))]

    print("| weights | bfloat16 s/step | float16 scaled s/step | bf16 / fp16 |" +
          (" per main block bf16 / fp16 (s) |" if args.model is None else ""))
    print("|---|---|---|---|" + ("---|" if args.model is None else ""))
    for bits in args.quantize:
        times = {"bfloat16": [], "float16": []}
        for _ in range(args.rounds):
            for dtype in times:
                model = load(args, dtype, bits)
                times[dtype] += time_steps(model, (x, t, caps), args.steps)
                del model
                gc.collect()
                mx.clear_cache()
        bf, f16 = statistics.median(times["bfloat16"]), statistics.median(times["float16"])
        row = f"| {'dense' if not bits else f'{bits}-bit'} | {bf:.3f} | {f16:.3f} | {bf / f16:.2f}x |"
        if args.model is None:
            # Refiners run on fewer tokens; per main block is the step over the blocks, an upper bound.
            row += f" {bf / (args.layers + 2):.3f} / {f16 / (args.layers + 2):.3f} |"
        print(row, flush=True)
    if args.model is None:
        print(f"(a release step is about 30 main blocks + 2+2 refiners: scale the per-block times by ~32)")


if __name__ == "__main__":
    main()
