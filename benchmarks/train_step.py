"""What one LoRA training step of the full-size DiT costs, from one full-width block measured on this machine.

Builds one modulated block (dim 3840, 30 heads, FFN 10240) with random weights, puts rank-16 LoRAs on its
attention q/k/v/out and FFN w1/w2/w3 (the `zimage-mlx train` defaults), and measures at a token count:

  forward       the block alone, no gradients (what a sampling step costs per block);
  train         the block as a training step runs it: wrapped in mx.checkpoint, the loss's gradient with
                respect to the LoRA factors and the block input (forward, recompute, backward);
  peak          the peak memory above the weights and inputs during `train`.

and then derives the step of the whole DiT: 30 main blocks at the unified length plus 2 noise-refiner blocks
at the image length (the 2 caption refiners and the embedders are under 1% at these sizes and left out),
and the peak: weights + LoRA factors, gradients and AdamW moments (float32) + the 32 checkpointed block
inputs + one block's training peak. The base is float32 ("--bits 0", MLX's CPU bf16 matmul is slow) or
quantized with the DiT's own policy ("--bits 4": quantized_matmul).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/train_step.py --size 512
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

DIM, HEADS, N_LAYERS, N_REFINER = 3840, 30, 30, 2
FULL_PARAMS = 6.15e9  # the released DiT's parameters (bf16: 12.3 GB)
CAPTION = 128  # caption tokens (padded); a typical caption is 40-100 tokens with the chat template


def lora_params(rank: int) -> int:
    ffn = int(DIM / 3 * 8)
    per_layer = 4 * rank * (DIM + DIM) + 2 * rank * (DIM + ffn) + rank * (ffn + DIM)
    return per_layer * N_LAYERS


def block(bits: int, rank: int):
    from zimage_mlx import train as T
    from zimage_mlx import transformer as Z

    args = Z.TransformerArgs(dim=DIM, n_heads=HEADS, n_layers=1, n_refiner_layers=1)
    blk = Z.TransformerBlock(args, modulation=True)
    blk.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.02, blk.parameters()))
    n_params = sum(p.size for _, p in nn.utils.tree_flatten(blk.parameters()))
    if bits:
        nn.quantize(blk, class_predicate=lambda path, m: Z.quant_predicate(bits)(f"layers.0.{path}", m))
    mx.eval(blk.parameters())
    bytes_per_param = sum(p.nbytes for _, p in nn.utils.tree_flatten(blk.parameters())) / n_params
    holder = nn.Module()
    holder.layers = [blk]
    T.add_lora(holder, ["default"], rank, rank, seed=0)
    for m in T.lora_layers(holder).values():  # B nonzero, as after some training
        m.lora_B = mx.random.normal(m.lora_B.shape) * 0.01
    mx.eval(holder.parameters())
    return args, holder, bytes_per_param


def measure(tokens: int, bits: int, rank: int, repeat: int):
    from zimage_mlx import kernels
    from zimage_mlx import transformer as Z

    args, holder, weight_bytes = block(bits, rank)
    blk = holder.layers[0]
    x, adaln = mx.random.normal((1, tokens, DIM)), mx.random.normal((1, 256))
    cos, sin = Z.rope_angles(np.zeros((1, tokens, 3), np.int64), args.axes_dims, args.rope_theta)
    mx.eval(x, adaln, cos, sin)

    def loss(params, x):
        holder.update(params)

        def inner(params, x, cos, sin, adaln):
            holder.update(params)
            return blk(x, (cos, sin), None, adaln)

        out = mx.checkpoint(inner)(params, x, cos, sin, adaln)
        return (out * out).mean()

    grad = mx.value_and_grad(loss, argnums=(0, 1))
    fwd, train, peak = [], [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(blk(x, (cos, sin), None, adaln))
        fwd.append(time.perf_counter() - t)
        kernels.FAST_CPU_PATH = False  # differentiable kernels, as training uses
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        t = time.perf_counter()
        value, grads = grad(holder.trainable_parameters(), x)
        mx.eval(value, grads)
        train.append(time.perf_counter() - t)
        peak = max(peak, mx.get_peak_memory() - base)
        kernels.FAST_CPU_PATH = True
        del value, grads
    return min(fwd), min(train), peak, weight_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--bits", type=int, default=0, choices=(0, 4, 8), help="quantized base (0: float32)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from zimage_mlx import kernels

    kernels.keep_freed_memory()
    img = (args.size // 16) ** 2
    unified = img + CAPTION
    f_u, t_u, peak, wbytes = measure(unified, args.bits, args.rank, args.repeat)
    # The noise refiner runs at the image length; scale its blocks by token count (within 11% of the unified).
    t_img = t_u * img / unified
    step = N_LAYERS * t_u + N_REFINER * t_img
    full_weights = FULL_PARAMS * (2 if not args.bits else wbytes)  # bf16, or this block's bytes per parameter
    lora = lora_params(args.rank) * 4 * 4  # float32 factors, gradients, AdamW m and v
    saved = (N_LAYERS + N_REFINER) * unified * DIM * 2  # checkpointed block inputs, bf16
    print(f"{args.size}x{args.size}, {unified} tokens, base {'float32' if not args.bits else f'{args.bits}-bit'}, "
          f"rank {args.rank}, measured per block on this CPU:")
    print(f"  forward {f_u:.2f} s   train (checkpointed fwd + recompute + bwd) {t_u:.2f} s "
          f"({t_u / f_u:.2f}x forward)   block training peak {peak / 1e9:.2f} GB above weights (float32)")
    print(f"derived for the full DiT ({N_LAYERS} layers + {N_REFINER} refiner blocks), this CPU: step {step:.0f} s")
    print(f"derived peak (bf16 activations = half the float32 block peak): weights {full_weights / 1e9:.1f} GB + "
          f"LoRA state {lora / 1e9:.2f} GB + saved inputs {saved / 1e9:.2f} GB + block {peak / 2e9:.2f} GB = "
          f"{(full_weights + lora + saved + peak / 2) / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
