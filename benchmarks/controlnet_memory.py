"""Weight bytes of the released ControlNet Union layouts at bfloat16, 8-bit and 4-bit, from the real module
structures, and the tensors a ControlNet step holds beside the DiT's.

Builds zimage_mlx.controlnet.ControlNet for the release DiT (30 layers, dim 3840) *lazily*: no weight is
materialised; the bytes come from the shapes and dtypes after the ControlNet's quantization policy
(controlnet.quant_predicate, as `zimage-mlx convert --controlnet` writes them). The step's extra tensors are
counted from the shapes `controlnet.Control` keeps alive (arithmetic, not a measurement).

    python benchmarks/controlnet_memory.py [--size 1024]
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from zimage_mlx import controlnet as cn
from zimage_mlx.transformer import TransformerArgs, padded

GB = 1e9
LAYOUTS = {  # name: (control blocks, channels, refiner)
    "Union 2.1 full (and Tile 2.1; the 2.0 file has the same size)": (15, 33, "control_noise_refiner"),
    "Union 2.1 lite (and Tile lite)": (3, 33, "control_noise_refiner"),
    "Union 1.0": (6, 16, "plain"),
}


def build(n: int, channels: int, refiner: str, dit: TransformerArgs) -> cn.ControlNet:
    places = tuple(range(0, dit.n_layers, dit.n_layers // n))
    return cn.ControlNet(cn.ControlNetArgs("2.1" if channels == 33 else "1.0", channels, places, refiner, dit.n_layers), dit)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="image side for the step's extra tensors")
    args = ap.parse_args()
    dit = TransformerArgs()
    print("| layout | parameters | bfloat16 GB | 8-bit GB | 4-bit GB |")
    print("|---|---|---|---|---|")
    for name, (n, channels, refiner) in LAYOUTS.items():
        row = []
        for bits in (None, 8, 4):
            net = build(n, channels, refiner, dit)
            net.set_dtype(mx.bfloat16)
            if bits is None:
                params = sum(v.size for _, v in tree_flatten(net.parameters()))
            else:
                nn.quantize(net, class_predicate=cn.quant_predicate(bits))
            row.append(sum(v.nbytes for _, v in tree_flatten(net.parameters())) / GB)
        print(f"| {name} | {params:,} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} |")
    tokens = padded((args.size // 16) ** 2)
    unified = tokens + 32  # + a caption of up to 32 tokens
    one = unified * dit.dim * 2 / GB  # one (1, L, 3840) bfloat16 stream
    print(f"\nAt {args.size}x{args.size} ({tokens} image tokens + 32 caption), one bfloat16 stream is {one:.3f} GB. "
          f"Beside the DiT's own, a ControlNet step holds the control tokens ({tokens * dit.dim * 2 / GB:.3f} GB per "
          f"control, embedded once), the control state and the residual due next ({2 * one:.3f} GB), and in the "
          f"diffusers graph the private refiner stream ({one:.3f} GB) until the main stage starts.")


if __name__ == "__main__":
    main()
