"""Reading checkpoint folders: configs, (sharded) safetensors in any dtype, strict loading into modules."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, incomplete or not what it claims to be."""


def to_dtype(dtype) -> mx.Dtype:
    """Accept an mx.Dtype or its name ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_config(folder: Path, name: str = "config.json") -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: is {folder} a component folder of a Z-Image checkpoint?")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a component folder: the shards named by an *.index.json, else every *.safetensors."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {indexes[0]}: {e}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder} is incomplete: shard(s) {', '.join(missing)} named by {indexes[0].name} are missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder}")
    return files


def load_safetensors(folder: Path) -> dict[str, mx.array]:
    """All tensors of a component folder (lazily: nothing is read until it is used)."""
    weights: dict[str, mx.array] = {}
    for f in safetensors_files(folder):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mx.load raises RuntimeError/ValueError on damaged files
            raise CheckpointError(f"cannot read {f}: {e}") from None
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
