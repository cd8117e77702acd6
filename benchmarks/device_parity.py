"""The same DiT forward on MLX's default device (a GPU: Metal on a Mac) and on its CPU, compared.

The test suite checks the DiT against diffusers on the CPU, where float32 runs zimage_mlx.kernels' CPU
path and the GPU path (MLX's fused kernels) is forced by a switch. This runs the real GPU path on a GPU
against the CPU, on one random small-width DiT, in float32 and bfloat16:

    python benchmarks/device_parity.py
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from zimage_mlx.transformer import TransformerArgs, ZImageTransformer


def forward(model, x, t, cap, device):
    with mx.stream(device):
        out = model(x, t, [cap]).astype(mx.float32)
        mx.eval(out)
    return np.array(out)


def main():
    if mx.default_device().type != mx.DeviceType.gpu:
        print(f"default device is {mx.default_device()}: no GPU to compare with the CPU")
        return
    mx.random.seed(0)
    model = ZImageTransformer(TransformerArgs(dim=512, n_heads=4, n_layers=2, n_refiner_layers=1, cap_feat_dim=256))
    model.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.parameters()))
    x, t, cap = mx.random.normal((1, 64, 48, 16)), mx.array([0.4]), mx.random.normal((37, 256))
    mx.eval(model.parameters(), x, t, cap)
    for dtype in (mx.float32, mx.bfloat16):
        model.set_dtype(dtype)
        gpu, cpu = forward(model, x, t, cap, mx.gpu), forward(model, x, t, cap, mx.cpu)
        err = np.abs(gpu - cpu).max() / np.abs(cpu).max()
        print(f"{dtype}: {mx.default_device()} vs cpu, max abs error / max abs = {err:.2e} (output {gpu.shape})")


if __name__ == "__main__":
    main()
