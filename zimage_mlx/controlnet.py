"""alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union (1.0, 2.0, 2.1, 2.1 lite, Tile 2.1) in MLX.

Follows diffusers' `models/controlnets/controlnet_z_image.py` (ZImageControlNetModel) and its pipelines
`pipeline_z_image_controlnet{,_inpaint}.py`; the authors' graph is VideoX-Fun's
`z_image_transformer2d_control.py`.

A ControlNet owns only its control modules: a patch embedder for the control latents (16 channels in 1.0,
33 in 2.x: control latents, an inpainting keep mask, masked-image latents), `control_layers` (modulated
DiT blocks with a zero-initialised `after_proj` each, and a `before_proj` on block 0 that adds the base
stream into the control stream) and `control_noise_refiner`. Everything else (timestep embedding, patch
embedding, refiners, RoPE, pad tokens) is the DiT's own: the DiT passes itself and its intermediate
streams to the per-step `Control` hook, so nothing is copied, saved or quantized twice, and a LoRA on the
DiT acts on the ControlNet's use of those modules too (as in diffusers, where they are shared by reference).

Per step, the control tokens (embedded once per image) run through the control blocks beside the DiT:
- refiner stage, over the image tokens. 1.0: two plain blocks, no residuals. 2.1: two control blocks
  whose residuals go after the DiT's two noise-refiner blocks. 2.0 (trained with this graph): the
  `control_layers` themselves run here, their first two residuals used and its unused
  `control_noise_refiner` (zero `before_proj`) ignored;
- main stage, over [control tokens, caption tokens] with the DiT's unified sequence as block 0's input:
  control block k's residual is added after DiT layer `places[k]`, the places spread evenly from layer 0.

The two 2.x graphs (the `graph` switch). diffusers adds the refiner-stage residuals only to a private
copy of the noise-refiner stream that feeds the control blocks; the DiT's own stream never sees them.
VideoX-Fun, the code the weights were trained with, adds them to the DiT's stream (which then feeds
both the 30 layers and the control blocks). The default is therefore "authors"; "diffusers" exists for
parity with diffusers (our tests) and costs two more refiner blocks per step. For 1.0 both are the same.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .errors import InputError
from .inputs import mask_latents, open_image
from .sources import resolve_controlnet
from .transformer import (DEFAULT_GROUP_SIZE, TransformerArgs, TransformerBlock, ZImageTransformer, padded, patchify,
                          quant_predicate as dit_quant_predicate)
from .weights import (CheckpointError, check_quantization, load_into, load_safetensors, quantize_as_stored,
                      quantize_model, to_dtype)

GRAPHS = ("authors", "diffusers")
# The authors' example scales (VideoX-Fun examples/z_image_fun): 0.75 for 1.0 and 2.0, 0.90 for 2.1 and
# lite at 8 steps (Tile 2.1 uses 0.85 but has the 2.1 layout, so it cannot be told apart by its keys).
RECOMMENDED_SCALE = {"1.0": 0.75, "2.0": 0.75, "2.1": 0.9}
# The steps the authors' examples use: 9 for 1.0, 25 for 2.0 (not distilled), 8 for the 2.1 8-step files.
RECOMMENDED_STEPS = {"1.0": 9, "2.0": 25, "2.1": 8}

# Quantization policy, by analogy with the DiT's (transformer.QUANT_KEEP / QUANT_MIN_BITS; not measured
# separately): the patch embedder stays in the compute dtype (2.x's 132-wide one cannot be grouped by 64
# anyway), and the adaLN modulation and the before/after projections, which scale what is added to the
# DiT's stream, get at least 8 bits.
QUANT_KEEP = ("control_all_x_embedder.",)
QUANT_MIN_BITS = {"adaLN_modulation": 8, "before_proj": 8, "after_proj": 8}


def quant_predicate(bits: int, group_size: int = DEFAULT_GROUP_SIZE):
    """The ControlNet's quantization policy as an `nn.quantize` class_predicate (see transformer.quant_predicate)."""
    return dit_quant_predicate(bits, group_size, keep=QUANT_KEEP, min_bits=QUANT_MIN_BITS)


@dataclass
class ControlNetArgs:
    version: str  # "1.0", "2.0" or "2.1" (2.1 covers lite, Tile and the 8-step files: same layout)
    in_dim: int  # channels of the control context: 16 (1.0) or 33 (2.x)
    places: tuple[int, ...]  # the DiT layer after which each control block's residual is added
    refiner: str  # "plain" (1.0), "control_layers" (2.0) or "control_noise_refiner" (2.1)
    n_layers: int  # the base DiT's layer count the places are spread over

    @property
    def name(self) -> str:
        lite = self.version == "2.1" and len(self.places) < self.n_layers // 2
        return f"Union {self.version}{' lite' if lite else ''} ({len(self.places)} control blocks)"

    @property
    def scale(self) -> float:
        return RECOMMENDED_SCALE[self.version]

    def to_dict(self) -> dict:
        return {"version": self.version, "control_in_dim": self.in_dim, "control_layers_places": list(self.places),
                "refiner": self.refiner}


_INDEXED = re.compile(r"^(control_layers|control_noise_refiner)\.(\d+)\.(.+)$")


def detect(weights: dict, dit: TransformerArgs, what: str = "ControlNet") -> ControlNetArgs:
    """Infer the layout from the keys and shapes of a ControlNet state dict (never from a file name).

    1.0: a 16-channel embedder and a plain control_noise_refiner. 2.x: a 2*16+1 = 33-channel embedder; 2.1 has
    control_noise_refiner blocks with projections, 2.0 has them with an all-zero (untrained) before_proj, or
    none (diffusers drops them). The n control blocks sit after layers 0, L/n, 2L/n, ... of the DiT's L layers
    (n must divide L): 15 -> [0, 2, ..., 28], 6 -> [0, 5, ..., 25], lite's 3 -> [0, 10, 20] for L = 30.
    Anything else is refused with a CheckpointError.
    """
    emb = weights.get("control_all_x_embedder.2-1.weight")
    if emb is None or "control_layers.0.after_proj.weight" not in weights:
        if any(k.startswith(("layers.", "model.diffusion_model.", "noise_refiner.")) for k in weights):
            raise CheckpointError(f"{what} is a Z-Image DiT checkpoint, not a ControlNet")
        raise CheckpointError(f"{what} is not a Z-Image ControlNet Union file (no control_all_x_embedder.2-1 / "
                              "control_layers.0.after_proj weights)")
    blocks: dict[str, dict[int, set[str]]] = {"control_layers": {}, "control_noise_refiner": {}}
    for key in weights:
        m = _INDEXED.match(key)
        if m:
            blocks[m.group(1)].setdefault(int(m.group(2)), set()).add(m.group(3))
    if emb.ndim != 2 or emb.shape[1] % 4:
        raise CheckpointError(f"{what}: control_all_x_embedder.2-1.weight has shape {tuple(emb.shape)}, "
                              "not (dim, 4 x channels)")
    if emb.shape[0] != dit.dim:
        raise CheckpointError(f"{what} is for a model of width {emb.shape[0]}; this DiT has width {dit.dim}")
    in_dim, C = emb.shape[1] // 4, dit.in_channels
    n = len(blocks["control_layers"])
    if sorted(blocks["control_layers"]) != list(range(n)):
        raise CheckpointError(f"{what}: control_layers indices {sorted(blocks['control_layers'])} are not 0..{n - 1}")
    if dit.n_layers % n:
        raise CheckpointError(f"{what} has {n} control blocks, which cannot be spread evenly over this DiT's "
                              f"{dit.n_layers} layers: it is not a ControlNet for this model")
    for i, names in blocks["control_layers"].items():
        if ("before_proj.weight" in names) != (i == 0) or "after_proj.weight" not in names:
            raise CheckpointError(f"{what}: control_layers.{i} does not have the projections of a Union control block")
    refiner = blocks["control_noise_refiner"]
    with_proj = any("after_proj.weight" in names for names in refiner.values())
    if refiner and sorted(refiner) != list(range(dit.n_refiner_layers)):
        raise CheckpointError(f"{what}: control_noise_refiner has blocks {sorted(refiner)}, this DiT has "
                              f"{dit.n_refiner_layers} refiner layers")
    if in_dim == C:
        if not refiner or with_proj:
            raise CheckpointError(f"{what}: a 16-channel (Union 1.0) ControlNet needs a plain control_noise_refiner")
        version, kind = "1.0", "plain"
    elif in_dim == 2 * C + 1:
        if refiner and not with_proj:
            raise CheckpointError(f"{what}: a 33-channel (Union 2.x) ControlNet with a plain control_noise_refiner")
        zero = refiner and not bool(mx.any(weights["control_noise_refiner.0.before_proj.weight"] != 0).item())
        version, kind = ("2.0", "control_layers") if not refiner or zero else ("2.1", "control_noise_refiner")
        if kind == "control_layers" and n < dit.n_refiner_layers:
            raise CheckpointError(f"{what}: a Union 2.0 layout needs at least {dit.n_refiner_layers} control blocks")
    else:
        raise CheckpointError(f"{what}: a control context of {in_dim} channels matches no Union version "
                              f"({C} for 1.0, {2 * C + 1} for 2.x)")
    stride = dit.n_layers // n
    return ControlNetArgs(version, in_dim, tuple(range(0, dit.n_layers, stride)), kind, dit.n_layers)


class ControlBlock(TransformerBlock):
    """A modulated DiT block on the control stream, with a zero-initialised after_proj that makes its residual;
    block 0 also has before_proj, through which the control tokens enter: c = before_proj(c) + x."""

    def __init__(self, args: TransformerArgs, first: bool):
        super().__init__(args, modulation=True)
        if first:
            self.before_proj = nn.Linear(args.dim, args.dim)
        self.after_proj = nn.Linear(args.dim, args.dim)

    def __call__(self, c, x, rope, mask, adaln):
        """Returns (new control state, residual). x (the base stream) is read by block 0 only."""
        if "before_proj" in self:
            c = self.before_proj(c) + x
        c = super().__call__(c, rope, mask, adaln)
        return c, self.after_proj(c)


class ControlNet(nn.Module):
    """A Union ControlNet's own modules. Build with `from_pretrained`; per step, `Control` runs it beside the DiT."""

    def __init__(self, args: ControlNetArgs, dit: TransformerArgs, graph: str | None = None):
        super().__init__()
        self.args = args
        self.graph = _check_graph(graph)
        self.control_all_x_embedder = {"2-1": nn.Linear(4 * args.in_dim, dit.dim)}
        self.control_layers = [ControlBlock(dit, first=i == 0) for i in range(len(args.places))]
        if args.refiner == "control_noise_refiner":
            self.control_noise_refiner = [ControlBlock(dit, first=j == 0) for j in range(dit.n_refiner_layers)]
        elif args.refiner == "plain":
            self.control_noise_refiner = [TransformerBlock(dit, modulation=True) for _ in range(dit.n_refiner_layers)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.control_all_x_embedder["2-1"].weight.dtype

    def embed(self, dit: ZImageTransformer, context: mx.array) -> mx.array:
        """Control latents (K, h, w, in_dim) -> control tokens (K, padded(h/2 * w/2), dim), padded with the DiT's
        x_pad_token as its image tokens are (the step-invariant part of the ControlNet: computed once)."""
        if context.shape[-1] != self.args.in_dim:
            raise ValueError(f"control context has {context.shape[-1]} channels, this ControlNet takes {self.args.in_dim}")
        tokens = self.control_all_x_embedder["2-1"](patchify(context.astype(self.dtype)))  # (K, N, dim)
        K, N, dim = tokens.shape
        if padded(N) > N:
            pad = mx.broadcast_to(dit.x_pad_token.astype(tokens.dtype), (K, padded(N) - N, dim))
            tokens = mx.concatenate([tokens, pad], axis=1)
        return tokens

    @classmethod
    def from_pretrained(cls, source, dit: ZImageTransformer | TransformerArgs, *, graph: str | None = None, dtype=None,
                        quantize: int | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> "ControlNet":
        """Load a ControlNet for `dit`: a .safetensors file (the released single files), a folder (diffusers'
        save_pretrained, or `zimage-mlx convert --controlnet`, quantized or not), a Hub repo id holding one
        .safetensors file, or `owner/repo/file.safetensors` (the alibaba-pai repos hold several variants: name
        one). The layout is read from the weights (`detect`); a file for another model is refused. `dit` is the
        DiT it runs with (or just its TransformerArgs, to check or inspect a file).

        graph: "authors" (default: the graph the weights were trained with) or "diffusers" (parity with
        diffusers); see the module docstring. dtype: the compute dtype (default: the DiT's). quantize: bits to
        quantize a float file to on the fly with `quant_predicate`.
        """
        dit_args = dit if isinstance(dit, TransformerArgs) else dit.args
        dtype = dtype if dtype is not None else "float32" if isinstance(dit, TransformerArgs) else dit.dtype
        what = f"ControlNet {source}"
        weights, config = read_controlnet(source)
        model, weights = cls.build(weights, dit_args, what, graph)
        if quantize is not None:
            check_quantization(quantize, group_size)
        stored = quantize_as_stored(model, weights, config or {}, what, quantize)
        load_into(model, weights, what, to_dtype(dtype))
        del weights
        if quantize is not None and stored is None:
            quantize_model(model, quant_predicate(quantize, group_size))
        return model


    @classmethod
    def build(cls, weights: dict, dit: TransformerArgs, what: str = "ControlNet", graph: str | None = None):
        """The module for a state dict's layout (not loaded), and the weights it takes (2.0's untrained
        control_noise_refiner dropped, as diffusers drops it)."""
        args = detect(weights, dit, what)
        if args.refiner == "control_layers":
            weights = {k: w for k, w in weights.items() if not k.startswith("control_noise_refiner.")}
        return cls(args, dit, graph), weights


def read_controlnet(source) -> tuple[dict[str, mx.array], dict | None]:
    """A ControlNet's tensors (lazily) and config.json (if it has one); see `sources.resolve_controlnet`."""
    files, config = resolve_controlnet(source)
    return load_safetensors(files), config


def _check_graph(graph: str | None) -> str:
    if graph is None:
        return "authors"
    if graph not in GRAPHS:
        raise InputError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    return graph


# ----------------------------------------------------------------------------------------------
# The per-step hook the DiT calls (see ZImageTransformer.__call__)


class Control:
    """K control contexts of one ControlNet for one DiT forward: the K x B control streams run as one batch
    (k-major: control k, item b is row k * B + b), and each DiT block gets sum_k scale_k * residual_k.

    tokens: (K, L_img, dim) from `ControlNet.embed`; scales: K floats. `record`, if set to a dict, receives
    every residual added to a main DiT layer by its index (tests compare them with diffusers').
    """

    def __init__(self, net: ControlNet, tokens: mx.array, scales: list[float]):
        self.net, self.tokens, self.scales = net, tokens, list(scales)
        self.record: dict | None = None
        self._state = self._private = None

    def _tile(self, a: mx.array) -> mx.array:  # (B, ...) -> (K * B, ...), k-major
        K = len(self.scales)
        return a if K == 1 else mx.concatenate([a] * K)

    def _scaled(self, hint: mx.array, B: int) -> list[mx.array]:
        """Each control's residual times its scale: K arrays (B, L, dim)."""
        return [hint[k * B:(k + 1) * B] * s for k, s in enumerate(self.scales)]

    @staticmethod
    def _sum(parts: list[mx.array]) -> mx.array:
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    def refiner(self, dit: ZImageTransformer, img, rope, adaln):
        net, B = self.net, img.shape[0]
        rope_k, adaln_k = tuple(self._tile(r) for r in rope), self._tile(adaln)
        c = mx.concatenate([mx.broadcast_to(self.tokens[k:k + 1], (B, *self.tokens.shape[1:]))
                            for k in range(len(self.scales))]).astype(img.dtype)  # (K * B, L_img, dim)
        if net.args.refiner == "plain":  # 1.0: plain blocks over the control tokens, no residuals
            for block in net.control_noise_refiner:
                c = kernels.cut(block(c, rope_k, None, adaln_k))
            self._state = c
            return None
        blocks = net.control_layers if net.args.refiner == "control_layers" else net.control_noise_refiner
        x_k, hints = self._tile(img), []
        for j, block in enumerate(blocks):
            c, hint = block(c, x_k, rope_k, None, adaln_k)
            c = kernels.cut(c)
            if j < len(dit.noise_refiner):  # refiner places are [0, 1]; 2.0's other 13 residuals are unused
                hints.append(self._scaled(hint, B))
        self._state = c
        if net.graph == "authors":  # into the DiT's own stream
            return iter([(j, self._sum(h)) for j, h in enumerate(hints)])
        # diffusers: a private copy of the noise-refiner stream (each control with its own residuals) feeds
        # the control blocks; the DiT's stream is left alone.
        x = x_k
        for j, block in enumerate(dit.noise_refiner):
            x = block(x, rope_k, None, adaln_k)
            if j < len(hints):
                x = x + mx.concatenate(hints[j])
            x = kernels.cut(x)
        self._private = x
        return None

    def main(self, dit: ZImageTransformer, unified, rope, mask, adaln):
        net, B, n_img = self.net, unified.shape[0], self.tokens.shape[1]
        unified_k = self._tile(unified)
        if self._private is not None:  # diffusers' graph: the control blocks read the private stream
            unified_k = mx.concatenate([self._private, unified_k[:, n_img:]], axis=1)
        c = mx.concatenate([self._state, unified_k[:, n_img:]], axis=1)  # [control tokens, caption tokens]
        rope_k, adaln_k = tuple(self._tile(r) for r in rope), self._tile(adaln)
        mask_k = None if mask is None else self._tile(mask)
        self._state = self._private = None

        def residuals():
            nonlocal c
            for place, block in zip(net.args.places, net.control_layers):
                c, hint = block(c, unified_k, rope_k, mask_k, adaln_k)
                c = kernels.cut(c)
                res = self._sum(self._scaled(hint, B))
                if self.record is not None:
                    self.record[place] = res
                yield place, res

        return residuals()


# ----------------------------------------------------------------------------------------------
# Pipeline side: checking the inputs, making the control contexts, choosing the controls of each step


@dataclass
class ControlInputs:
    """Control images opened and checked (no model needed), with their scales (None: the ControlNet's default)."""

    images: list
    scales: list[float | None]
    start: float
    end: float


def control_inputs(control_image, control_scale=None, start: float = 0.0, end: float = 1.0) -> ControlInputs:
    """Check generate's control arguments: images (a path, a PIL image or a list of them), a scale or one per
    image, and the window [start, end] as fractions of the steps. Raises InputError/TypeError in one line."""
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if not images or any(im is None for im in images):
        raise InputError("control_image must be an image or a non-empty list of images")
    images = [open_image(im, "control image") for im in images]
    scales = list(control_scale) if isinstance(control_scale, (list, tuple)) else [control_scale] * len(images)
    if len(scales) != len(images):
        raise InputError(f"{len(scales)} control scales for {len(images)} control images")
    for s in scales:
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)
                              or not -2 <= s <= 2):
            raise InputError(f"control scale must be a number in [-2, 2] (0.65-1 is the useful range), got {s!r}")
    for name, v in (("control_start", start), ("control_end", end)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise InputError(f"{name} must be a number in [0, 1], got {v!r}")
    if start >= end:
        raise InputError(f"control_start ({start}) must be below control_end ({end})")
    return ControlInputs(images, [None if s is None else float(s) for s in scales], float(start), float(end))


class ControlPlan:
    """The controls of one generate call: their tokens (embedded once) and scales, and the step window."""

    def __init__(self, net: ControlNet, tokens: mx.array, scales: list[float], start: float, end: float):
        self.net, self.tokens, self.scales, self.start, self.end = net, tokens, scales, start, end

    def at(self, i: int, total: int) -> Control | None:
        """The hook for step i of total, or None when no control acts (outside the window, or all scales 0):
        step i is controlled unless i / total < start or (i + 1) / total > end."""
        if i / total < self.start or (i + 1) / total > self.end + 1e-9:
            return None
        active = [k for k, s in enumerate(self.scales) if s != 0]
        if not active:
            return None
        tokens = self.tokens if len(active) == len(self.scales) else self.tokens[mx.array(active)]
        return Control(self.net, tokens, [self.scales[k] for k in active])


def control_contexts(vae, net: ControlNet, images: list, width: int, height: int, *, image=None, mask=None) -> mx.array:
    """The control contexts (K, h, w, in_dim): each control image converted to RGB, stretched to width x height
    (Lanczos, aspect ratio not kept, as diffusers), encoded to the VAE posterior's mode and scaled.
    2.x: 17 more channels, [keep mask (1), masked-image latents (16)], as diffusers' ControlNet pipelines:
    zeros without a mask (text-to-image, image-to-image); with a mask (1 = repaint) and the image, the
    latent-grid keep mask and the latents of the image with the repainted pixels set to 0 (mid-grey)."""
    from .vae import from_pil

    h, w, C = height // 8, width // 8, net.args.in_dim
    lat = mx.concatenate([vae.encode(from_pil(im, width, height))[0] for im in images])  # (K, h, w, 16)
    if C == lat.shape[-1]:
        return lat
    K = lat.shape[0]
    if mask is None:
        return mx.concatenate([lat, mx.zeros((K, h, w, C - lat.shape[-1]), dtype=lat.dtype)], axis=-1)
    if image is None:
        raise InputError("ControlNet inpainting needs the image itself (image=...), not only its latents")
    repaint = mask_latents(mask, width, height, scale=1)  # (1, H, W, 1) at full size, 1 = repaint
    masked = vae.encode(from_pil(image, width, height) * (1 - repaint))[0]  # (1, h, w, 16)
    keep = 1 - mask_latents(mask, width, height, scale=8)  # (1, h, w, 1)
    extra = mx.concatenate([keep, masked], axis=-1).astype(lat.dtype)
    return mx.concatenate([lat, mx.broadcast_to(extra, (K, h, w, extra.shape[-1]))], axis=-1)


def plan(pipe, inputs: ControlInputs, width: int, height: int, init=None) -> ControlPlan:
    """Encode and embed the controls of a generate call (one VAE encode per control image, once)."""
    net = pipe.controlnet
    if net is None:
        raise InputError("control_image needs a ControlNet: call load_controlnet(...) first")
    image = mask = None
    if init is not None and init.mask is not None:
        image, mask = init.image, init.mask
    context = control_contexts(pipe.vae, net, inputs.images, width, height, image=image, mask=mask)
    tokens = net.embed(pipe._dit(), context)
    mx.eval(tokens)
    scales = [net.args.scale if s is None else s for s in inputs.scales]
    return ControlPlan(net, tokens, scales, inputs.start, inputs.end)


# ----------------------------------------------------------------------------------------------
# Control maps from photos (optional: OpenCV, `pip install zimage-mlx[control]`)

CONTROL_TYPES = ("none", "canny", "lines")


def control_refs(controls, kind: str = "none", width: int | None = None, height: int | None = None,
                 init_size: tuple[int, int] | None = None) -> list:
    """Opened control images [(name, scale, PIL image)] as a Recipe's `controls`: each made into a map of
    `kind` (`control_map`) at the output size, as the Recipe settles it: width x height, a missing side from
    the input image's size (`init_size`), else from the first control image's (`inputs.output_size`). The
    CLI and the server both build their controls here, so a control image gives the same map either way."""
    from .inputs import output_size
    from .recipe import ControlRef

    if not controls:
        return []
    size = init_size if init_size is not None else controls[0][2].size
    width, height = output_size(size, width, height)
    return [ControlRef(name, scale, control_map(image, kind, width, height)) for name, scale, image in controls]


def control_map(image, kind: str, width: int, height: int):
    """A control map computed from a photo at the output size: "canny" (the authors' annotator: OpenCV Canny
    100/200 on the grey image, white edges on black) or "lines" (OpenCV's LSD line segments drawn 1 px wide,
    a stand-in for the MLSD maps the model was trained with); "none" returns the image as it is.
    The photo is resized (Lanczos) before the map is made, so thin lines stay sharp (resizing a map blurs them).
    Depth and pose maps come from the user."""
    from PIL import Image

    if kind not in CONTROL_TYPES:
        raise InputError(f"control type must be one of {', '.join(CONTROL_TYPES)}, got {kind!r}")
    if kind == "none":
        return image
    try:
        import cv2
    except ImportError:
        raise InputError(f"control type {kind} needs OpenCV: pip install 'zimage-mlx[control]'") from None
    import numpy as np

    grey = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS).convert("L"))
    if kind == "canny":
        out = cv2.Canny(grey, 100, 200)
    else:
        out = np.zeros_like(grey)
        lines = cv2.createLineSegmentDetector().detect(grey)[0]
        for x0, y0, x1, y1 in ([] if lines is None else lines.reshape(-1, 4)):
            cv2.line(out, (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1))), 255, 1)
    return Image.fromarray(out).convert("RGB")
