"""Where one full-width DiT block spends its time and memory (random weights, float32 on CPU by default).

Times a modulated block (dim 3840, 30 heads, FFN 10240) at a token count, then its parts alone: the four
attention projections, w1 + w3, w2, the attention core (q k^T, softmax, v) and, by difference, everything
else. Then the peak memory above inputs and weights of the block, its attention and its FFN.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/block_profile.py --tokens 1056
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from dit_speed import timeit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1056)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--generic", action="store_true", help="kernels.FAST_CPU_PATH = False (the GPU's ops)")
    ap.add_argument("--fused", action="store_true",
                    help="also time q/k/v and w1/w3 as one GEMM each on pre-concatenated weights")
    args = ap.parse_args()

    from zimage_mlx import kernels
    from zimage_mlx import transformer as T

    kernels.keep_freed_memory()
    kernels.FAST_CPU_PATH = not args.generic
    targs = T.TransformerArgs(dim=3840, n_heads=30, n_layers=1, n_refiner_layers=1)
    blk = T.TransformerBlock(targs, modulation=True)
    blk.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.02, blk.parameters()))
    mx.eval(blk.parameters())
    L = args.tokens
    x, adaln = mx.random.normal((1, L, 3840)), mx.random.normal((1, 256))
    cos, sin = T.rope_angles(np.zeros((1, L, 3), np.int64), targs.axes_dims, targs.rope_theta)
    q = mx.random.normal((1, 30, L, 128))
    h = mx.random.normal((1, L, 10240))
    mx.eval(x, adaln, cos, sin, q, h)
    a, ff = blk.attention, blk.feed_forward
    parts = {
        "block": lambda: blk(x, (cos, sin), None, adaln),
        "q, k, v, out projections": lambda: [a.to_q(x), a.to_k(x), a.to_v(x), a.to_out[0](x)],
        "w1 + w3": lambda: [ff.w1(x), ff.w3(x)],
        "w2": lambda: ff.w2(h),
        "attention core": lambda: kernels.attention(q, q, q, 128**-0.5),
    }
    times = {name: timeit(lambda f=f: mx.eval(f()), args.repeat) for name, f in parts.items()}
    gemm_flops = {"q, k, v, out projections": 8 * L * 3840**2, "w1 + w3": 4 * L * 3840 * 10240,
                  "w2": 2 * L * 3840 * 10240, "attention core": 4 * L * L * 3840}
    print(f"{L} tokens, float32, {'generic ops' if args.generic else 'CPU fast path'}, median of {args.repeat}")
    print("| part | seconds | GFLOP/s |\n|---|---|---|")
    for name, t in times.items():
        rate = f"{gemm_flops[name] / t / 1e9:.0f}" if name in gemm_flops else ""
        print(f"| {name} | {t:.3f} | {rate} |")
    rest = times["block"] - sum(t for n, t in times.items() if n != "block")
    print(f"| everything else (norms, RoPE, modulation, residuals; by difference) | "
          f"{f'{rest:.3f}' if rest > 0 else 'below the noise'} | |")

    if args.fused:
        wqkv = mx.concatenate([a.to_q.weight, a.to_k.weight, a.to_v.weight])
        w13 = mx.concatenate([ff.w1.weight, ff.w3.weight])
        mx.eval(wqkv, w13)
        t3 = timeit(lambda: mx.eval([a.to_q(x), a.to_k(x), a.to_v(x)]), args.repeat)
        t1 = timeit(lambda: mx.eval(x @ wqkv.T), args.repeat)
        s2 = timeit(lambda: mx.eval([ff.w1(x), ff.w3(x)]), args.repeat)
        s1 = timeit(lambda: mx.eval(x @ w13.T), args.repeat)
        print(f"\nq, k, v: three GEMMs {t3:.3f} s, one fused {t1:.3f} s; w1, w3: two GEMMs {s2:.3f} s, one fused {s1:.3f} s")

        # The same with what consumes the outputs: a fused output is split into strided views.
        def qkv_separate():
            q, k, v = (lin(x).reshape(1, L, 30, -1) for lin in (a.to_q, a.to_k, a.to_v))
            return T.apply_rope(a.norm_q(q), cos, sin), T.apply_rope(a.norm_k(k), cos, sin), v

        def qkv_fused():
            qkv = (x @ wqkv.T).reshape(1, L, 3, 30, -1)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            return T.apply_rope(a.norm_q(q), cos, sin), T.apply_rope(a.norm_k(k), cos, sin), v

        def ffn_fused():
            h13 = x @ w13.T
            return kernels.silu_mul(h13[..., :10240], h13[..., 10240:])

        u3, u1 = (timeit(lambda f=f: mx.eval(f()), args.repeat) for f in (qkv_separate, qkv_fused))
        v2 = timeit(lambda: mx.eval(kernels.silu_mul(ff.w1(x), ff.w3(x))), args.repeat)
        v1 = timeit(lambda: mx.eval(ffn_fused()), args.repeat)
        print(f"with their consumers (norms + RoPE; silu * mul): q, k, v separate {u3:.3f} s, fused {u1:.3f} s; "
              f"w1, w3 separate {v2:.3f} s, fused {v1:.3f} s")

    print("\n| peak memory above inputs and weights | GiB |\n|---|---|")
    for name, fn in (("block", parts["block"]), ("attention (projections to output)", lambda: a(x, (cos, sin), None)),
                     ("feed-forward", lambda: ff(x))):
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(fn())
        print(f"| {name} | {(mx.get_peak_memory() - base) / 2**30:.2f} |")


if __name__ == "__main__":
    main()
