"""LoRA fine-tuning of the Z-Image DiT in MLX: dataset, cached features, trainable LoRA layers, the loss, the
training loop, and the output file.

The math is the reference trainers' for this flow-matching model (diffusers' SD3/Flux/Z-Image DreamBooth
LoRA scripts, ai-toolkit, musubi-tuner):

  x0 = VAE posterior sample, scaled and shifted (z - shift_factor) * scaling_factor, as img2img does;
  sigma ~ density (below), then shifted like the sampler's schedule: sigma' = s sigma / (1 + (s - 1) sigma);
  x_t = (1 - sigma) x0 + sigma noise;  the DiT is called at t = 1 - sigma (it predicts x0 - noise);
  loss = mean((-DiT(x_t, t, caption) - (noise - x0))^2), the flow-matching velocity target.

Sigma densities (`weighting`): "logit_normal" draws u ~ N(logit_mean, logit_std) and sigma = sigmoid(u)
(SD3's default, diffusers `compute_density_for_timestep_sampling`); "uniform" draws sigma ~ U(0, 1). Either
is then shifted with the checkpoint's scheduler shift (3.0 for Turbo; a dynamic-shifting scheduler uses its
size-dependent mu), so training sees noise levels in the proportions the sampler visits them.

Memory: the text encoder, the VAE and the DiT are loaded one after the other (`load_for_training`): caption
features are computed once per caption and the text encoder is freed before the DiT loads; VAE latents once
per image. The base is frozen (optionally quantized: QLoRA), only the LoRA factors are trainable and AdamW
keeps state for them only, and every transformer block can be wrapped in `mx.checkpoint` so the backward
pass recomputes its activations instead of keeping them.

Randomness: every step draws its batch, noise and sigmas from a generator seeded with (seed, step), so a
resumed run (LoRA weights, AdamW state and step restored from a checkpoint) continues the same curve.

The output is one .safetensors file in the layout ai-toolkit writes and diffusers, ComfyUI and
`zimage_mlx.lora` read: `diffusion_model.<layer>.lora_A.weight` (rank, in), `.lora_B.weight` (out, rank)
and `.alpha`, with the training facts in the file's metadata.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import kernels
from ._version import __version__
from .errors import Cancelled, ZImageError  # Cancelled: also raised by Trainer.run when its cancel token is set
from .inputs import MAX_SEED
from .lora import LoraLinear, apply_lora, layer_dims, linear_layers, read_lora
from .noise import image_key
from .recipe import LoraRef, Recipe
from .transformer import ZImageTransformer
from .weights import model_label

TRAINER = f"zimage-mlx {__version__}"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
OUTPUT_PREFIX = "diffusion_model."

# Target presets. A pattern starting with ^ must match a layer's whole name (diffusers spelling, e.g.
# layers.3.attention.to_q); any other pattern matches the end of a name at a dot, as PEFT's target_modules.
_ATTN = r"attention\.(?:to_q|to_k|to_v|to_out\.0)"
_FFN = r"feed_forward\.w[123]"
TARGET_PRESETS = {
    "default": [rf"^layers\.\d+\.{_ATTN}", rf"^layers\.\d+\.{_FFN}"],
    "attention": [rf"^layers\.\d+\.{_ATTN}"],
    "ffn": [rf"^layers\.\d+\.{_FFN}"],
    # The main layers plus the refiners, and the blocks' adaLN modulation.
    "all": [rf"^(?:layers|noise_refiner|context_refiner)\.\d+\.(?:{_ATTN}|{_FFN}|adaLN_modulation\.0)"],
}


class TrainError(ZImageError):
    """A training request that cannot run: bad dataset, bad option, incompatible checkpoint."""


class TrainWarning(UserWarning):
    """Something in the dataset was skipped or replaced (an image without a caption)."""


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Every option of a training run (the CLI's flags and the --config TOML keys have these names)."""

    data: str = ""
    output: str = ""
    model: str = "Tongyi-MAI/Z-Image-Turbo"
    rank: int = 16
    alpha: float | None = None  # default: the rank (scale 1)
    targets: list[str] = field(default_factory=lambda: ["default"])
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0
    quantize: int | None = None
    dtype: str = "auto"
    adapters: list[tuple[str, float]] = field(default_factory=list)
    weighting: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    checkpointing: bool = True
    allow_empty_captions: bool = False
    sample_prompts: list[str] = field(default_factory=list)
    sample_every: int = 0
    sample_steps: int = 8
    sample_size: int | None = None  # default: the resolution
    save_every: int = 0
    resume: str | None = None
    force: bool = False

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in values if k.replace("-", "_") not in names)
        if unknown:
            raise TrainError(f"unknown training options: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**{k.replace("-", "_"): v for k, v in values.items()})

    def check(self) -> None:
        """Raise TrainError for values that cannot work, in one line."""
        def positive_int(name, v, zero=False):
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero else 1):
                raise TrainError(f"{name} must be an integer >= {0 if zero else 1}, got {v!r}")

        positive_int("rank", self.rank)
        positive_int("steps", self.steps)
        positive_int("batch_size", self.batch_size)
        positive_int("sample_every", self.sample_every, zero=True)
        positive_int("save_every", self.save_every, zero=True)
        positive_int("sample_steps", self.sample_steps)
        check_resolution(self.resolution)
        if self.sample_size is not None:
            check_resolution(self.sample_size, "sample_size")
        for name in ("lr", "weight_decay", "logit_std"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) or (name != "weight_decay" and v == 0):
                raise TrainError(f"{name} must be a positive number, got {v!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise TrainError(f"alpha must be a positive number, got {self.alpha!r}")
        if self.weighting not in ("logit_normal", "uniform"):
            raise TrainError(f"weighting must be logit_normal or uniform, got {self.weighting!r}")
        if self.quantize not in (None, 4, 8):
            raise TrainError(f"quantize must be 4 or 8, got {self.quantize!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise TrainError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not self.output or not str(self.output).endswith(".safetensors"):
            raise TrainError(f"the output must be a .safetensors file, got {self.output!r}")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def check_resolution(value, name: str = "resolution") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 16 or value % 16:
        raise TrainError(f"{name} must be a positive multiple of 16 (the VAE's 8 x the DiT's 2x2 patches), got {value!r}")


# ----------------------------------------------------------------------------------------------
# Dataset: a folder of images with same-name .txt captions, in aspect-ratio buckets


@dataclass
class Example:
    image: Path
    caption: str
    size: tuple[int, int]  # (width, height) of its bucket, multiples of 16


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (W, H) bucket of an image: multiples of 16 with about resolution^2 pixels and the image's aspect
    ratio (clamped to 1:4 .. 4:1)."""
    aspect = min(max(width / height, 0.25), 4.0)
    w = max(16, round(resolution * math.sqrt(aspect) / 16) * 16)
    h = max(16, round(resolution / math.sqrt(aspect) / 16) * 16)
    return w, h


class Dataset:
    """Examples grouped by bucket size. `from_folder` reads the mflux / ai-toolkit layout."""

    def __init__(self, examples: list[Example]):
        if not examples:
            raise TrainError("the dataset holds no examples")
        self.examples = examples
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for i, ex in enumerate(examples):
            self.buckets.setdefault(ex.size, []).append(i)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def captions(self) -> list[str]:
        return list(dict.fromkeys(ex.caption for ex in self.examples))

    @classmethod
    def from_folder(cls, folder, resolution: int = 512, allow_empty_captions: bool = False) -> "Dataset":
        """Every image in `folder` (not recursive) with the caption in the .txt file of the same name.

        An image without a caption file (or with an empty one) is skipped with a TrainWarning, or trained
        with an empty caption when allow_empty_captions is set. Raises TrainError for a missing or empty
        folder, an unreadable image, or a resolution that is not a multiple of 16.
        """
        from PIL import Image, UnidentifiedImageError

        check_resolution(resolution)
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise TrainError(f"dataset folder {folder} does not exist")
        # Hidden files are skipped: macOS leaves "._name.png" resource forks on non-Apple file systems.
        images = sorted(p for p in folder.iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
        if not images:
            raise TrainError(f"dataset folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        examples, missing = [], []
        for path in images:
            txt = path.with_suffix(".txt")
            try:
                caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
            except (OSError, UnicodeDecodeError) as e:
                raise TrainError(f"cannot read the caption {txt}: {getattr(e, 'strerror', None) or e}") from None
            if not caption:
                missing.append(path.name)
                if not allow_empty_captions:
                    continue
            try:
                with Image.open(path) as im:
                    size = im.size
                    im.verify()
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
                raise TrainError(f"cannot read the image {path}: {getattr(e, 'strerror', None) or e}") from None
            examples.append(Example(path, caption, bucket_size(*size, resolution)))
        if missing:
            what = "trained with an empty caption" if allow_empty_captions else "skipped (allow empty captions to keep them)"
            warnings.warn(TrainWarning(f"{len(missing)} of {len(images)} images have no caption (.txt) and are {what}: "
                                       f"{', '.join(missing[:3])}"), stacklevel=2)
        if not examples:
            raise TrainError(f"none of the {len(images)} images in {folder} has a caption: add same-name .txt files "
                             "or allow empty captions")
        return cls(examples)


def load_image(example: Example) -> mx.array:
    """The example's image resized to cover its bucket and centre-cropped: (1, H, W, 3) in [-1, 1]."""
    from PIL import Image, ImageOps

    from .vae import from_pil

    w, h = example.size
    with Image.open(example.image) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im = ImageOps.fit(im, (w, h), method=Image.Resampling.LANCZOS)
    return from_pil(im, w, h)


# ----------------------------------------------------------------------------------------------
# Cached inputs


@dataclass
class Cache:
    """What training reads every step: one latent per example and one feature array per caption."""

    latents: list[mx.array]  # (1, h, w, 16) float32 per example
    features: dict[str, mx.array]  # caption -> (L, cap_feat_dim)


def cache_dataset(pipe, dataset: Dataset, seed: int = 0, extra_prompts=()) -> Cache:
    """Encode every caption (and `extra_prompts`, e.g. sample prompts) once with the pipeline's text encoder,
    then free it; encode every image once with the pipeline's VAE (`encode_images`). Evaluated."""
    prompts = list(dict.fromkeys(dataset.captions + list(extra_prompts)))
    features = dict(zip(prompts, pipe.encode_prompt(prompts)))
    pipe.release_text_encoder()
    return Cache(encode_images(pipe.vae, dataset, seed), features)


def encode_images(vae, dataset: Dataset, seed: int = 0) -> list[mx.array]:
    """Every example's latents (1, h, w, 16), one at a time: the VAE posterior sampled with the img2img key
    of seed + index (noise.image_key), scaled and shifted. Evaluated."""
    latents = []
    for i, ex in enumerate(dataset.examples):
        _, z = vae.encode(load_image(ex), key=image_key((seed + i) % 2**32))
        mx.eval(z)
        latents.append(z)
    return latents


def load_for_training(config: TrainConfig, dataset: Dataset):
    """Load the models one after the other so that at most one large one is in memory at a time: the text
    encoder (captions and sample prompts encoded, then freed), the VAE (images encoded), then the DiT.
    Returns a low-memory ZImagePipeline without a text encoder (for samples) and the Cache."""
    from .pipeline import ZImagePipeline, default_dtype
    from .sampler import FlowMatchScheduler
    from .sources import read_config as read_json_config
    from .sources import resolve_model
    from .text_encoder import TextEncoder
    from .text_encoder import default_bits as text_encoder_bits
    from .vae import VAE

    root = resolve_model(config.model)
    dtype = default_dtype() if config.dtype == "auto" else config.dtype
    if mx.default_device() == mx.cpu:
        kernels.keep_freed_memory()  # as ZImagePipeline.from_pretrained does on CPU
    cap_feat_dim = read_json_config(root / "transformer").get("cap_feat_dim")
    encoder = TextEncoder.from_pretrained(root, dtype="bfloat16" if dtype == "float16" else dtype,
                                          cap_feat_dim=cap_feat_dim, quantize=text_encoder_bits(config.quantize))
    prompts = list(dict.fromkeys(dataset.captions + list(config.sample_prompts)))
    feats = encoder.encode(prompts)
    mx.eval(feats)
    encoder.release()
    del encoder
    vae = VAE.from_pretrained(root / "vae")
    latents = encode_images(vae, dataset, config.seed)
    mx.clear_cache()
    dit = ZImageTransformer.from_pretrained(root / "transformer", dtype=dtype, quantize=config.quantize)
    pipe = ZImagePipeline(dit, None, vae, FlowMatchScheduler.from_pretrained(root / "scheduler"), root=root,
                          dtype=dtype, low_memory=True, quantize=config.quantize)
    return pipe, Cache(latents, dict(zip(prompts, feats)))


# ----------------------------------------------------------------------------------------------
# Trainable LoRA layers


class TrainableLoRA(nn.Module):
    """A frozen layer with a trainable LoRA beside it: base(x) + alpha / rank * (x @ A^T) @ B^T.

    A (rank, in) and B (out, rank) are float32 whatever the base is (a bf16 or quantized base: QLoRA); they
    are cast to the input's dtype in the forward pass. Initialised as PEFT does: A uniform in
    +-1/sqrt(in) (kaiming_uniform with a = sqrt(5)), B zero, so training starts from the base model.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, key: mx.array | None = None):
        super().__init__()
        out_dim, in_dim = layer_dims(base)
        self.base = base
        bound = 1 / math.sqrt(in_dim)
        self.lora_A = mx.random.uniform(-bound, bound, (rank, in_dim), key=key)
        self.lora_B = mx.zeros((out_dim, rank))
        self.rank, self.alpha = rank, float(alpha)

    @property
    def weight(self) -> mx.array:  # for code that reads a layer's dtype from its weight (the timestep MLP)
        return self.base.weight

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = (x @ self.lora_A.astype(x.dtype).T) @ self.lora_B.astype(x.dtype).T
        return y + (self.alpha / self.rank) * z.astype(y.dtype)


def select_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """The names of the model's Linear layers matched by the patterns or presets (see TARGET_PRESETS)."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    expanded = []
    for p in patterns:
        p = p.strip()
        expanded.extend(TARGET_PRESETS.get(p, [p]))
    compiled = []
    for p in expanded:
        try:
            compiled.append(re.compile(p[1:] if p.startswith("^") else rf"(?:.*\.)?(?:{p})"))
        except re.error as e:
            raise TrainError(f"target pattern {p!r} is not a regular expression: {e}") from None
    names = [n for n in linear_layers(model) if any(c.fullmatch(n) for c in compiled)]
    if not names:
        raise TrainError(f"the targets {', '.join(patterns)} match no layer of the DiT "
                         f"(presets: {', '.join(TARGET_PRESETS)}; or patterns such as to_q or ^layers\\.0\\..*)")
    return names


def add_lora(model: nn.Module, targets, rank: int, alpha: float, seed: int = 0) -> list[str]:
    """Freeze the model and put a TrainableLoRA beside every target layer; return their names. Only the
    LoRA factors are trainable afterwards (`model.trainable_parameters()`)."""
    from .lora import _set_module

    names = select_targets(model, targets)
    layers = linear_layers(model)
    model.freeze()
    keys = mx.random.split(mx.random.key(seed), len(names))
    for name, key in zip(names, keys):
        wrapped = TrainableLoRA(layers[name], rank, alpha, key)
        wrapped.freeze()
        wrapped.unfreeze(keys=["lora_A", "lora_B"], recurse=False)
        _set_module(model, name, wrapped)
    return names


def lora_layers(model: nn.Module) -> dict[str, TrainableLoRA]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TrainableLoRA)}


def remove_lora(model: nn.Module) -> None:
    """Take the trainable LoRAs out again (the base layers go back in place)."""
    from .lora import _set_module

    for name, m in lora_layers(model).items():
        _set_module(model, name, m.base)


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing: each block recomputes its activations in the backward pass


def _checkpointed_call(self, x, rope, mask=None, adaln=None):
    plain = type(self).__bases__[0].__call__
    cos, sin = rope

    def inner(params, x, cos, sin, *adaln):
        self.update(params)
        return plain(self, x, (cos, sin), mask, adaln[0] if adaln else None)

    extra = () if adaln is None else (adaln,)
    return mx.checkpoint(inner)(self.trainable_parameters(), x, cos, sin, *extra)


_CHECKPOINTED: dict[type, type] = {}


def set_checkpointing(model: ZImageTransformer, on: bool = True) -> None:
    """Wrap (or unwrap) every transformer block of the DiT in mx.checkpoint. The blocks keep their parameter
    names; only their class changes to a subclass whose __call__ is checkpointed."""
    for block in list(model.noise_refiner) + list(model.context_refiner) + list(model.layers):
        cls = type(block)
        plain = cls.__bases__[0] if cls in _CHECKPOINTED.values() else cls
        if on:
            if plain not in _CHECKPOINTED:
                _CHECKPOINTED[plain] = type(f"Checkpointed{plain.__name__}", (plain,), {"__call__": _checkpointed_call})
            block.__class__ = _CHECKPOINTED[plain]
        else:
            block.__class__ = plain


# ----------------------------------------------------------------------------------------------
# The loss and the sigma density


def flow_loss(model: ZImageTransformer, latents: mx.array, noise: mx.array, sigmas: mx.array,
              captions: list[mx.array]) -> mx.array:
    """The flow-matching loss of one batch: latents x0 and noise (B, h, w, 16), sigmas (B,), one caption
    feature array per item. x_t = (1 - sigma) x0 + sigma noise; the DiT runs at t = 1 - sigma and predicts
    x0 - noise, so its negation is compared with the velocity noise - x0 (mean squared error, float32)."""
    s = sigmas.astype(mx.float32)[:, None, None, None]
    x0, eps = latents.astype(mx.float32), noise.astype(mx.float32)
    x_t = (1 - s) * x0 + s * eps
    pred = model(x_t, 1 - sigmas.astype(mx.float32), captions).astype(mx.float32)
    return mx.mean(mx.square(-pred - (eps - x0)))


def shift_sigmas(u: mx.array, scheduler, image_seq_len: int) -> mx.array:
    """Apply the scheduler's shift to sigmas in (0, 1): static s sigma / (1 + (s - 1) sigma), or with dynamic
    shifting e^mu / (e^mu + 1/sigma - 1), mu from the image's token count (as the sampler does)."""
    from .sampler import calculate_shift

    if scheduler.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, scheduler.base_image_seq_len, scheduler.max_image_seq_len,
                             scheduler.base_shift, scheduler.max_shift)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    s = scheduler.shift
    return s * u / (1 + (s - 1) * u)


def sample_sigmas(key: mx.array, n: int, config: TrainConfig, scheduler, image_seq_len: int) -> mx.array:
    """n training sigmas from the configured density (see the module docstring), shifted; float32 in (0, 1)."""
    if config.weighting == "uniform":
        u = mx.random.uniform(shape=(n,), key=key)
    else:
        u = mx.sigmoid(config.logit_mean + config.logit_std * mx.random.normal((n,), key=key))
    u = mx.clip(u, 1e-5, 1 - 1e-5)
    return shift_sigmas(u, scheduler, image_seq_len).astype(mx.float32)


def loss_and_grads(value_and_grad, *args):
    """Call an nn.value_and_grad of flow_loss with the kernels training needs. The graph is built during the
    call, so the switches only need to hold while it runs:
    - the CPU fast path's exp builds 2**n through a bit view, which has no derivative;
    - kernels.cut would evaluate every block's output inside the transformation, which succeeds under
      value_and_grad but keeps what each block's backward needs alive across the whole step: with the cuts,
      16 checkpointed blocks of a small DiT peaked at 1029 MB, without them at 80 MB (412 MB unchecked)."""
    fast, cut = kernels.FAST_CPU_PATH, kernels.CUT_GRAPHS
    kernels.FAST_CPU_PATH = kernels.CUT_GRAPHS = False
    try:
        return value_and_grad(*args)
    finally:
        kernels.FAST_CPU_PATH, kernels.CUT_GRAPHS = fast, cut


# ----------------------------------------------------------------------------------------------
# Output file and checkpoints


def lora_state(model: nn.Module, dtype=mx.float32) -> dict[str, mx.array]:
    """The trained LoRA in the output layout: diffusion_model.<layer>.lora_A.weight / lora_B.weight / alpha."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{OUTPUT_PREFIX}{name}.lora_A.weight"] = m.lora_A.astype(dtype)
        out[f"{OUTPUT_PREFIX}{name}.lora_B.weight"] = m.lora_B.astype(dtype)
        out[f"{OUTPUT_PREFIX}{name}.alpha"] = mx.array(m.alpha, dtype=mx.float32)
    return out


def save_atomic(path, arrays: dict[str, mx.array], metadata: dict[str, str]) -> Path:
    """Write a .safetensors file through a temporary file in the same folder and a rename, so a reader never
    sees half a file and an interrupted write leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_lora(model: nn.Module, path, config: TrainConfig, step: int, dtype=mx.float32) -> Path:
    """Write the trained LoRA (only the trainable factors: a training adapter is not part of it)."""
    layers = lora_layers(model)
    meta = {
        "format": "pt",
        "zimage_mlx.base_model": model_label(str(config.model)),  # no local path: a Hub id, or name#config-hash
        "zimage_mlx.rank": str(config.rank),
        "zimage_mlx.alpha": str(config.lora_alpha),
        "zimage_mlx.targets": json.dumps(sorted(layers)),
        "zimage_mlx.target_patterns": json.dumps(list(config.targets)),
        "zimage_mlx.steps": str(step),
        "zimage_mlx.trainer": TRAINER,
        # kohya's keys, which several UIs show
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.lora_alpha),
        "ss_base_model_version": "zimage",
    }
    return save_atomic(path, lora_state(model, dtype), meta)


# What must match for a checkpoint to continue a run.
_RESUME_KEYS = ("rank", "alpha", "targets", "lr", "weight_decay", "batch_size", "resolution", "seed", "weighting",
                "logit_mean", "logit_std", "quantize", "adapters")


def save_checkpoint(trainer: "Trainer", path) -> Path:
    """LoRA factors (float32), AdamW state, step and the run's seed (every step's randomness derives from
    (seed, step)), written atomically."""
    arrays = {f"lora.{k}": v for k, v in tree_flatten(trainer.model.trainable_parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(trainer.optimizer.state)})
    cfg = {k: getattr(trainer.config, k) for k in _RESUME_KEYS}
    meta = {"zimage_mlx.checkpoint": "1", "step": str(trainer.step), "config": json.dumps(cfg),
            "losses": json.dumps(trainer.losses), "trainer": TRAINER}
    return save_atomic(path, arrays, meta)


def load_checkpoint(trainer: "Trainer", path) -> None:
    path = Path(path).expanduser()
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise TrainError(f"cannot read checkpoint {path}: {e}") from None
    if meta.get("zimage_mlx.checkpoint") != "1":
        raise TrainError(f"{path} is not a zimage-mlx training checkpoint")
    saved = json.loads(meta["config"])
    now = json.loads(json.dumps({k: getattr(trainer.config, k) for k in _RESUME_KEYS}))
    diff = [k for k in _RESUME_KEYS if saved.get(k) != now[k]]
    if diff:
        raise TrainError(f"checkpoint {path} was made with other settings: " +
                         ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in diff))
    lora = {k.removeprefix("lora."): v for k, v in arrays.items() if k.startswith("lora.")}
    expected = {k for k, _ in tree_flatten(trainer.model.trainable_parameters())}
    if set(lora) != expected:
        raise TrainError(f"checkpoint {path} holds LoRA factors for other layers")
    trainer.model.update(tree_unflatten(list(lora.items())))
    state = tree_unflatten([(k.removeprefix("optimizer."), v) for k, v in arrays.items() if k.startswith("optimizer.")])
    trainer.optimizer.state = state
    trainer.step = int(meta["step"])
    trainer.losses = json.loads(meta.get("losses", "[]"))
    mx.eval(trainer.model.trainable_parameters(), trainer.optimizer.state)


# ----------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainStep:
    """Reported after every optimizer step."""

    step: int  # steps done so far (1-based)
    total: int
    loss: float
    seconds: float  # wall time of this step


def step_generator(seed: int, step: int) -> np.random.Generator:
    """The generator of one step's batch choice and of its noise and sigma keys."""
    return np.random.default_rng([seed, step])


class Trainer:
    """Trains a LoRA on a DiT from cached inputs. `run` (or `train_step`) moves it; `save_lora` and
    `save_checkpoint` write it. The model given is changed in place (LoRA layers added, base frozen)."""

    def __init__(self, model: ZImageTransformer, dataset: Dataset, cache: Cache, config: TrainConfig, scheduler):
        self.model, self.dataset, self.cache, self.config, self.scheduler = model, dataset, cache, config, scheduler
        self.targets = add_lora(model, config.targets, config.rank, config.lora_alpha, config.seed)
        set_checkpointing(model, config.checkpointing)
        self.optimizer = optim.AdamW(learning_rate=config.lr, weight_decay=config.weight_decay, bias_correction=True)
        self.step = 0
        self.losses: list[float] = []
        self._adapter_ups: dict[str, mx.array] = {}  # the adapters' B factors while they are switched off
        self._value_and_grad = nn.value_and_grad(model, lambda *a: flow_loss(model, *a))

    def batch(self, step: int):
        """The batch of a step: (latents, noise, sigmas, caption features), all drawn from (seed, step)."""
        rng = step_generator(self.config.seed, step)
        sizes = sorted(self.dataset.buckets)
        counts = np.array([len(self.dataset.buckets[s]) for s in sizes], dtype=np.float64)
        members = self.dataset.buckets[sizes[rng.choice(len(sizes), p=counts / counts.sum())]]
        n = self.config.batch_size
        idx = rng.choice(members, size=n, replace=len(members) < n)
        latents = mx.concatenate([self.cache.latents[i] for i in idx])
        caps = [self.cache.features[self.dataset.examples[i].caption] for i in idx]
        k_noise, k_sigma = mx.random.split(mx.random.key(int(rng.integers(2**32))))
        noise = mx.random.normal(latents.shape, key=k_noise)
        h, w = latents.shape[1:3]
        sigmas = sample_sigmas(k_sigma, n, self.config, self.scheduler, (h // 2) * (w // 2))
        return latents, noise, sigmas, caps

    def loss_and_grads(self, latents, noise, sigmas, captions):
        """The loss of a batch and its gradients with respect to the LoRA factors (lazy)."""
        return loss_and_grads(self._value_and_grad, latents, noise, sigmas, captions)

    def train_step(self) -> float:
        t0 = time.perf_counter()
        loss, grads = self.loss_and_grads(*self.batch(self.step))
        self.optimizer.update(self.model, grads)
        mx.eval(loss, self.model.trainable_parameters(), self.optimizer.state)
        self.step += 1
        self.losses.append(float(loss))
        self.last_seconds = time.perf_counter() - t0
        return self.losses[-1]

    def run(self, steps: int | None = None, on_step: Callable[[TrainStep], None] | None = None, cancel=None) -> None:
        """Train until `steps` (default: the config's) are done. on_step gets a TrainStep after each step;
        a set `cancel` (anything with is_set(), e.g. a threading.Event) raises Cancelled between steps,
        leaving the trainer consistent (save a checkpoint to resume)."""
        total = self.config.steps if steps is None else steps
        while self.step < total:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"training cancelled after step {self.step}")
            loss = self.train_step()
            if on_step is not None:
                on_step(TrainStep(self.step, total, loss, self.last_seconds))

    def set_adapters(self, enabled: bool) -> None:
        """Switch the training adapters (see add_adapters) on or off; samples are made with them off."""
        for name, m in self.model.named_modules():
            if not isinstance(m, LoraLinear):
                continue
            if not enabled and name not in self._adapter_ups:
                self._adapter_ups[name] = m.up
                m.up = mx.zeros_like(m.up)
            elif enabled and name in self._adapter_ups:
                m.up = self._adapter_ups.pop(name)

    def save_lora(self, path) -> Path:
        return save_lora(self.model, path, self.config, self.step)

    def save_checkpoint(self, path) -> Path:
        return save_checkpoint(self, path)

    def load_checkpoint(self, path) -> None:
        load_checkpoint(self, path)


def add_adapters(model: ZImageTransformer, adapters) -> int:
    """Apply training adapters (path or Hub id, scale) beside the DiT's layers (never fused, so they can be
    switched off for samples); return how many layers they touch."""
    originals: dict = {}
    n = 0
    for source, scale in adapters:
        n += apply_lora(model, read_lora(source), float(scale), originals, fuse=False)
    return n


def sample_recipes(prompts: list[str], size: int, steps: int, seed: int) -> list[Recipe]:
    """The recipes of a run's samples: prompt k at seed + k, `steps` steps, size x size, no guidance."""
    return [Recipe(prompt=p, steps=steps, seed=(seed + k) % (MAX_SEED + 1), width=size, height=size)
            for k, p in enumerate(prompts)]


def sample_images(pipe, trainer: Trainer, prompts: list[str], features: dict, size: int, steps: int, seed: int):
    """Images of the prompts with the LoRA as trained so far and the training adapters off (PIL), made by
    `pipe.run` from `sample_recipes` (each carries its recipe in `info["recipe"]`). The prompts' features
    come from `features` (encoded with the dataset), so no text encoder is loaded."""
    trainer.set_adapters(False)
    try:
        images = []
        for recipe in sample_recipes(prompts, size, steps, seed):
            pipe.cache_prompt(recipe.prompt, features[recipe.prompt], recipe.max_sequence_length)
            images.extend(pipe.run(recipe))
        return images
    finally:
        trainer.set_adapters(True)


# ----------------------------------------------------------------------------------------------
# One call: a whole run


@dataclass
class Event:
    """What `train` reports: kind "cached" (inputs encoded), "step", "sample" (paths), "checkpoint" (path),
    "done" (path of the LoRA)."""

    kind: str
    step: int
    total: int
    loss: float | None = None
    seconds: float | None = None
    paths: list[Path] = field(default_factory=list)


def checkpoint_path(output, step: int) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}-step{step:06d}.ckpt.safetensors")


def sample_dir(output) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}-samples")


def train(config: TrainConfig, on_event: Callable[[Event], None] | None = None, cancel=None, pipe=None) -> Trainer:
    """Run a whole training: read the dataset, load the models one at a time and cache the captions and
    latents (`load_for_training`; or use `pipe`, a ZImagePipeline, whose DiT is then trained in place), train,
    write samples and checkpoints as asked, and write the LoRA to config.output. On cancel (see Trainer.run)
    a checkpoint of the last step is written, then Cancelled is raised. Returns the trainer."""
    config.check()
    output = Path(config.output).expanduser()
    if output.exists() and not config.force:
        raise TrainError(f"{output} exists; choose another output or allow overwriting ({{force}})", "force",
                         ("force",))
    dataset = Dataset.from_folder(config.data, config.resolution, config.allow_empty_captions)
    if pipe is None:
        pipe, cache = load_for_training(config, dataset)
    else:
        cache = cache_dataset(pipe, dataset, config.seed, config.sample_prompts)
    emit = on_event or (lambda e: None)
    emit(Event("cached", 0, config.steps))
    if config.adapters:
        add_adapters(pipe.transformer, config.adapters)
    trainer = Trainer(pipe.transformer, dataset, cache, config, pipe.scheduler)
    if config.resume:
        trainer.load_checkpoint(config.resume)

    def on_step(s: TrainStep):
        emit(Event("step", s.step, s.total, s.loss, s.seconds))
        if config.sample_prompts and config.sample_every and s.step % config.sample_every == 0:
            write_samples(s.step)
        if config.save_every and s.step % config.save_every == 0 and s.step < s.total:
            emit(Event("checkpoint", s.step, s.total, paths=[trainer.save_checkpoint(checkpoint_path(output, s.step))]))

    def write_samples(step):
        folder = sample_dir(output)
        folder.mkdir(parents=True, exist_ok=True)
        images = sample_images(pipe, trainer, config.sample_prompts, cache.features,
                               config.sample_size or config.resolution, config.sample_steps, config.seed)
        paths = []
        for k, im in enumerate(images):
            paths.append(folder / f"step{step:06d}-{k}.png")
            recipe = im.info["recipe"]  # the LoRA being trained is named by its output file (as of this step)
            recipe = recipe.replace(loras=[*(recipe.loras or []), LoraRef(output.name, 1.0)])
            im.save(paths[-1], pnginfo=recipe.to_png())
        emit(Event("sample", step, config.steps, paths=paths))

    try:
        trainer.run(on_step=on_step, cancel=cancel)
    except Cancelled:
        path = trainer.save_checkpoint(checkpoint_path(output, trainer.step))
        emit(Event("checkpoint", trainer.step, config.steps, paths=[path]))
        raise
    trainer.save_lora(output)
    emit(Event("done", trainer.step, config.steps, paths=[output]))
    return trainer


def read_config(path) -> dict:
    """A TOML file's training options (the same names as the CLI's long options, with - or _)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise TrainError("reading a TOML config needs Python 3.11, or `pip install tomli` on 3.10") from None
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise TrainError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise TrainError(f"config file {path} is not valid TOML: {e}") from None


__all__ = ["TrainConfig", "Dataset", "Example", "Cache", "cache_dataset", "TrainableLoRA", "add_lora", "select_targets",
           "set_checkpointing", "flow_loss", "sample_sigmas", "Trainer", "TrainStep", "train", "Event", "save_lora",
           "Cancelled", "TrainError", "TrainWarning"]
