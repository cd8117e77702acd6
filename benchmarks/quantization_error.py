"""How much quantization changes the DiT's output, the text encoder's features and the final image.

Builds a random-weight Z-Image checkpoint (with the reference stack, like the tests) that is wide enough for
group sizes 64 and 128: DiT dim 768 (6 heads of 128 = sum(axes_dims), as in the release), FFN 2048, 2+2
refiners and 4 main layers, caption width 256; a Qwen3 text encoder of hidden 256; the test VAE. Then:

  A. DiT output error vs float32, per bits (4, 8) and group size (32, 64, 128), under the shipped policy,
     with only the two layers the spec names kept, and with everything quantized; plus the release DiT's
     size under each;
  B. per layer group, the error of quantizing that group alone (4 bits, group 64), per share of parameters;
  C. text encoder feature error per bits and group size, with and without the token embedding quantized;
  D. end-to-end image PSNR against the float32 pipeline (same seeds, 8 steps), per DiT/text-encoder bits.

Random weights are Gaussian; trained weights have heavier tails and outlier channels, which quantize worse.
The numbers rank layers and settings; they do not predict the absolute quality on the release.

    python3 benchmarks/quantization_error.py [--dir /tmp/zimage-quant] [--size 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from zimage_mlx import ZImagePipeline  # noqa: E402
from zimage_mlx import text_encoder as TE  # noqa: E402
from zimage_mlx import transformer as T  # noqa: E402

DIT_CONFIG = dict(
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=768, n_layers=4, n_refiner_layers=2, n_heads=6,
    n_kv_heads=6, norm_eps=1e-5, qk_norm=True, cap_feat_dim=256, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)
TE_CONFIG = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
)
PROMPTS = ["a red fox in the snow, golden hour", "一只可爱的猫坐在窗台上", "a lighthouse at dusk, cinematic"]

# Layer groups of the DiT, as path regexes (nn.quantize paths).
GROUPS = {
    "x_embedder": r"all_x_embedder\.",
    "final linear": r"all_final_layer\.2-1\.linear",
    "final adaLN": r"all_final_layer\.2-1\.adaLN",
    "block adaLN": r"(layers|noise_refiner)\.\d+\.adaLN_modulation",
    "noise_refiner (attn+ffn)": r"noise_refiner\.\d+\.(attention|feed_forward)",
    "context_refiner": r"context_refiner\.",
    "main attention": r"layers\.\d+\.attention",
    "main ffn": r"layers\.\d+\.feed_forward",
    "t_embedder": r"t_embedder\.",
    "cap_embedder": r"cap_embedder\.",
}


def build(root: Path) -> Path:
    import json

    import reference

    if (root / "model_index.json").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    n_tokens = reference.build_tokenizer(root / "tokenizer")
    reference.build_text_encoder(root / "text_encoder", 64 * math.ceil((n_tokens + 10) / 64), config=TE_CONFIG)
    reference.build_transformer(root / "transformer", max_shard_size="200MB", config=DIT_CONFIG)
    reference.build_vae(root / "vae")
    reference.build_scheduler(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(reference.MODEL_INDEX, indent=2))
    return root


def rel(a: mx.array, b: mx.array) -> float:
    """Relative Frobenius error |a - b| / |b| in float64."""
    a, b = np.array(a.astype(mx.float32), np.float64), np.array(b.astype(mx.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def psnr(a, b) -> float:
    d = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if d == 0 else 10 * math.log10(255**2 / d)


def fake_quantize(model: nn.Module, predicate) -> float:
    """Replace each weight the predicate selects by dequantize(quantize(weight)); returns the quantized share
    of the Linear/Embedding parameters.

    On CPU MLX's quantized matmul runs at ~1 GFLOPS, which would make this benchmark take hours; x @ W_deq in
    float32 is the same product up to summation order (checked once in main())."""
    total = quant = 0
    for path, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            continue
        total += m.weight.size
        params = predicate(path, m)
        if params:
            quant += m.weight.size
            m.weight = mx.dequantize(*mx.quantize(m.weight, **params), **params)
    mx.eval(model.parameters())
    return quant / total


def dit_inputs(cap_feat_dim: int, size: int):
    rng = np.random.default_rng(0)
    h = size // 8
    x = mx.array(rng.standard_normal((1, h, h, 16)).astype(np.float32))
    cap = [mx.array(rng.standard_normal((40, cap_feat_dim)).astype(np.float32))]
    return [(x, mx.array([t], dtype=mx.float32), cap) for t in (0.0, 0.5, 0.9)]


def dit_error(root: Path, inputs, refs, predicate) -> tuple[float, float]:
    model = T.ZImageTransformer.from_pretrained(root / "transformer", dtype="float32")
    share = fake_quantize(model, predicate)
    errs = [rel(model(*inp), ref) for inp, ref in zip(inputs, refs)]
    return float(np.mean(errs)), share


# DiT policies compared: the shipped one (transformer.QUANT_KEEP + QUANT_MIN_BITS), the two layers the spec
# names alone, and every Linear whose width allows it.
POLICIES = {
    "policy": {},
    "spec keep only": {"keep": ("t_embedder.", "cap_embedder."), "min_bits": {}},
    "quantize all": {"keep": (), "min_bits": {}},
}


def release_gb(predicate) -> float:
    """Bytes of the release-size DiT (built lazily: nothing is allocated) stored in bfloat16 under a policy:
    quantized layers at bits/8 bytes per weight plus a bfloat16 scale and bias per group."""
    model = T.ZImageTransformer(T.TransformerArgs())
    total = 0
    quantized = set()
    for path, m in model.named_modules():
        params = predicate(path, m) if isinstance(m, nn.Linear) else False
        if params:
            n = m.weight.size
            total += n * params["bits"] / 8 + n / params["group_size"] * 4
            quantized.add(f"{path}.weight")
    total += sum(v.size * 2 for k, v in tree_flatten(model.parameters()) if k not in quantized)
    return total / 1e9


def only(group: str, predicate):
    return lambda p, m: predicate(p, m) if re.match(GROUPS[group], p) else False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "zimage-quant-bench")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    t0 = time.time()
    root = build(args.dir)

    # A. DiT output error
    fp = T.ZImageTransformer.from_pretrained(root / "transformer", dtype="float32")
    inputs = dit_inputs(fp.args.cap_feat_dim, args.size)
    refs = [fp(*inp) for inp in inputs]
    mx.eval(refs)
    # Fake quantization equals the real quantized layers up to float32 summation order: check it once.
    real = T.ZImageTransformer.from_pretrained(root / "transformer", dtype="float32")
    nn.quantize(real, class_predicate=T.quant_predicate(4, 64))
    fake = T.ZImageTransformer.from_pretrained(root / "transformer", dtype="float32")
    fake_quantize(fake, T.quant_predicate(4, 64))
    print(f"fake vs real 4-bit quantized DiT: relative difference {rel(fake(*inputs[1]), real(*inputs[1])):.1e}\n")
    del real, fake

    print(f"## A. DiT output relative error vs float32 (mean over t = 0, 0.5, 0.9; {args.size}px), and the release "
          f"DiT's size in GB under each policy (bfloat16 rest; 12.3 GB unquantized)\n")
    print("| bits | group | " + " | ".join(POLICIES) + " | " + " | ".join(f"GB, {p}" for p in POLICIES) + " |")
    print("|---|---|" + "---|" * 2 * len(POLICIES))
    for bits in (4, 8):
        for gs in (32, 64, 128):
            errors = [dit_error(root, inputs, refs, T.quant_predicate(bits, gs, **kw))[0] for kw in POLICIES.values()]
            sizes = [release_gb(T.quant_predicate(bits, gs, **kw)) for kw in POLICIES.values()]
            print(f"| {bits} | {gs} | " + " | ".join(f"{e:.4f}" for e in errors) + " | "
                  + " | ".join(f"{g:.2f}" for g in sizes) + " |")

    # B. sensitivity per layer group
    print("\n## B. One layer group quantized alone (4 bits, group 64): DiT output error\n")
    print("| group | params share | error | error / params share |")
    print("|---|---|---|---|")
    n_total = sum(m.weight.size for _, m in fp.named_modules() if isinstance(m, nn.Linear))
    for group, pattern in GROUPS.items():
        n = sum(m.weight.size for p, m in fp.named_modules() if isinstance(m, nn.Linear) and re.match(pattern, p))
        e, _ = dit_error(root, inputs, refs, only(group, T.quant_predicate(4, 64, keep=(), min_bits={})))
        print(f"| {group} | {n / n_total:.4f} | {e:.5f} | {e / (n / n_total):.4f} |")
    del fp, refs

    # C. text encoder
    print("\n## C. Text encoder feature relative error vs float32 (3 prompts)\n")
    print("| bits | group | embedding kept | embedding quantized |")
    print("|---|---|---|---|")
    enc = TE.TextEncoder.from_pretrained(root)
    ref_feats = enc.encode(PROMPTS)
    mx.eval(ref_feats)
    for bits in (4, 8):
        for gs in (32, 64, 128):
            row = []
            for embed in (False, True):
                q = TE.TextEncoder.from_pretrained(root)
                pred = TE.quant_predicate(bits, gs, keep=() if embed else ("embed_tokens",))
                fake_quantize(q.model, pred)
                row.append(np.mean([rel(a, b) for a, b in zip(q.encode(PROMPTS), ref_feats)]))
            print(f"| {bits} | {gs} | {row[0]:.4f} | {row[1]:.4f} |")
    del enc

    # D. end to end
    print(f"\n## D. Image PSNR vs the float32 pipeline ({args.size}x{args.size}, {args.steps} steps, "
          f"{len(PROMPTS)} prompts), dB\n")
    print("| DiT bits | text encoder bits | group | " + " | ".join(POLICIES) + " |")
    print("|---|---|---|" + "---|" * len(POLICIES))
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32")
    gen = dict(width=args.size, height=args.size, steps=args.steps)
    ref_images = [np.asarray(pipe.generate(p, seed=i, **gen)[0]) for i, p in enumerate(PROMPTS)]
    for dit_bits, te_bits in ((8, 8), (4, 8), (4, 4)):
        for gs in (32, 64, 128):
            row = []
            for name, kw in POLICIES.items():
                q = ZImagePipeline.from_pretrained(root, dtype="float32")
                fake_quantize(q.transformer, T.quant_predicate(dit_bits, gs, **kw))
                fake_quantize(q.text_encoder.model, TE.quant_predicate(te_bits, gs))
                images = [np.asarray(q.generate(p, seed=i, **gen)[0]) for i, p in enumerate(PROMPTS)]
                row.append(np.mean([psnr(a, b) for a, b in zip(images, ref_images)]))
            print(f"| {dit_bits} | {te_bits} | {gs} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
