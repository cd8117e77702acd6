"""Would the text encoder (Qwen3-4B) fit float16? The largest stored activations per layer, in float32.

The pipeline keeps the text encoder in bfloat16 when the DiT runs float16 (pipeline._load_text_encoder):
the only published measurement of its activations on the real weights is the hidden state (13,753.5 at
position 0, fp16.md 1.2); its MLP product silu(gate x) * up x, the tensor that overflows in the DiT, was
never measured. This script measures, over a few prompts, per decoder layer: max |hidden state| (the
residual stream, what mlx-lm stores between layers), max |silu(gate x) * up x| and max |MLP output|, and
the headroom to float16's 65,504. Run it on the real checkpoint (a folder or Hub id) to settle the choice;
on the tests' random weights (the default here, no download) the numbers only show that it runs.

    python3 benchmarks/fp16_text_encoder.py [--model Tongyi-MAI/Z-Image-Turbo] [--prompts FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import qwen3

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from zimage_mlx.text_encoder import TextEncoder  # noqa: E402
from zimage_mlx.sources import resolve_model  # noqa: E402

PROMPTS = [
    "A photorealistic portrait of an astronaut riding a horse on the moon, golden hour light.",
    "A red neon sign that says OPEN above a rainy street in Tokyo at night, cinematic, 35mm film grain.",
    "一只可爱的猫坐在窗台上，阳光明媚，高清摄影。",
    "A poster with the words 'FLOAT SIXTEEN' in bold letters, minimalist, Swiss design, " * 6,
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder or Hub id (default: the tests' random checkpoint)")
    ap.add_argument("--prompts", help="a file with one prompt per line")
    a = ap.parse_args()
    prompts = [p for p in Path(a.prompts).read_text().splitlines() if p.strip()] if a.prompts else PROMPTS
    tmp = None
    if a.model is None:
        import reference

        tmp = tempfile.TemporaryDirectory()
        root = reference.build_checkpoint(Path(tmp.name) / "ckpt")
        print("random weights (tests/reference.py): these numbers say nothing about the release")
    else:
        root = resolve_model(a.model)
    encoder = TextEncoder.from_pretrained(root, dtype="float32")
    stats: dict[int, dict[str, float]] = {}
    layer_of = {id(layer.mlp): i for i, layer in enumerate(encoder.model.layers)}

    def mlp(self, x):
        product = qwen3.swiglu(self.gate_proj(x), self.up_proj(x))
        out = self.down_proj(product)
        s = stats.setdefault(layer_of[id(self)], {"hidden": 0.0, "product": 0.0, "mlp_out": 0.0})
        s["product"] = max(s["product"], mx.abs(product).max().item())
        s["mlp_out"] = max(s["mlp_out"], mx.abs(out).max().item())
        return out

    orig_block = qwen3.TransformerBlock.__call__

    def block(self, x, mask=None, cache=None):
        out = orig_block(self, x, mask, cache)
        s = stats.setdefault(layer_of[id(self.mlp)], {"hidden": 0.0, "product": 0.0, "mlp_out": 0.0})
        s["hidden"] = max(s["hidden"], mx.abs(out).max().item())
        return out

    qwen3.MLP.__call__ = mlp
    qwen3.TransformerBlock.__call__ = block
    encoder.encode(prompts)
    print(f"{len(prompts)} prompts; float16's largest finite value is 65,504")
    print("| layer | max hidden | max silu(gate) * up | max MLP output |")
    print("|---|---|---|---|")
    for i in sorted(stats):
        s = stats[i]
        print(f"| {i} | {s['hidden']:,.1f} | {s['product']:,.1f} | {s['mlp_out']:,.1f} |")
    worst = max(max(s.values()) for s in stats.values())
    print(f"largest: {worst:,.1f} ({65504 / worst:.1f}x headroom)" if worst else "no activations")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
