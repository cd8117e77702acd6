"""LyCORIS adapters (LoKr, LoHa) and weight decomposition (DoRA): their factors -> a dense update per layer.

lora.py reads the files and maps their names; this module holds the arithmetic (shared/docs/formats.md):

  LoKr   w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2 or w2_a @ w2_b (Tucker: lokr_t2), delta = kron(w1, w2).
         LyCORIS/ComfyUI scale (comfy/weight_adapter/lokr.py): alpha / rank, rank = w2_b's rows if w2 is
         factored, else w1_b's; 1 when both halves are full (ai-toolkit's full-rank files store a huge alpha
         that must be ignored) or without alpha. PEFT's layout: alpha / r from adapter_config.json, always.
  LoHa   delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, rank = hada_w1_b's rows (no alpha: 1).
  DoRA   W' = dora_scale * (W + s delta) / ||W + s delta||, the norm per output row when dora_scale has one
         value per row, else per input column, as LyCORIS trains it; at strength k: W + k (W' - W).

A dense update is the size of the layer's weight, so it is built one layer at a time, when it is applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from .errors import LoraError

LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


@dataclass
class DenseLayer:
    """A LoKr or LoHa update of one layer, kept as its factors until applied; `factor` is its alpha scale."""

    kind: str  # "LoKr" | "LoHa"
    parts: dict[str, mx.array]
    factor: float
    keys: tuple[str, ...]
    shape: tuple[int, int]  # (out, in) of the whole update (a fused qkv's: three layers' rows)
    rows: tuple[int, int] | None = None  # the rows of the update this layer takes (fused qkv split)
    dora_scale: mx.array | None = None

    @property
    def dims(self) -> tuple[int, int]:
        """(out, in) of the layer it updates."""
        return (self.rows[1] - self.rows[0] if self.rows else self.shape[0]), self.shape[1]

    def delta(self) -> mx.array:
        """The update (out, in) in float32, before `factor` and the user's scale."""
        p = {k: v.astype(mx.float32) for k, v in self.parts.items()}
        d = _lokr(p) if self.kind == "LoKr" else _loha(p)
        return d[self.rows[0]:self.rows[1]] if self.rows else d


def _half(p: dict, full: str, a: str, b: str, t: str | None = None) -> mx.array:
    if full in p:
        return p[full]
    if t is not None and t in p:  # Tucker: t (r, r, k, l) with a (r, out) and b (r, in) -> (out, in) for k = l = 1
        return mx.einsum("ijkl,jr,ip->prkl", p[t], p[b], p[a]).reshape(p[a].shape[1], p[b].shape[1])
    return p[a] @ p[b]


def _lokr(p: dict) -> mx.array:
    w1 = _half(p, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
    w2 = _half(p, "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    return mx.kron(w1, w2)  # (p*q, r*s): kron[i*q + k, j*s + l] = w1[i, j] * w2[k, l]


def _loha(p: dict) -> mx.array:
    w1 = _half(p, "", "hada_w1_a", "hada_w1_b", "hada_t1")
    w2 = _half(p, "", "hada_w2_a", "hada_w2_b", "hada_t2")
    return w1 * w2


def dense_layer(name: str, kind: str, parts: dict[str, tuple[str, mx.array]], peft: tuple[float, float] | None
                ) -> DenseLayer:
    """A LoKr/LoHa layer from the file's parts (role -> (key, array)). peft: (r, alpha) of a PEFT adapter,
    whose scale is alpha / r whatever the halves; None for LyCORIS files (alpha / rank as ComfyUI reads it)."""
    keys = tuple(sorted(k for k, _ in parts.values()))
    arrays = {r: w for r, (_, w) in parts.items() if r not in ("alpha", "dora_scale")}
    shape = _check_shapes(name, kind, arrays, keys)
    alpha = parts.get("alpha", (None, None))[1]
    alpha = None if alpha is None else float(alpha.astype(mx.float32).reshape(-1)[0].item())
    if peft is not None:
        factor = peft[1] / peft[0]
    elif kind == "LoKr":
        rank = arrays["lokr_w2_b"].shape[0] if "lokr_w2_b" in arrays else \
            arrays["lokr_w1_b"].shape[0] if "lokr_w1_b" in arrays else None
        factor = alpha / rank if alpha and rank else 1.0  # both halves full, or no alpha: 1 (alpha = rank)
    else:
        factor = alpha / arrays["hada_w1_b"].shape[0] if alpha else 1.0
    if not math.isfinite(factor):
        raise LoraError(f"{name}: {keys[0]} has an alpha that is not a finite number")
    dora = parts.get("dora_scale", (None, None))[1]
    return DenseLayer(kind, arrays, factor, keys, shape, dora_scale=dora)


def _check_shapes(name: str, kind: str, p: dict, keys: tuple) -> tuple[int, int]:
    """(out, in) of the update, or a LoraError naming the first key when the factors do not fit together."""
    def fail(why):
        raise LoraError(f"{name}: {keys[0]} and the other {kind} factors of its layer {why}")

    halves = (("lokr_w1", "lokr_w1_a", "lokr_w1_b", None), ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")) \
        if kind == "LoKr" else (("", "hada_w1_a", "hada_w1_b", "hada_t1"), ("", "hada_w2_a", "hada_w2_b", "hada_t2"))
    shapes = []
    for full, a, b, t in halves:
        if full in p:
            if p[full].ndim != 2:
                fail(f"have a {p[full].ndim}-D {full} (a linear layer's is 2-D)")
            shapes.append(tuple(p[full].shape))
        elif a in p and b in p:
            if t in p:
                if p[t].ndim != 4 or p[t].shape[2:] != (1, 1):
                    fail(f"have a {t} of shape {tuple(p[t].shape)} (a linear layer's is (r, r, 1, 1))")
                shapes.append((p[a].shape[1], p[b].shape[1]))
            elif p[a].ndim != 2 or p[b].ndim != 2 or p[a].shape[1] != p[b].shape[0]:
                fail(f"are not a pair of matrices: {a} {tuple(p[a].shape)}, {b} {tuple(p[b].shape)}")
            else:
                shapes.append((p[a].shape[0], p[b].shape[1]))
        else:
            fail(f"lack {full or a} (or {a} and {b})" if full else f"lack {a} or {b}")
    (o1, i1), (o2, i2) = shapes
    if kind == "LoKr":
        return o1 * o2, i1 * i2
    if (o1, i1) != (o2, i2):
        fail(f"have halves of different shapes {(o1, i1)} and {(o2, i2)}")
    return o1, i1


def decompose(weight: mx.array, update: mx.array, dora_scale: mx.array, strength: float) -> mx.array:
    """DoRA: the change to `weight` (float32, out x in) that `update` (s * delta, float32) makes with the
    magnitudes `dora_scale`, at the user's strength."""
    merged = weight + update
    m = dora_scale.astype(mx.float32)
    if m.size == weight.shape[0] and (m.ndim == 1 or m.shape[0] == weight.shape[0]):
        norm = mx.linalg.norm(merged, axis=1, keepdims=True)  # (out, 1): per output row
        m = m.reshape(-1, 1)
    else:
        norm = mx.linalg.norm(merged, axis=0, keepdims=True)  # (1, in): per input column
        m = m.reshape(1, -1)
    eps = float(mx.finfo(mx.float32).eps)
    return strength * (merged * (m / (norm + eps)) - weight)


def check_dora(name: str, key: str, dora_scale: mx.array, dims: tuple[int, int]) -> None:
    """A dora_scale holds one magnitude per output row or per input column of its layer."""
    out_dim, in_dim = dims
    n = dora_scale.size
    if not (n == out_dim and dora_scale.shape[0] == out_dim or n == in_dim and dora_scale.shape[-1] == in_dim):
        raise LoraError(f"{name}: {key} {tuple(dora_scale.shape)} does not fit its layer ({out_dim} -> {in_dim} "
                        "features): a dora_scale has one value per output row or per input column")
