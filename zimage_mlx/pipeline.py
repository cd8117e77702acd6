"""ZImagePipeline: prompt in, images out, with the three models held in memory between calls.

Follows diffusers' `pipelines/z_image/pipeline_z_image.py`: the prompt is encoded by Qwen3 (second to
last hidden state), float32 noise is denoised by flow-match Euler with the DiT's prediction negated,
and the FLUX VAE decodes. Work is lazy: the pipeline evaluates once after encoding and once per step.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx

from .sampler import FlowMatchScheduler, apply_cfg, euler_step, guidance_for_step, model_time
from .text_encoder import TextEncoder
from .transformer import ZImageTransformer
from .vae import VAE, to_pil
from .weights import resolve_model

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
LATENT_CHANNELS = 16
MAX_SEED = 2**32 - 1


def default_dtype() -> str:
    """bfloat16 on an Apple GPU; float32 on CPU, where MLX's bfloat16 matmul is slow."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


@dataclass
class Step:
    """The state after one denoising step; `denoised` (the x0 estimate) is lazy and free unless used."""

    index: int  # 0-based index of the step just taken
    total: int
    sigma: float  # the sigma this step started from
    latents: mx.array  # (B, h, w, 16) float32, after the step
    denoised: mx.array  # (B, h, w, 16) x + sigma * prediction at the step's start


class ZImagePipeline:
    """Z-Image text-to-image. Load once with `from_pretrained`, then call `generate` as often as needed."""

    def __init__(self, transformer: ZImageTransformer, text_encoder: TextEncoder | None, vae: VAE,
                 scheduler: FlowMatchScheduler, *, root: Path, dtype: str, low_memory: bool = False,
                 quantize: int | None = None):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae
        self.scheduler = scheduler
        self.root = Path(root)
        self.dtype = dtype
        self.low_memory = low_memory
        self.quantize = quantize
        self._prompt_cache: OrderedDict[tuple[str, int], mx.array] = OrderedDict()

    @classmethod
    def from_pretrained(cls, model=DEFAULT_MODEL, dtype: str = "auto", quantize: int | None = None,
                        low_memory: bool = False) -> "ZImagePipeline":
        """Load a checkpoint folder (diffusers layout, or one written by `zimage-mlx convert`) or a Hub id.

        dtype: "auto" (bfloat16 on an Apple GPU, float32 on CPU), "bfloat16", "float16" or "float32".
        quantize: 4 or 8 to quantize the DiT and text encoder on the fly (the VAE never is).
        low_memory: load the text encoder only while encoding and free it before denoising, and decode
        the VAE in tiles; a little slower, a much lower peak.
        """
        root = resolve_model(model)
        dtype = default_dtype() if dtype == "auto" else dtype
        if quantize is not None:
            raise NotImplementedError("on-the-fly quantization is not available yet")
        transformer = ZImageTransformer.from_pretrained(root / "transformer", dtype=dtype)
        vae = VAE.from_pretrained(root / "vae")
        scheduler = FlowMatchScheduler.from_pretrained(root / "scheduler")
        pipe = cls(transformer, None, vae, scheduler, root=root, dtype=dtype, low_memory=low_memory,
                   quantize=quantize)
        if not low_memory:
            pipe.text_encoder = pipe._load_text_encoder()
        return pipe

    def _load_text_encoder(self) -> TextEncoder:
        # Qwen3 overflows float16; the text encoder runs once per prompt, so it gets bfloat16 instead.
        dtype = "bfloat16" if self.dtype == "float16" else self.dtype
        return TextEncoder.from_pretrained(self.root, dtype=dtype, cap_feat_dim=self.transformer.args.cap_feat_dim)

    # ------------------------------------------------------------------------------------------
    # Stages

    def encode_prompt(self, prompt: str | list[str], max_sequence_length: int = 512) -> list[mx.array]:
        """Caption features, one (L_i, cap_feat_dim) array per prompt (valid tokens only), evaluated.

        Recently used prompts come from a small cache, so an app that varies only the seed pays once.
        """
        prompts = _check_prompts(prompt, "prompt")
        todo = [p for p in dict.fromkeys(prompts) if (p, max_sequence_length) not in self._prompt_cache]
        if todo:
            encoder = self.text_encoder
            if encoder is None:
                encoder = self._load_text_encoder()
            feats = encoder.encode(todo, max_sequence_length=max_sequence_length)
            mx.eval(feats)
            if self.text_encoder is None:
                encoder.release()
            for p, f in zip(todo, feats):
                self._prompt_cache[(p, max_sequence_length)] = f
        out = []
        for p in prompts:
            self._prompt_cache.move_to_end((p, max_sequence_length))
            out.append(self._prompt_cache[(p, max_sequence_length)])
        while len(self._prompt_cache) > 32:
            self._prompt_cache.popitem(last=False)
        return out

    def release_text_encoder(self) -> None:
        """Free the text encoder's weights; later prompts load it again for the time they are encoded."""
        if self.text_encoder is not None:
            self.text_encoder.release()
            self.text_encoder = None
        mx.clear_cache()

    def sigmas(self, steps: int, height: int, width: int) -> list[float]:
        seq_len = (height // 16) * (width // 16)
        return [float(s) for s in self.scheduler.sigmas(steps, seq_len)]

    def denoise(self, prompt_embeds: list[mx.array], latents: mx.array, sigmas: list[float], *,
                negative_embeds: list[mx.array] | None = None, guidance: float = 0.0,
                cfg_normalization: float | bool = False, cfg_truncation: float = 1.0) -> Iterator[Step]:
        """Run the sampler, yielding a `Step` after each DiT step (len(sigmas) - 1 of them).

        prompt_embeds: one caption per latent; latents: (B, h, w, 16) float32 noise at sigmas[0].
        With guidance > 0, negative_embeds (one per latent) give CFG as diffusers defines it:
        pos + guidance * (pos - neg); the positive and negative branches run as one batch.
        """
        B = latents.shape[0]
        if len(prompt_embeds) != B or (negative_embeds is not None and len(negative_embeds) != B):
            raise ValueError("need one prompt embedding (and one negative) per latent")
        x = latents.astype(mx.float32)
        total = len(sigmas) - 1
        for i in range(total):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            g = guidance_for_step(guidance, sigma, cfg_truncation) if negative_embeds is not None else 0.0
            t = mx.full((B,), model_time(sigma), dtype=mx.float32)
            if g > 0:
                both = self.transformer(mx.concatenate([x, x]), mx.concatenate([t, t]),
                                        list(prompt_embeds) + list(negative_embeds))
                pred = apply_cfg(both[:B], both[B:], g, cfg_normalization)
            else:
                pred = self.transformer(x, t, prompt_embeds).astype(mx.float32)
            denoised = x + sigma * pred
            x = euler_step(x, pred, sigma, sigma_next)
            mx.eval(x)
            yield Step(i, total, sigma, x, denoised)

    def decode(self, latents: mx.array, tile_size: int | None = None):
        """Latents (B, h, w, 16) to PIL images."""
        if tile_size is None and self.low_memory:
            tile_size = self.low_memory_tile_size
        return to_pil(self.vae.decode(latents, tile_size=tile_size))

    low_memory_tile_size = 64  # latent pixels (512 image pixels) per tile side in low-memory mode

    def preview(self, step: Step):
        """Decode a step's x0 estimate: what the image is becoming, for an app to show while it waits."""
        return self.decode(step.denoised)

    # ------------------------------------------------------------------------------------------
    # The one call

    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, width: int = 1024,
                 height: int = 1024, steps: int = 8, guidance: float = 0.0, cfg_normalization: float | bool = False,
                 cfg_truncation: float = 1.0, seed: int | None = None, num_images: int = 1,
                 latents: mx.array | None = None, callback: Callable[[int, int, mx.array], None] | None = None,
                 max_sequence_length: int = 512):
        """Generate images; returns a list of PIL images, prompt-major (all images of prompt 0 first).

        Image k uses the noise of seed + k, so any image of a batch can be made again alone. With
        seed=None a seed is drawn; each image's seed is in `image.info["seed"]`. `latents` (B, h, w, 16)
        float32 replaces the noise (B = prompts x num_images). `callback(step, total, latents)` runs
        after every step (step counts from 1).
        """
        prompts = _check_prompts(prompt, "prompt")
        validate(width=width, height=height, steps=steps, guidance=guidance, num_images=num_images, seed=seed)
        negatives = None
        if guidance > 0:
            negatives = _check_prompts("" if negative_prompt is None else negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        elif negative_prompt:
            raise ValueError("negative_prompt needs guidance > 0 (Turbo runs without CFG; try --guidance 4 with the Base model)")
        h, w = height // 8, width // 8
        B = len(prompts) * num_images
        self.transformer.check_sizes(h, w, [1])
        if latents is not None:
            if tuple(latents.shape) != (B, h, w, LATENT_CHANNELS):
                raise ValueError(f"latents must have shape {(B, h, w, LATENT_CHANNELS)}, got {tuple(latents.shape)}")
            seeds = [None] * B
        else:
            seed = random.randint(0, MAX_SEED) if seed is None else seed
            seeds = [(seed + k) % (MAX_SEED + 1) for k in range(B)]
            latents = mx.concatenate([noise(s, h, w) for s in seeds])

        feats = self.encode_prompt(prompts + (negatives or []), max_sequence_length)
        pos = [f for f in feats[: len(prompts)] for _ in range(num_images)]
        neg = [f for f in feats[len(prompts):] for _ in range(num_images)] if negatives else None
        if self.low_memory:
            self.release_text_encoder()

        for step in self.denoise(pos, latents, self.sigmas(steps, height, width), negative_embeds=neg,
                                 guidance=guidance, cfg_normalization=cfg_normalization,
                                 cfg_truncation=cfg_truncation):
            latents = step.latents
            if callback is not None:
                callback(step.index + 1, step.total, latents)
        images = self.decode(latents)
        for k, image in enumerate(images):
            if seeds[k] is not None:
                image.info["seed"] = seeds[k]
        return images


def noise(seed: int, h: int, w: int) -> mx.array:
    """The initial noise for one image: (1, h, w, 16) float32 from mx.random.key(seed)."""
    return mx.random.normal((1, h, w, LATENT_CHANNELS), dtype=mx.float32, key=mx.random.key(seed))


def _check_prompts(prompt, what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{what} must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    return list(prompts)


def validate(*, width=None, height=None, steps=None, guidance=None, num_images=None, seed=None, strength=None) -> None:
    """Check user-facing generation arguments; raise ValueError with a one-line reason."""
    for name, v in (("width", width), ("height", height)):
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {v!r}")
        if v > 8192:
            raise ValueError(f"{name} {v} is above the model's limit of 8192 pixels")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if guidance is not None and not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"guidance must be a number >= 0, got {guidance!r}")
    if num_images is not None and (not isinstance(num_images, int) or num_images < 1):
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if strength is not None and not (isinstance(strength, (int, float)) and 0 <= strength <= 1):
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
