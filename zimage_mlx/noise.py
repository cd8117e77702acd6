"""The seeded random draws of an image: its starting noise and the key that samples its input image's VAE
posterior, and the noise that `variety` adds to its prompt embeddings. Each comes from `mx.random.key(seed)` alone, so any image can be made again from its seed."""

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


def variety_key(seed: int) -> mx.array:
    """The key of the prompt-embedding noise for `seed` (variety): the first half of mx.random.key(seed)'s
    split (which nothing else uses), split again, second half; independent of noise(seed) and image_key(seed)."""
    return mx.random.split(mx.random.split(mx.random.key(seed))[0])[1]


def vary(embeds: mx.array, seed: int, variety: float) -> mx.array:
    """Prompt embeddings (L, D) plus seeded Gaussian noise of `variety` times their own std (one number over
    the whole caption), as InvokeAI's seed variance enhancer perturbs the conditioning of the early steps."""
    x = embeds.astype(mx.float32)
    eps = mx.random.normal(x.shape, dtype=mx.float32, key=variety_key(seed))
    return (x + variety * mx.std(x) * eps).astype(embeds.dtype)


def variety_steps(until: float, total: int) -> int:
    """How many of `total` steps get the varied embeddings: those with i / total < until."""
    return sum(1 for i in range(total) if i / total < until)
