"""Loading checkpoints: (sharded) safetensors in any dtype, strict loading into modules, quantization.

Where a checkpoint is (local folders, the Hub) is sources.py's role."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import CheckpointError, InputError  # noqa: F401  (CheckpointError: re-exported, its historical home)
from .sources import safetensors_files

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def to_dtype(dtype) -> mx.Dtype:
    """Accept an mx.Dtype or its name ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_safetensors(source, *, label: str | None = None, transform=None) -> dict[str, mx.array]:
    """The one loop reading (sharded) safetensors: all tensors of a folder (its index's shards, else its
    *.safetensors files, see sources.safetensors_files) or of a list of files, lazily: nothing is read until
    it is used. transform: applied to each file's tensors (e.g. a model's sanitize, to keep only its own);
    label: named in the error for an unreadable file."""
    files = safetensors_files(source) if isinstance(source, (str, Path)) else source
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            tensors = mx.load(str(f))
        except Exception as e:  # mx.load raises RuntimeError/ValueError on damaged or foreign files
            raise CheckpointError(f"cannot read {f}" + (f" ({label})" if label else "") + f": {e}") from None
        weights.update(transform(tensors) if transform else tensors)
    return weights


def load_into(model: nn.Module, weights: dict[str, mx.array], what: str, dtype: mx.Dtype | None = None) -> None:
    """Load weights strictly: every module parameter must be present with its shape, and nothing else.

    Floating-point weights are cast to `dtype` when given (quantized integer weights keep theirs).
    """
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {', '.join(unexpected[:4])}")
        raise CheckpointError(f"{what}: weights do not fit the model: {'; '.join(parts)}")
    for key, w in weights.items():
        if w.shape != expected[key].shape:
            raise CheckpointError(f"{what}: {key} has shape {tuple(w.shape)}, the model expects {tuple(expected[key].shape)}")
    if dtype is not None:
        weights = {k: w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w for k, w in weights.items()}
    model.load_weights(list(weights.items()), strict=True)


# ----------------------------------------------------------------------------------------------
# Quantization: each model's policy is its own `quant_predicate`; these helpers apply a policy on the fly or
# rebuild the quantized layers of a stored folder.

QUANT_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def check_quantization(bits, group_size) -> None:
    """Raise ValueError unless MLX can quantize with these bits and group size."""
    if bits not in QUANT_BITS or isinstance(bits, bool):
        raise InputError(f"quantization bits must be one of {', '.join(map(str, QUANT_BITS))}, got {bits!r}")
    if group_size not in GROUP_SIZES or isinstance(group_size, bool):
        raise InputError(f"quantization group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")


def stored_bits(config: dict) -> int | None:
    """The bits a component's config.json records it was converted to (`zimage-mlx convert --quantize`), or None."""
    q = config.get("quantization")
    return q.get("bits") if isinstance(q, dict) else None


def quantize_as_stored(model: nn.Module, weights: dict[str, mx.array], config: dict, what: str,
                       requested: int | None = None) -> dict | None:
    """Before strict loading from a quantized folder: quantize the modules whose `<path>.scales` are in the
    weights, with the bits and group size its config.json records (per-layer entries override them), the
    mlx-lm way. Returns the recorded quantization, or None for a float folder.

    requested: bits asked for on the fly; a folder stored at other bits is refused rather than requantized.
    """
    q = config.get("quantization")
    if not q:
        if any(k.endswith(".scales") for k in weights):
            raise CheckpointError(f"{what}: the weights are quantized but config.json records no quantization")
        return None
    if requested is not None and requested != q.get("bits"):
        raise CheckpointError(
            f"{what} is stored quantized to {q.get('bits')} bits: load it without {{quantize}}, "
            f"or convert the original checkpoint again with {{quantize}} {requested}", "quantize", ("quantize",))
    try:
        nn.quantize(model, q["group_size"], q["bits"], mode=q.get("mode", "affine"),
                    class_predicate=lambda p, m: f"{p}.scales" in weights and q.get(p, True))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{what}: config.json records an unusable quantization {q}: {e}") from None
    return q


def quantize_model(model: nn.Module, predicate) -> None:
    """Quantize a loaded model in place with a policy predicate, then evaluate it one parameter at a time:
    each float weight is read, quantized and dropped before the next, so the peak stays near the quantized
    size instead of float + quantized."""
    nn.quantize(model, class_predicate=predicate)
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)


def quant_policy(bits: int, group_size: int, keep: tuple[str, ...] = (), min_bits: dict[str, int] | None = None,
                 types: tuple = (nn.Linear,)):
    """The one shape of every model's quantization policy, as an `nn.quantize` class_predicate: modules of
    `types` are quantized at `bits` (at least min_bits[name] where `name` is in their path) and group_size,
    except those under a `keep` prefix and those whose input width is not a multiple of group_size
    (mx.quantize works on whole groups of a row)."""
    min_bits = min_bits or {}

    def predicate(path: str, module: nn.Module):
        if not isinstance(module, types) or path.startswith(keep) or module.weight.shape[-1] % group_size:
            return False
        return {"bits": max([bits] + [m for name, m in min_bits.items() if name in path]), "group_size": group_size}

    return predicate


def model_label(model: str) -> str:
    """How a model, LoRA or ControlNet is named in metadata, without any local path: a Hub id as given; a
    folder by its name and a short hash of its configs (`my-folder#1a2b3c4d`, which --from-image compares
    with the --model folder); a file by its name."""
    path = Path(model).expanduser()
    if path.is_dir():
        return f"{path.resolve().name}#{config_hash(path)}"
    return path.name if path.exists() else str(model)


def config_hash(folder: Path) -> str:
    """8 hex digits of SHA-256 over a folder's top-level and per-component JSON configs (names and contents)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.glob("*.json")) + sorted(folder.glob("*/*config*.json")):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:8]
