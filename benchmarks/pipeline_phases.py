"""Per-phase time and peak memory of one generation: load, text encoding, each DiT step, VAE decode.

Builds a random-weight checkpoint in the Hugging Face layout (with the test suite's builders), either
tiny or at the real widths with few layers, then runs ZImagePipeline on it. mx.get_peak_memory() is
reset between phases, so each phase's peak is its own (weights resident at that time included). As in
a single-shot CLI run, the text encoder is freed once the prompt is encoded and the DiT before decoding. Each DiT step is reported
with its model FLOPs and its share of the GEMM throughput measured in the same run (at the DiT's shape).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python benchmarks/pipeline_phases.py --width full --size 512 --steps 2 --low-memory
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

GIB = 1024**3


def build(root: Path, width: str, layers: int, te_layers: int) -> Path:
    import math

    import reference

    if (root / "model_index.json").exists():
        return root
    if width == "tiny":
        return reference.build_checkpoint(root)
    root.mkdir(parents=True)
    n_tokens = reference.build_tokenizer(root / "tokenizer")
    reference.build_text_encoder(root / "text_encoder", 151936, config=dict(
        reference.TEXT_ENCODER_CONFIG, hidden_size=2560, intermediate_size=9728, num_hidden_layers=te_layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128))
    assert n_tokens < 151936 and math.isfinite(n_tokens)
    reference.build_transformer(root / "transformer", max_shard_size="5GB", config=dict(
        reference.TRANSFORMER_CONFIG, dim=3840, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
        axes_dims=[32, 48, 48], n_layers=layers))
    reference.build_vae(root / "vae", config=dict(reference.VAE_CONFIG, block_out_channels=[128, 256, 512, 512],
                                                   norm_num_groups=32))
    reference.build_scheduler(root / "scheduler")
    (root / "model_index.json").write_text(__import__("json").dumps(reference.MODEL_INDEX))
    return root


class Phase:
    def __init__(self, name, rows):
        self.name, self.rows = name, rows

    def __enter__(self):
        mx.synchronize()
        mx.reset_peak_memory()
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        mx.synchronize()
        self.rows.append((self.name, time.perf_counter() - self.t, mx.get_peak_memory() / GIB,
                          mx.get_active_memory() / GIB))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--layers", type=int, default=2, help="main DiT layers (full width)")
    ap.add_argument("--te-layers", type=int, default=3, help="text encoder layers (full width)")
    ap.add_argument("--dir", default="/tmp/zimage-bench")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--low-memory", action="store_true")
    ap.add_argument("--quantize", type=int, choices=[4, 8])
    args = ap.parse_args()

    from dit_speed import dit_flops, gemm_meter
    from zimage_mlx import ZImagePipeline

    root = build(Path(args.dir) / f"{args.width}-{args.layers}", args.width, args.layers, args.te_layers)
    rows = []
    with Phase("load (lazy)", rows):
        pipe = ZImagePipeline.from_pretrained(root, dtype=args.dtype, low_memory=args.low_memory,
                                              quantize=args.quantize)
    with Phase("text encoding (incl. weights read)", rows):
        feats = pipe.encode_prompt("a red fox in the snow, golden hour, 35 mm photo")
    pipe.release_text_encoder()
    h = w = args.size // 8
    latents = mx.random.normal((1, h, w, 16), key=mx.random.key(0))
    steps = pipe.denoise(feats, latents, pipe.sigmas(args.steps, width=args.size, height=args.size))
    for i in range(args.steps):
        with Phase(f"DiT step {i + 1}" + (" (incl. weights read)" if i == 0 else ""), rows):
            step = next(steps)
    a = pipe.transformer.args
    steps.close()  # the finished generator would otherwise keep a reference to the DiT
    pipe.release_transformer()  # as the CLI does before its last decode
    with Phase("VAE decode (DiT freed)", rows):
        pipe.decode(step.latents)

    n_img, n_cap = (h // 2) * (w // 2), int(feats[0].shape[0])
    flops = dit_flops(a.dim, int(a.dim / 3 * 8), n_img, n_cap, a.n_layers, a.n_refiner_layers)
    gemm = gemm_meter(n_img + n_cap, a.dim, int(a.dim / 3 * 8), repeat=3)() if args.dtype == "float32" else None
    print(f"{args.width} width ({args.layers} DiT layers), {args.size}x{args.size}, {args.dtype}"
          f"{f', {args.quantize}-bit' if args.quantize else ''}{', low memory' if args.low_memory else ''}, "
          f"device {mx.default_device()}")
    print(f"DiT model FLOPs per step: {flops / 1e9:.1f} GFLOP ({n_img} image + {n_cap} caption tokens)"
          + (f"; float32 GEMM {n_img + n_cap}x{a.dim}x{int(a.dim / 3 * 8)} in this run: {gemm:.1f} GFLOP/s" if gemm else ""))
    print("| phase | seconds | peak GiB | active after GiB | GFLOP/s (share of GEMM) |\n|---|---|---|---|---|")
    for name, sec, peak, active in rows:
        rate = ""
        if name.startswith("DiT step"):
            rate = f"{flops / sec / 1e9:.1f}" + (f" ({100 * flops / sec / 1e9 / gemm:.0f}%)" if gemm else "")
        print(f"| {name} | {sec:.2f} | {peak:.2f} | {active:.2f} | {rate} |")


if __name__ == "__main__":
    main()
