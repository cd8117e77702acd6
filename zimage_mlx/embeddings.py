"""The DiT's sinusoidal timestep embedding, the input of its t_embedder MLP.

Its own module because two modules need it and one sits below the other: transformer.py (the model) and
fp16.py (the float16 statistics of a DiT's weights, which bound the modulation over a grid of timesteps).
The model imports fp16 to record those statistics at load, so fp16 cannot import the model.
"""

from __future__ import annotations

import math

import mlx.core as mx

FREQ_EMBED_DIM = 256


def timestep_embedding(t: mx.array, dim: int = FREQ_EMBED_DIM, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding of t (B,) in float32, cos first then sin: (B, dim)."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)
