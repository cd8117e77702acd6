"""Peak memory of `zimage-mlx convert` at release widths: it must not grow with the model.

Writes a checkpoint whose DiT has the release's widths (dim 3840, FFN 10240, 30 heads, caption 2560) but only
a few layers, as float32 shards like the Hub's, with random weights (numpy + safetensors, no torch), next to
a text encoder with Qwen3-4B's embedding table (151936 x 2560 bfloat16, the largest tensor of the release)
and 2 small layers, a small VAE, the test tokenizer and the scheduler. Then converts it in a fresh process
per setting and reads that process's peak RSS, against the same process importing everything and stopping
before the conversion. Two depths show what a layer adds (nothing: tensors are streamed one at a time, so
the peak is the largest source tensor and its output, here Qwen3-4B's embedding table, plus the interpreter).

    python3 benchmarks/convert_memory.py [--layers 1 3] [--shard-mb 2048] [--dir /tmp/zimage-convert-mem]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

RELEASE_DIT = {
    "_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1], "all_patch_size": [2], "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512], "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16, "n_heads": 30,
    "n_kv_heads": 30, "n_layers": 30, "n_refiner_layers": 2, "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0,
    "t_scale": 1000.0,
}
SMALL_QWEN = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2560, "intermediate_size": 1024, "max_position_embeddings": 40960, "model_type": "qwen3",
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
}

# Runs in a fresh interpreter: import everything, then (unless "baseline") convert; print seconds and peak RSS.
CHILD = """
import sys, time
from zimage_mlx import convert as C, text_encoder, transformer, vae  # the imports a conversion pays for
t = time.perf_counter()
if sys.argv[1] != "baseline":
    quantize = None if sys.argv[3] == "none" else int(sys.argv[3])
    C.convert(sys.argv[1], sys.argv[2], dtype=sys.argv[4], quantize=quantize, shard_size=int(sys.argv[5]), force=True)
# VmHWM, not ru_maxrss: after fork + exec, ru_maxrss still counts the parent's pages at fork time.
print(time.perf_counter() - t, next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))  # KiB
"""


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def write_checkpoint(root: Path, layers: int) -> int:
    """The checkpoint under root; returns the DiT's float32 bytes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import reference
    from zimage_mlx.text_encoder import Qwen3Encoder, model_args
    from zimage_mlx.transformer import TransformerArgs, ZImageTransformer
    from zimage_mlx.vae import VAE, VAEArgs

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def random(shape):
        return (rng.standard_normal(shape, dtype=np.float32) * (shape[-1] ** -0.5 if len(shape) > 1 else 1)).astype(np.float32)

    # DiT: shapes from our own module (built lazily, nothing allocated), float32 shards of about 2 GB.
    dit_config = dict(RELEASE_DIT, n_layers=layers, n_refiner_layers=1)
    shapes = {k: v.shape for k, v in tree_flatten(ZImageTransformer(TransformerArgs.from_dict(dit_config)).parameters())}
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps(dit_config, indent=2))
    shard, size, files, weight_map = {}, 0, [], {}
    names = sorted(shapes)
    for i, name in enumerate(names):
        shard[name] = random(shapes[name])
        size += shard[name].nbytes
        if size > 2 * 2**30 or i == len(names) - 1:
            f = f"diffusion_pytorch_model-{len(files) + 1:05d}.safetensors"
            write_safetensors(root / "transformer" / f, shard)
            weight_map.update({k: f for k in shard})
            files.append(f)
            shard, size = {}, 0
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))

    # Tokenizer, text encoder (hidden 2560 = cap_feat_dim), VAE, scheduler, model_index.
    n_tokens = reference.build_tokenizer(root / "tokenizer")
    # Qwen3-4B's embedding table (151936 x 2560, bfloat16 like the release): the largest tensor to convert.
    te_config = dict(SMALL_QWEN, vocab_size=151936)
    encoder = Qwen3Encoder(model_args(te_config))
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "config.json").write_text(json.dumps(te_config, indent=2))
    key = mx.random.key(0)
    mx.save_safetensors(str(root / "text_encoder" / "model.safetensors"),
                        {"model." + k: (mx.random.normal(v.shape, key=key) * 0.05).astype(mx.bfloat16)
                         for k, v in tree_flatten(encoder.parameters())}, metadata={"format": "pt"})
    del n_tokens
    vae_config = dict(reference.VAE_CONFIG, _class_name="AutoencoderKL")
    model = VAE(VAEArgs.from_dict(vae_config))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps(vae_config, indent=2))
    write_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors",
                      {k: random(v.shape).transpose(0, 3, 1, 2).copy() if v.ndim == 4 else random(v.shape)
                       for k, v in tree_flatten(model.parameters())})
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        dict(reference.SCHEDULER_CONFIG, _class_name="FlowMatchEulerDiscreteScheduler")))
    (root / "model_index.json").write_text(json.dumps(reference.MODEL_INDEX, indent=2))
    mx.clear_cache()
    return total


def child(*args) -> tuple[float, float]:
    """Run CHILD in a fresh interpreter: (seconds, peak RSS in GiB)."""
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    seconds, kib = out.stdout.split()[-2:]
    return float(seconds), int(kib) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--shard-mb", type=int, default=2048, help="output shard size in MiB (the default is convert's)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "zimage-convert-mem")
    args = ap.parse_args()
    shard = args.shard_mb * 2**20
    settings = [("bf16", None, "bfloat16"), ("q4", 4, "bfloat16"), ("q8", 8, "bfloat16"), ("fp32", None, "float32")]
    rows = []
    _, base_peak = child("baseline")
    for layers in sorted(args.layers):
        src, dst = args.dir / f"src-{layers}", args.dir / f"dst-{layers}"
        t = time.perf_counter()
        dit_bytes = write_checkpoint(src, layers)
        print(f"wrote a {layers}-layer DiT ({dit_bytes / 2**30:.2f} GiB float32) in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
        for name, bits, dtype in settings:
            seconds, peak = child(src, dst, bits or "none", dtype, shard)
            files = sorted((dst / "transformer").glob("*.safetensors"))
            out = sum(f.stat().st_size for f in files)
            largest = max(f.stat().st_size for f in dst.rglob("*.safetensors"))  # any component's
            rows.append((layers, name, dit_bytes, out, len(files), largest, peak, seconds))
            print(rows[-1], file=sys.stderr)
            shutil.rmtree(dst)
        shutil.rmtree(src)
    print(f"\nbaseline (interpreter + imports, no conversion): {base_peak:.2f} GiB peak RSS\n")
    print("| DiT layers (+1+1 refiners) | setting | DiT in (fp32) | DiT out | DiT shards | largest shard | peak RSS "
          "| peak - baseline | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layers, name, dit_bytes, out, n, largest, peak, seconds in rows:
        print(f"| {layers} | {name} | {dit_bytes / 2**30:.2f} GiB | {out / 2**30:.2f} GiB | {n} | {largest / 2**30:.2f} GiB "
              f"| {peak:.2f} GiB | {peak - base_peak:.2f} GiB | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
