"""DiT output error against float32 of the float16 scaled graph, bfloat16, naive float16 and the bfloat16 redo,
on a normal and a stress random-weight checkpoint (shared/docs/fp16.md 5.1).

Each checkpoint is diffusers' ZImageTransformer2DModel with the tests' random weights (tests/reference.py),
saved in bfloat16 like the release, so that every dtype starts from the same weight values. "stress" inflates
every modulated block's pre-norm weights (reference.stress_, x100, a few channels x400) so that the SwiGLU
product reaches ~1.4e5, the release's order of magnitude (284,507 measured over an 8-step 1024x1024 run).
Modes, all against the float32 forward of the same weights:

  float16 scaled   dtype="float16": the scaled graph (transformer.V_SCALE / FFN_SCALE, float32 stream)
  float16 redo     the scaled graph with bfloat16 GEMMs: what the pipeline runs for a step that overflowed
  bfloat16         dtype="bfloat16": the plain graph
  float16 naive    the plain graph with float16 weights (what dtype="float16" ran before issue 18)

Random weights are Gaussian; the release has outlier channels. The numbers compare modes; they do not
predict the release's absolute error.

    python3 benchmarks/fp16_error.py [--dim 3840] [--layers 1] [--refiners 1] [--checkpoints normal stress]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import reference  # noqa: E402

from zimage_mlx import kernels  # noqa: E402
from zimage_mlx.transformer import ZImageTransformer  # noqa: E402

STRESS = {"normal": dict(ffn=1.0, attention=1.0), "stress": dict(ffn=100.0, attention=100.0)}


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=3840, help="DiT width (heads of 128)")
    ap.add_argument("--layers", type=int, default=1, help="main blocks")
    ap.add_argument("--refiners", type=int, default=1, help="noise and context refiner blocks each")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (128: 64 image tokens)")
    ap.add_argument("--caption", type=int, default=20, help="caption tokens")
    ap.add_argument("--checkpoints", nargs="+", default=["normal", "stress"], choices=list(STRESS))
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    a = ap.parse_args()
    if mx.default_device() == mx.cpu:
        kernels.keep_freed_memory()
    config = dict(reference.WIDE_TRANSFORMER_CONFIG, dim=a.dim, n_heads=a.dim // 128, n_kv_heads=a.dim // 128,
                  n_layers=a.layers, n_refiner_layers=a.refiners)
    rng = np.random.default_rng(0)
    lat = a.size // 8
    x = mx.array(rng.standard_normal((1, lat, lat, 16)).astype(np.float32))
    t = mx.array([0.5], dtype=mx.float32)
    caps = [mx.array(rng.standard_normal((a.caption, config["cap_feat_dim"])).astype(np.float32))]
    print(f"device {mx.default_device()}, MLX {mx.__version__}; DiT dim {a.dim}, {a.refiners}+{a.refiners} refiners, "
          f"{a.layers} main blocks; {a.size}x{a.size} image, {a.caption}-token caption")
    print("| checkpoint | max SwiGLU product (float32) | float16 scaled | float16 redo (bf16 GEMMs) | bfloat16 | float16 naive |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        for name in a.checkpoints:
            t0 = time.perf_counter()
            folder = reference.build_stress_transformer(Path(tmp) / name / "transformer", config=config, **STRESS[name])
            products, orig = [], kernels.silu_mul

            def probe(p, q):
                out = orig(p, q)
                products.append(float(mx.abs(out).max().item()))
                return out

            kernels.silu_mul = probe
            ref = np.array(ZImageTransformer.from_pretrained(folder, dtype="float32")(x, t, caps))
            kernels.silu_mul = orig
            errs = {}
            m16 = ZImageTransformer.from_pretrained(folder, dtype="float16")
            errs["scaled"] = rel_l2(np.array(m16(x, t, caps).astype(mx.float32)), ref)
            errs["redo"] = rel_l2(np.array(m16(x, t, caps, activations=mx.bfloat16).astype(mx.float32)), ref)
            m16.graph = "plain"
            naive = np.array(m16(x, t, caps).astype(mx.float32))
            del m16
            mbf = ZImageTransformer.from_pretrained(folder, dtype="bfloat16")
            errs["bf16"] = rel_l2(np.array(mbf(x, t, caps).astype(mx.float32)), ref)
            del mbf
            errs["naive"] = rel_l2(naive, ref) if np.isfinite(naive).all() else float("nan")
            shown = {k: ("non-finite" if v != v else f"{v:.2e}") for k, v in errs.items()}
            print(f"| {name} | {max(products):,.0f} | {shown['scaled']} | {shown['redo']} | {shown['bf16']} | "
                  f"{shown['naive']} |  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
