"""Side-by-side DiT forward: zimage-mlx vs diffusers (torch, CPU) vs mflux on the same shapes and weights.

Full width (dim 3840, 30 heads, FFN 10240, caption features 2560) with few layers, random weights.
Reports seconds per forward, model FLOPs, and the fraction of the GEMM throughput measured in the same
run. On Linux preload OpenBLAS so MLX's CPU matmul is not the slow reference BLAS:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python benchmarks/dit_speed.py --size 512 --layers 2

mflux (the peer MLX port) pins its own mlx, so it runs from its own venv (see benchmarks/mflux_dit.py for
the setup): the same diffusers weights, config and inputs go to a temp dir and mflux_dit.py times them in
a subprocess, which inherits the environment (LD_PRELOAD included). Every output is also compared with
diffusers' (max abs error / max abs of the reference).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MFLUX_PYTHON = Path("/work/venvs/mflux/bin/python")


def dit_flops(dim, ffn, n_img, n_cap, n_layers, n_refiner):
    """Matmul + attention FLOPs of one forward (the rest is < 0.5%)."""
    def block(tokens):
        return 2 * tokens * (4 * dim * dim + 3 * dim * ffn) + 4 * tokens * tokens * dim

    return n_layers * block(n_img + n_cap) + n_refiner * (block(n_img) + block(n_cap)) + 2 * n_img * 64 * dim


def timeit(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns, gemm, repeat):
    """Time each of fns (name -> callable) `repeat` times in rounds, measuring the GEMM rate (`gemm()`,
    GFLOP/s) before the first round and after every round. This VM's speed drifts by 10-20% over minutes,
    so each forward is set against the GEMM measured next to it: returns {name: [seconds per round]} and
    [GEMM GFLOP/s around each round] (the mean of the measurements before and after it)."""
    for fn in fns.values():
        fn()  # warm-up
    rates = [gemm()]
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        rates.append(gemm())
    return times, [(a + b) / 2 for a, b in zip(rates, rates[1:])]


def fmt(values, spec):
    return ", ".join(format(v, spec) for v in values)


def rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def run_mflux(python, tmodel, cfg, x, t, cap, args):
    """Time mflux's transformer on tmodel's weights in mflux's venv; returns its JSON and output (C, h, w)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({k: v.contiguous() for k, v in tmodel.state_dict().items()}, str(tmp / "weights.safetensors"))
        (tmp / "config.json").write_text(json.dumps(cfg))
        np.savez(tmp / "inputs.npz", x=x, t=np.float32(t), cap=cap)
        cmd = [str(python), str(Path(__file__).with_name("mflux_dit.py")), "--compile",
               "--weights", str(tmp / "weights.safetensors"), "--config", str(tmp / "config.json"),
               "--inputs", str(tmp / "inputs.npz"), "--repeat", str(args.repeat), "--dtype", args.dtype,
               "--out", str(tmp / "out.npy")]
        env = os.environ.copy()
        if not args.default_malloc:  # the same allocator setting as this process (kernels.keep_freed_memory)
            env["GLIBC_TUNABLES"] = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0:
            print(f"mflux: {python} failed (exit {proc.returncode}); skipped")
            return None, None
        # mflux returns -(diffusers' prediction): flip it to compare.
        return json.loads(proc.stdout.strip().splitlines()[-1]), -np.load(tmp / "out.npy")[:, 0]


def gemm_meter(m, k, n, repeat=2):
    """A callable returning MLX's float32 GEMM rate (GFLOP/s) for (m, k) @ (k, n) (the DiT's FFN shape):
    the median of `repeat` timings after a warm-up."""
    a = mx.random.normal((m, k))
    b = mx.random.normal((n, k))
    mx.eval(a, b)
    return lambda: 2 * m * k * n / timeit(lambda: mx.eval(a @ b.T), repeat) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--refiner-layers", type=int, default=2)
    ap.add_argument("--caption", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--mflux-python", type=Path, default=MFLUX_PYTHON if MFLUX_PYTHON.exists() else None,
                    help=f"python of a venv with mflux installed (default {MFLUX_PYTHON} if it exists)")
    ap.add_argument("--no-mflux", action="store_true")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc malloc as it is (by default freed memory is kept for reuse, for all three "
                         "implementations alike, as ZImagePipeline does on CPU: see zimage_mlx/kernels.py)")
    args = ap.parse_args()
    from zimage_mlx import kernels

    kept = False if args.default_malloc else kernels.keep_freed_memory()

    import torch
    from diffusers import ZImageTransformer2DModel

    import reference
    from zimage_mlx.transformer import TransformerArgs, ZImageTransformer

    torch.set_num_threads(torch.get_num_threads())
    cfg = dict(reference.TRANSFORMER_CONFIG, dim=3840, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
               axes_dims=[32, 48, 48], n_layers=args.layers, n_refiner_layers=args.refiner_layers)
    tmodel = ZImageTransformer2DModel(**cfg).eval()
    reference.randomize_(tmodel, 0)
    weights = {k: mx.array(v.numpy()) for k, v in tmodel.state_dict().items()}
    model = ZImageTransformer(TransformerArgs.from_dict(cfg))
    model.load_weights(list(weights.items()))
    if args.dtype != "float32":
        model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    del weights
    gc.collect()

    h = w = args.size // 8
    n_img, n_cap = (h // 2) * (w // 2), args.caption
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, h, w)).astype(np.float32)
    cap = rng.standard_normal((n_cap, 2560)).astype(np.float32)
    flops = dit_flops(3840, 10240, n_img, n_cap, args.layers, args.refiner_layers)

    gemm = gemm_meter(n_img + n_cap, 3840, 10240)
    xm, tm, cm = mx.array(x.transpose(0, 2, 3, 1)), mx.array([0.3]), [mx.array(cap)]
    outs = {}

    def mlx_forward():
        outs["mlx"] = model(xm, tm, cm)
        mx.eval(outs["mlx"])

    fns = {"zimage-mlx": mlx_forward}
    if not args.no_torch:
        xt, tt, ct = [torch.from_numpy(x[0])[:, None]], torch.tensor([0.3]), [torch.from_numpy(cap)]

        def torch_forward():
            with torch.no_grad():
                outs["torch"] = tmodel(xt, tt, ct, return_dict=False)

        fns["diffusers"] = torch_forward
    times, rates = interleaved(fns, gemm, args.repeat)
    out_mlx = np.array(outs.pop("mlx")[0].astype(mx.float32)).transpose(2, 0, 1)  # (C, h, w)
    del model
    gc.collect()
    mx.clear_cache()
    t_mlx = statistics.median(times["zimage-mlx"])
    pct = [100 * flops / t / 1e9 / g for t, g in zip(times["zimage-mlx"], rates)]
    print(f"shape: {args.size}x{args.size} ({n_img} image + {n_cap} caption tokens), {args.layers} layers + "
          f"{args.refiner_layers}+{args.refiner_layers} refiners, dim 3840, {args.dtype}")
    print(f"model FLOPs per forward: {flops / 1e12:.3f} TFLOP; malloc keeps freed memory: {kept}; "
          f"{args.repeat} rounds, the GEMM measured before and after each")
    print(f"MLX GEMM ({n_img + n_cap}x3840x10240) around each round: {fmt(rates, '.1f')} GFLOP/s")
    print(f"zimage-mlx forward: {fmt(times['zimage-mlx'], '.2f')} s = {fmt(pct, '.0f')}% of the GEMM around "
          f"it; median {t_mlx:.2f} s, {statistics.median(pct):.0f}%")
    mf = out_mf = None
    if not args.no_mflux and (args.mflux_python is None or not args.mflux_python.exists()):
        print(f"mflux: no venv python at {args.mflux_python or MFLUX_PYTHON}; skipped (see benchmarks/mflux_dit.py)")
    elif not args.no_mflux:
        mf, out_mf = run_mflux(args.mflux_python, tmodel, cfg, x, 0.3, cap, args)
    if mf is not None:
        t_mf, t_mfc = mf["seconds"], mf["seconds_compiled"]
        pct_mf = [100 * flops / t / 1e9 / g for t, g in zip(mf["rounds_compiled"], mf["gemm_gflops"])]
        print(f"mflux {mf['mflux_version']} forward (mlx {mf['mlx_version']}, its own process): {t_mf:.2f} s; "
              f"mx.compile'd as its pipeline runs it: {fmt(mf['rounds_compiled'], '.2f')} s = {fmt(pct_mf, '.0f')}% "
              f"of the GEMM around it (median {t_mfc:.2f} s, {statistics.median(pct_mf):.0f}%)")
        print(f"-> zimage-mlx is {t_mf / t_mlx:.2f}x mflux's speed ({t_mfc / t_mlx:.2f}x compiled) in seconds, "
              f"{statistics.median(pct) / statistics.median(pct_mf):.2f}x compiled in % of each run's GEMM")
        print(f"mflux vs zimage-mlx output: max rel err {rel_err(out_mf, out_mlx):.1e}")
    if not args.no_torch:
        t_torch = statistics.median(times["diffusers"])
        speedups = [a / b for a, b in zip(times["diffusers"], times["zimage-mlx"])]
        out_torch = outs["torch"][0][0][:, 0].float().numpy()  # (C, h, w)
        print(f"diffusers forward (torch {torch.__version__}, {torch.get_num_threads()} threads), right after "
              f"zimage-mlx's in each round: {fmt(times['diffusers'], '.2f')} s -> zimage-mlx is "
              f"{fmt(speedups, '.2f')}x diffusers' speed (median {statistics.median(speedups):.2f}x)")
        print(f"zimage-mlx vs diffusers output: max rel err {rel_err(out_mlx, out_torch):.1e}")
        if mf is not None:
            print(f"mflux is {t_torch / t_mf:.2f}x diffusers' speed ({t_torch / t_mfc:.2f}x compiled); "
                  f"mflux vs diffusers output: max rel err {rel_err(out_mf, out_torch):.1e}")


if __name__ == "__main__":
    main()
