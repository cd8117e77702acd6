"""AutoencoderKL (the 16-channel FLUX.1 VAE used by Z-Image), channels-last, with tiled decoding.

Follows diffusers models/autoencoders/{autoencoder_kl,vae}.py (Encoder, Decoder, DiagonalGaussianDistribution),
models/unets/unet_2d_blocks.py (DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D), models/resnet.py,
models/{downsampling,upsampling}.py, the VAE attention of models/attention_processor.py, image_processor.py
(VaeImageProcessor) and the LDM key layout of loaders/single_file_utils.py (convert_ldm_vae_checkpoint).
Arrays are (B, H, W, C); module attributes carry the diffusers key names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import kernels
from .sources import read_config
from .weights import CheckpointError, load_into, load_safetensors, to_dtype


@dataclass
class VAEArgs:
    """vae/config.json; the defaults are the FLUX.1 VAE that Z-Image Turbo ships (spec 1.5)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    norm_num_groups: int = 32
    latent_channels: int = 16
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    act_fn: str = "silu"
    down_block_types: list[str] | None = None
    up_block_types: list[str] | None = None

    @classmethod
    def from_dict(cls, config: dict) -> "VAEArgs":
        names = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in config.items() if k in names})
        args.shift_factor = args.shift_factor or 0.0  # SD-style configs store null
        n = len(args.block_out_channels)
        if args.act_fn != "silu":
            raise CheckpointError(f"unsupported VAE act_fn {args.act_fn!r}: only silu (the FLUX/SD AutoencoderKL) is implemented")
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(args, key)
            if types is not None and list(types) != [kind] * n:
                raise CheckpointError(f"unsupported VAE {key} {types}: expected {n} x {kind}")
        if any(c % args.norm_num_groups for c in args.block_out_channels):
            raise CheckpointError(f"VAE block_out_channels {args.block_out_channels} are not multiples of norm_num_groups {args.norm_num_groups}")
        return args


# ----------------------------------------------------------------------------------------------- layers


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm(groups, dims, eps=1e-6) on channels-last input, statistics in float32.

    Not nn.GroupNorm(pytorch_compatible=True): that one transposes to (B, G, L*C/G) and its single-pass
    layer_norm was ~30x further from torch on large groups in our check; this keeps the layout.
    """

    def __init__(self, groups: int, dims: int, eps: float = 1e-6):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        g = x.reshape(B, H * W, self.groups, C // self.groups).astype(mx.float32)  # (B, L, G, C/G)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = g.var(axis=(1, 3), keepdims=True)
        g = ((g - mean) * mx.rsqrt(var + self.eps)).reshape(B, H, W, C)
        return (g * self.weight + self.bias).astype(x.dtype)


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(kernels.silu(self.norm1(x)))
        h = self.conv2(kernels.silu(self.norm2(h)))
        return kernels.cut((self.conv_shortcut(x) if "conv_shortcut" in self else x) + h)  # one graph per block


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # diffusers pads right and bottom only, (0, 1, 0, 1), then convolves with stride 2 and no padding
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)  # nearest x2
        return kernels.cut(self.conv(x))


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual (diffusers' VAE mid attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)  # (B, heads=1, L, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        # One call over all positions. Splitting the queries does not lower the peak without an eval per
        # chunk (measured at 128x128: 1.28 vs 1.22 GiB, twice as slow); tiled decoding bounds it instead.
        o = kernels.attention(q, k, v, 1.0 / math.sqrt(C))
        return x + self.to_out[0](o).reshape(B, H, W, C)


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups) for _ in range(2)]
        self.attentions = [Attention(channels, groups)] if attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)]
        if downsample:
            self.downsamplers = [Downsample2D(cout)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)]
        if upsample:
            self.upsamplers = [Upsample2D(cout)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Encoder(nn.Module):
    def __init__(self, args: VAEArgs):
        super().__init__()
        ch, g, n = args.block_out_channels, args.norm_num_groups, len(args.block_out_channels)
        self.conv_in = nn.Conv2d(args.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], args.layers_per_block, g, downsample=i < n - 1) for i in range(n)
        ]
        self.mid_block = UNetMidBlock2D(ch[-1], g, args.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * args.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(kernels.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, args: VAEArgs):
        super().__init__()
        ch, g, n = args.block_out_channels[::-1], args.norm_num_groups, len(args.block_out_channels)
        self.conv_in = nn.Conv2d(args.latent_channels, ch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], g, args.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], args.layers_per_block + 1, g, upsample=i < n - 1) for i in range(n)
        ]
        self.conv_norm_out = GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], args.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(kernels.silu(self.conv_norm_out(x)))


# ------------------------------------------------------------------------------------ tiling helpers

def auto_tile_size(latent_height: int, latent_width: int) -> int | None:
    """The tile_size for VAE.decode on the default device: None (decode whole) or a tile in latent pixels.

    GPU: whole up to 128x128 latents (1024x1024 images), tiles of 128 above (diffusers' 1024-pixel tiles
    for this VAE). CPU: MLX's CPU convolutions unfold their input (9x for 3x3), so a whole 512x512 decode
    already peaks at ~8.5 GiB in float32 (benchmarks/vae_memory.py): whole up to 64x64 latents, tiles of
    32 above (~2.1 GiB whatever the image size).
    """
    whole, tile = (128, 128) if mx.default_device().type == mx.DeviceType.gpu else (64, 32)
    return None if latent_height * latent_width <= whole * whole else tile


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread starts of equal tiles covering [0, size), neighbours overlapping by >= overlap."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _blend_weights(starts: list[int], tile: int, size: int, scale: int) -> list[mx.array]:
    """1-D weights (image pixels) per tile: linear ramps across each overlap with a neighbour, 1 elsewhere,
    normalised so that they sum to 1 at every pixel; the 2-D weight of a tile is the product of its two."""
    t = min(tile, size) * scale
    i = np.arange(t) + 0.5
    ws = []
    for k, s in enumerate(starts):
        w = np.ones(t)
        if k > 0:
            w = np.minimum(w, i / ((starts[k - 1] + tile - s) * scale))
        if k < len(starts) - 1:
            w = np.minimum(w, (t - i) / ((s + tile - starts[k + 1]) * scale))
        ws.append(w)
    total = np.zeros(size * scale)
    for s, w in zip(starts, ws):
        total[s * scale : s * scale + t] += w
    return [mx.array((w / total[s * scale : s * scale + t]).astype(np.float32)) for s, w in zip(starts, ws)]


# ------------------------------------------------------------------------------------------- model

# LDM / ComfyUI (ae.safetensors) names -> diffusers names; `up.{b}` is reversed and handled in sanitize.
_LDM_RENAMES = [
    (r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets."),
    (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.", ".mid_block.attentions.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    # attention leaves: LDM (norm, q, k, v, proj_out) and old diffusers (query, key, value, proj_attn)
    (r"attentions\.0\.norm\.", "attentions.0.group_norm."),
    (r"attentions\.0\.(q|query)\.", "attentions.0.to_q."),
    (r"attentions\.0\.(k|key)\.", "attentions.0.to_k."),
    (r"attentions\.0\.(v|value)\.", "attentions.0.to_v."),
    (r"attentions\.0\.(proj_out|proj_attn)\.", "attentions.0.to_out.0."),
]
_LDM_PREFIXES = ("first_stage_model.", "vae.")


class VAE(nn.Module):
    """diffusers AutoencoderKL in MLX: images (B, H, W, 3) in [-1, 1] <-> scaled latents (B, H/8, W/8, C)."""

    def __init__(self, args: VAEArgs):
        super().__init__()
        self.args = args
        self.scaling_factor = args.scaling_factor
        self.shift_factor = args.shift_factor
        self.scale = 2 ** (len(args.block_out_channels) - 1)
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)
        if args.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * args.latent_channels, 2 * args.latent_channels, 1)
        if args.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(args.latent_channels, args.latent_channels, 1)

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    @classmethod
    def from_pretrained(cls, folder, dtype="float32", config: dict | None = None) -> "VAE":
        """Load a diffusers vae/ folder (config.json + safetensors) or an LDM-format single file such as
        ComfyUI's ae.safetensors; a single file has no config, so it is `config` (vae/config.json values)
        or else the FLUX.1 VAE's."""
        path = Path(folder)
        if path.is_dir():
            args, weights = VAEArgs.from_dict(read_config(path)), load_safetensors(path)
        elif path.is_file() and path.suffix == ".safetensors":
            try:
                args, weights = VAEArgs.from_dict(config or {}), mx.load(str(path))
            except Exception as e:  # mx.load raises RuntimeError/ValueError on damaged files
                raise CheckpointError(f"cannot read {path}: {e}") from None
        else:
            raise CheckpointError(f"{path} is neither a diffusers vae/ folder nor a .safetensors VAE file (e.g. ComfyUI's ae.safetensors)")
        model = cls(args)
        load_into(model, model.sanitize(weights), f"VAE {path}", to_dtype(dtype))
        return model

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """diffusers or LDM keys in torch layout (or already sanitized) -> this module's keys and MLX layout."""
        prefix = next((p for p in _LDM_PREFIXES if any(k.startswith(p) for k in weights)), None)
        if prefix:  # a full LDM checkpoint: keep its VAE only
            weights = {k[len(prefix) :]: w for k, w in weights.items() if k.startswith(prefix)}
        n = len(self.args.block_out_channels)
        out = {}
        for key, w in weights.items():
            for pattern, repl in _LDM_RENAMES:
                key = re.sub(pattern, repl, key)
            key = re.sub(r"\.up\.(\d+)\.block\.", lambda m: f".up_blocks.{n - 1 - int(m[1])}.resnets.", key)
            key = re.sub(r"\.up\.(\d+)\.upsample\.", lambda m: f".up_blocks.{n - 1 - int(m[1])}.upsamplers.0.", key)
            if ".attentions.0." in key and w.ndim > 2:  # LDM attention projections are 1x1 convs
                w = w.reshape(w.shape[:2])
            out[key] = w
        if _torch_conv_layout(out):
            out = {k: w.transpose(0, 2, 3, 1) if w.ndim == 4 else w for k, w in out.items()}  # [O,I,kh,kw] -> [O,kh,kw,I]
        return out

    def _decode(self, z: mx.array) -> mx.array:
        z = z.astype(self.dtype)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(mx.float32)

    def decode(self, latents: mx.array, tile_size: int | None = None) -> mx.array:
        """Scaled latents (B, h, w, C), as the DiT produces them -> images (B, 8h, 8w, 3) in about [-1, 1]
        (not clamped), float32.

        tile_size (latent pixels, >= 8): decode overlapping tiles of that size (overlap tile_size // 4) and
        blend them with linear ramps; peak memory then depends on tile_size, not on the image size.
        auto_tile_size() picks it from the latent size.
        """
        if latents.ndim != 4 or latents.shape[-1] != self.args.latent_channels:
            raise ValueError(f"latents must be (B, h, w, {self.args.latent_channels}) channels-last, got shape {tuple(latents.shape)}")
        if tile_size is not None and tile_size < 8:
            raise ValueError(f"tile_size is in latent pixels and must be at least 8, got {tile_size}")
        z = latents.astype(mx.float32) / self.scaling_factor + self.shift_factor
        B, h, w, _ = z.shape
        if tile_size is None or (h <= tile_size and w <= tile_size):
            return self._decode(z)

        s, overlap = self.scale, tile_size // 4
        ys, xs = _tile_starts(h, tile_size, overlap), _tile_starts(w, tile_size, overlap)
        wys, wxs = _blend_weights(ys, tile_size, h, s), _blend_weights(xs, tile_size, w, s)
        th, tw = min(tile_size, h), min(tile_size, w)
        image = mx.zeros((B, h * s, w * s, self.args.out_channels), dtype=mx.float32)
        for y, wy in zip(ys, wys):
            for x, wx in zip(xs, wxs):
                tile = self._decode(z[:, y : y + th, x : x + tw]) * (wy[:, None, None] * wx[None, :, None])
                image[:, y * s : (y + th) * s, x * s : (x + tw) * s] += tile
                # Evaluate tile by tile: left lazy, the graph would hold every tile's activations at once
                # and the peak would grow with the image, which is what tiling is meant to avoid.
                mx.eval(image)
        return image

    def encode(self, images: mx.array, key: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        """Images (B, H, W, 3) in [-1, 1], H and W multiples of 8 -> (scaled posterior mean, scaled sample or
        None when key is None); scaled = (z - shift_factor) * scaling_factor, as Z-Image's img2img does, and
        sample = mean + std * eps with eps = mx.random.normal(mean.shape, key=key)."""
        mean, std = self.posterior(images)
        if key is None:
            return self.scale_latents(mean), None
        return self.scale_latents(mean), self.scale_latents(mean + std * mx.random.normal(mean.shape, key=key))

    def posterior(self, images: mx.array) -> tuple[mx.array, mx.array]:
        """Images (B, H, W, 3) in [-1, 1] -> the latent distribution's (mean, std), unscaled, float32, lazy.
        One encoder pass can then give several samples (one per seed)."""
        if images.ndim != 4 or images.shape[-1] != self.args.in_channels:
            raise ValueError(f"images must be (B, H, W, {self.args.in_channels}) channels-last, got shape {tuple(images.shape)}")
        if images.shape[1] % self.scale or images.shape[2] % self.scale:
            raise ValueError(f"image height and width must be multiples of {self.scale}, got {images.shape[1]}x{images.shape[2]}")
        h = self.encoder(images.astype(self.dtype))
        if "quant_conv" in self:
            h = self.quant_conv(h)
        mean, logvar = mx.split(h.astype(mx.float32), 2, axis=-1)
        return mean, mx.exp(0.5 * mx.clip(logvar, -30.0, 20.0))

    def scale_latents(self, z: mx.array) -> mx.array:
        """Posterior latents -> the DiT's latent space: (z - shift_factor) * scaling_factor (decode inverts it)."""
        return (z - self.shift_factor) * self.scaling_factor


def _torch_conv_layout(weights: dict[str, mx.array]) -> bool:
    """Whether the 4-D conv weights are torch's [O, I, kh, kw] (else MLX's [O, kh, kw, I]), decided on a
    weight whose shape tells (I != kh): a 3x3 conv with 3 inputs looks the same either way."""
    for w in weights.values():
        if w.ndim == 4:
            _, a, b, c = w.shape
            if b == c and a != b:
                return True
            if a == b and c != a:
                return False
    return True


# ----------------------------------------------------------------------------------- image helpers


def to_pil(images: mx.array) -> list:
    """(B, H, W, 3) in [-1, 1] -> PIL images, exactly as diffusers' VaeImageProcessor.postprocess(output_type="pil")."""
    from PIL import Image

    x = np.clip(np.array(images.astype(mx.float32)) / 2 + 0.5, 0, 1)
    return [Image.fromarray(im) for im in (x * 255).round().astype(np.uint8)]


def from_pil(images, width: int | None = None, height: int | None = None, multiple: int = 16) -> mx.array:
    """PIL image(s) -> (B, H, W, 3) float32 in [-1, 1], as Z-Image's VaeImageProcessor.preprocess does it.

    The size is (width, height) if given, else the first image's; either way it is rounded down to a
    multiple of `multiple` (16 = vae_scale_factor * 2 in the Z-Image pipelines), and every image is resized
    to it with Lanczos (a no-op at the same size). Unlike diffusers, images are converted to RGB first, so
    RGBA and grayscale inputs work.
    """
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    width = (width or images[0].width) // multiple * multiple
    height = (height or images[0].height) // multiple * multiple
    if width == 0 or height == 0:
        raise ValueError(f"image size must be at least {multiple}x{multiple} pixels")
    from PIL import Image

    arrays = [np.array(im.convert("RGB").resize((width, height), resample=Image.Resampling.LANCZOS)) for im in images]
    x = np.stack([a.astype(np.float32) / 255.0 for a in arrays])
    return mx.array(2.0 * x - 1.0)
