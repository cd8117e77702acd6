"""GGUF DiTs per tensor type: load time, memory and error against the float weights, beside our own q8/q4.

Builds the tiny test DiT (tests/reference.py), writes it as a GGUF in ComfyUI's names per type with gguf-py
(2-D weights of over 1024 values quantized, the rest F32, as city96's convert does), loads each with
zimage_mlx.dit_file.load_dit_file (float32), and reports:
  load    seconds to read, map and load the file (median of --repeat runs)
  MB      bytes of the loaded DiT's parameters (kept blocks: packed weights + float32 scales and biases)
  kept    whether the type stays quantized in MLX
  weights SNR in dB of all Linear weights against the float32 ones (10 log10 sum w^2 / sum (w - w')^2)
  output  SNR in dB of one DiT forward (32x32 latents, a random caption) against the float32 DiT's
Our own q8/q4 are the float file loaded with quantize=8/4: the shipped policy (embedders, final layer, timestep
MLP and caption projection float; adaLN at least 8 bits) at group size 32, since the tiny DiT's 96-wide layers
are no multiple of the default 64.

    PYTHONPATH=. python3 benchmarks/gguf_types.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TYPES = ("F32", "F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def linear_weights(model) -> dict[str, np.ndarray]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            out[name] = np.array(mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits))
        elif isinstance(m, nn.Linear):
            out[name] = np.array(m.weight.astype(mx.float32))
    return out


def snr(ref: np.ndarray, got: np.ndarray) -> float:
    err = float(((ref - got) ** 2).sum())
    return math.inf if err == 0 else 10 * math.log10(float((ref ** 2).sum()) / err)


def forward(model) -> np.ndarray:
    g = np.random.default_rng(0)
    x = mx.array(g.standard_normal((1, 4, 4, 16)).astype(np.float32))  # (B, h, w, C): 32x32 pixels
    cap = [mx.array(g.standard_normal((12, model.args.cap_feat_dim)).astype(np.float32))]
    out = model(x, mx.array([0.5]), cap)
    return np.array(out.astype(mx.float32))


def main():
    import reference
    from gguf import GGMLQuantizationType as T
    from test_gguf import comfy_names, write_gguf

    from zimage_mlx.dit_file import load_dit_file
    from zimage_mlx.sources import read_config

    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="zimage-gguf-"))
    root = reference.build_checkpoint(tmp / "ckpt")
    config = read_config(root / "transformer")
    state = comfy_names(root)
    files = {}
    for name in TYPES:
        files[name] = tmp / f"dit-{name}.gguf"
        write_gguf(files[name], state, T[name])

    def load(file, quantize=None):
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            model = load_dit_file(file, config, dtype="float32", quantize=quantize, group_size=32)
            mx.eval(model.parameters())
            times.append(time.perf_counter() - t0)
        return model, statistics.median(times)

    base, _ = load(files["F32"])
    ref_w, ref_out = linear_weights(base), forward(base)
    rows = []
    for label, file, q in [(n, files[n], None) for n in TYPES] + [("ours q8 (g32)", files["F32"], 8), ("ours q4 (g32)", files["F32"], 4)]:
        model, seconds = load(file, q)
        from mlx.utils import tree_flatten

        nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        w = linear_weights(model)
        kept = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        w_snr = snr(np.concatenate([ref_w[k].ravel() for k in ref_w]), np.concatenate([w[k].ravel() for k in ref_w]))
        o_snr = snr(ref_out, forward(model))
        rows.append((label, file.stat().st_size / 1e6, seconds * 1e3, nbytes / 1e6, kept, w_snr, o_snr))
    print("| type | file MB | load ms | loaded MB | stays quantized | weights SNR dB | DiT output SNR dB |")
    print("|---|---|---|---|---|---|---|")
    for label, fmb, ms, mb, kept, ws, os_ in rows:
        print(f"| {label} | {fmb:.3f} | {ms:.1f} | {mb:.3f} | {'yes' if kept else 'no'} | "
              f"{'exact' if ws == math.inf else f'{ws:.1f}'} | {'exact' if os_ == math.inf else f'{os_:.1f}'} |")


if __name__ == "__main__":
    main()
