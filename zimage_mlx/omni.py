"""Z-Image-Omni: the DiT's omni sequence, for generating with reference images, in MLX.

Follows diffusers `models/transformers/transformer_z_image.py` (`patchify_and_embed_omni`, `_build_unified_sequence`
in omni mode, `select_per_token`) and `pipelines/z_image/pipeline_z_image_omni.py` (prompt segments, reference
preprocessing). The DiT's Omni weights (`siglip_embedder`, `siglip_refiner`, `siglip_pad_token`) live on
`ZImageTransformer` when its config has `siglip_feat_dim`; this module runs them.

One item's sequence is [caption segments, image tokens, SigLIP tokens]:
- the prompt is split around the references: N + 2 caption segments for N references (one when there are none),
  each tokenized and encoded alone, each padded to a multiple of 32 with cap_pad_token;
- images are the N clean reference latents, then the noisy target, each patchified and padded with x_pad_token;
- SigLIP tokens are each reference's feature grid, then 32 siglip_pad_tokens for the target's empty slot.
Clean tokens (the references' caption segments, latents and SigLIP grids) are modulated with the timestep
embedding of t = 1, the rest with that of the step (a per-token noise mask).

Traps reproduced from the executable reference: a caption segment's RoPE positions are its padded length
counted from its start followed by as many (0, 0, 0) rows as it has pads, the whole truncated to the captions'
total length (so a segment after a padded one is shifted); the caption position counter advances by the
*unpadded* length + 2; a SigLIP grid (h, w, C) is flattened as `permute(2, 0, 1).reshape(h*w, C)` (channels and
positions interleaved, as trained); SigLIP h/w positions are rescaled to the reference's latent size and
truncated to integers in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import kernels
from .errors import InputError
from .transformer import SEQ_MULTI_OF, ZImageTransformer, padded, patchify, rope_angles, unpatchify

MAX_REFERENCE_AREA = 1024 * 1024  # larger references are resized down to this area (diffusers' rule)
MIN_REFERENCE_SIDE = 64  # diffusers' check_image_input
MAX_REFERENCE_ASPECT = 8
MAX_REFERENCES = 4  # our limit: every reference lengthens each step's sequence


def prompt_segments(prompt: str, n_images: int) -> list[str]:
    """The Omni pipeline's prompt template, split into the segments that are encoded separately."""
    if n_images == 0:
        return ["<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n"]
    return (["<|im_start|>user\n<|vision_start|>"] + ["<|vision_end|><|vision_start|>"] * (n_images - 1)
            + ["<|vision_end|>" + prompt + "<|im_end|>\n<|im_start|>assistant\n<|vision_start|>",
               "<|vision_end|><|im_end|>"])


def encode_segments(encoder, segments: list[str], max_sequence_length: int = 512) -> list[mx.array]:
    """Each segment tokenized as is (no chat template: the segments carry it) and encoded alone: (L_k, hidden)."""
    out = []
    for text in segments:
        ids = encoder.tokenizer(text, max_length=max_sequence_length, truncation=True)["input_ids"]
        if not ids:
            raise InputError("an empty prompt segment cannot be encoded", "prompt")
        out.append(encoder.model(mx.array(ids, dtype=mx.int32)[None])[0])
    return out


# ----------------------------------------------------------------------------------------------
# References: the size rules and the two encodings


def check_reference(image, what: str = "reference image") -> None:
    """diffusers' check_image_input: at least 64 px a side and an aspect ratio of at most 8."""
    w, h = image.size
    if w < MIN_REFERENCE_SIDE or h < MIN_REFERENCE_SIDE:
        raise InputError(f"the {what} is {w}x{h} pixels: both sides must be at least {MIN_REFERENCE_SIDE}",
                         "reference_images")
    if max(w / h, h / w) > MAX_REFERENCE_ASPECT:
        raise InputError(f"the {what} is {w}x{h} pixels: its aspect ratio must be at most {MAX_REFERENCE_ASPECT}:1",
                         "reference_images")


def resized_reference(image, width: int | None = None, height: int | None = None):
    """The reference as SigLIP sees it: RGB, and above 1024x1024 pixels of area resized (Lanczos) to the output's
    area (or 1024x1024 when no size is given), keeping its aspect ratio, as ZImageOmniPipeline does."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    if w * h > MAX_REFERENCE_AREA:
        target = height * width if height is not None and width is not None else MAX_REFERENCE_AREA
        scale = math.sqrt(target / (w * h))
        image = image.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
    return image


def reference_pixels(image) -> mx.array:
    """The VAE's input for a (resized) reference: center-cropped to multiples of 16, in [-1, 1], (1, H, W, 3)."""
    w, h = image.size
    W, H = w // 16 * 16, h // 16 * 16
    left, top = (w - W) // 2, (h - H) // 2
    x = np.asarray(image.crop((left, top, left + W, top + H)), dtype=np.float32) / 255.0
    return mx.array(2.0 * x - 1.0)[None]


@dataclass
class OmniConditions:
    """One run's references, encoded: the clean latents (h_j, w_j, 16) and the SigLIP grids (hs_j, ws_j, C)."""

    latents: list[mx.array]
    siglip: list[mx.array]

    def __len__(self) -> int:
        return len(self.latents)


# ----------------------------------------------------------------------------------------------
# The omni sequence


def _grid(t: int, h: int, w: int) -> np.ndarray:
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([np.full(h * w, t), hh.ravel(), ww.ravel()], axis=-1).astype(np.int64)


def _with_pads(pos: np.ndarray, n_pad: int) -> np.ndarray:
    return np.concatenate([pos, np.zeros((n_pad, 3), np.int64)]) if n_pad else pos


def layout(cap_lens: list[int], image_sizes: list[tuple[int, int]], siglip_grids: list[tuple[int, int]] | None,
           noise: list[int]):
    """Positions (L, 3) and noise masks (L,) of the caption, image and SigLIP parts of one item's sequence.

    cap_lens: the caption segments' token counts; image_sizes: each image's latent (h, w), references then
    target; siglip_grids: each reference's SigLIP grid (hs, ws), or None (no references); noise: 0 per reference
    and 1 for the target."""
    cap_pos, cap_nm, cu, ends = [], [], 1, []
    for k, n in enumerate(cap_lens):
        P = padded(n)
        cap_pos.append(_with_pads(np.stack([cu + np.arange(P), np.zeros(P), np.zeros(P)], -1).astype(np.int64), P - n))
        cap_nm += [noise[k] if k < len(noise) else 1] * P
        cu += n
        ends.append(cu)
        cu += 2  # the image's and the SigLIP grid's positions
    Lc = sum(padded(n) for n in cap_lens)
    cap_pos = np.concatenate(cap_pos)[:Lc]  # the segments' extra pad rows push later segments along (see header)

    x_pos, x_nm = [], []
    for j, (h, w) in enumerate(image_sizes):
        n = (h // 2) * (w // 2)
        x_pos.append(_with_pads(_grid(ends[j], h // 2, w // 2), padded(n) - n))
        x_nm += [noise[j]] * padded(n)
    sig_pos, sig_nm = [], []
    if siglip_grids is not None:
        for j, (hs, ws) in enumerate(siglip_grids):
            n = hs * ws
            pos = _with_pads(_grid(ends[j] + 1, hs, ws), padded(n) - n).astype(np.float32)
            h, w = image_sizes[j]
            pos[:, 1] = pos[:, 1] / np.float32(max(hs - 1, 1)) * np.float32(h - 1)  # float32, then truncated
            pos[:, 2] = pos[:, 2] / np.float32(max(ws - 1, 1)) * np.float32(w - 1)
            sig_pos.append(pos.astype(np.int32).astype(np.int64))
            sig_nm += [noise[j]] * padded(n)
        sig_pos.append(np.zeros((SEQ_MULTI_OF, 3), np.int64))  # the target's empty slot
        sig_nm += [1] * SEQ_MULTI_OF
    return ((cap_pos, np.array(cap_nm)), (np.concatenate(x_pos), np.array(x_nm)),
            (np.concatenate(sig_pos), np.array(sig_nm)) if sig_pos else None)


def _embed(layers, feats: mx.array, n_pad: int, pad_token: mx.array, dtype) -> mx.array:
    """RMSNorm + Linear, then n_pad learned pad tokens: (L + n_pad, dim)."""
    x = layers[1](layers[0](feats.astype(dtype)))
    if n_pad:
        x = mx.concatenate([x, mx.broadcast_to(pad_token.astype(dtype), (n_pad, x.shape[-1]))])
    return x


def _modulated(block, x, rope, noisy: mx.array, mods: tuple) -> mx.array:
    """A modulated block with per-token modulation: `noisy` (1, L, 1) picks the step's (mods[0]) or t=1's (mods[1])."""
    parts = [[m for m in block.modulation(a)] for a in mods]  # each: scale_msa, gate_msa, scale_mlp, gate_mlp
    scale_msa, scale_mlp = (mx.where(noisy, 1 + parts[0][i], 1 + parts[1][i]) for i in (0, 2))
    gate_msa, gate_mlp = (mx.where(noisy, mx.tanh(parts[0][i]), mx.tanh(parts[1][i])) for i in (1, 3))
    x = x + gate_msa * block.attention_norm2(block.attention(block.attention_norm1(x) * scale_msa, rope, None))
    return x + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(x) * scale_mlp))


def _run(blocks, x, rope, noisy=None, mods=None):
    for block in blocks:
        x = _modulated(block, x, rope, noisy, mods) if mods is not None else block(x, rope)
        x = kernels.cut(x)
    return x


def omni_forward(dit: ZImageTransformer, x: mx.array, t: mx.array, segments: list[mx.array],
                 cond: OmniConditions | None) -> mx.array:
    """One item's DiT forward in omni mode. x: (h, w, 16) target latents; t: (1,) model time; segments: the
    caption segments' features; cond: the references (None or empty: text only). Returns (h, w, 16)."""
    if dit.scaled:
        raise InputError("Omni runs in float32 or bfloat16, not float16: pass dtype='bfloat16'", "dtype")
    args, dtype = dit.args, dit.dtype
    refs = cond.latents if cond is not None else []
    n_ref = len(refs)
    if n_ref and "siglip_embedder" not in dit:
        raise InputError("reference images need an Omni DiT (its config has siglip_feat_dim)", "reference_images")
    if len(segments) != (n_ref + 2 if n_ref else 1):
        raise ValueError(f"{len(segments)} caption segments for {n_ref} references")
    images = list(refs) + [x]
    noise = [0] * n_ref + [1]
    sig = cond.siglip if n_ref else None
    (cap_pos, cap_nm), (x_pos, x_nm), sig_part = layout(
        [int(s.shape[0]) for s in segments], [tuple(im.shape[:2]) for im in images],
        [tuple(s.shape[:2]) for s in sig] if sig else None, noise)

    def rope(pos):
        c, s = rope_angles(pos[None], args.axes_dims, args.rope_theta)  # (1, L, head_dim/2)
        return c, s

    mods = (dit.t_embedder(t * args.t_scale).astype(dtype), dit.t_embedder(mx.ones_like(t) * args.t_scale).astype(dtype))

    # Images: each patch-embedded and padded, then the noise refiner over all of them.
    toks = []
    for im in images:
        p = dit.all_x_embedder["2-1"](patchify(im[None].astype(dtype)))[0]  # (n, dim)
        n_pad = padded(p.shape[0]) - p.shape[0]
        toks.append(mx.concatenate([p, mx.broadcast_to(dit.x_pad_token.astype(dtype), (n_pad, args.dim))]) if n_pad else p)
    x_noisy = mx.array(x_nm.astype(bool))[None, :, None]
    img = _run(dit.noise_refiner, mx.concatenate(toks)[None], rope(x_pos), x_noisy, mods)

    caps = mx.concatenate([_embed(dit.cap_embedder, s, padded(s.shape[0]) - s.shape[0], dit.cap_pad_token, dtype)
                           for s in segments])[None]
    caps = _run(dit.context_refiner, caps, rope(cap_pos))
    parts, pos, nm = [caps, img], [cap_pos, x_pos], [cap_nm, x_nm]
    if sig is not None:
        feats = []
        for g in sig:  # (hs, ws, C) flattened as the reference does: permute(2, 0, 1).reshape(hs*ws, C)
            hs, ws, C = g.shape
            flat = g.transpose(2, 0, 1).reshape(hs * ws, C)
            feats.append(_embed(dit.siglip_embedder, flat, padded(hs * ws) - hs * ws, dit.siglip_pad_token, dtype))
        feats.append(mx.broadcast_to(dit.siglip_pad_token.astype(dtype), (SEQ_MULTI_OF, args.dim)))
        s = _run(dit.siglip_refiner, mx.concatenate(feats)[None], rope(sig_part[0]))
        parts.append(s)
        pos.append(sig_part[0])
        nm.append(sig_part[1])
    unified = mx.concatenate(parts, axis=1)  # (1, L, dim): [captions, images, SigLIP]
    noisy = mx.array(np.concatenate(nm).astype(bool))[None, :, None]
    unified = _run(dit.layers, unified, rope(np.concatenate(pos)), noisy, mods)

    final = dit.all_final_layer["2-1"]
    silu, linear = final.adaLN_modulation
    scale = mx.where(noisy, 1 + linear(silu(mods[0]))[:, None, :], 1 + linear(silu(mods[1]))[:, None, :])
    out = final.linear(mx.fast.layer_norm(unified, None, None, 1e-6) * scale)

    h, w = x.shape[:2]
    start = caps.shape[1] + sum(padded((a.shape[0] // 2) * (a.shape[1] // 2)) for a in refs)
    return unpatchify(out[:, start: start + (h // 2) * (w // 2)], h, w)[0]


class OmniDiT:
    """The DiT bound to one run's references, called as ZImagePipeline.denoise calls the DiT: x (B, h, w, 16),
    t (B,), and per item the list of its caption segments' features."""

    def __init__(self, dit: ZImageTransformer, cond: OmniConditions | None):
        self.dit, self.cond = dit, cond

    @property
    def scaled(self) -> bool:
        return self.dit.scaled

    @property
    def dtype(self):
        return self.dit.dtype

    def __call__(self, x: mx.array, t: mx.array, caps: list, **kw) -> mx.array:
        if kw:
            raise InputError(f"Omni runs do not support {', '.join(sorted(kw))} yet")
        # Items run one at a time (positive and negative have different lengths; diffusers masks a padded batch,
        # the same arithmetic).
        return mx.stack([omni_forward(self.dit, x[i], t[i: i + 1], caps[i], self.cond) for i in range(x.shape[0])])


# ----------------------------------------------------------------------------------------------
# Checks and loading (the pipeline's side)


def reference_size(image) -> tuple[int, int]:
    """The output (width, height) a run takes from its last reference when no size is given: the reference as
    resized for SigLIP (at most 1024x1024 of area), rounded down to multiples of 16 (diffusers' rule)."""
    w, h = resized_reference(image).size
    return max(16, w // 16 * 16), max(16, h // 16 * 16)


def check_references(recipe) -> None:
    """A recipe's references: at most MAX_REFERENCES, each large enough and not too elongated, and not mixed with
    an input image or control images (not supported with Omni yet)."""
    n = max(len(recipe.reference_images), len(recipe.reference_pixels))
    if n > MAX_REFERENCES:
        raise InputError(f"{n} reference images: at most {MAX_REFERENCES}", "reference_images")
    if len(recipe.reference_pixels) != len(recipe.reference_images):
        names = ", ".join(str(x) for x in recipe.reference_images)
        raise InputError(f"the recipe names {len(recipe.reference_images)} reference image(s) ({names}) but carries "
                         f"{len(recipe.reference_pixels)}: give them again (reference_images=...)", "reference_images")
    for k, im in enumerate(recipe.reference_pixels):
        check_reference(im, f"reference image {k + 1}")
    if recipe.has_image or recipe.controls:
        raise InputError("{reference_images} cannot be combined with an input {image} or control images yet",
                         "reference_images", ("reference_images", "image"))


def check_omni_run(recipe, dtype: str) -> None:
    """What an Omni folder's run does not support yet, refused before any work."""
    if dtype == "float16":
        raise InputError("Omni runs in float32 or bfloat16, not float16: load with dtype='bfloat16'", "dtype")
    for name in ("variety", "tile"):
        if getattr(recipe, name):
            raise InputError(f"{{{name}}} is not supported with Z-Image-Omni yet", name, (name,))


def is_omni_folder(root) -> bool:
    """Whether a checkpoint folder is Z-Image-Omni's: its model_index.json names `siglip` and `siglip_processor`."""
    import json
    from pathlib import Path

    index = Path(root) / "model_index.json"
    if not index.is_file():
        return False
    try:
        names = json.loads(index.read_text())
    except (OSError, ValueError):
        return False
    return "siglip" in names and "siglip_processor" in names
