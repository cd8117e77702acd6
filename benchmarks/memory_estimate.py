"""Weight bytes of the full-size model per component, per precision, from the real module structures.

Builds ZImageTransformer (the release config: 6.15B parameters), the text encoder as we run it (Qwen3-4B
without its unused last layer) and the VAE at full size *lazily*: no weight is ever materialised, the
bytes come from the shapes and dtypes after the same quantization policy the converter uses. Add the
activation peaks measured by pipeline_phases.py to get the peak of a generation.

    python benchmarks/memory_estimate.py
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


if __name__ == "__main__":
    main()
