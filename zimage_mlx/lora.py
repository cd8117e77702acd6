"""LoRA adapters for the Z-Image DiT: read the formats trainers write, apply them, and undo them exactly.

Key conventions, read with the semantics of diffusers'
`_convert_non_diffusers_z_image_lora_to_diffusers` (loaders/lora_conversion_utils.py), which the tests
check us against:

  diffusers / PEFT   transformer.layers.0.attention.to_q.lora_A[.default].weight, lora_B, optional .alpha
                     (and lora_alpha / alpha_pattern / use_rslora in the file's `lora_adapter_metadata`)
  ai-toolkit         diffusion_model.layers.0.attention.to_q.lora_A.weight
  kohya / musubi     lora_unet_layers_0_attention_to_q.lora_down.weight, lora_up, alpha
  ComfyUI native     ...attention.qkv.* (B stacks q, k and v, A is shared), ...attention.out.*,
                     x_embedder, final_layer
  "dot" (Anime-Z)    ...attention.to.q.lora.down.weight, lora.up; its redundant qkv/out copies are skipped
  DiffSynth          layers.0.attention.to_q.lora_A.default.weight (bare names, no alpha)
  LyCORIS            ...to_q.lokr_w1 / lokr_w2_a ... (LoKr), .hada_w1_a ... (LoHa), .alpha, .dora_scale, under any
                     prefix above or SimpleTuner's lycoris_layers_0_attention_to_q; PEFT's base_model.model.*.lokr_w1
                     with r and alpha in adapter_config.json (the arithmetic: lycoris.py)

A float layer gets W + scale * alpha / rank * (B @ A), computed in float32 and cast back to W's dtype, and
its original array is kept, so unloading restores it bit for bit. A quantized layer is never dequantized:
the LoRA runs beside it, y = layer(x) + (x @ A^T) @ (c B)^T, which keeps the LoRA exact and costs no
memory (benchmarks/lora_quantized.py compares this with dequantize-merge-requantize); with fuse=False
float layers get the same side path, trading a few percent per step for no extra memory. LoKr, LoHa and DoRA
updates are dense: merged into float layers the same way, or beside a layer as one (out, in) matrix in the
compute dtype.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn


from .errors import LoraError  # noqa: F401  (re-exported: its historical home)
from .lycoris import DenseLayer, check_dora, decompose, dense_layer
from .sources import resolve_file


class LoraWarning(UserWarning):
    """A LoRA was applied, but some of its keys name no layer of the DiT and were left out."""


@dataclass
class LoraLayer:
    """One layer's update: B @ A times `factor` (alpha / rank), before the user's scale."""

    down: mx.array  # A: (rank, in)
    up: mx.array  # B: (out, rank)
    factor: float
    keys: tuple[str, ...]  # the file's keys for this layer, for messages
    dora_scale: mx.array | None = None  # DoRA's magnitudes (LyCORIS), per output row or input column

    @property
    def dims(self) -> tuple[int, int]:
        """(out, in) of the layer it updates."""
        return self.up.shape[0], self.down.shape[1]

    def delta(self) -> mx.array:
        """B @ A (out, in) in float32, before `factor` and the user's scale."""
        return self.up.astype(mx.float32) @ self.down.astype(mx.float32)


@dataclass
class Lora:
    """A LoRA file read and mapped to DiT layer names (diffusers spelling), not yet applied."""

    name: str  # as the user gave it: a path or a Hub id
    path: Path
    layers: dict[str, LoraLayer | DenseLayer]
    unmatched: list[str]  # keys that are not LoRA weights of a layer (orphans, biases, unknown names)
    skipped: list[str]  # redundant copies of other keys (fused qkv / bare out next to split keys)
    n_keys: int


# ----------------------------------------------------------------------------------------------
# Reading: file or Hub id -> Lora

# module path, then one of: .lora_A[.adapter].weight, .lora_down.weight, .lora.down.weight, .alpha, or a LyCORIS
# factor (.lokr_w1, .hada_w1_a, ..., .dora_scale, PEFT's with an optional .default)
_SUFFIX = re.compile(r"\.(?:lora_(A|B|down|up)(?:\.[\w-]+)?\.weight|lora\.(down|up)\.weight|(alpha)|"
                     r"(lokr_w[12](?:_[ab])?|lokr_t2|hada_w[12]_[ab]|hada_t[12]|dora_scale)(?:\.default)?)$")
_ROLE = {"A": "down", "down": "down", "B": "up", "up": "up"}
_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")
# Kohya writes module paths with every "." turned into "_"; these names keep their own underscores.
_KOHYA_WORDS = re.compile(
    r"(?<![^_])(all_x_embedder|all_final_layer|x_embedder|final_layer|noise_refiner|context_refiner|"
    r"adaLN_modulation|cap_embedder|t_embedder|feed_forward|to_out|to_[qkv])(?![^_])", re.IGNORECASE)
# SimpleTuner's LyCORIS names (`lycoris_` + the path with dots as underscores), mapped forward from the DiT's
# module names: `to_out_0` cannot be split back safely.
_BLOCK_MODULES = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "attention.qkv",
                  "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
_TOP_MODULES = ("all_x_embedder.2-1", "x_embedder", "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1",
                "final_layer.linear", "final_layer.adaLN_modulation.1", "t_embedder.mlp.0", "t_embedder.mlp.2",
                "cap_embedder.1")
_LYCORIS_BLOCK = re.compile(r"(layers|noise_refiner|context_refiner)_(\d+)_(.+)")
_DIT_ROOTS = {"layers", "noise_refiner", "context_refiner", "all_x_embedder", "all_final_layer", "cap_embedder",
              "t_embedder"}
_TEXT_ENCODER = re.compile(r"^(?:lora_te\d*_|text_encoders?[._]|te\d?\.)")
# Substrings that give away a LoRA for another model (no Z-Image key contains them), checked in this order.
_OTHER_MODELS = (
    (("double_blocks", "single_blocks", "single_transformer_blocks"), "FLUX"),
    (("transformer_blocks",), "FLUX, SD3, Qwen-Image or another MMDiT"),
    (("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block"), "Stable Diffusion / SDXL"),
)


def read_lora(source) -> Lora:
    """Read a LoRA, LoKr or LoHa: a .safetensors file, a folder holding one, a Hub repo id holding one, or
    `owner/repo/file.safetensors`. A PEFT LoKr/LoHa takes r and alpha from the adapter_config.json beside it.
    Raises LoraError for files that are not Z-Image DiT adapters we can apply."""
    path = resolve_file(source, "LoRA", error=LoraError)
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mx.load raises RuntimeError/ValueError on damaged files
        raise LoraError(f"cannot read LoRA {path}: {e}") from None
    config = None
    if (path.parent / "adapter_config.json").is_file():
        try:
            config = json.loads((path.parent / "adapter_config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoraError(f"cannot read {path.parent / 'adapter_config.json'}: {e}") from None
    return map_lora(tensors, metadata, name=str(source), file=path, adapter_config=config)


def map_lora(tensors: dict[str, mx.array], metadata: dict | None = None, *, name: str = "LoRA",
             file: Path | None = None, adapter_config: dict | None = None) -> Lora:
    """Map an adapter state dict (LoRA, LoKr, LoHa, with or without DoRA) in any of the supported conventions
    to DiT layer names. adapter_config: PEFT's adapter_config.json, which a PEFT LoKr/LoHa needs."""
    keys = list(tensors)
    _refuse_unsupported(name, keys)
    config = _peft_config(name, metadata)
    peft = _peft_lycoris(name, keys, adapter_config)
    groups: dict[str, dict[str, tuple[str, mx.array]]] = {}  # module path in the file -> role -> (key, array)
    unmatched = []
    for key, w in tensors.items():
        m = _SUFFIX.search(key)
        if m is None or m.start() == 0:
            unmatched.append(key)
            continue
        role = m.group(4) or ("alpha" if m.group(3) else _ROLE[m.group(1) or m.group(2)])
        groups.setdefault(key[: m.start()], {})[role] = (key, w)

    layers: dict = {}
    aliased: dict[str, bool] = {}
    skipped: list[str] = []
    for module, parts in groups.items():
        found = tuple(k for k, _ in parts.values())
        built = _build_layer(name, module, parts, config, peft)
        if built is None:
            unmatched.extend(found)  # an orphan half, alpha or dora_scale: nothing to apply
            continue
        # ComfyUI's fused qkv and bare out; the "dot" format carries them next to split keys.
        alias = _module_path(module).endswith((".attention.qkv", ".attention.out"))
        for t, layer in built:
            if t in layers:
                if alias:  # a redundant copy of split keys seen already
                    skipped.extend(k for k in found if k not in skipped)
                    continue
                if not aliased[t]:
                    raise LoraError(f"{name}: {layers[t].keys[0]} and {found[0]} both update layer {t}")
                skipped.extend(k for k in layers[t].keys if k not in skipped)
            layers[t] = layer
            aliased[t] = alias
    if not any(t.split(".")[0] in _DIT_ROOTS for t in layers):
        raise LoraError(f"{name}: none of its {len(keys)} keys names a layer of the Z-Image DiT "
                        f"(e.g. {', '.join(sorted(keys)[:3])})")
    return Lora(name=name, path=Path(file or name), layers=layers, unmatched=unmatched,
                skipped=skipped, n_keys=len(keys))


def _build_layer(name: str, module: str, parts: dict, config: dict, peft: dict | None) -> list | None:
    """[(DiT layer, LoraLayer or DenseLayer)] for one module of the file (three for a fused qkv), or None when
    its factors are incomplete."""
    roles = set(parts) - {"alpha", "dora_scale"}
    kinds = {"LoKr" if r.startswith("lokr") else "LoHa" if r.startswith("hada") else "LoRA" for r in roles}
    if len(kinds) > 1:
        raise LoraError(f"{name}: {module} mixes {' and '.join(sorted(kinds))} factors")
    if not kinds or kinds == {"LoRA"} and not {"down", "up"} <= roles:
        return None
    kind = kinds.pop()
    path = _module_path(module)
    target = _canonical(path)
    if kind == "LoRA":
        layer = _lora_layer(name, parts, config, target)
    else:
        pattern = None
        if peft is not None:
            pattern = (float(_pattern_value(peft.get("rank_pattern") or {}, path, peft["r"])),
                       float(_pattern_value(peft.get("alpha_pattern") or {}, path, peft["alpha"])))
        layer = dense_layer(name, kind, parts, pattern)
    if layer.dora_scale is not None:
        check_dora(name, parts["dora_scale"][0], layer.dora_scale, layer.dims)
    if not target.endswith(".attention.qkv"):
        return [(target, layer)]
    return _split_qkv(name, target, layer, parts)


def _lora_layer(name: str, parts: dict, config: dict, target: str) -> LoraLayer:
    (down_key, down), (up_key, up) = parts["down"], parts["up"]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise LoraError(f"{name}: {down_key} {tuple(down.shape)} and {up_key} {tuple(up.shape)} are not a "
                        "pair of LoRA matrices (rank x in, out x rank)")
    rank = down.shape[0]
    if "alpha" in parts:
        alpha = float(parts["alpha"][1].astype(mx.float32).reshape(-1)[0].item())
    else:
        alpha = float(_pattern_value(config["alpha_pattern"], target, config["lora_alpha"] or rank))
    factor = alpha / (math.sqrt(rank) if config["use_rslora"] else rank)
    dora = parts.get("dora_scale", (None, None))[1]
    keys = tuple(parts[r][0] for r in ("down", "up", "alpha", "dora_scale") if r in parts)
    return LoraLayer(down, up, factor, keys, dora)


def _split_qkv(name: str, target: str, layer, parts: dict) -> list:
    """A fused q, k, v update -> three: B (or the dense update's rows) in thirds, A shared."""
    out_dim = layer.dims[0]
    key = next(iter(parts.values()))[0]
    if out_dim % 3:
        raise LoraError(f"{name}: {key} updates {out_dim} rows, not three equal q, k, v parts")
    d = out_dim // 3
    dora = layer.dora_scale
    if dora is not None and not (dora.shape[0] == out_dim):
        raise LoraError(f"{name}: {parts['dora_scale'][0]} normalises the fused q, k, v weight per input column, "
                        "which zimage-mlx cannot split over to_q, to_k and to_v")
    block = target[: -len("qkv")]
    out = []
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        part_dora = None if dora is None else dora[i * d:(i + 1) * d]
        if isinstance(layer, LoraLayer):
            part = LoraLayer(layer.down, layer.up[i * d:(i + 1) * d], layer.factor, layer.keys, part_dora)
        else:
            part = replace(layer, rows=(i * d, (i + 1) * d), dora_scale=part_dora)
        out.append((block + p, part))
    return out


def _peft_lycoris(name: str, keys: list[str], adapter_config: dict | None) -> dict | None:
    """PEFT's own LoKr/LoHa layout (base_model.model. and adapter_config.json): its config, whose scale
    alpha / r holds even with full halves; None for LyCORIS files."""
    if not any(k.startswith("base_model.model.") and (".lokr_" in k or ".hada_" in k) for k in keys):
        return None
    if not isinstance(adapter_config, dict) or not {"r", "alpha"} <= set(adapter_config):
        raise LoraError(f"{name} is a PEFT LoKr/LoHa adapter: it needs its adapter_config.json (with r and alpha) "
                        "in the same folder")
    return adapter_config


def layer_name(module: str) -> str:
    """A LoRA file's module path -> the DiT layer name in diffusers spelling (fused qkv stays `qkv`)."""
    return _canonical(_module_path(module))


def _module_path(module: str) -> str:
    """Without the trainer's prefix, and dotted where kohya or SimpleTuner wrote underscores."""
    for prefix in _PREFIXES:
        module = module.removeprefix(prefix)
    if module.startswith("lora_unet_"):
        pieces = _KOHYA_WORDS.split(module.removeprefix("lora_unet_"))  # odd pieces are protected words
        module = "".join(p if i % 2 else p.replace("_", ".") for i, p in enumerate(pieces))
    elif module.startswith("lycoris_"):
        module = _lycoris_path(module.removeprefix("lycoris_"))
    return module


def _lycoris_path(name: str) -> str:
    """`layers_0_attention_to_out_0` -> `layers.0.attention.to_out.0`, looked up among the DiT's module names
    (case-insensitively); an unknown name stays as it is and matches nothing."""
    top = {m.replace(".", "_").lower(): m for m in _TOP_MODULES}
    if name.lower() in top:
        return top[name.lower()]
    m = _LYCORIS_BLOCK.fullmatch(name)
    block = {b.replace(".", "_").lower(): b for b in _BLOCK_MODULES}
    if m and m.group(3).lower() in block:
        return f"{m.group(1)}.{m.group(2)}.{block[m.group(3).lower()]}"
    return name


def _canonical(path: str) -> str:
    """ComfyUI's original module names and the "dot" format's to.q -> diffusers names."""
    if path == "x_embedder":
        return "all_x_embedder.2-1"
    if path.startswith("final_layer."):
        path = "all_final_layer.2-1." + path.removeprefix("final_layer.")
    path = re.sub(r"\.attention\.to\.([qkv])$", r".attention.to_\1", path)
    return re.sub(r"\.attention\.(?:out|to_out)$", ".attention.to_out.0", path)


def _refuse_unsupported(name: str, keys: list[str]) -> None:
    def examples(found):
        return ", ".join(found[:3]) + (f" (and {len(found) - 3} more)" if len(found) > 3 else "")

    if not keys:
        raise LoraError(f"{name} holds no tensors")
    for markers, what in _OTHER_MODELS:
        found = [k for k in keys if any(m in k for m in markers)]
        if found:
            raise LoraError(f"{name} is not a Z-Image LoRA: it looks like one for {what} ({examples(found)})")
    text_encoder = [k for k in keys if _TEXT_ENCODER.match(k)]
    if text_encoder:
        # The text encoder is reloaded between prompts in low-memory mode and its output is cached per prompt,
        # and diffusers' Z-Image loader applies LoRAs to the DiT only. Refusing beats an image without them.
        raise LoraError(f"{name} changes the text encoder ({len(text_encoder)} keys, e.g. {examples(text_encoder)}); "
                        "zimage-mlx applies LoRAs to the DiT only")
    found = [k for k in keys if "lora_magnitude_vector" in k]
    if found:
        raise LoraError(f"{name} is a PEFT DoRA adapter ({examples(found)}), which zimage-mlx does not support yet; "
                        "LoRA, LoKr and LoHa files (with a LyCORIS dora_scale or without) can be applied")


def _peft_config(name: str, metadata: dict | None) -> dict:
    """lora_alpha, alpha_pattern and use_rslora from a diffusers/PEFT file's `lora_adapter_metadata`."""
    config = {"lora_alpha": None, "alpha_pattern": {}, "use_rslora": False}
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return config
    try:
        meta = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    except (json.JSONDecodeError, AttributeError):
        raise LoraError(f"{name}: its lora_adapter_metadata is not a JSON object") from None
    if meta.get("use_dora"):
        raise LoraError(f"{name} is a DoRA adapter (use_dora in its metadata), which zimage-mlx does not support yet")
    config["lora_alpha"] = meta.get("lora_alpha")
    config["alpha_pattern"] = dict(meta.get("alpha_pattern") or {})
    config["use_rslora"] = bool(meta.get("use_rslora"))
    return config


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches the end of a module name at a dot, or, starting
    with ^, the whole name; the first match wins."""
    for key, value in patterns.items():
        if re.fullmatch(key[1:] if key.startswith("^") else rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


# ----------------------------------------------------------------------------------------------
# Applying and undoing


class LoraLinear(nn.Module):
    """A layer with adapters running beside it: base(x) + (x @ A^T) @ B^T + x @ D^T, B already scaled, D the
    sum of the dense updates (LoKr, LoHa, DoRA) in the compute dtype. The base (a QuantizedLinear, or a Linear
    when not fusing) is untouched. Stacked LoRAs are concatenated along the rank, so any number of them costs
    one pair of small matmuls; dense updates are summed into one.
    """

    def __init__(self, base: nn.Module, dtype: mx.Dtype):
        super().__init__()
        self.base = base
        self.dtype = dtype  # the model's compute dtype, which the factors are kept in
        self.down: mx.array | None = None  # (sum of ranks, in)
        self.up: mx.array | None = None  # (out, sum of ranks)
        self.dense: mx.array | None = None  # (out, in)

    @property
    def weight(self) -> mx.array:
        """The base layer's weight, for code that reads a layer's dtype from it (the timestep MLP)."""
        return self.base.weight

    def add(self, down: mx.array, up: mx.array) -> None:
        down, up = down.astype(self.dtype), up.astype(self.dtype)
        self.down = down if self.down is None else mx.concatenate([self.down, down], axis=0)
        self.up = up if self.up is None else mx.concatenate([self.up, up], axis=1)

    def add_dense(self, delta: mx.array) -> None:
        """Add a full-size update (out, in), given in float32."""
        self.dense = (delta if self.dense is None else self.dense.astype(mx.float32) + delta).astype(self.dtype)

    def side(self, x: mx.array) -> mx.array:
        """What the adapters add to base(x), computed in x's dtype."""
        dt = x.dtype
        y = 0
        if self.down is not None:
            y = (x @ self.down.astype(dt).T) @ self.up.astype(dt).T
        if self.dense is not None:
            y = y + x @ self.dense.astype(dt).T
        return y

    def side_weight(self) -> mx.array:
        """What the adapters add to the base layer's weight, (out, in) in float32."""
        w = mx.zeros(layer_dims(self), mx.float32)
        if self.down is not None:
            w = w + self.up.astype(mx.float32) @ self.down.astype(mx.float32)
        return w if self.dense is None else w + self.dense.astype(mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        return self.base(x) + self.side(x)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Linear layers (plain, quantized, or with LoRAs beside them) by dotted name."""
    kinds = (nn.Linear, nn.QuantizedLinear, LoraLinear)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds) and not name.endswith(".base")}


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(out, in) features of a Linear, QuantizedLinear or LoraLinear."""
    if isinstance(module, LoraLinear):
        module = module.base
    if isinstance(module, nn.QuantizedLinear):
        return module.weight.shape[0], module.scales.shape[-1] * module.group_size
    return tuple(module.weight.shape)


def float_weight(module: nn.Module) -> mx.array:
    """The weight a layer computes with, in float32: a quantized one dequantized, with the adapters beside it."""
    if isinstance(module, LoraLinear):
        return float_weight(module.base) + module.side_weight()
    if isinstance(module, nn.QuantizedLinear):
        return mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                             bits=module.bits, mode=getattr(module, "mode", "affine")).astype(mx.float32)
    return module.weight.astype(mx.float32)


def _low_rank(layer) -> bool:
    """A plain LoRA: it can run beside a layer as two small matmuls."""
    return isinstance(layer, LoraLayer) and layer.dora_scale is None


def _update(module: nn.Module, layer, scale: float) -> mx.array:
    """The change (out, in, float32) a LoKr, LoHa or DoRA layer makes to the module's weight at `scale`."""
    delta = layer.factor * layer.delta()
    if layer.dora_scale is None:
        return scale * delta
    return decompose(float_weight(module), delta, layer.dora_scale, scale)


def apply_lora(model: nn.Module, lora: Lora, scale: float, originals: dict, fuse: bool = True) -> int:
    """Apply `lora` (LoRA, LoKr, LoHa, DoRA) at `scale` to the model; return the number of layers changed.

    fuse: merge into float layers (no cost per step; the original weights are kept for `restore`, so each
    touched layer takes twice its memory until then). Quantized layers, and every layer with fuse=False,
    get the update beside them instead: a LoRA as its two factors (no extra memory; a few percent more work per
    step), a LoKr, LoHa or DoRA as a dense update in the compute dtype (the layer's size in that dtype).
    `originals` collects, for every layer touched the first time, what `restore` needs to undo all adapters
    exactly: the layer's module and its weight array. Nothing changes if the adapter is refused (no layer
    matches, a shape does not fit).
    """
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)):
        raise LoraError(f"LoRA scale must be a finite number, got {scale!r}")
    layers = linear_layers(model)
    todo = _targets(lora, layers)
    compute_dtype = getattr(model, "dtype", mx.float32)  # the DiT's; side-path factors are kept in it
    if compute_dtype == mx.float16:
        _check_float16(lora, scale, todo, layers, fuse)
    for name, layer in todo:
        module = layers[name]
        originals.setdefault(name, (module, module.weight if isinstance(module, nn.Linear) else None))
        c = scale * layer.factor
        if fuse and isinstance(module, nn.Linear):
            w = module.weight
            delta = c * layer.delta() if _low_rank(layer) else _update(module, layer, scale)  # (out, in)
            module.weight = (w.astype(mx.float32) + delta).astype(w.dtype)
            mx.eval(module.weight)  # one layer at a time: a full-size delta is 150 MB in float32
            continue
        delta = None if _low_rank(layer) else _update(module, layer, scale)
        if not isinstance(module, LoraLinear):
            module = layers[name] = LoraLinear(module, compute_dtype)
            _set_module(model, name, module)
        if delta is None:
            module.add(layer.down, c * layer.up.astype(mx.float32))
            mx.eval(module.down, module.up)
        else:
            module.add_dense(delta)
            mx.eval(module.dense)
    return len(todo)


def _targets(lora: Lora, layers: dict) -> list[tuple[str, object]]:
    """(DiT layer name, update) for each layer of `lora` this model has; warns about keys that match none,
    refuses a file that matches nothing or does not fit."""
    by_lower = {n.lower(): n for n in layers}  # some trainers lower-case names (adaln_modulation)
    todo, missing = [], dict.fromkeys(lora.unmatched)  # a dict keeps the order and drops repeats
    for target, layer in lora.layers.items():
        name = by_lower.get(target.lower())
        if name is None:
            missing.update(dict.fromkeys(layer.keys))
            continue
        (out_dim, in_dim), (lo, li) = layer_dims(layers[name]), layer.dims
        if (li, lo) != (in_dim, out_dim):
            raise LoraError(f"{lora.name}: {layer.keys[0]} does not fit the DiT layer {name}: the LoRA maps "
                            f"{li} -> {lo} features, the layer {in_dim} -> {out_dim} "
                            "(a LoRA for another model or model size?)")
        todo.append((name, layer))
    missing = list(missing)
    if not todo:
        raise LoraError(f"{lora.name}: none of its {lora.n_keys} keys names a layer of this Z-Image DiT "
                        f"(e.g. {', '.join(missing[:3])})")
    if missing:
        warnings.warn(LoraWarning(f"{lora.name}: {len(missing)} of its {lora.n_keys} keys name no layer of the "
                                  f"Z-Image DiT and are not applied, e.g. {', '.join(missing[:3])}"), stacklevel=4)
    return todo


def _check_float16(lora: Lora, scale: float, todo: list, layers: dict, fuse: bool) -> None:
    """Refuse, before anything changes, an adapter whose merged weights (or scaled factors or dense update,
    beside the layers) would not fit float16: they would turn into inf and every step into NaN."""
    for name, layer in todo:
        module, c = layers[name], scale * layer.factor
        merged = fuse and isinstance(module, nn.Linear)
        if _low_rank(layer) and not merged:
            w = mx.concatenate([mx.abs(layer.down.astype(mx.float32)).reshape(-1),
                                mx.abs(c * layer.up.astype(mx.float32)).reshape(-1)])
        else:
            w = c * layer.delta() if _low_rank(layer) else _update(module, layer, scale)
            if merged:
                w = module.weight.astype(mx.float32) + w
            elif isinstance(module, LoraLinear) and module.dense is not None:
                w = module.dense.astype(mx.float32) + w
        m = mx.abs(w).max().item()
        if not m < 65504:
            raise LoraError(f"{lora.name} at scale {scale:g} takes {name} to |w| = {m:g}, beyond float16's 65,504: "
                            "use a smaller scale, or load the pipeline with dtype='bfloat16'")


def restore(model: nn.Module, originals: dict) -> None:
    """Undo every LoRA applied with this `originals` dict, bit for bit, and empty it."""
    for name, (module, weight) in originals.items():
        if weight is not None:
            module.weight = weight
        _set_module(model, name, module)
    originals.clear()


def _get_module(model: nn.Module, name: str):
    m = model
    for part in name.split("."):
        m = m[int(part)] if isinstance(m, list) else m[part]
    return m


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, last = name.rpartition(".")
    parent = _get_module(model, parent_name) if parent_name else model
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        parent[last] = module  # an nn.Module is a dict of its children, like the {"2-1": ...} dicts
