"""MultiDiffusion tiles for a pass larger than a tile (Bar-Tal et al. 2023, "MultiDiffusion: Fusing Diffusion
Paths for Controlled Image Generation"): every step, the DiT's velocity is computed on overlapping latent tiles
and blended with smooth weights into one velocity for the whole image, which the sampler steps as usual. Each
DiT call sees one tile's tokens, so a step's peak is a tile's, not the image's (attention grows with the square
of the tokens), and the blend leaves no seam.

Tiles are `tile` pixels a side (tile / 8 latent pixels, even), overlapping by a quarter of a tile, spread
evenly so that the first starts at 0 and the last ends at the image's edge. A tile's weight is 1 inside and
falls linearly to near 0 across the overlap on each side it shares with a neighbour (not on the image's
edges); the velocity is sum(w_i v_i) / sum(w_i). One tile covering the image is the untiled pass exactly
(its weights are all 1).
"""

from __future__ import annotations

import mlx.core as mx

def spans(n: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the tiles along an axis of n latent pixels: one when size covers n, else overlapping
    by size // 4, starts even (the DiT's 2x2 patches)."""
    if n <= size:
        return [(0, n)]
    overlap = size // 4
    count = -(-(n - overlap) // (size - overlap))  # ceil
    starts = [(i * (n - size) // (count - 1)) // 2 * 2 for i in range(count)]
    starts[-1] = n - size
    return [(s, s + size) for s in starts]


def ramp(start: int, end: int, n: int, overlap: int) -> mx.array:
    """A tile's weights along one axis: 1, falling linearly over `overlap` towards a side inside the image."""
    j = mx.arange(end - start, dtype=mx.float32) + 0.5
    w = mx.ones((end - start,), dtype=mx.float32)
    if start > 0:
        w = mx.minimum(w, j / overlap)
    if end < n:
        w = mx.minimum(w, (end - start - j) / overlap)
    return w


class TiledDiT:
    """A DiT that computes the velocity of (B, h, w, 16) latents tile by tile; called as the DiT is."""

    def __init__(self, dit, tile: int):
        self.dit = dit
        self.size = max(2, tile // 8 // 2 * 2)  # latent pixels, even
        self.scaled, self.dtype = dit.scaled, dit.dtype

    def tiles(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        return [(y0, y1, x0, x1) for y0, y1 in spans(h, self.size) for x0, x1 in spans(w, self.size)]

    def __call__(self, x: mx.array, t: mx.array, caps, **kw) -> mx.array:
        B, h, w, C = x.shape
        total = mx.zeros((B, h, w, C), dtype=mx.float32)
        weight = mx.zeros((1, h, w, 1), dtype=mx.float32)
        overlap = max(self.size // 4, 1)
        for y0, y1, x0, x1 in self.tiles(h, w):
            wy, wx = ramp(y0, y1, h, overlap), ramp(x0, x1, w, overlap)
            tw = (wy[:, None] * wx[None, :])[None, :, :, None]  # (1, th, tw, 1)
            v = self.dit(x[:, y0:y1, x0:x1], t, caps, **kw).astype(mx.float32)
            total[:, y0:y1, x0:x1] += tw * v
            weight[:, y0:y1, x0:x1] += tw
            mx.eval(total, weight)  # one tile's activations at a time: the point of tiling
        return total / weight
