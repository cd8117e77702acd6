"""Weight bytes of the full-size model per component, per precision, from the real module structures.

Builds ZImageTransformer (the release config: 6.15B parameters), the text encoder as we run it (Qwen3-4B
without its unused last layer) and the VAE at full size *lazily*: no weight is ever materialised, the
bytes come from the shapes and dtypes after the same quantization policy the converter uses. Given
activation peaks (GiB above the weights), it also prints the peak of a generation: resident weights plus
the activation peak of each phase, where a single-shot CLI run holds only the text encoder while encoding,
only the DiT while denoising and only the VAE while decoding (weights load lazily; each is freed before
the next phase), and an app holding a pipeline keeps all three. Adding one phase's activations to the
weights holds because each model is evaluated block by block (kernels.cut); phase_peaks.py measures the
phases themselves.

    python benchmarks/memory_estimate.py [--te-act GIB --dit-act GIB --vae-act GIB]
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from zimage_mlx import text_encoder as te
from zimage_mlx import transformer as dit
from zimage_mlx.vae import VAE, VAEArgs

GB = 1e9
QWEN3_4B = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 2560, "intermediate_size": 9728, "max_position_embeddings": 40960, "model_type": "qwen3",
            "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000, "tie_word_embeddings": True, "vocab_size": 151936}


def nbytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def nparams(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def main():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--te-act", type=float, help="measured text-encoding activation peak, GiB")
    ap.add_argument("--dit-act", type=float, help="measured DiT step activation peak at the size of interest, GiB")
    ap.add_argument("--vae-act", type=float, help="measured VAE decode activation peak (tiled as run), GiB")
    args = ap.parse_args()
    rows = []
    for label, bits in (("bfloat16", None), ("8-bit", 8), ("4-bit", 4)):
        d = dit.ZImageTransformer(dit.TransformerArgs())
        d.set_dtype(mx.bfloat16)
        t = te.Qwen3Encoder(te.model_args(QWEN3_4B))
        t.set_dtype(mx.bfloat16)
        if label == "bfloat16":
            n_dit, n_te = nparams(d), nparams(t)
        if bits:
            nn.quantize(d, class_predicate=dit.quant_predicate(bits))
            nn.quantize(t, class_predicate=te.quant_predicate(max(bits, te.MIN_DEFAULT_BITS)))
        rows.append((label, nbytes(d), nbytes(t)))
    vae_bytes = nbytes(VAE(VAEArgs()))
    print(f"DiT parameters: {n_dit:,}; text encoder parameters as run (35 of 36 layers): {n_te:,}")
    print("| precision | DiT GB | text encoder GB | VAE GB (float32) | all resident GB |\n|---|---|---|---|---|")
    for label, b_dit, b_te in rows:
        v = vae_bytes
        print(f"| {label} | {b_dit / GB:.2f} | {b_te / GB:.2f} | {v / GB:.2f} | {(b_dit + b_te + v) / GB:.2f} |")
    if None in (args.te_act, args.dit_act, args.vae_act):
        return
    te_a, dit_a, vae_a = (x * 2**30 for x in (args.te_act, args.dit_act, args.vae_act))
    print(f"\nWith activation peaks text encoding {args.te_act} GiB, DiT step {args.dit_act} GiB, VAE decode "
          f"{args.vae_act} GiB (GB = 1e9 bytes):")
    print("| precision | encode phase GB | denoise phase GB | decode phase GB | CLI single-shot peak GB "
          "| app keeping all resident GB |\n|---|---|---|---|---|---|")
    for label, b_dit, b_te in rows:
        phases = (b_te + te_a, b_dit + dit_a, vae_bytes + vae_a)
        resident = b_dit + b_te + vae_bytes + max(te_a, dit_a, vae_a)
        print(f"| {label} | " + " | ".join(f"{p / GB:.2f}" for p in phases)
              + f" | **{max(phases) / GB:.2f}** | {resident / GB:.2f} |")


if __name__ == "__main__":
    main()
