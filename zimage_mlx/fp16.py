"""When float16 is safe for a Z-Image DiT, and when dtype="auto" picks it.

float16 is the fast type on M1/M2 GPUs, which have no native bfloat16 (MLX emulates it there); from M3 on
bfloat16 is native and float16 gains nothing. The DiT's float16 path is the scaled graph of transformer.py
(V_SCALE, FFN_SCALE), which the pipeline checks after every step. What it cannot fix is a checkpoint whose
weights or activations are out of float16's reach; these statistics, read off the weights (by
`zimage-mlx convert`, which stores them in the transformer's config.json, or at load), decide that:

- max |w| over every Linear weight: it must be below float16's 65,504 (the release's largest is 14.0);
- the fraction of weights below float16's smallest normal 6.1e-5 (a precision figure: they become subnormal);
- the population std of layers.{n-2}.ffn_norm1.weight: ComfyUI runs Z-Image in float16 only when it is below
  0.42 (comfy/model_detection.py); Turbo passes, Z-Image Base and some merges fail and overflow even when
  scaled;
- per block, worst-case bounds (loose: Cauchy-Schwarz on the weights, for information): the largest element of
  a sublayer's GEMM input (sqrt(dim) max|w_norm1 (1 + scale)| over a grid of timesteps), the q/k/v and
  gate/up GEMM outputs (that times the largest row norm), the SwiGLU product, the residual increment
  (sqrt(dim) max|w_norm2|) and the attention logits (sqrt(head_dim) max|w_norm_q| max|w_norm_k|).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .embeddings import timestep_embedding

STATS_VERSION = 1
DTYPE_NAMES = ("float32", "bfloat16", "float16")
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
STD_GATE = 0.42  # ComfyUI's allow_fp16 threshold on std(layers.{n-2}.ffn_norm1.weight, population)
T_GRID = 33  # model times in [0, 1] over which the modulation bounds are taken


class Float16OverflowWarning(UserWarning):
    """float16 was asked for or chosen but did not hold: a step overflowed (and was redone in bfloat16),
    or a LoRA made the weights fail the float16 checks."""


# ----------------------------------------------------------------------------------------------
# Statistics


def _dense(layer: nn.Module) -> mx.array:
    """A Linear, QuantizedLinear or LoRA-wrapped layer's effective weight (out, in) in float32."""
    if "base" in layer:  # lora.LoraLinear: the base plus the LoRAs beside it
        return _dense(layer["base"]) + layer.side_weight()
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits,
                             mode=layer.mode).astype(mx.float32)
    return layer.weight.astype(mx.float32)


def model_weights(model: nn.Module) -> Callable[[str], mx.array]:
    """weight(key) -> the float32 array of a loaded model's parameter `key` (quantized layers dequantized,
    LoRAs beside a layer added in)."""
    modules = dict(model.named_modules())

    def weight(key: str) -> mx.array:
        path, _, leaf = key.rpartition(".")
        module = modules[path]
        if leaf == "weight" and ("base" in module or isinstance(module, (nn.Linear, nn.QuantizedLinear))):
            return _dense(module)
        return module[leaf].astype(mx.float32)

    return weight


def linear_names(args) -> list[str]:
    """The module paths of the DiT's Linear layers, for a TransformerArgs."""
    names = ["all_x_embedder.2-1", "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1",
             "t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1"]
    for prefix, blocks in _blocks(args):
        for b in blocks:
            names += [f"{b}.attention.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")]
            names += [f"{b}.feed_forward.{n}" for n in ("w1", "w2", "w3")]
            if prefix != "context_refiner":
                names.append(f"{b}.adaLN_modulation.0")
    return names


def _blocks(args):
    return [(p, [f"{p}.{i}" for i in range(n)]) for p, n in
            (("noise_refiner", args.n_refiner_layers), ("context_refiner", args.n_refiner_layers),
             ("layers", args.n_layers))]


def statistics(weight: Callable[[str], mx.array], args) -> dict:
    """The float16 statistics of a DiT (see the module docstring), JSON-ready.

    weight(key) gives a parameter as a float32 array, e.g. model_weights(model), or lazily read tensors:
    each Linear weight is asked for once and can be dropped after, so the peak is one weight."""
    row_norms, max_w, max_layer, small, total = {}, 0.0, "", 0, 0
    for name in linear_names(args):
        w = weight(f"{name}.weight")
        a = mx.abs(w)
        m, n_small = mx.max(a), mx.sum((a < FP16_MIN_NORMAL) & (a > 0))
        rows = mx.max(mx.sqrt(mx.sum(w * w, axis=1))) if name.endswith(("to_q", "to_k", "to_v", "w1", "w3")) else None
        mx.eval(m, n_small, *([rows] if rows is not None else []))
        m = float(m.item())
        if not m <= max_w:  # also takes inf / nan
            max_w, max_layer = m, name
        small += int(n_small.item())
        total += w.size
        if rows is not None:
            row_norms[name] = float(rows.item())
        del w, a

    # The modulation at T_GRID model times: adaln = t_embedder(1000 t); each block's (1 + scale) from it.
    t = mx.linspace(0, 1, T_GRID) * args.t_scale
    h = timestep_embedding(t) @ weight("t_embedder.mlp.0.weight").T + weight("t_embedder.mlp.0.bias")
    adaln = nn.silu(h) @ weight("t_embedder.mlp.2.weight").T + weight("t_embedder.mlp.2.bias")  # (T, adaln_dim)
    sqrt_d, layers = math.sqrt(args.dim), {}
    for prefix, blocks in _blocks(args):
        for b in blocks:
            n1a, n1f = weight(f"{b}.attention_norm1.weight"), weight(f"{b}.ffn_norm1.weight")
            if prefix != "context_refiner":
                mod = adaln @ weight(f"{b}.adaLN_modulation.0.weight").T + weight(f"{b}.adaLN_modulation.0.bias")
                scale_msa, _, scale_mlp, _ = mx.split(mod, 4, axis=-1)
                n1a, n1f = n1a * (1 + scale_msa), n1f * (1 + scale_mlp)
            in_a, in_f = (float(mx.max(mx.abs(v)).item()) for v in (n1a, n1f))
            qkv = max(row_norms[f"{b}.attention.{n}"] for n in ("to_q", "to_k", "to_v")) * sqrt_d * in_a
            gate = row_norms[f"{b}.feed_forward.w1"] * sqrt_d * in_f
            up = row_norms[f"{b}.feed_forward.w3"] * sqrt_d * in_f
            n2 = max(float(mx.max(mx.abs(weight(f"{b}.{n}.weight"))).item()) for n in ("attention_norm2", "ffn_norm2"))
            nq, nk = (float(mx.max(mx.abs(weight(f"{b}.attention.{n}.weight"))).item()) for n in ("norm_q", "norm_k"))
            layers[b] = {
                "attention_input": sqrt_d * in_a,  # bound on any element of the q/k/v GEMM input
                "ffn_input": sqrt_d * in_f,  # ... of the w1/w3 GEMM input
                "qkv": qkv,  # bound on the q, k, v GEMM outputs
                "gate_up": max(gate, up),  # ... on w1 x and w3 x
                "product": gate * up,  # ... on silu(w1 x) * w3 x (|silu(a)| <= |a|), before FFN_SCALE
                "residual_increment": sqrt_d * n2,  # per sublayer (tanh(gate) < 1)
                "logits": math.sqrt(args.head_dim) * nq * nk,
            }
    n = args.n_layers
    std_key = f"layers.{max(n - 2, 0)}.ffn_norm1.weight"  # ComfyUI: layers.28 of 30
    w = weight(std_key)
    std = float(mx.sqrt(mx.mean((w - mx.mean(w)) ** 2)).item())
    return {
        "version": STATS_VERSION,
        "max_abs_weight": _json_float(max_w),
        "max_abs_weight_layer": max_layer,
        "small_weight_fraction": small / max(total, 1),
        "ffn_norm1_std": std,
        "ffn_norm1_std_key": std_key,
        "layers": {k: {s: _json_float(v) for s, v in d.items()} for k, d in layers.items()},
    }


def _json_float(v: float):
    return v if math.isfinite(v) else str(v)  # JSON has no inf / nan


def stored(config: dict) -> dict | None:
    """The statistics a transformer config.json records (written by zimage-mlx convert), if current."""
    s = config.get("fp16_stats")
    return s if isinstance(s, dict) and s.get("version") == STATS_VERSION else None


def verdict(stats: dict) -> tuple[bool, str]:
    """(whether float16 is safe for these statistics, the reason in a few words)."""
    m = float(stats["max_abs_weight"])
    if not m < FP16_MAX:
        return False, f"a weight of {stats['max_abs_weight_layer']} reaches {m:g}, beyond float16's 65,504"
    std, key = stats["ffn_norm1_std"], stats["ffn_norm1_std_key"].removesuffix(".weight")
    if not std < STD_GATE:
        return False, (f"std of {key} is {std:.3f} >= {STD_GATE} (ComfyUI's float16 gate; Z-Image Base "
                       "and some merges fail it and overflow float16)")
    return True, f"max |w| {m:.3g}, std of {key} {std:.3f} < {STD_GATE}"


# ----------------------------------------------------------------------------------------------
# The device, and dtype="auto"


def gpu_name() -> tuple[str, str] | None:
    """(device name, architecture) of the Metal GPU MLX runs on by default, or None (CPU, CUDA)."""
    if mx.default_device().type != mx.DeviceType.gpu or not mx.metal.is_available():
        return None
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return str(info.get("device_name", "")), str(info.get("architecture", ""))


def is_m1_or_m2(name: str, architecture: str = "") -> bool:
    """Apple M1/M2 GPUs (no native bfloat16): by name ("Apple M2 Pro"), or by MLX's architecture string
    (applegpu_g13* is M1, g14* is M2; MLX calls generations below 15 "pre-M3")."""
    return bool(re.search(r"\bM[12]\b", name) or re.match(r"applegpu_g1[34]", architecture))


@dataclass
class DtypeChoice:
    dtype: str
    reason: str
    pending: bool = False  # float16 chosen on the chip alone: the statistics, not stored, must be checked at load


def choose_dtype(requested: str, stats: dict | None, gpu: tuple[str, str] | None = ...,
                 stored: str | None = None) -> DtypeChoice:
    """The compute dtype for `requested` ("auto" or a dtype name) and why.

    auto, the rule:
    - on the CPU, float32 whatever the folder holds: MLX's bfloat16 and float16 matmuls are slow there (a
      folder written in a half type is upcast as it loads);
    - on a GPU, a folder converted in float32 runs float32 and one converted in float16 runs float16 when the
      statistics pass (else bfloat16); `stored` is the dtype its config.json records (`zimage-mlx convert`);
    - otherwise (bfloat16 or unrecorded): float16 on an M1/M2 GPU when the statistics pass (`pending` when
      they are not known yet; bfloat16 is emulated there), bfloat16 on any other GPU."""
    if requested != "auto":
        return DtypeChoice(requested, f"{requested} (requested)")
    gpu = gpu_name() if gpu is ... else gpu
    on_gpu = gpu is not None or mx.default_device().type == mx.DeviceType.gpu
    if not on_gpu:
        return DtypeChoice("float32", "float32: running on the CPU, where MLX's bfloat16 and float16 matmuls are slow"
                           + (f" (the folder's {stored} weights are upcast)" if stored not in (None, "float32") else ""))
    if stored == "float32":
        return DtypeChoice("float32", "float32: the folder was converted in float32")
    if stored == "float16":
        return _float16_if_safe(stats, "the folder was converted in float16", "the folder was converted in float16")
    if gpu is None:
        return DtypeChoice("bfloat16", "bfloat16: the GPU is not an Apple one (float16 pays only on M1/M2)")
    name, arch = gpu
    if not is_m1_or_m2(name, arch):
        return DtypeChoice("bfloat16", f"bfloat16: {name} has native bfloat16 (float16 pays only on M1/M2)")
    return _float16_if_safe(stats, f"{name} has no native bfloat16", f"{name} would run float16 faster")


def _float16_if_safe(stats: dict | None, because: str, otherwise: str) -> DtypeChoice:
    """float16 (for `because`) when the statistics pass, `pending` while they are unknown; else bfloat16."""
    if stats is None:
        return DtypeChoice("float16", f"float16: {because}; the checkpoint's float16 statistics are checked at load",
                           pending=True)
    ok, why = verdict(stats)
    if ok:
        return DtypeChoice("float16", f"float16: {because} and the checkpoint passes the float16 checks ({why})")
    return DtypeChoice("bfloat16", f"bfloat16: {otherwise}, but {why}")
