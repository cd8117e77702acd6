"""The seeded random draws of an image: its initial noise and the key of its VAE posterior sample.

Everything random in a generation comes from mx.random.key(seed) (seed + k for the k-th image), so that a
seed reproduces an image: the pipeline, the trainer (its samples and the latents it encodes) and the parity
tests draw through these two functions.
"""

from __future__ import annotations

import mlx.core as mx

from .inputs import LATENT_CHANNELS


def noise(seed: int, h: int, w: int) -> mx.array:
    """The initial noise for one image: (1, h, w, 16) float32 from mx.random.key(seed)."""
    return mx.random.normal((1, h, w, LATENT_CHANNELS), dtype=mx.float32, key=mx.random.key(seed))


def image_key(seed: int) -> mx.array:
    """The key that samples the VAE posterior of the input image for `seed` (img2img): split from
    mx.random.key(seed), so it draws independently of noise(seed)."""
    return mx.random.split(mx.random.key(seed))[1]
