"""Prompt enhancement at Qwen3-4B width: tokens per second, and the memory the language-model tail adds.

Writes a random-weight text_encoder/ with the release's Qwen3-4B config (hidden 2560, 32 heads, 8 KV heads,
FFN 9728, vocab 151936, tied embeddings) but only a few layers, in bfloat16 like the release, plus the test
tokenizer (benchmarks/text_encoder_memory.py writes it); loads it with TextEncoder.from_pretrained, then
measures with mx.get_active_memory / mx.get_peak_memory:

- what PromptEnhancer.from_text_encoder adds (the last layer and the final norm; the head is the tied
  embedding, shared), while it loads and once loaded;
- a greedy generation of --tokens tokens after a --prompt-tokens token prompt (stop tokens masked so it
  runs to the end): prefill time, decoding tokens/s, and the peak above the loaded weights (KV cache, logits,
  activations);
- one decoder layer's and the head's time per decoded token, measured alone, from which a 36-layer
  per-token time on this machine is derived (labelled derived).

It then derives, from the module structures at the full 36 layers (shapes only; nothing is allocated), the
bytes the tail adds in bfloat16 and in 8 bits (the text encoder's quantization policy), and the KV cache per
token.

    python3 benchmarks/enhance_speed.py [--layers 3] [--tokens 48] [--prompt-tokens 256] [--dtype float32]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from text_encoder_memory import QWEN3_4B, write_checkpoint  # noqa: E402

from zimage_mlx import kernels  # noqa: E402
from zimage_mlx.enhance import CausalLM, PromptEnhancer, Qwen3Tail  # noqa: E402
from zimage_mlx.text_encoder import Qwen3Encoder, TextEncoder, model_args, quant_predicate  # noqa: E402


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def module_bytes(module: nn.Module, dtype=mx.bfloat16, bits: int | None = None) -> int:
    """Bytes of a module's parameters in `dtype` (quantized to `bits` with the text encoder's policy), from the
    lazy shapes: the random initial values are never computed."""
    module.set_dtype(dtype)
    if bits is not None:
        nn.quantize(module, class_predicate=quant_predicate(bits))
    return sum(p.nbytes for _, p in tree_flatten(module.parameters()))


def time_per_call(fn, repeat: int) -> float:
    mx.eval(fn())  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        mx.eval(fn())
    return (time.perf_counter() - t) / repeat


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48, help="tokens to generate")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (chat template + system prompt)")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    args = parser.parse_args()

    kernels.keep_freed_memory()  # as ZImagePipeline.from_pretrained does on the CPU
    root = args.dir or Path(tempfile.mkdtemp(prefix="enhance-speed-"))
    config = root / "text_encoder" / "config.json"
    if not (config.is_file() and json.loads(config.read_text())["num_hidden_layers"] == args.layers):
        write_checkpoint(root, args.layers)
    gc.collect()
    mx.clear_cache()

    te = TextEncoder.from_pretrained(root, dtype=args.dtype)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t = time.perf_counter()
    enhancer = PromptEnhancer.from_text_encoder(te, root)
    t_tail = time.perf_counter() - t
    tail_active, tail_peak = mx.get_active_memory() - base, mx.get_peak_memory() - base

    key = mx.random.key(0)
    ids = mx.random.randint(0, 400, (args.prompt_tokens,), key=key).tolist()
    gc.collect()
    loaded = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    times = []
    for _ in enhancer.generate_ids(ids, max_tokens=args.tokens, temperature=0, min_tokens=args.tokens):
        times.append(time.perf_counter())
    gen_peak = mx.get_peak_memory() - loaded
    prefill = times[0] - t0
    decode_tps = (len(times) - 1) / (times[-1] - times[0])

    # One layer and the head alone, for one new token after a full context.
    from mlx_lm.models.cache import KVCache

    lm = CausalLM(te.model, enhancer.tail)
    layer = enhancer.tail.layer
    cache = KVCache()
    h = mx.random.normal((1, args.prompt_tokens, te.hidden_size), key=key).astype(te.dtype)
    mx.eval(layer(h, "causal", cache))
    x = h[:, :1]

    def one_layer():
        out = layer(x, None, cache)
        cache.offset -= 1  # keep the context length fixed
        return out

    t_layer = time_per_call(one_layer, 10)
    t_head = time_per_call(lambda: te.model.embed_tokens.as_linear(enhancer.tail.norm(x)), 10)
    del lm

    full = model_args(QWEN3_4B)
    n = full.num_hidden_layers
    tail_bf16, tail_8bit = module_bytes(Qwen3Tail(full)), module_bytes(Qwen3Tail(full), bits=8)
    enc_bf16, enc_8bit = module_bytes(Qwen3Encoder(full)), module_bytes(Qwen3Encoder(full), bits=8)
    kv_per_token = n * 2 * full.num_key_value_heads * full.head_dim * 2  # keys and values, bfloat16

    print(f"Qwen3-4B width, {args.layers} layers, compute dtype {args.dtype}, checkpoint {root}")
    print("measured:")
    print(f"  tail (last layer + norm; tied head shared) nbytes {mib(enhancer.nbytes)}, loaded in {t_tail:.2f} s")
    print(f"  active added by from_text_encoder              {mib(tail_active)}")
    print(f"  peak added while loading it                    {mib(tail_peak)}")
    print(f"  generation: {args.prompt_tokens}-token prompt, {len(times)} tokens greedy")
    print(f"    prefill + first token                        {prefill:8.2f} s")
    print(f"    decoding                                     {decode_tps:8.2f} tokens/s")
    print(f"    peak above the loaded weights                {mib(gen_peak)}")
    print(f"  one decoder layer, one token at {args.prompt_tokens} context  {t_layer * 1e3:8.2f} ms")
    print(f"  final norm + tied head (151936 logits)         {t_head * 1e3:8.2f} ms")
    print(f"derived (this machine, {args.dtype}): {n} layers + head per token "
          f"{(n * t_layer + t_head) * 1e3:.0f} ms = {1 / (n * t_layer + t_head):.2f} tokens/s")
    print(f"derived from the module structures at {n} layers (bfloat16 / 8-bit, group size 64):")
    print(f"  tail added by enhancing                        {mib(tail_bf16)} / {mib(tail_8bit)}")
    print(f"  text encoder it shares (layers 0..{n - 2} + embeddings) {mib(enc_bf16)} / {mib(enc_8bit)}")
    print(f"  KV cache per token (bfloat16)                  {kv_per_token / 2**10:8.1f} KiB "
          f"({mib(kv_per_token * 1024)} at 1024 tokens)")


if __name__ == "__main__":
    main()
