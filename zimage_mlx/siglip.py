"""The SigLIP2 vision tower (NaFlex) in MLX, and its image processor's rules, for Z-Image-Omni's references.

Follows transformers `models/siglip2/modeling_siglip2.py` (Siglip2VisionModel: patch embedding of
pre-patchified pixels, the learned position grid resized to each image's patch grid, pre-norm encoder,
post-layernorm) and `image_processing_pil_siglip2.py` (resize to the largest patch grid of at most
`max_num_patches` patches, rescale, normalize, patchify). The Omni pipeline uses `last_hidden_state` of the
valid patches only, as an (h, w, C) grid: the pooling head is not used and its weights are not loaded.

Each image runs alone at its own grid, so the processor's padding to `max_num_patches` (masked keys in
transformers) is never built: the valid tokens' features are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .sources import read_config
from .weights import CheckpointError, load_into, load_safetensors, quant_policy, quantize_as_stored, to_dtype

# The tower's quantization policy (`zimage-mlx convert --quantize`): the attention and MLP Linear layers at
# 8 bits whatever the DiT's; the embeddings (patch projection, position table) stay float, as the other
# models' embedders do (layer norms are never quantized).
QUANT_KEEP = ("embeddings.",)
QUANT_BITS = 8
DEFAULT_GROUP_SIZE = 64


def default_bits(bits: int | None) -> int | None:
    """The tower's bits when the whole model is quantized to `bits`: 8 for any."""
    return None if bits is None else QUANT_BITS


def quant_predicate(bits: int, group_size: int = DEFAULT_GROUP_SIZE, keep: tuple[str, ...] = QUANT_KEEP):
    """The tower's quantization policy (weights.quant_policy): its Linear layers but the embeddings'."""
    return quant_policy(bits, group_size, keep)


@dataclass
class SiglipArgs:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    num_patches: int = 256
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, config: dict) -> "SiglipArgs":
        config = config.get("vision_config", config)  # a full Siglip2Config holds the tower's under vision_config
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.items() if k in names})

    def __post_init__(self):
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            raise CheckpointError(f"siglip: num_patches {self.num_patches} is not a square grid")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise CheckpointError(f"siglip: activation {self.hidden_act!r} is not supported")


@dataclass
class SiglipProcessor:
    """Siglip2ImageProcessor's settings (preprocessor_config.json) and rules."""

    patch_size: int = 16
    max_num_patches: int = 256
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 2  # PIL BILINEAR

    @classmethod
    def from_pretrained(cls, folder) -> "SiglipProcessor":
        config = read_config(Path(folder), "preprocessor_config.json")
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) in pixels the processor resizes an image to: transformers'
        get_image_size_for_max_num_patches, the same bisection on the scale, multiples of the patch size."""
        p, eps = self.patch_size, 1e-5

        def scaled(scale: float, size: int) -> int:
            return int(max(p, math.ceil(size * scale / p) * p))

        lo, hi = eps / 10, 100.0
        while hi - lo >= eps:
            scale = (lo + hi) / 2
            if (scaled(scale, height) / p) * (scaled(scale, width) / p) <= self.max_num_patches:
                lo = scale
            else:
                hi = scale
        return scaled(lo, height), scaled(lo, width)

    def __call__(self, image) -> tuple[mx.array, tuple[int, int]]:
        """A PIL image -> (patches (h*w, p*p*3) float32, row-major, patch vector (py, px, c); (h, w) patches)."""
        from PIL import Image

        image = image.convert("RGB")
        height, width = self.target_size(image.height, image.width)
        image = image.resize((width, height), Image.Resampling(self.resample))
        x = (np.asarray(image).astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        p, h, w = self.patch_size, height // self.patch_size, width // self.patch_size
        x = x.reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, p * p * 3)  # (h*w, py px c)
        return mx.array(x), (h, w)


def resize_weights(grid: int, size: int) -> np.ndarray:
    """(size, grid) float32 weights of a 1-D bilinear, antialiased (align_corners=False) resize from grid to size
    points, as transformers' `resize_positional_embeddings` computes them."""
    scale = np.float32(grid / size)
    support = max(scale, np.float32(1))
    center = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.arange(grid, dtype=np.float32)
    w = np.clip(1 - np.abs(src[None, :] - center[:, None]) / support, 0, None).astype(np.float32)
    return w / w.sum(-1, keepdims=True)


def resized_positions(table: mx.array, h: int, w: int) -> mx.array:
    """The (G*G, D) learned position table resized to an h x w grid: (h*w, D), row-major, float32."""
    G = math.isqrt(table.shape[0])
    wr, wc = mx.array(resize_weights(G, h)), mx.array(resize_weights(G, w))
    grid = table.astype(mx.float32).reshape(G, G, -1)
    out = mx.einsum("ri,cj,ijd->rcd", wr, wc, grid)  # (h, w, D)
    return out.reshape(h * w, -1).astype(table.dtype)


class Embeddings(nn.Module):
    def __init__(self, args: SiglipArgs):
        super().__init__()
        self.patch_embedding = nn.Linear(args.num_channels * args.patch_size**2, args.hidden_size)
        self.position_embedding = nn.Embedding(args.num_patches, args.hidden_size)

    def __call__(self, patches: mx.array, h: int, w: int) -> mx.array:
        x = self.patch_embedding(patches.astype(self.patch_embedding.weight.dtype))
        return x + resized_positions(self.position_embedding.weight, h, w)


class SelfAttention(nn.Module):
    def __init__(self, args: SiglipArgs):
        super().__init__()
        d = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.scale = (d // self.n_heads) ** -0.5

    def __call__(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (p(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, L, D)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: SiglipArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.hidden_size)
        self.act = nn.gelu_approx if args.hidden_act == "gelu_pytorch_tanh" else nn.gelu

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, args: SiglipArgs):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attn = SelfAttention(args)
        self.layer_norm2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = MLP(args)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, args: SiglipArgs):
        super().__init__()
        self.layers = [EncoderLayer(args) for _ in range(args.num_hidden_layers)]


class SiglipVisionModel(nn.Module):
    """Siglip2VisionModel without its pooling head: patches of one image -> last_hidden_state."""

    def __init__(self, args: SiglipArgs):
        super().__init__()
        self.args = args
        self.embeddings = Embeddings(args)
        self.encoder = Encoder(args)
        self.post_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, patches: mx.array, grid: tuple[int, int]) -> mx.array:
        """patches (h*w, p*p*3) from `SiglipProcessor`; returns (h, w, hidden) features in the weights' dtype."""
        h, w = grid
        x = self.embeddings(patches, h, w)[None]  # (1, h*w, D)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)[0].reshape(h, w, -1)

    def encode(self, processor: SiglipProcessor, image) -> mx.array:
        """A PIL image -> its (h, w, hidden) feature grid, lazy."""
        return self(*processor(image))

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop the pooling head (unused by Omni) and a `vision_model.` prefix. Idempotent."""
        out = {}
        for key, w in weights.items():
            key = key.removeprefix("vision_model.")
            if key.startswith("head."):
                continue
            out[key] = w
        return out

    @classmethod
    def from_pretrained(cls, folder, dtype="float32") -> "SiglipVisionModel":
        """Load a `siglip/` folder (transformers' Siglip2VisionModel: config.json + safetensors), quantized as
        its config.json records when `zimage-mlx convert --quantize` wrote it. dtype None: as stored."""
        folder = Path(folder)
        config = read_config(folder)
        model = cls(SiglipArgs.from_dict(config))
        weights, what = cls.sanitize(load_safetensors(folder)), f"siglip ({folder})"
        quantize_as_stored(model, weights, config, what)
        load_into(model, weights, what, None if dtype is None else to_dtype(dtype))
        return model
