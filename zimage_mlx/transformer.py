"""The Z-Image single-stream DiT (ZImageTransformer2DModel) in MLX.

Follows diffusers `models/transformers/transformer_z_image.py` (basic, non-omni mode) and the official
Tongyi-MAI/Z-Image `src/zimage/transformer.py`. Channels-last: latents are (B, h, w, 16).

The details that are easy to get wrong: the output is x0 - noise (the pipeline
negates it), t is 1 - sigma, blocks modulate with (1 + scale) and tanh(gate) and no SiLU before the
adaLN linear (the final layer has one), each branch has a pre- and a post-norm, RoPE rotates
interleaved pairs over three axes, the patch vector is (ph, pw, c) with c fastest, image tokens sit at
t-position (padded caption length + 1), and both streams are padded to multiples of 32 with learned
pad tokens that are attended to, not masked.

float16 (M1/M2 Macs, where it is the fast type) runs a scaled graph that never overflows; see `V_SCALE`,
`FFN_SCALE` and `TransformerBlock.scaled`.
float32 and bfloat16 run the plain graph, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import fp16, kernels
from .embeddings import FREQ_EMBED_DIM, timestep_embedding
from .errors import InputError
from .sources import read_config
from .weights import (CheckpointError, check_quantization, load_into, load_safetensors, quant_policy, quantize_as_stored,
                      quantize_model, to_dtype)

SEQ_MULTI_OF = 32
ADALN_EMBED_DIM = 256
T_MLP_DIM = 1024

# The float16 graph ("scaled"): float16 weights and GEMMs, float32 residual stream, modulation vectors,
# timestep embedding and RoPE. Inside a block the only tensors that can exceed float16's 65,504 are those
# stored between a sublayer's pre-norm and its post-norm: the SwiGLU product silu(w1 x) * w3 x
# (measured at 284,507 on the release over an 8-step 1024x1024 run, 64,695 at step 1) and the FFN output,
# and, as a precaution, the attention value path and its output. Both paths end in an RMSNorm (attention_norm2,
# ffn_norm2), and RMSNorm(c y; c^2 eps) = RMSNorm(y; eps) for any c > 0, so dividing them by a constant and
# multiplying that norm's epsilon by c^2 changes nothing in real arithmetic. Powers of two also make the
# scaling exact in floating point (only the exponent changes, except for values pushed into float16's
# subnormal range: below 2^-14 / c in magnitude, negligible next to an RMSNorm over thousands of channels).
# The constants are Draw Things' defaults for Turbo: 284,507 / 32 = 8,891 leaves 7.4x
# headroom, and the pipeline redoes a step in bfloat16 if it ever overflows anyway.
V_SCALE = 2.0**-2  # the value projection's input: v, the attention output and to_out's output are 1/4
FFN_SCALE = 2.0**-5  # the SwiGLU product (w3's output is scaled before the multiply): w2's output is 1/32


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
    siglip_feat_dim: int | None = None  # Omni checkpoints only: the SigLIP feature width (see omni.py)

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
# Pure functions: RoPE, patchify (the timestep embedding is in embeddings.py)


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


@mx.compile
def _silu_mul_scaled(a, b):
    """silu(a) * b * FFN_SCALE for float16/bfloat16 a, b: computed in float32 registers and rounded once at
    the store, so the product exists only at 1/32 of its size in memory."""
    af = a.astype(mx.float32)
    return (af * mx.sigmoid(af) * (b.astype(mx.float32) * FFN_SCALE)).astype(a.dtype)


def _norm_scaled(norm: nn.RMSNorm, h: mx.array, scale: float) -> mx.array:
    """norm(h / scale) for h already multiplied by scale (a power of two): the epsilon is multiplied by
    scale^2, which makes it exact; float32 output (the weight is upcast: 1 x dim) for the float32 stream."""
    return mx.fast.rms_norm(h, norm.weight.astype(mx.float32), norm.eps * scale * scale)


def _linear(layer: nn.Module, x: mx.array) -> mx.array:
    """layer(x), with the GEMM in x's dtype even when the weights are in another: a float16 model redoes an
    overflowing step in bfloat16 by casting each weight (or a quantized layer's scales and biases) as it is
    used. Nothing is kept: the cost is a transient copy of one layer's weight and one pass over the weights."""
    dt = x.dtype
    if "base" in layer:  # a LoRA beside the layer (lora.LoraLinear)
        return _linear(layer["base"], x) + layer.side(x)
    if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):  # a wrapper (distributed.ShardedToAll) casts inside
        return layer(x)
    if isinstance(layer, nn.QuantizedLinear):
        if layer["scales"].dtype == dt:
            return layer(x)
        biases = layer.get("biases")
        y = mx.quantized_matmul(x, layer["weight"], scales=layer["scales"].astype(dt),
                                biases=None if biases is None else biases.astype(dt), transpose=True,
                                group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    else:
        if layer.weight.dtype == dt:
            return layer(x)
        y = x @ layer.weight.astype(dt).T
    return y + layer["bias"].astype(dt) if "bias" in layer else y


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

    def __call__(self, t: mx.array, dtype: mx.Dtype | None = None) -> mx.array:
        """dtype: compute the MLP in it (float32 for the scaled graph: float16 weights are upcast as used);
        by default in the weights' dtype."""
        first = self.mlp[0]  # its weight is uint32 if quantized; the scales carry the compute dtype then
        x = timestep_embedding(t).astype(dtype or (first.scales.dtype if "scales" in first else first.weight.dtype))
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

    def scaled(self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array | None) -> mx.array:
        """The scaled graph's attention: every GEMM in x's dtype, and the value path divided by 4 (the input of
        to_v; the output is then V_SCALE times the true one). q and k are not scaled: Turbo's are not at risk,
        and after the qk-norm they and the logits (accumulated in float32 by SDPA) are bounded,
        |logit| <= sqrt(head_dim) max|w_norm_q| max|w_norm_k|."""
        B, L, _ = x.shape
        q = _linear(self.to_q, x).reshape(B, L, self.n_heads, -1)  # (B, L, H, D)
        k = _linear(self.to_k, x).reshape(B, L, self.n_heads, -1)
        v = _linear(self.to_v, x * V_SCALE).reshape(B, L, self.n_heads, -1)
        if "norm_q" in self:  # weights in q's dtype: float16 ones would promote a bfloat16 redo to float32
            q = mx.fast.rms_norm(q, self.norm_q.weight.astype(q.dtype), self.norm_q.eps)
            k = mx.fast.rms_norm(k, self.norm_k.weight.astype(k.dtype), self.norm_k.eps)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # rotated in float32, stored in x's dtype
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, L, D)
        o = kernels.attention(q, k, v, self.scale, mask)
        return _linear(self.to_out[0], o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(kernels.silu_mul(self.w1(x), self.w3(x)))

    def scaled(self, x: mx.array) -> mx.array:
        """The scaled graph's FFN: w2(silu(w1 x) * (w3 x) * FFN_SCALE), every GEMM in x's dtype."""
        a, b = _linear(self.w1, x), _linear(self.w3, x)
        if a.dtype == mx.float32:  # the scaled graph run in float32 (tests): the same kernel as the plain graph
            p = kernels.silu_mul(a, b * FFN_SCALE)
        else:
            p = _silu_mul_scaled(a, b)
        return _linear(self.w2, p)


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

    def __call__(self, x, rope, mask=None, adaln=None, act=None):
        if act is not None:
            return self.scaled(x, rope, mask, adaln, act)
        if "adaLN_modulation" not in self:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulation(adaln)
        h = self.attention(_modulate(self.attention_norm1(x), scale_msa), rope, mask)
        x = _gated_add(x, mx.tanh(gate_msa), self.attention_norm2(h))
        h = self.feed_forward(_modulate(self.ffn_norm1(x), scale_mlp))
        return _gated_add(x, mx.tanh(gate_mlp), self.ffn_norm2(h))

    def scaled(self, x, rope, mask, adaln, act):
        """The scaled graph (float16): x, the modulation and the norms' outputs in float32; each sublayer's
        input is cast to `act` (float16, or bfloat16 when the pipeline redoes a step) at the one cast point, its
        GEMMs run in act, its output is V_SCALE / FFN_SCALE times the true one, and the post-norm's epsilon is
        compensated (see V_SCALE). In real arithmetic this is the plain graph."""
        if "adaLN_modulation" in self:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulation(adaln)  # float32 (adaln is)
            h = self.attention.scaled(_modulate(self.attention_norm1(x), scale_msa).astype(act), rope, mask)
            x = _gated_add(x, mx.tanh(gate_msa), _norm_scaled(self.attention_norm2, h, V_SCALE))
            h = self.feed_forward.scaled(_modulate(self.ffn_norm1(x), scale_mlp).astype(act))
            return _gated_add(x, mx.tanh(gate_mlp), _norm_scaled(self.ffn_norm2, h, FFN_SCALE))
        h = self.attention.scaled(self.attention_norm1(x).astype(act), rope, mask)
        x = x + _norm_scaled(self.attention_norm2, h, V_SCALE)
        h = self.feed_forward.scaled(self.ffn_norm1(x).astype(act))
        return x + _norm_scaled(self.ffn_norm2, h, FFN_SCALE)


class FinalLayer(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.linear = nn.Linear(args.dim, args.patch_dim)
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(args.adaln_dim, args.dim)]

    def __call__(self, x: mx.array, adaln: mx.array, act: mx.Dtype | None = None) -> mx.array:
        """act (the scaled graph): x and adaln are float32, the LayerNorm and the modulation stay float32 and
        only the 64-wide linear's input is cast to act."""
        silu, linear = self.adaLN_modulation
        scale = 1 + linear(silu(adaln))[:, None, :]
        if act is not None:
            return _linear(self.linear, (mx.fast.layer_norm(x, None, None, 1e-6) * scale).astype(act))
        return self.linear(mx.fast.layer_norm(x, None, None, 1e-6) * scale)


def _blocks(blocks, x, rope, mask, adaln, residuals=None, **kw):
    """Run blocks in order, one graph per block (see kernels.cut). residuals: None, or an iterator of
    (block index, array) with increasing indices, each array added to that block's output; it is advanced
    only when its next residual is due, so a side network can compute one residual at a time. kw: the
    scaled graph's per-call options (`act`), passed to every block."""
    due = next(residuals, None) if residuals is not None else None
    for i, block in enumerate(blocks):
        x = block(x, rope, mask, adaln, **kw)
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
# these four are 0.2% of the parameters. Omni's SigLIP feature projection stays float likewise, as the
# caption projection it mirrors.
QUANT_KEEP = ("t_embedder.", "cap_embedder.", "all_x_embedder.", "all_final_layer.", "siglip_embedder.")
# At least 8 bits: the blocks' adaLN modulation (the scale and gate of every branch), 3-6x more sensitive
# per parameter than attention and FFN weights, 2% of the parameters (+2% size at 4 bits).
QUANT_MIN_BITS = {"adaLN_modulation": 8}
DEFAULT_GROUP_SIZE = 64


def quant_predicate(bits: int, group_size: int = DEFAULT_GROUP_SIZE, keep: tuple[str, ...] = QUANT_KEEP,
                    min_bits: dict[str, int] = QUANT_MIN_BITS):
    """The DiT's quantization policy (weights.quant_policy): its Linear layers, those under `keep` left in the
    compute dtype, and at least min_bits[name] bits for a layer whose path contains `name`."""
    return quant_policy(bits, group_size, keep, min_bits)


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
        if args.siglip_feat_dim is not None:  # Omni: reference images' SigLIP features (omni.py runs them)
            self.siglip_embedder = [nn.RMSNorm(args.siglip_feat_dim, eps=args.norm_eps),
                                    nn.Linear(args.siglip_feat_dim, args.dim)]
            self.siglip_refiner = [TransformerBlock(args, modulation=False) for _ in range(args.n_refiner_layers)]
            self.siglip_pad_token = mx.zeros((1, args.dim))
        # "auto": the scaled graph for float16 weights, the plain one otherwise; "plain" runs float16 naively
        # (it overflows: the tests' negative control); "scaled" runs the scaled graph in any dtype.
        self.graph = "auto"
        self.fp16_stats: dict | None = None  # fp16_stats.statistics() of these weights, when known

    @property
    def dtype(self) -> mx.Dtype:
        return self.x_pad_token.dtype

    @property
    def scaled(self) -> bool:
        """Whether forwards run the scaled graph (see V_SCALE)."""
        if self.graph not in ("auto", "plain", "scaled"):
            raise ValueError(f"graph must be 'auto', 'plain' or 'scaled', got {self.graph!r}")
        return self.graph == "scaled" or (self.graph == "auto" and self.dtype == mx.float16)

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

    def __call__(self, x: mx.array, t: mx.array, cap_feats: list[mx.array], control=None,
                 activations: mx.Dtype | None = None) -> mx.array:
        """One DiT forward.

        x: (B, h, w, C) latents (any float dtype); t: (B,) model time 1 - sigma in [0, 1];
        cap_feats: B caption features (L_i, cap_feat_dim), valid tokens only. Returns (B, h, w, C) in
        the compute dtype: the prediction x0 - noise.

        control: optional residuals from a side network (a ControlNet's per-step `controlnet.Control`).
        `control.refiner(self, img, rope, adaln)` is called with the embedded image tokens before the noise
        refiner, `control.main(self, unified, rope, mask, adaln)` with the unified sequence before the main
        layers; each returns None or an iterator of (block index, residual), indices increasing, and each
        residual is added to that block's output.

        activations: for the scaled graph only, the GEMMs' dtype for this call (default: the weights'):
        mx.bfloat16 redoes a float16 step that overflowed, casting each weight as it is used.
        """
        B, h, w, _ = x.shape
        if len(cap_feats) != B:
            raise ValueError(f"{B} latents but {len(cap_feats)} captions")
        cap_lens = [int(c.shape[0]) for c in cap_feats]
        self.check_sizes(h, w, cap_lens)
        dtype = self.dtype
        if self.scaled:
            # GEMMs in act; the residual stream, the timestep embedding and the modulation in float32.
            act, kw = activations or dtype, {"act": activations or dtype}
            adaln = self.t_embedder(t * self.args.t_scale, mx.float32)  # (B, adaln_dim)
            gemm, dtype = act, mx.float32
        else:
            if activations is not None and activations != dtype:
                raise ValueError("activations applies to the scaled (float16) graph only")
            kw, gemm = {}, dtype
            adaln = self.t_embedder(t * self.args.t_scale).astype(dtype)  # (B, adaln_dim)

        img = self._image_tokens(x, gemm, dtype)  # (B, n_img, dim)
        n_img, N = img.shape[1], (h // 2) * (w // 2)
        # RoPE for every item's unified sequence [image, caption]; items differ only through caption length.
        cap_padded = [padded(n) for n in cap_lens]
        L_max = n_img + max(cap_padded)
        pos = np.zeros((B, L_max, 3), dtype=np.int64)
        for i, lc in enumerate(cap_padded):
            pos[i, : n_img + lc] = self.positions(h, w, cap_lens[i])
        cos, sin = rope_angles(pos, self.args.axes_dims, self.args.rope_theta)  # (B, L_max, head_dim/2)

        img_rope = (cos[:, :n_img], sin[:, :n_img])
        extra = control.refiner(self, img, img_rope, adaln) if control is not None else None
        img = _blocks(self.noise_refiner, img, img_rope, None, adaln, extra, **kw)
        caps = self._caption_tokens(cap_feats, cap_padded, (cos[:, n_img:], sin[:, n_img:]), gemm, dtype, kw)
        unified, mask = self._unified(img, caps, L_max)

        extra = control.main(self, unified, (cos, sin), mask, adaln) if control is not None else None
        unified = _blocks(self.layers, unified, (cos, sin), mask, adaln, extra, **kw)

        out = self.all_final_layer["2-1"](unified[:, :N], adaln, **kw)  # (B, N, 4C)
        return unpatchify(out, h, w)

    def _image_tokens(self, x: mx.array, gemm: mx.Dtype, dtype: mx.Dtype) -> mx.array:
        """Patch-embedded latents, padded to a multiple of 32 with the learned x_pad_token: (B, n_img, dim)."""
        B, h, w, _ = x.shape
        N = (h // 2) * (w // 2)
        n_pad = padded(N) - N
        img = _linear(self.all_x_embedder["2-1"], patchify(x.astype(gemm))).astype(dtype)  # (B, N, dim)
        if n_pad:
            pad = self.x_pad_token.astype(dtype)
            img = mx.concatenate([img, mx.broadcast_to(pad, (B, n_pad, self.args.dim))], axis=1)
        return img

    def _caption_tokens(self, cap_feats: list[mx.array], cap_padded: list[int], rope: tuple, gemm: mx.Dtype,
                        dtype: mx.Dtype, kw: dict) -> list[mx.array]:
        """Caption tokens: embedded, padded with the learned cap_pad_token and refined (no modulation); one
        (padded length, dim) array per item. `rope`: the caption part of the RoPE tables, (B, L_cap_max, ...)."""
        caps = []
        for feats, lc in zip(cap_feats, cap_padded):
            n = feats.shape[0]
            c = _linear(self.cap_embedder[1], self.cap_embedder[0](feats.astype(dtype)).astype(gemm)).astype(dtype)
            if lc > n:
                c = mx.concatenate([c, mx.broadcast_to(self.cap_pad_token.astype(dtype), (lc - n, self.args.dim))],
                                   axis=0)
            caps.append(c)
        cos, sin = rope
        if len(set(cap_padded)) == 1:
            cap = mx.stack(caps)
            for layer in self.context_refiner:
                cap = layer(cap, (cos, sin), **kw)
            return list(cap)
        for i, lc in enumerate(cap_padded):  # ragged: refine each caption alone rather than pay for padding and masks
            c = caps[i][None]
            for layer in self.context_refiner:
                c = layer(c, (cos[i: i + 1, :lc], sin[i: i + 1, :lc]), **kw)
            caps[i] = c[0]
        return caps

    @staticmethod
    def _unified(img: mx.array, caps: list[mx.array], L_max: int) -> tuple[mx.array, mx.array | None]:
        """The unified sequence, image first, then caption: (B, L_max, dim), and the key mask of ragged items
        (right-padded; (B, 1, 1, L), True = attend), or None when every caption has the same length."""
        B, n_img, dim = img.shape
        lengths = [c.shape[0] for c in caps]
        if len(set(lengths)) == 1:
            return mx.concatenate([img, mx.stack(caps)], axis=1), None
        rows = []
        for i in range(B):
            fill = L_max - n_img - lengths[i]
            parts = [img[i], caps[i]] + ([mx.zeros((fill, dim), dtype=img.dtype)] if fill else [])
            rows.append(mx.concatenate(parts, axis=0))
        valid = np.arange(L_max)[None, :] < (n_img + np.array(lengths))[:, None]
        return mx.stack(rows), mx.array(valid)[:, None, None, :]

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
        float16 runs the scaled graph (see V_SCALE); its statistics (fp16.statistics), from config.json when
        `zimage-mlx convert` stored them or else computed from the loaded weights, are in `fp16_stats`.
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
        if to_dtype(dtype) == mx.float16:
            model.fp16_stats = fp16.stored(config) or fp16.statistics(fp16.model_weights(model), model.args)
        return model
