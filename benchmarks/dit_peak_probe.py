"""Where a full-size DiT step's memory peak comes from (random weights, default device).

Peaks above the resident weights of: MLX's attention alone at the step's shape, one modulated block, and
the whole step evaluated as one graph versus cut after every block (kernels.cut).

    python benchmarks/dit_peak_probe.py --size 1024 [--quantize 4]
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from phase_peaks import GB, free, materialise, measure

from zimage_mlx import kernels
from zimage_mlx import transformer as dit


def above(fn) -> float:
    """GB of fn()'s peak above the memory in use before it."""
    mx.synchronize()
    free()
    base = mx.get_active_memory()
    return (measure(fn)[0] - base) / GB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--quantize", type=int)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    h = args.size // 8
    L = (h // 2) ** 2 + 64
    q = mx.random.normal((1, 30, L, 128)).astype(mx.bfloat16)
    mx.eval(q)
    print(f"device {mx.default_device()}, {L} tokens, bfloat16{f', {args.quantize}-bit' if args.quantize else ''}")
    print(f"attention (mx.fast.scaled_dot_product_attention) alone: {above(lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=0.088)):.2f} GB above inputs")
    del q

    model = dit.ZImageTransformer(dit.TransformerArgs(n_layers=args.layers))
    model.set_dtype(mx.bfloat16)
    if args.quantize:
        nn.quantize(model, class_predicate=dit.quant_predicate(args.quantize))
    weights = materialise(model)
    x = mx.random.normal((1, h, h, 16))
    t = mx.array([0.5])
    cap = mx.random.normal((64, 2560)).astype(mx.bfloat16)
    xt = mx.random.normal((1, L, 3840)).astype(mx.bfloat16)
    adaln = mx.random.normal((1, 256)).astype(mx.bfloat16)
    cos, sin = dit.rope_angles(np.zeros((1, L, 3), np.int64), [32, 48, 48], 256.0)
    mx.eval(x, t, cap, xt, adaln, cos, sin)
    print(f"weights {weights / GB:.2f} GB")
    print(f"one modulated block: {above(lambda: model.layers[0](xt, (cos, sin), None, adaln)):.2f} GB above")
    kernels.CUT_GRAPHS = False
    print(f"whole step, one graph (kernels.CUT_GRAPHS = False): {above(lambda: model(x, t, [cap])):.2f} GB above")
    kernels.CUT_GRAPHS = True
    print(f"whole step, cut after every block (kernels.cut, the default): {above(lambda: model(x, t, [cap])):.2f} GB above")


if __name__ == "__main__":
    main()
