"""Memory of the text encoder at Qwen3-4B width: what loading keeps, what release() returns.

Writes a random-weight text_encoder/ with the release's Qwen3-4B config (hidden 2560, vocab 151936, ...) but
only a few layers, in bfloat16 like the release, plus the test tokenizer; then loads it with
TextEncoder.from_pretrained, encodes a prompt and releases it, reading mx.get_active_memory() at each step.

    python3 benchmarks/text_encoder_memory.py [--layers 3] [--dtype bfloat16] [--dir /tmp/te-mem]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from zimage_mlx.text_encoder import TextEncoder  # noqa: E402

# Tongyi-MAI/Z-Image-Turbo text_encoder/config.json (release style: top-level rope_theta, torch_dtype).
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2560, "intermediate_size": 9728, "max_position_embeddings": 40960, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000, "rope_scaling": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936,
}


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def write_checkpoint(root: Path, layers: int) -> int:
    """A bf16 text_encoder/ (keys prefixed model., no lm_head) and a tokenizer/; returns the file's size."""
    import reference

    c = dict(QWEN3_4B, num_hidden_layers=layers)
    h, q, kv, f = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"], c["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (c["head_dim"],), p + "self_attn.k_norm.weight": (c["head_dim"],),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        }
    key = mx.random.key(0)
    weights = {}
    for name, shape in shapes.items():
        key, sub = mx.random.split(key)
        scale = 0.2 if len(shape) == 1 else shape[-1] ** -0.5 if "embed" not in name else 1.0
        w = mx.random.normal(shape, key=sub) * scale + (1.0 if len(shape) == 1 else 0.0)
        weights[name] = w.astype(mx.bfloat16)
        mx.eval(weights[name])
    (root / "text_encoder").mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(root / "text_encoder" / "model.safetensors"), weights)
    (root / "text_encoder" / "config.json").write_text(json.dumps(c, indent=2))
    reference.build_tokenizer(root / "tokenizer")
    return (root / "text_encoder" / "model.safetensors").stat().st_size


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="te-mem-"))
    config = root / "text_encoder" / "config.json"
    if config.is_file() and json.loads(config.read_text())["num_hidden_layers"] == args.layers:
        on_disk = (root / "text_encoder" / "model.safetensors").stat().st_size  # reuse the one written before
    else:
        on_disk = write_checkpoint(root, args.layers)
    gc.collect()
    mx.clear_cache()

    base = mx.get_active_memory()
    mx.reset_peak_memory()
    te = TextEncoder.from_pretrained(root, dtype=args.dtype)
    loaded = mx.get_active_memory() - base
    peak_load = mx.get_peak_memory() - base
    kept = te.nbytes
    features = te.encode("A photorealistic portrait of an astronaut riding a horse on the moon, golden hour light. " * 4)
    mx.eval(features)
    after_encode = mx.get_active_memory() - base
    peak_encode = mx.get_peak_memory() - base
    features_bytes = sum(f.nbytes for f in features)
    before_release = mx.get_active_memory()
    te.release()
    gc.collect()
    freed = before_release - mx.get_active_memory()

    print(f"Qwen3-4B width, {args.layers} layers ({args.layers - 1} built), compute dtype {args.dtype}, checkpoint {root}")
    print(f"  weights on disk (bf16, all layers + final norm) {mib(on_disk)}")
    print(f"  weights kept by the encoder (te.nbytes)         {mib(kept)}")
    print(f"  active after from_pretrained                    {mib(loaded)}")
    print(f"  peak during from_pretrained                     {mib(peak_load)}")
    print(f"  active after encode ({features[0].shape[0]} tokens, features {features_bytes} B) {mib(after_encode)}")
    print(f"  peak during encode                              {mib(peak_encode)}")
    print(f"  freed by release()                              {mib(freed)}")
    print(f"  active after release                            {mib(mx.get_active_memory() - base)}")


if __name__ == "__main__":
    main()
