"""The Z-Image single-stream DiT (ZImageTransformer2DModel) in MLX.

Follows diffusers `models/transformers/transformer_z_image.py` (basic, non-omni mode) and the official
Tongyi-MAI/Z-Image `src/zimage/transformer.py`. Channels-last: latents are (B, h, w, 16).

The details that are easy to get wrong (model-spec section 11): the output is x0 - noise (the pipeline
negates it), t is 1 - sigma, blocks modulate with (1 + scale) and tanh(gate) and no SiLU before the
adaLN linear (the final layer has one), each branch has a pre- and a post-norm, RoPE rotates
interleaved pairs over three axes, the patch vector is (ph, pw, c) with c fastest, image tokens sit at
t-position (padded caption length + 1), and both streams are padded to multiples of 32 with learned
pad tokens that are attended to, not masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import kernels
from .errors import InputError
from .weights import (CheckpointError, check_quantization, load_into, load_safetensors, quantize_as_stored, quantize_model,
                      read_config, to_dtype)

SEQ_MULTI_OF = 32
ADALN_EMBED_DIM = 256
FREQ_EMBED_DIM = 256
T_MLP_DIM = 1024


@dataclass
class TransformerArgs:
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    in_channels: int = 16
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: list = field(default_factory=lambda: [32, 48, 48])
    axes_lens: list = field(default_factory=lambda: [1536, 512, 512])
    all_patch_size: list = field(default_factory=lambda: [2])
    all_f_patch_size: list = field(default_factory=lambda: [1])

    @classmethod
    def from_dict(cls, config: dict) -> "TransformerArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def __post_init__(self):
        if list(self.all_patch_size) != [2] or list(self.all_f_patch_size) != [1]:
            raise CheckpointError(
                f"only patch size 2-1 is supported, the config has {self.all_patch_size}/{self.all_f_patch_size}"
            )
        if self.dim % self.n_heads or self.dim // self.n_heads != sum(self.axes_dims):
            raise CheckpointError(f"head dim {self.dim}/{self.n_heads} does not equal sum(axes_dims)={sum(self.axes_dims)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def patch_dim(self) -> int:
        return 2 * 2 * self.in_channels


# ----------------------------------------------------------------------------------------------
# Pure functions: timestep embedding, RoPE, patchify


def timestep_embedding(t: mx.array, dim: int = FREQ_EMBED_DIM, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding of t (B,) in float32, cos first then sin: (B, dim)."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


def rope_angles(pos: np.ndarray, axes_dims, theta: float) -> tuple[mx.array, mx.array]:
    """cos and sin tables for integer positions pos (..., 3): each (..., sum(axes_dims)/2), float32.

    As the reference: frequencies and angles in float64, the angle cast to float32, cos/sin in float32.
    Pairs 0..d0/2-1 rotate with the t-axis position, the next d1/2 with h, the last d2/2 with w.
    """
    angles = []
    for axis, d in enumerate(axes_dims):
        omega = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        angles.append(pos[..., axis : axis + 1].astype(np.float64) * omega)
    phi = mx.array(np.concatenate(angles, axis=-1).astype(np.float32))
    return mx.cos(phi), mx.sin(phi)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (2m, 2m+1) of x (B, L, H, D) by cos/sin (B, L, D/2), in float32."""
    return _rope(x, cos, sin)


@mx.compile
def _rope(x, cos, sin):  # one fused loop instead of eight passes over q and k
    B, L, H, D = x.shape
    xf = x.astype(mx.float32).reshape(B, L, H, D // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = mx.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(B, L, H, D).astype(x.dtype)


# Element-wise tails of a block, each one fused loop. tanh(gate) is taken outside: inside a fused kernel it
# would be evaluated once per element of the (B, L, dim) output instead of once per channel.
_modulate = mx.compile(lambda xn, scale: xn * (1 + scale))
_gated_add = mx.compile(lambda x, tanh_gate, h: x + tanh_gate * h)


def patchify(x: mx.array) -> mx.array:
    """(B, h, w, C) latents -> (B, h/2 * w/2, 4C) tokens, row-major, patch vector (ph, pw, c) with c fastest."""
    B, h, w, C = x.shape
    x = x.reshape(B, h // 2, 2, w // 2, 2, C).transpose(0, 1, 3, 2, 4, 5)  # (B, Ht, Wt, ph, pw, C)
    return x.reshape(B, (h // 2) * (w // 2), 4 * C)


def unpatchify(tokens: mx.array, h: int, w: int) -> mx.array:
    """Inverse of patchify: (B, h/2 * w/2, 4C) -> (B, h, w, C)."""
    B, _, P = tokens.shape
    C = P // 4
    x = tokens.reshape(B, h // 2, w // 2, 2, 2, C).transpose(0, 1, 3, 2, 4, 5)  # (B, Ht, ph, Wt, pw, C)
    return x.reshape(B, h, w, C)


def padded(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


# ----------------------------------------------------------------------------------------------
# Modules (attribute names are the checkpoint's key names)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int):
        super().__init__()
        self.mlp = [nn.Linear(FREQ_EMBED_DIM, T_MLP_DIM), nn.SiLU(), nn.Linear(T_MLP_DIM, out_dim)]

    def __call__(self, t: mx.array) -> mx.array:
        first = self.mlp[0]  # its weight is uint32 if quantized; the scales carry the compute dtype then
        x = timestep_embedding(t).astype(first.scales.dtype if "scales" in first else first.weight.dtype)
        for layer in self.mlp:
            x = layer(x)
        return x


class Attention(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        dim, self.n_heads = args.dim, args.n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = [nn.Linear(dim, dim, bias=False)]
        if args.qk_norm:
            # diffusers hard-codes eps=1e-5 for the QK norms, whatever norm_eps says.
            self.norm_q = nn.RMSNorm(args.head_dim, eps=1e-5)
            self.norm_k = nn.RMSNorm(args.head_dim, eps=1e-5)
        self.scale = args.head_dim**-0.5

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array | None) -> mx.array:
        B, L, _ = x.shape
        q = self.to_q(x).reshape(B, L, self.n_heads, -1)  # (B, L, H, D)
        k = self.to_k(x).reshape(B, L, self.n_heads, -1)
        v = self.to_v(x).reshape(B, L, self.n_heads, -1)
        if "norm_q" in self:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, L, D)
        o = kernels.attention(q, k, v, self.scale, mask)
        return self.to_out[0](o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(kernels.silu_mul(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    """A sandwich-norm block; modulated blocks scale the pre-norms and gate the post-normed branches."""

    def __init__(self, args: TransformerArgs, modulation: bool):
        super().__init__()
        dim, eps = args.dim, args.norm_eps
        self.attention = Attention(args)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1 = nn.RMSNorm(dim, eps=eps)
        self.attention_norm2 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=eps)
        if modulation:
            # No SiLU before this linear (unlike the final layer's).
            self.adaLN_modulation = [nn.Linear(args.adaln_dim, 4 * dim)]

    def modulation(self, adaln: mx.array) -> list[mx.array]:
        """scale_msa, gate_msa, scale_mlp, gate_mlp, each (B, 1, dim), in this order."""
        return mx.split(self.adaLN_modulation[0](adaln)[:, None, :], 4, axis=-1)

    def __call__(self, x, rope, mask=None, adaln=None):
        if "adaLN_modulation" not in self:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulation(adaln)
        h = self.attention(_modulate(self.attention_norm1(x), scale_msa), rope, mask)
        x = _gated_add(x, mx.tanh(gate_msa), self.attention_norm2(h))
        h = self.feed_forward(_modulate(self.ffn_norm1(x), scale_mlp))
        return _gated_add(x, mx.tanh(gate_mlp), self.ffn_norm2(h))


class FinalLayer(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.linear = nn.Linear(args.dim, args.patch_dim)
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(args.adaln_dim, args.dim)]

    def __call__(self, x: mx.array, adaln: mx.array) -> mx.array:
        silu, linear = self.adaLN_modulation
        scale = 1 + linear(silu(adaln))[:, None, :]
        return self.linear(mx.fast.layer_norm(x, None, None, 1e-6) * scale)


def _blocks(blocks, x, rope, mask, adaln, residuals=None):
    """Run blocks in order, one graph per block (see kernels.cut). residuals: None, or an iterator of
    (block index, array) with increasing indices, each array added to that block's output; it is advanced
    only when its next residual is due, so a side network can compute one residual at a time."""
    due = next(residuals, None) if residuals is not None else None
    for i, block in enumerate(blocks):
        x = block(x, rope, mask, adaln)
        if due is not None and due[0] == i:
            x = x + due[1]
            due = next(residuals, None)
        x = kernels.cut(x)
    return x


# ----------------------------------------------------------------------------------------------
# Quantization policy: the one predicate used by the converter and by on-the-fly quantization

# Measured with benchmarks/quantization_error.py (DiT output error of quantizing one layer group alone, per
# share of parameters; random weights, so indicative).
# Kept in the compute dtype: the timestep MLP and the caption projection, which diffusers also keeps out of
# layerwise casting (spec trap 14), and the patch embedding and final layer, which map straight from and to
# the 64-wide patch space: per parameter they are over 100x more sensitive than block weights, and together
# these four are 0.2% of the parameters.
QUANT_KEEP = ("t_embedder.", "cap_embedder.", "all_x_embedder.", "all_final_layer.")
# At least 8 bits: the blocks' adaLN modulation (the scale and gate of every branch), 3-6x more sensitive
# per parameter than attention and FFN weights, 2% of the parameters (+2% size at 4 bits).
QUANT_MIN_BITS = {"adaLN_modulation": 8}
DEFAULT_GROUP_SIZE = 64


def quant_predicate(bits: int, group_size: int = DEFAULT_GROUP_SIZE, keep: tuple[str, ...] = QUANT_KEEP,
                    min_bits: dict[str, int] = QUANT_MIN_BITS):
    """The DiT's quantization policy as an `nn.quantize` class_predicate: which Linear layers get quantized,
    at which bits and group size. Layers under a `keep` prefix stay in the compute dtype, and so do layers
    whose input width is not a multiple of group_size (mx.quantize works on whole groups of a row); a layer
    whose path contains a `min_bits` key gets at least those bits."""

    def predicate(path: str, module: nn.Module):
        if not isinstance(module, nn.Linear) or path.startswith(keep) or module.weight.shape[-1] % group_size:
            return False
        b = max([bits] + [m for name, m in min_bits.items() if name in path])
        return {"bits": b, "group_size": group_size}

    return predicate


class ZImageTransformer(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.args = args
        self.all_x_embedder = {"2-1": nn.Linear(args.patch_dim, args.dim)}
        self.all_final_layer = {"2-1": FinalLayer(args)}
        self.noise_refiner = [TransformerBlock(args, modulation=True) for _ in range(args.n_refiner_layers)]
        self.context_refiner = [TransformerBlock(args, modulation=False) for _ in range(args.n_refiner_layers)]
        self.t_embedder = TimestepEmbedder(args.adaln_dim)
        self.cap_embedder = [nn.RMSNorm(args.cap_feat_dim, eps=args.norm_eps), nn.Linear(args.cap_feat_dim, args.dim)]
        self.x_pad_token = mx.zeros((1, args.dim))
        self.cap_pad_token = mx.zeros((1, args.dim))
        self.layers = [TransformerBlock(args, modulation=True) for _ in range(args.n_layers)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.x_pad_token.dtype

    def check_sizes(self, h: int, w: int, cap_lens: list[int]) -> None:
        """Raise InputError if the latent size or a caption length falls outside the RoPE tables."""
        lens = self.args.axes_lens
        if h % 2 or w % 2 or h < 2 or w < 2:
            raise InputError(f"latent size {h}x{w} must be even and positive (image sides multiples of 16)")
        if h // 2 > lens[1] or w // 2 > lens[2]:
            raise InputError(
                f"latent {h}x{w} is too large: at most {2 * lens[1]}x{2 * lens[2]} latent pixels "
                f"({16 * lens[1]}x{16 * lens[2]} image pixels)"
            )
        longest = max(padded(n) for n in cap_lens)
        if longest + 1 >= lens[0]:
            raise InputError(f"caption of {max(cap_lens)} tokens is too long for the RoPE table ({lens[0]})")
        if min(cap_lens) < 1:
            raise InputError("every caption needs at least one token")

    @staticmethod
    def positions(h: int, w: int, cap_len: int) -> np.ndarray:
        """Integer (t, h, w) positions of one item's [image tokens, image pads, caption tokens + pads].

        Caption token j sits at (1 + j, 0, 0), pads included; image tokens at (Lc + 1, row, col) with Lc
        the *padded* caption length; image pad tokens at (0, 0, 0).
        """
        Ht, Wt = h // 2, w // 2
        cap_len_padded, n_img_pad = padded(cap_len), padded(Ht * Wt) - Ht * Wt
        hh, ww = np.meshgrid(np.arange(Ht), np.arange(Wt), indexing="ij")
        img = np.stack([np.full(Ht * Wt, cap_len_padded + 1), hh.ravel(), ww.ravel()], axis=-1)
        pads = np.zeros((n_img_pad, 3), dtype=np.int64)
        cap = np.stack([1 + np.arange(cap_len_padded), np.zeros(cap_len_padded), np.zeros(cap_len_padded)], -1)
        return np.concatenate([img, pads, cap.astype(np.int64)], axis=0)

    def __call__(self, x: mx.array, t: mx.array, cap_feats: list[mx.array], control=None) -> mx.array:
        """One DiT forward.

        x: (B, h, w, C) latents (any float dtype); t: (B,) model time 1 - sigma in [0, 1];
        cap_feats: B caption features (L_i, cap_feat_dim), valid tokens only. Returns (B, h, w, C) in
        the compute dtype: the prediction x0 - noise.

        control: optional residuals from a side network (a ControlNet's per-step `controlnet.Control`).
        `control.refiner(self, img, rope, adaln)` is called with the embedded image tokens before the noise
        refiner, `control.main(self, unified, rope, mask, adaln)` with the unified sequence before the main
        layers; each returns None or an iterator of (block index, residual), indices increasing, and each
        residual is added to that block's output.
        """
        B, h, w, _ = x.shape
        if len(cap_feats) != B:
            raise ValueError(f"{B} latents but {len(cap_feats)} captions")
        cap_lens = [int(c.shape[0]) for c in cap_feats]
        self.check_sizes(h, w, cap_lens)
        dtype, dim = self.dtype, self.args.dim
        adaln = self.t_embedder(t * self.args.t_scale).astype(dtype)  # (B, adaln_dim)

        # Image tokens, padded to a multiple of 32 with the learned x_pad_token.
        N = (h // 2) * (w // 2)
        n_pad = padded(N) - N
        img = self.all_x_embedder["2-1"](patchify(x.astype(dtype)))  # (B, N, dim)
        if n_pad:
            img = mx.concatenate([img, mx.broadcast_to(self.x_pad_token, (B, n_pad, dim))], axis=1)

        # RoPE for every item's unified sequence [image, caption]; items differ only through caption length.
        cap_padded = [padded(n) for n in cap_lens]
        L_max = N + n_pad + max(cap_padded)
        pos = np.zeros((B, L_max, 3), dtype=np.int64)
        for i, lc in enumerate(cap_padded):
            pos[i, : N + n_pad + lc] = self.positions(h, w, cap_lens[i])
        cos, sin = rope_angles(pos, self.args.axes_dims, self.args.rope_theta)  # (B, L_max, head_dim/2)
        n_img = N + n_pad

        img_rope = (cos[:, :n_img], sin[:, :n_img])
        extra = control.refiner(self, img, img_rope, adaln) if control is not None else None
        img = _blocks(self.noise_refiner, img, img_rope, None, adaln, extra)

        # Caption tokens: embed, pad with the learned cap_pad_token, refine (no modulation).
        caps = []
        for i, (feats, n, lc) in enumerate(zip(cap_feats, cap_lens, cap_padded)):
            c = self.cap_embedder[1](self.cap_embedder[0](feats.astype(dtype)))
            if lc > n:
                c = mx.concatenate([c, mx.broadcast_to(self.cap_pad_token, (lc - n, dim))], axis=0)
            caps.append(c)
        if len(set(cap_padded)) == 1:
            cap = mx.stack(caps)
            rope = (cos[:, n_img:], sin[:, n_img:])
            for layer in self.context_refiner:
                cap = layer(cap, rope)
            caps = list(cap)
        else:  # ragged: refine each caption alone rather than pay for padding and masks
            for i in range(B):
                rope = (cos[i : i + 1, n_img : n_img + cap_padded[i]], sin[i : i + 1, n_img : n_img + cap_padded[i]])
                c = caps[i][None]
                for layer in self.context_refiner:
                    c = layer(c, rope)
                caps[i] = c[0]

        # Unified sequence: image first, then caption. Ragged items are right-padded and masked as keys.
        mask = None
        if len(set(cap_padded)) == 1:
            unified = mx.concatenate([img, mx.stack(caps)], axis=1)
        else:
            rows = []
            for i in range(B):
                fill = L_max - n_img - cap_padded[i]
                parts = [img[i], caps[i]] + ([mx.zeros((fill, dim), dtype=dtype)] if fill else [])
                rows.append(mx.concatenate(parts, axis=0))
            unified = mx.stack(rows)
            valid = np.arange(L_max)[None, :] < (n_img + np.array(cap_padded))[:, None]
            mask = mx.array(valid)[:, None, None, :]  # (B, 1, 1, L): True = attend

        extra = control.main(self, unified, (cos, sin), mask, adaln) if control is not None else None
        unified = _blocks(self.layers, unified, (cos, sin), mask, adaln, extra)

        out = self.all_final_layer["2-1"](unified[:, :N], adaln)  # (B, N, 4C)
        return unpatchify(out, h, w)

    # ------------------------------------------------------------------------------------------
    # Loading

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map ComfyUI/original single-file names to diffusers names; diffusers keys pass unchanged.

        Handles the `model.diffusion_model.` prefix, fused `attention.qkv`, `attention.out`,
        `q_norm`/`k_norm`, `x_embedder`/`final_layer`, the unused `norm_final.weight`, and pad tokens
        stored as (dim,). Idempotent.
        """
        out = {}
        for key, w in weights.items():
            key = key.removeprefix("model.diffusion_model.")
            if key == "norm_final.weight":
                continue
            if key.startswith("x_embedder."):
                key = "all_x_embedder.2-1." + key.removeprefix("x_embedder.")
            elif key.startswith("final_layer."):
                key = "all_final_layer.2-1." + key.removeprefix("final_layer.")
            key = (
                key.replace(".attention.out.", ".attention.to_out.0.")
                .replace(".attention.q_norm.", ".attention.norm_q.")
                .replace(".attention.k_norm.", ".attention.norm_k.")
            )
            if key.endswith("pad_token") and w.ndim == 1:
                w = w[None]
            if ".attention.qkv." in key:
                for name, part in zip(("to_q", "to_k", "to_v"), mx.split(w, 3, axis=0)):
                    out[key.replace(".qkv.", f".{name}.")] = part
                continue
            out[key] = w
        return out

    @classmethod
    def from_pretrained(cls, folder, dtype="float32", quantize: int | None = None,
                        group_size: int = DEFAULT_GROUP_SIZE) -> "ZImageTransformer":
        """Load a `transformer/` folder (config.json + one or several safetensors, any dtype): diffusers', or one
        written by `zimage-mlx convert`, quantized or not.

        quantize: bits to quantize a float folder to on the fly with this model's policy (`quant_predicate`);
        a folder stored quantized loads as stored and refuses other bits.
        """
        folder, what = Path(folder), f"transformer ({folder})"
        config = read_config(folder)
        model = cls(TransformerArgs.from_dict(config))
        weights = cls.sanitize(load_safetensors(folder))
        if quantize is not None:
            check_quantization(quantize, group_size)
        stored = quantize_as_stored(model, weights, config, what, quantize)
        load_into(model, weights, what, to_dtype(dtype))
        del weights  # else the file arrays would stay alive once read
        if quantize is not None and stored is None:
            quantize_model(model, quant_predicate(quantize, group_size))
        return model
