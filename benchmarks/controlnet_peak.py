"""Peak memory of one DiT step with and without a ControlNet, above the weights, measured on this device.

A DiT of the release's structure but reduced width and depth (default: dim 1280, 10 heads of 128, 2 layers,
2+2 refiners) and a ControlNet of 1 to 3 control blocks on it, random weights, at a real token count
(1024x1024: 4096 image tokens + 32 caption tokens). Each configuration: weights materialised,
mx.reset_peak_memory(), one forward evaluated (block by block, as the pipeline runs it), peak minus the
active memory before the step. The difference with and without the ControlNet is what it adds to a step;
blocks are evaluated one at a time (kernels.cut), so the extra is the streams it keeps alive, which scale
with the width (dim) and the token count, not with the number of blocks.

    $BLAS python benchmarks/controlnet_peak.py [--size 1024 --dim 1280 --blocks 1 3]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from zimage_mlx import controlnet as cn
from zimage_mlx import kernels
from zimage_mlx.transformer import TransformerArgs, ZImageTransformer

GiB = 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if mx.default_device() == mx.cpu:
        kernels.keep_freed_memory()
    heads = args.dim // 128
    targs = TransformerArgs(dim=args.dim, n_heads=heads, n_layers=args.layers, axes_dims=[32, 48, 48])
    dtype = getattr(mx, args.dtype)
    dit = ZImageTransformer(targs)
    dit.set_dtype(dtype)
    mx.eval(dit.parameters())
    h = w = args.size // 8
    x = mx.random.normal((1, h, w, 16), key=mx.random.key(0))
    t = mx.array([0.5])
    cap = [mx.random.normal((32, targs.cap_feat_dim), key=mx.random.key(1))]
    ctx = mx.random.normal((1, h, w, 33), key=mx.random.key(2))
    mx.eval(x, cap, ctx)

    def step(control=None):
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        out = dit(x, t, cap, **({"control": control} if control is not None else {}))
        mx.eval(out)
        return (mx.get_peak_memory() - base) / GiB, time.perf_counter() - t0

    plain, seconds = step()
    print(f"dim {args.dim}, {args.layers} layers, {args.size}x{args.size}, {args.dtype}: DiT step {plain:.3f} GiB "
          f"above its weights ({seconds:.1f} s)")
    for n in args.blocks:
        places = tuple(range(0, args.layers, max(1, args.layers // n)))[:n]
        for graph in ("authors", "diffusers"):
            net = cn.ControlNet(cn.ControlNetArgs("2.1", 33, places, "control_noise_refiner", args.layers), targs,
                                graph)
            net.set_dtype(dtype)
            mx.eval(net.parameters())
            tokens = net.embed(dit, ctx)
            mx.eval(tokens)
            hook = cn.ControlPlan(net, tokens, [0.9], 0, 1).at(0, 1)
            peak, seconds = step(hook)
            weights = sum(v.nbytes for _, v in tree_flatten(net.parameters())) / GiB
            print(f"  + ControlNet, {n} control block(s) + 2 refiner blocks ({weights:.2f} GiB), graph {graph}: "
                  f"{peak:.3f} GiB above the weights, +{peak - plain:.3f} GiB ({seconds:.1f} s)")
            del net, tokens, hook


if __name__ == "__main__":
    main()
