"""The seeded random draws of an image: its starting noise and the key that samples its input image's VAE
posterior. Each comes from `mx.random.key(seed)` alone, so any image can be made again from its seed."""

from __future__ import annotations

import mlx.core as mx

LATENT_CHANNELS = 16


def noise(seed: int, h: int, w: int) -> mx.array:
    """The initial noise for one image: (1, h, w, 16) float32 from mx.random.key(seed)."""
    return mx.random.normal((1, h, w, LATENT_CHANNELS), dtype=mx.float32, key=mx.random.key(seed))


def image_key(seed: int) -> mx.array:
    """The key that samples the VAE posterior of the input image for `seed` (img2img): split from
    mx.random.key(seed), so it draws independently of noise(seed)."""
    return mx.random.split(mx.random.key(seed))[1]
