"""Batching several seeds through the DiT: B images as one batch against B forwards of one image.

A full-width DiT (dim 3840, 30 heads, FFN 10240, caption features 2560) with few layers and random weights,
float32, the same inputs; rounds interleave the two so that machine drift hits both alike. Reports the
seconds per image and the speed-up of the batch, and checks the batch's outputs equal the single ones'.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/batch_speed.py --size 256 --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--caption", type=int, default=64, help="caption tokens")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from zimage_mlx import kernels
    from zimage_mlx.transformer import TransformerArgs, ZImageTransformer

    kernels.keep_freed_memory()
    model = ZImageTransformer(TransformerArgs(n_layers=args.layers, n_refiner_layers=1))
    model.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.02, model.parameters()))
    mx.eval(model.parameters())
    h = w = args.size // 8
    B = args.batch
    x = mx.random.normal((B, h, w, 16), key=mx.random.key(0))
    t = mx.full((B,), 0.5)
    cap = mx.random.normal((args.caption, 2560), key=mx.random.key(1)) * 0.1
    mx.eval(x, cap)

    def batched():
        out = model(x, t, [cap] * B)
        mx.eval(out)
        return out

    def one_by_one():
        outs = [model(x[i: i + 1], t[i: i + 1], [cap]) for i in range(B)]
        mx.eval(outs)
        return mx.concatenate(outs)

    a, b = batched(), one_by_one()  # warm-up, and the check
    err = float(mx.abs(a - b).max() / mx.abs(b).max())
    times = {"batch": [], "single": []}
    for _ in range(args.rounds):
        for name, fn in (("batch", batched), ("single", one_by_one)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tb, ts = statistics.median(times["batch"]), statistics.median(times["single"])
    print(f"{args.size}x{args.size}, {B} images, {args.layers} layer(s) + 1+1 refiners, caption {args.caption} tokens, "
          f"float32, {mx.default_device()}")
    print(f"batch of {B}: {tb:.2f} s ({tb / B:.3f} s/image); one by one: {ts:.2f} s ({ts / B:.3f} s/image); "
          f"speed-up {ts / tb:.2f}x (rounds: {', '.join(f'{s / b:.2f}' for s, b in zip(times['single'], times['batch']))})")
    print(f"max |batch - single| / max |single| = {err:.1e}")


if __name__ == "__main__":
    main()
