"""What one LoRA training step of the full-size DiT costs, from one full-width block measured on this machine.

Builds one modulated block (dim 3840, 30 heads, FFN 10240) with random weights, puts rank-16 LoRAs on its
attention q/k/v/out and FFN w1/w2/w3 (the `zimage-mlx train` defaults), and measures at a token count:

  forward       the block alone, no gradients (what a sampling step costs per block);
  train         the block as a training step runs it: wrapped in mx.checkpoint, the loss's gradient with
                respect to the LoRA factors and the block input (forward, recompute, backward);
  peak          the peak memory above the weights and inputs during `train`.

and derives the step of the whole DiT: 30 main blocks at the unified length plus 2 noise-refiner blocks
at the image length (the 2 caption refiners and the embedders are under 1% at these sizes and left out),
and the peak: weights + LoRA factors, gradients and AdamW moments (float32) + the 32 checkpointed block
inputs + one block's training peak. The base is float32 ("--bits 0", MLX's CPU bf16 matmul is slow) or
quantized with the DiT's own policy ("--bits 4": quantized_matmul).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/train_step.py --tokens 160 320

This machine cannot run a full-size training step in a benchmark's time, so the step and peak are derived:
the training/forward time ratio and the per-token peak are measured at small token counts, the step time
scales the idle-machine forward per block measured by block_profile.py (IDLE_FORWARD below) by that ratio,
and the peak adds the terms listed above.
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

    args, holder, bytes_per_param = block(bits, rank)
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
    print(f"  block built ({bytes_per_param:.2f} bytes per parameter); measuring {tokens} tokens", flush=True)
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(blk(x, (cos, sin), None, adaln))
        fwd.append(time.perf_counter() - t)
        print(f"  forward {fwd[-1]:.2f} s", flush=True)
        kernels.FAST_CPU_PATH = False  # differentiable kernels, as training uses
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        t = time.perf_counter()
        value, grads = grad(holder.trainable_parameters(), x)
        mx.eval(value, grads)
        train.append(time.perf_counter() - t)
        print(f"  train {train[-1]:.2f} s", flush=True)
        peak = max(peak, mx.get_peak_memory() - base)
        kernels.FAST_CPU_PATH = True
        del value, grads
    return min(fwd), min(train), peak, bytes_per_param


# Forward seconds of one full-width block on this CPU with OpenBLAS on an idle machine (benchmarks/README.md,
# "Where the time goes": block_profile.py at 1056 and 4160 tokens).
IDLE_FORWARD = {512: (1056, 2.98), 1024: (4160, 17.19)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[160, 320],
                    help="token counts to measure at (two or more: the peak is fitted as a L + b L^2)")
    ap.add_argument("--bits", type=int, default=0, choices=(0, 4, 8), help="quantized base (0: float32)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    from zimage_mlx import kernels

    kernels.keep_freed_memory()
    rows = []
    for L in args.tokens:
        f, t, peak, bpp = measure(L, args.bits, args.rank, args.repeat)
        rows.append((L, f, t, peak))
        print(f"{L} tokens, base {'float32' if not args.bits else f'{args.bits}-bit'}, rank {args.rank}: forward {f:.2f} s, "
              f"train (checkpointed: forward, recompute, backward) {t:.2f} s = {t / f:.2f}x forward, "
              f"training peak {peak / 1e6:.0f} MB above weights and inputs", flush=True)
    Ls = np.array([r[0] for r in rows], np.float64)
    peaks = np.array([r[3] for r in rows], np.float64)
    a, b = np.linalg.lstsq(np.stack([Ls, Ls**2], 1), peaks, rcond=None)[0]  # bytes per token, per token^2
    ratio = rows[-1][2] / rows[-1][1]
    weights = FULL_PARAMS * (2 if not args.bits else bpp)  # bf16, or this block's bytes per parameter
    lora = lora_params(args.rank) * 4 * 4  # float32 factors, gradients, AdamW m and v
    print(f"peak fit: {a:.0f} B/token + {b:.1f} B/token^2 (float32); LoRA state {lora / 1e9:.2f} GB; "
          f"weights {weights / 1e9:.1f} GB ({'bf16' if not args.bits else f'{args.bits}-bit'})")
    for size, (L_ref, fwd_ref) in IDLE_FORWARD.items():
        img = (size // 16) ** 2
        L = img + CAPTION
        step = fwd_ref * ratio * (N_LAYERS * L / L_ref + N_REFINER * img / L_ref)  # forward scaled by tokens
        block_peak = (a * L + b * L * L) / 2  # bf16 activations: half of float32
        saved = (N_LAYERS + N_REFINER) * L * DIM * 2  # checkpointed block inputs, bf16
        total = weights + lora + saved + block_peak
        print(f"{size}x{size} ({L} tokens): step ~{step:.0f} s on this CPU (idle, OpenBLAS), "
              f"peak ~{total / 1e9:.1f} GB = weights {weights / 1e9:.1f} + LoRA state {lora / 1e9:.2f} "
              f"+ saved block inputs {saved / 1e9:.2f} + one block {block_peak / 1e9:.2f}")


if __name__ == "__main__":
    main()
