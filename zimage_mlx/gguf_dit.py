"""GGUF DiTs (city96's ComfyUI-GGUF files, sd.cpp's, unsloth's): their tensors, read with gguf-py, as MLX arrays.

Names are ComfyUI's single-file names (fused qkv, final_layer, x_embedder, q_norm/k_norm, an optional
`model.diffusion_model.` prefix), which ZImageTransformer.sanitize maps. What each tensor type becomes:

  F32, F16, BF16         the same values (1-D and small tensors are stored so)
  Q8_0, Q4_0, Q4_1       kept quantized: 32-element blocks with a float16 scale d (and Q4_1's minimum m) are
                         MLX's affine quantization with group size 32, exactly (ggml-common.h block layouts):
                           Q8_0  [d][32 x int8]        w = d q        -> 8 bits, q + 128, scale d, bias -128 d
                           Q4_0  [d][16 bytes]         w = d (q - 8)  -> 4 bits, scale d, bias -8 d
                           Q4_1  [d][m][16 bytes]      w = d q + m    -> 4 bits, scale d, bias m
                         (a Q4 block's byte j holds element j in its low nibble and j + 16 in its high one)
  K-quants, Q5_0/Q5_1,   dequantized with gguf.quants.dequantize (numpy, vectorised over blocks) and kept in the
  IQ types, others       requested dtype, or re-quantized by the caller
A quantized weight `name.weight` becomes `name.weight` (uint32, MLX packing), `name.scales` and `name.biases`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import CheckpointError

GROUP_SIZE = 32  # every GGUF block type kept quantized has 32 elements


@dataclass
class GGUFTensors:
    """The tensors of a GGUF file (file names), and what each stored type became."""

    tensors: dict[str, mx.array]
    types: Counter = field(default_factory=Counter)  # GGML type name -> number of tensors
    kept: dict[str, int] = field(default_factory=dict)  # weight key -> bits, for the blocks kept quantized

    def describe(self) -> str:
        """`GGUF Q4_0 x120, F32 x200: Q4_0 kept 4-bit (group 32)`."""
        types = ", ".join(f"{t} x{n}" for t, n in self.types.most_common())
        kept = sorted({t for t in self.types if t in _KEPT})
        return f"GGUF {types}" + (f"; {', '.join(kept)} kept quantized (group {GROUP_SIZE})" if kept else "")


def _kept():
    from gguf import GGMLQuantizationType as T

    return {T.Q8_0: 8, T.Q4_0: 4, T.Q4_1: 4}


_KEPT = ("Q8_0", "Q4_0", "Q4_1")


def read_gguf(path, dtype: mx.Dtype | None = None) -> GGUFTensors:
    """Read a GGUF DiT. dtype: what dequantized and float tensors are cast to (None: float32 / as stored).
    Raises CheckpointError for a file gguf-py cannot read (truncated, not GGUF) or a type it cannot dequantize."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError("reading GGUF files needs the gguf package: pip install 'zimage-mlx[gguf]'") from None
    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError, struct or memmap errors on damaged files
        raise CheckpointError(f"cannot read {path} as a GGUF file ({type(e).__name__}: {e})") from None
    out = GGUFTensors({})
    kept = _kept()
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGML lists ne0 (the row length) first
        out.types[t.tensor_type.name] += 1
        try:
            if t.tensor_type in kept and len(shape) == 2 and t.name.endswith(".weight"):
                w, scales, biases = affine(np.asarray(t.data), t.tensor_type.name, shape)
                base = t.name.removesuffix(".weight")
                out.tensors.update({t.name: w, f"{base}.scales": scales, f"{base}.biases": biases})
                out.kept[t.name] = kept[t.tensor_type]
                continue
            w = _dense(np.asarray(t.data), t.tensor_type, shape)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read {t.name} ({t.tensor_type.name}, {list(shape)}): {e}") from None
        out.tensors[t.name] = w.astype(dtype) if dtype is not None else w
    if not out.tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return out


def _dense(raw: np.ndarray, qtype, shape: tuple[int, ...]) -> mx.array:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    if qtype == T.F32:
        return mx.array(raw.reshape(shape).astype(np.float32))
    if qtype == T.F16:
        return mx.array(raw.reshape(shape).astype(np.float16))
    if qtype == T.BF16:
        return mx.array(np.ascontiguousarray(raw).view(np.uint16).reshape(shape)).view(mx.bfloat16)
    return mx.array(dequantize(raw, qtype).astype(np.float32).reshape(shape))  # (rows, row length) blocks


def affine(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> tuple[mx.array, mx.array, mx.array]:
    """Q8_0 / Q4_0 / Q4_1 rows (out, bytes per row) -> MLX's (weight uint32, scales, biases), group size 32.
    Scales and biases are float32, which holds float16's d and m and the products -8 d, -128 d exactly."""
    out_dim, in_dim = shape
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    blocks = np.ascontiguousarray(raw).reshape(out_dim, in_dim // GROUP_SIZE, size)  # (out, groups, bytes)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (out, groups)
    if kind == "Q8_0":
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # (out, groups, 32)
        packed = q.reshape(out_dim, in_dim).view(np.uint32)  # 4 per word, element 0 in the low byte
        return mx.array(packed), mx.array(d), mx.array(-128 * d)
    start = 2 if kind == "Q4_0" else 4
    qs = blocks[..., start:start + 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(out_dim, in_dim)  # element j, then j + 16
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).view(np.uint32)  # 8 per word, element 0 lowest
    bias = -8 * d if kind == "Q4_0" else blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return mx.array(packed), mx.array(d), mx.array(bias)


def quantized_layers(tensors: dict[str, mx.array]) -> dict[str, dict]:
    """{layer path: {"bits", "group_size"}} of the weights stored quantized (a `.scales` beside them), from the
    packing: a group of 32 values takes `bits` uint32 words."""
    out = {}
    for key, scales in tensors.items():
        if key.endswith(".scales"):
            path = key.removesuffix(".scales")
            out[path] = {"bits": tensors[f"{path}.weight"].shape[-1] // scales.shape[-1], "group_size": GROUP_SIZE}
    return out


def quantize_like(model, tensors: dict[str, mx.array]) -> dict[str, dict]:
    """Make the model's layers whose weights are stored quantized QuantizedLinear (before strict loading);
    returns quantized_layers(tensors)."""
    import mlx.nn as nn

    layers = quantized_layers(tensors)
    if layers:
        nn.quantize(model, class_predicate=lambda p, m: layers.get(p, False))
    return layers


def logical_shape(tensors: dict[str, mx.array], key: str) -> tuple[int, ...]:
    """A weight's (out, in) even when it is stored packed."""
    scales = tensors.get(key.removesuffix(".weight") + ".scales")
    w = tensors[key]
    return tuple(w.shape) if scales is None else (w.shape[0], scales.shape[-1] * GROUP_SIZE)


def dense_weight(tensors: dict[str, mx.array], key: str) -> mx.array:
    """A weight in float32, dequantized when it is stored quantized."""
    base = key.removesuffix(".weight")
    if f"{base}.scales" not in tensors:
        return tensors[key].astype(mx.float32)
    bits = tensors[key].shape[-1] // tensors[f"{base}.scales"].shape[-1]
    return mx.dequantize(tensors[key], tensors[f"{base}.scales"], tensors[f"{base}.biases"], group_size=GROUP_SIZE,
                         bits=bits).astype(mx.float32)
