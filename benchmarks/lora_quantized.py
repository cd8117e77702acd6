"""LoRA on a quantized DiT layer: a low-rank side path versus dequantize-merge-requantize.

    python benchmarks/lora_quantized.py [--tokens N] [--ranks 16 64] [--bits 4 8]

For each full-size Z-Image layer shape (attention 3840x3840, FFN up 10240x3840, FFN down 3840x10240), a
random weight W is quantized (group size 64, as the pipeline does), and a random rank-r LoRA whose update
has 3% of W's norm (a typical style LoRA at scale 1) is applied in two ways:

  side     y = qlinear(x) + (x @ A^T) @ (cB)^T           the quantized weights stay as they are
  requant  y = quantize(dequantize(Wq) + c B A)(x)        one layer at a time, then a plain qlinear

Reported per shape:
  lora err   |(y - qlinear(x)) - c x (BA)^T| / |c x (BA)^T|   how much of the LoRA's effect is lost or
             distorted (the requantized layer rounds the update to the quantization grid)
  total err  |y - x (W + cBA)^T| / |x (W + cBA)^T|             against the float model with the LoRA merged
  forward    one forward of `--tokens` tokens (float32 activations on CPU, bfloat16 on an Apple GPU): the
             quantized layer alone (which is also what the requantized layer costs) and the side path's two
             low-rank matmuls alone
  flops      the side path's extra work, rank * (in + out) / (in * out): what it costs where the quantized
             matmul is efficient (MLX's CPU quantized matmul is slow, which hides the side path's cost there)
  load       the per-layer cost of applying the LoRA
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

SHAPES = {"attention 3840->3840": (3840, 3840), "ffn w1/w3 3840->10240": (10240, 3840),
          "ffn w2 10240->3840": (3840, 10240)}
PER_BLOCK = {"attention 3840->3840": 4, "ffn w1/w3 3840->10240": 2, "ffn w2 10240->3840": 1}
GROUP = 64
RELATIVE_UPDATE = 0.03


def timed(fn, repeats=3):
    mx.eval(fn())  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t)
    return best


def rel(a, b):
    return (mx.linalg.norm((a - b).astype(mx.float32)) / mx.linalg.norm(b.astype(mx.float32))).item()


def run(shape, rank, bits, tokens, dtype):
    out_dim, in_dim = shape
    k = iter(mx.random.split(mx.random.key(rank * 100 + bits), 5))
    w = (mx.random.normal((out_dim, in_dim), key=next(k)) / in_dim**0.5).astype(dtype)
    a = mx.random.normal((rank, in_dim), key=next(k)) / in_dim**0.5
    b = mx.random.normal((out_dim, rank), key=next(k))
    delta = b @ a
    c = RELATIVE_UPDATE * mx.linalg.norm(w.astype(mx.float32)) / mx.linalg.norm(delta)  # scale * alpha / rank
    x = mx.random.normal((tokens, in_dim), key=next(k)).astype(dtype)
    wq, scales, biases = mx.quantize(w, group_size=GROUP, bits=bits)
    mx.eval(w, a, b, c, x, wq, scales, biases)

    def qlinear(x, wq=wq, scales=scales, biases=biases):
        return mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=GROUP, bits=bits)

    # side path: B carries the scale; both factors in the compute dtype
    down, up = a.astype(dtype), (c * b).astype(dtype)

    def side(x):
        return qlinear(x) + (x @ down.T) @ up.T

    def requantize():
        merged = mx.dequantize(wq, scales, biases, group_size=GROUP, bits=bits).astype(mx.float32) + c * delta
        return mx.quantize(merged.astype(dtype), group_size=GROUP, bits=bits)

    rq = requantize()
    mx.eval(rq)

    def requant(x):
        return qlinear(x, *rq)

    xs = x[:64]
    base = qlinear(xs)
    effect = (xs.astype(mx.float32) @ (c * delta).T)
    ideal = xs.astype(mx.float32) @ (w.astype(mx.float32) + c * delta).T
    row = {}
    for name, fn in (("side", side), ("requant", requant)):
        y = fn(xs).astype(mx.float32)
        row[name] = dict(lora_err=rel(y - base, effect), total_err=rel(y, ideal))
    row["side"]["time"] = timed(lambda: (x @ down.T) @ up.T)
    row["base"] = dict(total_err=rel(base.astype(mx.float32), ideal), time=timed(lambda: qlinear(x)))
    row["side"]["load"] = timed(lambda: (a.astype(dtype), (c * b).astype(dtype)))
    row["requant"]["load"] = timed(requantize)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per forward (4096 + caption at 1024x1024); default 4096 on a GPU, 64 on CPU")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    gpu = mx.default_device() == mx.gpu
    dtype = mx.bfloat16 if gpu else mx.float32
    args.tokens = args.tokens or (4096 if gpu else 64)
    print(f"device {mx.default_device()}, activations {dtype}, {args.tokens} tokens, group size {GROUP}, "
          f"LoRA update {RELATIVE_UPDATE:.0%} of |W|")
    print(f"{'layer':24} {'bits':>4} {'rank':>4} | {'lora err':>17} | {'total err':>26} | "
          f"{'forward ms':>19} | {'flops':>6} | {'load ms':>15}")
    print(f"{'':24} {'':>4} {'':>4} | {'side':>8} {'requant':>8} | {'side':>8} {'requant':>8} {'no LoRA':>8} | "
          f"{'qlinear':>8} {'low-rank':>10} | {'side':>6} | {'side':>7} {'requant':>7}")
    totals = {}
    for bits in args.bits:
        for rank in args.ranks:
            for label, shape in SHAPES.items():
                r = run(shape, rank, bits, args.tokens, dtype)
                s, q, b = r["side"], r["requant"], r["base"]
                for key, v in (("side", s["time"]), ("base", b["time"])):
                    totals[(bits, rank, key)] = totals.get((bits, rank, key), 0) + v * PER_BLOCK[label]
                out_dim, in_dim = shape
                flops = rank * (in_dim + out_dim) / (in_dim * out_dim)
                print(f"{label:24} {bits:>4} {rank:>4} | {s['lora_err']:8.2%} {q['lora_err']:8.2%} | "
                      f"{s['total_err']:8.3%} {q['total_err']:8.3%} {b['total_err']:8.3%} | "
                      f"{b['time'] * 1e3:8.1f} {s['time'] * 1e3:10.2f} | +{flops:5.1%} | "
                      f"{s['load'] * 1e3:7.2f} {q['load'] * 1e3:7.1f}")
    print("\nmeasured side-path cost (low-rank matmuls / quantized matmuls) over one block's 7 layers:")
    for bits in args.bits:
        for rank in args.ranks:
            side, base = totals[(bits, rank, "side")], totals[(bits, rank, "base")]
            print(f"  {bits}-bit rank {rank}: +{side / base:.1%}")


if __name__ == "__main__":
    main()
