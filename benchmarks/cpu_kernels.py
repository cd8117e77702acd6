"""The CPU fast path of zimage_mlx/kernels.py against MLX's own ops, at the shapes of a full-width block.

exp and the FFN's silu(a) * b on a 1056 x 10240 float32 array, and attention over 30 heads of 128 at 1056
tokens (512x512 image + 32 caption tokens), each timed as the median of 7 after a warm-up, with and without
the malloc setting the pipeline applies on Linux (`kernels.keep_freed_memory`; it is process-wide, so the
script runs itself twice). Also the peak memory of attention at 4160 tokens (a 1024x1024 image).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/cpu_kernels.py
"""

from __future__ import annotations

import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from dit_speed import timeit


def run(keep: bool) -> None:
    from zimage_mlx import kernels

    applied = kernels.keep_freed_memory() if keep else False
    print(f"\n### malloc keeps freed memory: {applied}\n")
    print("| op | MLX op s | kernels.py s | speed-up | max error |\n|---|---|---|---|---|")
    a = mx.random.normal((1056, 10240)) * 4
    b = mx.random.normal((1056, 10240))
    mx.eval(a, b)

    def row(name, ours, theirs, err):
        t_theirs, t_ours = timeit(lambda: mx.eval(theirs()), 7), timeit(lambda: mx.eval(ours()), 7)
        print(f"| {name} | {t_theirs:.3f} | {t_ours:.3f} | {t_theirs / t_ours:.1f}x | {err:.1e} |")

    ref = np.exp(np.array(a).astype(np.float64))
    row("exp, 10.8M floats", lambda: kernels.exp(a), lambda: mx.exp(a),
        float(np.max(np.abs(np.array(kernels.exp(a)) - ref) / ref)))
    row("silu(a) * b", lambda: kernels.silu_mul(a, b), lambda: nn.silu(a) * b,
        float(np.abs(np.array(kernels.silu_mul(a, b)) - np.array(nn.silu(a) * b)).max()))
    q, k, v = (mx.random.normal((1, 30, 1056, 128)) for _ in range(3))
    mx.eval(q, k, v)
    fast = lambda: kernels.attention(q, k, v, 128**-0.5)  # noqa: E731
    mlx = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=128**-0.5)  # noqa: E731
    row("attention 30 x 1056 x 128", fast, mlx, float(np.abs(np.array(fast()) - np.array(mlx())).max()))

    del a, b, q, k, v
    q, k, v = (mx.random.normal((1, 30, 4160, 128)) for _ in range(3))
    mx.eval(q, k, v)
    for name, fn in (("mx.fast.scaled_dot_product_attention", mlx), ("kernels.attention", fast)):
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        t = time.perf_counter()
        mx.eval(fn())
        print(f"attention 30 x 4160 x 128, {name}: {time.perf_counter() - t:.2f} s, "
              f"peak above inputs {(mx.get_peak_memory() - base) / 2**30:.2f} GiB")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(sys.argv[1] == "keep")
    else:
        for mode in ("default", "keep"):
            subprocess.run([sys.executable, __file__, mode], check=True)
