"""ZImagePipeline: prompt in, images out, with the three models held in memory between calls.

Follows diffusers' `pipelines/z_image/pipeline_z_image.py`: the prompt is encoded by Qwen3 (second to
last hidden state), float32 noise is denoised by flow-match Euler with the DiT's prediction negated,
and the FLUX VAE decodes. Work is lazy: the pipeline evaluates once after encoding and once per step.
"""

from __future__ import annotations

import os
import random
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx

from . import fp16, kernels
from .enhance import PromptEnhancer, check_options
from .errors import InputError
from .inputs import (LATENT_CHANNELS, MAX_SEED, ImageInput, image_input, mask_latents, open_image,  # noqa: F401
                     output_size, validate)
from .fp16 import Float16OverflowWarning
from .lora import Lora, apply_lora, read_lora, restore
from .noise import image_key, noise  # noqa: F401  (re-exported: pipeline.noise, pipeline.image_key)
from .sampler import (FlowMatchScheduler, apply_cfg, euler_step, guidance_for_step, model_time, scale_noise,
                      strength_start)
from .text_encoder import TextEncoder
from .text_encoder import default_bits as text_encoder_bits
from .transformer import ZImageTransformer
from .vae import VAE, auto_tile_size, from_pil, to_pil
from .weights import read_config, resolve_model, stored_bits

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
LOW_MEMORY_TILE = 64  # latent pixels (512 image pixels) per VAE tile side in low-memory mode


def default_dtype() -> str:
    """bfloat16 on an Apple GPU; float32 on CPU, where MLX's bfloat16 matmul is slow."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


class Cancelled(Exception):
    """Raised by `generate` when its `cancel` token is set: the run stopped between steps and the pipeline
    is ready for the next call."""


@dataclass
class Step:
    """The state after one denoising step; `denoised` (the x0 estimate) is lazy and free unless used."""

    index: int  # 0-based index of the step just taken
    total: int
    sigma: float  # the sigma this step started from
    latents: mx.array  # (B, h, w, 16) float32, after the step
    denoised: mx.array  # (B, h, w, 16) x + sigma * prediction at the step's start


class ZImagePipeline:
    """Z-Image text-to-image. Load once with `from_pretrained`, then call `generate` as often as needed.

    Threads: a pipeline belongs to the thread that created it, and every call must come from that thread;
    another thread gets a RuntimeError. MLX streams are thread-affine (an array made on one thread cannot be
    evaluated on another since mlx 0.31.2), so an app or a server gives the pipeline one owner thread that
    loads it and makes every call, and hands requests to it through a queue (as `zimage-mlx serve` does).
    A run is stopped from another thread by setting the `cancel` event passed to `generate`.
    """

    def __init__(self, transformer: ZImageTransformer, text_encoder: TextEncoder | None, vae: VAE,
                 scheduler: FlowMatchScheduler, *, root: Path, dtype: str, low_memory: bool = False,
                 quantize: int | None = None, quantization: dict | None = None, stored_dtype: str | None = None):
        self.transformer = transformer
        self._cap_feat_dim = transformer.args.cap_feat_dim
        self.text_encoder = text_encoder
        self.vae = vae
        self.scheduler = scheduler
        self.root = Path(root)
        self.dtype = dtype
        self.low_memory = low_memory
        self.quantize = quantize  # the on-the-fly bits asked for (None for a folder loaded as stored)
        # What each model really runs at: {"transformer": bits or None, "text_encoder": bits or None}, from the
        # folder's config.json when it was converted quantized, else from `quantize`.
        self.quantization = quantization if quantization is not None else {
            "transformer": quantize, "text_encoder": text_encoder_bits(quantize)}
        self.stored_dtype = stored_dtype  # the dtype a converted folder was written in (None: not recorded)
        self.reason = dtype  # why this dtype (from_pretrained explains "auto")
        self._prompt_cache: OrderedDict[tuple[str, int], mx.array] = OrderedDict()
        self.loras: list[tuple[str, float]] = []  # (name, scale) of the LoRAs applied, in order
        self._lora_originals: dict = {}  # what unload_loras() puts back
        self._enhancer: PromptEnhancer | None = None  # the LM tail, kept with a resident text encoder
        self._latent_rgb = None  # the fast preview's map, fitted on first use
        self.controlnet = None  # set by load_controlnet
        self._owner = threading.get_ident()
        self.parallel = None  # a distributed.Parallel when loaded with a group of several ranks

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError(
                "this ZImagePipeline belongs to the thread that loaded it and was called from another one: "
                "MLX streams are thread-affine, so make every call from one thread (use a queue to hand it work)")

    @classmethod
    def from_pretrained(cls, model=DEFAULT_MODEL, dtype: str = "auto", quantize: int | None = None,
                        low_memory: bool = False, *, group=None, parallel: str = "auto",
                        timeout: float | None = None) -> "ZImagePipeline":
        """Load a checkpoint folder (diffusers layout, or one written by `zimage-mlx convert`) or a Hub id.

        dtype: "auto", "bfloat16", "float16" or "float32". auto is float32 on the CPU; on a GPU the dtype a
        converted folder was written in (float16 only if it passes the float16 checks), else bfloat16, or
        float16 on M1/M2 GPUs (no native bfloat16) for a checkpoint that passes them (fp16.choose_dtype);
        `reason` on the pipeline says why, `stored_dtype` what the folder holds. float16 runs the DiT's scaled graph, checked after every step (see
        `denoise`); the text encoder then runs in bfloat16 and the VAE always in float32.
        quantize: 4 or 8 to quantize on the fly with each model's policy: the DiT to that many bits, the text
        encoder to at least 8 (the VAE never is). A folder converted quantized loads as stored without it.
        `quantization` on the pipeline gives the bits each model really runs at, stored or on the fly.
        low_memory: load the text encoder only while encoding and free it before denoising, and decode
        the VAE in tiles; a little slower, a much lower peak.
        group: an `mx.distributed` group of several ranks (`zimage_mlx.distributed.init()` under mlx.launch) to
        run as one job: every rank loads with the same arguments and makes the same calls. parallel: "data",
        "tensor" (each rank loads its shard of the DiT and text encoder), "cfg" or "auto"; timeout: seconds
        without progress before a rank gives up on the others. See `zimage_mlx.distributed`.
        """
        root = resolve_model(model)
        dit_config = read_config(root / "transformer")
        stored_dtype = dit_config.get("dtype") if dit_config.get("dtype") in fp16.DTYPE_NAMES else None
        choice = fp16.choose_dtype(dtype, fp16.stored(dit_config), stored=stored_dtype)
        par = None
        if group is not None and group.size() > 1:
            from . import distributed

            par = distributed.start(group, parallel, root, dtype=choice.dtype, quantize=quantize, timeout=timeout)
        if mx.default_device() == mx.cpu and os.environ.get("ZIMAGE_MLX_KEEP_FREED_MEMORY", "1") != "0":
            kernels.keep_freed_memory()  # MLX's CPU backend has no buffer cache (see kernels.py)
        if par is not None:
            transformer = par.load_transformer(root / "transformer", choice.dtype, quantize)
        else:
            transformer = ZImageTransformer.from_pretrained(root / "transformer", dtype=choice.dtype, quantize=quantize)
        if choice.pending:  # M1/M2 and no stored statistics: judged on the float16 weights just loaded
            choice = fp16.choose_dtype(dtype, transformer.fp16_stats, stored=stored_dtype)
            if choice.dtype != "float16":
                transformer = None
                if par is not None:
                    transformer = par.load_transformer(root / "transformer", choice.dtype, quantize)
                else:
                    transformer = ZImageTransformer.from_pretrained(root / "transformer", dtype=choice.dtype,
                                                                    quantize=quantize)
        dtype = choice.dtype
        if dtype == "float16" and transformer.fp16_stats is not None:
            ok, why = fp16.verdict(transformer.fp16_stats)
            if not ok:  # asked for explicitly: honoured, with the guard to catch what overflows
                choice.reason += f"; the checkpoint fails the float16 checks: {why}"
                warnings.warn(Float16OverflowWarning(f"float16 was requested but {why}: expect steps redone in "
                                                     "bfloat16 (dtype='bfloat16' avoids the retries)"), stacklevel=2)
        # The VAE decodes in float32 whatever the dtype: its config says force_upcast (the FLUX VAE is a known
        # float16 risk), and on Apple GPUs float32 convolutions cost memory traffic, not ALU rate.
        vae = VAE.from_pretrained(root / "vae")
        scheduler = FlowMatchScheduler.from_pretrained(root / "scheduler")
        quantization = {"transformer": stored_bits(dit_config) or quantize,
                        "text_encoder": stored_bits(read_config(root / "text_encoder")) or text_encoder_bits(quantize)}
        pipe = cls(transformer, None, vae, scheduler, root=root, dtype=dtype, low_memory=low_memory,
                   quantize=quantize, quantization=quantization, stored_dtype=stored_dtype)
        pipe.parallel = par
        pipe.reason = choice.reason
        if not low_memory:
            pipe.text_encoder = pipe._load_text_encoder()
        return pipe

    def _load_text_encoder(self) -> TextEncoder:
        # The text encoder stays bfloat16 when the DiT runs float16: its activations on the real weights are
        # measured only for the hidden state (13,754 at position 0, 4.8x below float16's limit; fp16.md 1.2),
        # not for its MLP, and it runs once per prompt, so float16 would save little there.
        dtype = "bfloat16" if self.dtype == "float16" else self.dtype
        return TextEncoder.from_pretrained(self.root, dtype=dtype, cap_feat_dim=self._cap_feat_dim,
                                           quantize=text_encoder_bits(self.quantize),
                                           prepare=self.parallel.prepare_text_encoder if self.parallel else None)

    # ------------------------------------------------------------------------------------------
    # Stages

    def encode_prompt(self, prompt: str | list[str], max_sequence_length: int = 512) -> list[mx.array]:
        """Caption features, one (L_i, cap_feat_dim) array per prompt (valid tokens only), evaluated.

        Recently used prompts come from a small cache, so an app that varies only the seed pays once.
        """
        self._check_thread()
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

    def enhance_prompt(self, prompt: str | list[str], *, system_prompt: str | None = None, max_tokens: int = 512,
                       temperature: float = 0.7, seed: int | list[int] | None = None,
                       callback: Callable[[str], None] | None = None) -> str | list[str]:
        """Rewrite a short prompt into a detailed one with the text encoder's own Qwen3 run as a chat model
        (see enhance.py); a list of prompts gives a list.

        system_prompt replaces ours (`enhance.SYSTEM_PROMPT`). temperature 0 decodes greedily; above 0 the
        sampling draws from mx.random.key(seed) (every prompt of a list: seed, as generate's seed rule; or
        seed[i] for a list of seeds; a random seed when None). callback(text) receives the decoded text as it is
        generated, prompt after prompt. The last layer, final norm and LM head are read from the checkpoint for this call
        (and kept with a resident text encoder until `release_text_encoder`; freed at once in low-memory mode).
        """
        self._check_thread()
        prompts = _check_prompts(prompt, "prompt")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise InputError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        for s in seeds:
            check_options(max_tokens, temperature, s, MAX_SEED)
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a string, got {type(system_prompt).__name__}")
        encoder = self.text_encoder or self._load_text_encoder()
        enhancer = self._enhancer
        if enhancer is None or enhancer.encoder is not encoder:
            enhancer = PromptEnhancer.from_text_encoder(encoder, self.root)
        try:
            out = [enhancer.enhance(p, system_prompt=system_prompt, max_tokens=max_tokens, temperature=temperature,
                                    seed=s, callback=callback) for p, s in zip(prompts, seeds)]
        finally:
            if self.low_memory or self.text_encoder is None:
                enhancer.release()
                self._enhancer = None
                if self.text_encoder is None:
                    encoder.release()
            else:
                self._enhancer = enhancer
        return out[0] if isinstance(prompt, str) else out

    def release_text_encoder(self) -> None:
        """Free the text encoder's weights (and the prompt enhancer's); later prompts load it again for the time
        they are encoded."""
        self._check_thread()
        if self.text_encoder is not None:
            self.text_encoder.release()
            self.text_encoder = None
        if self._enhancer is not None:
            self._enhancer.release()
            self._enhancer = None
        mx.clear_cache()

    def release_transformer(self) -> None:
        """Free the DiT's weights, for a process that has denoised its last image and only decodes now
        (the CLI does this before its last decode, so the DiT and the VAE's activations never add up).
        This pipeline cannot denoise afterwards: load another to generate again."""
        self._check_thread()
        self.transformer = None
        self.controlnet = None  # it runs only beside the DiT
        self._lora_originals = {}
        mx.clear_cache()

    def _dit(self) -> ZImageTransformer:
        self._check_thread()
        if self.transformer is None:
            raise RuntimeError("this pipeline's DiT was freed by release_transformer(); load the pipeline again")
        return self.transformer

    def sigmas(self, steps: int, *legacy, width: int | None = None, height: int | None = None) -> list[float]:
        """The sigmas of a `steps`-step run at this size (steps + 1 values, the last 0): sigmas(8, width=1024,
        height=768). The old positional form sigmas(steps, height, width) still works, with a warning."""
        if legacy:
            import warnings

            if len(legacy) != 2 or width is not None or height is not None:
                raise TypeError("sigmas() takes the size as keywords: sigmas(steps, width=W, height=H)")
            warnings.warn("sigmas(steps, height, width) is deprecated: use sigmas(steps, width=W, height=H), the "
                          "order of generate()", DeprecationWarning, stacklevel=2)
            height, width = legacy
        if width is None or height is None:
            raise TypeError("sigmas() needs width= and height=")
        seq_len = (height // 16) * (width // 16)
        return [float(s) for s in self.scheduler.sigmas(steps, seq_len)]

    def denoise(self, prompt_embeds: list[mx.array], latents: mx.array, sigmas: list[float], *,
                negative_embeds: list[mx.array] | None = None, guidance: float = 0.0,
                cfg_normalization: float | bool = False, cfg_truncation: float = 1.0, mask: mx.array | None = None,
                image_latents: mx.array | None = None, noise: mx.array | None = None,
                control=None) -> Iterator[Step]:
        """Run the sampler, yielding a `Step` after each DiT step (len(sigmas) - 1 of them).

        prompt_embeds: one caption per latent; latents: (B, h, w, 16) float32 latents at sigmas[0] (pure
        noise when sigmas[0] is 1). With guidance > 0, negative_embeds (one per latent) give CFG as diffusers
        defines it: pos + guidance * (pos - neg); the positive and negative branches run as one batch.

        Inpainting (as diffusers' ZImageInpaintPipeline): with `mask` (B or 1, h, w, 1; 1 = repaint, 0 = keep),
        `image_latents` (B or 1, h, w, 16) and the `noise` the start was made with, every step ends with
        x = (1 - mask) * scale_noise(image_latents, noise, sigma_next) + mask * x: the kept region follows the
        image, noised to the next sigma, and is the clean image latents after the last step (sigma 0).

        control: a `controlnet.ControlPlan` (made by generate from control images) whose residuals each step adds.

        A float16 DiT (the scaled graph) is checked after every step: if the step's output holds a non-finite
        value, the step is redone with bfloat16 GEMMs (the float16 weights cast to bfloat16 as each layer
        runs: no second copy of the DiT, a transient copy of one layer's weight and one extra pass over the
        weights per step), the rest of the run stays in bfloat16, and a `Float16OverflowWarning` is issued.
        """
        B = latents.shape[0]
        if len(prompt_embeds) != B or (negative_embeds is not None and len(negative_embeds) != B):
            raise ValueError("need one prompt embedding (and one negative) per latent")
        dit = self._dit()
        x = latents.astype(mx.float32)
        total = len(sigmas) - 1
        guard = dit.scaled and dit.dtype == mx.float16  # one isfinite reduction per step, evaluated with it
        activations = None  # mx.bfloat16 once a step has overflowed float16
        for i in range(total):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            g = guidance_for_step(guidance, sigma, cfg_truncation) if negative_embeds is not None else 0.0
            t = mx.full((B,), model_time(sigma), dtype=mx.float32)
            hook = control.at(i, total) if control is not None else None
            while True:
                kw = {} if activations is None else {"activations": activations}
                if hook is not None:
                    kw["control"] = hook
                if g > 0 and hook is None and self.parallel is not None and self.parallel.mode == "cfg":
                    both = self.parallel.guided(dit, x, t, prompt_embeds, negative_embeds, **kw)  # a branch per rank
                    pred = apply_cfg(both[:B], both[B:], g, cfg_normalization)
                elif g > 0:
                    both = dit(mx.concatenate([x, x]), mx.concatenate([t, t]),
                                            list(prompt_embeds) + list(negative_embeds), **kw)
                    pred = apply_cfg(both[:B], both[B:], g, cfg_normalization)
                else:
                    pred = dit(x, t, prompt_embeds, **kw).astype(mx.float32)
                denoised = x + sigma * pred
                x_next = euler_step(x, pred, sigma, sigma_next)
                if mask is not None:
                    x_next = (1 - mask) * scale_noise(image_latents, noise, sigma_next) + mask * x_next
                    denoised = (1 - mask) * image_latents + mask * denoised  # a preview shows the kept region as is
                if not guard:
                    mx.eval(x_next)
                    break
                finite = mx.isfinite(x_next).all()
                mx.eval(x_next, finite)
                if finite.item():
                    break
                if activations is not None:
                    raise FloatingPointError(f"step {i + 1} of {total} gives non-finite latents in bfloat16 as well: "
                                             "the inputs or the checkpoint hold non-finite values")
                warnings.warn(Float16OverflowWarning(
                    f"step {i + 1} of {total} overflowed float16; it and the remaining steps run in bfloat16 "
                    "(dtype='bfloat16' avoids the retry)"), stacklevel=2)
                activations = mx.bfloat16
            x = x_next
            yield Step(i, total, sigma, x, denoised)

    def decode(self, latents: mx.array, tile_size: int | None = None):
        """Latents (B, h, w, 16) to PIL images.

        Without tile_size, the whole image is decoded when that fits the device comfortably (exactly
        the reference), else in tiles (vae.auto_tile_size); low-memory mode always tiles above 512 px.
        """
        self._check_thread()
        if tile_size is None:
            h, w = latents.shape[1:3]
            tile_size = auto_tile_size(h, w)
            if self.low_memory and h * w > LOW_MEMORY_TILE**2:
                tile_size = min(tile_size or LOW_MEMORY_TILE, LOW_MEMORY_TILE)
        return to_pil(self.vae.decode(latents, tile_size=tile_size))

    def preview(self, step: Step):
        """Decode a step's x0 estimate with the VAE: what the image is becoming, exactly as it would decode,
        at about the cost of a step (`fast_preview` is the cheap one)."""
        return self.decode(step.denoised)

    def fast_preview(self, step: Step | mx.array, size: tuple[int, int] | None = None) -> list:
        """A step's x0 estimate (or any latents (B, h, w, 16)) as PIL images, through an affine map of the 16
        latent channels to RGB at latent resolution, upscaled (bilinear) to the image size or to `size`
        (W, H): colours and layout of what is forming, for a few milliseconds instead of a VAE decode.

        The map is fitted from this pipeline's VAE on first use (least squares of decoded pixels on
        latents, see `zimage_mlx.preview`) and cached beside the VAE or in the user cache, so it holds for
        any checkpoint; the first call of a new VAE pays one small encode and decode.
        """
        self._check_thread()
        if self._latent_rgb is None:
            from .preview import load_or_fit

            self._latent_rgb = load_or_fit(self.vae, self.root / "vae")
        latents = step.denoised if isinstance(step, Step) else step
        return self._latent_rgb.to_pil(latents, size=size, scale=self.vae.scale)

    # ------------------------------------------------------------------------------------------
    # LoRA

    def load_lora(self, lora, scale: float = 1.0, *, fuse: bool = True) -> Lora:
        """Apply a LoRA to the DiT: a .safetensors path, a Hub repo id holding one (or `owner/repo/file.safetensors`),
        or a `Lora` from `read_lora`. Several LoRAs stack. Keys that match no layer give a `LoraWarning`; a file
        for another model, or one that does not fit, raises `LoraError` and changes nothing.

        fuse=True merges the LoRA into float weights: no cost per step, but every touched layer keeps its
        original weights for `unload_loras` (up to twice the DiT's memory for a LoRA on every layer).
        fuse=False runs it beside the layers, as quantized layers always do: no extra memory, a few
        percent more work per step.
        """
        dit = self._dit()
        if self.parallel is not None and self.parallel.mode == "tensor":
            raise InputError("LoRAs are not supported with tensor parallelism yet: use --parallel data or cfg")
        lora = lora if isinstance(lora, Lora) else read_lora(lora)
        apply_lora(dit, lora, scale, self._lora_originals, fuse=fuse)
        self.loras.append((lora.name, float(scale)))
        if dit.scaled and dit.dtype == mx.float16:  # the weights changed: check them for float16 again
            dit.fp16_stats = fp16.statistics(fp16.model_weights(dit), dit.args)
            ok, why = fp16.verdict(dit.fp16_stats)
            if not ok:
                warnings.warn(Float16OverflowWarning(
                    f"with LoRA {lora.name} the DiT fails the float16 checks ({why}): expect steps redone in "
                    "bfloat16, or load the pipeline with dtype='bfloat16'"), stacklevel=2)
        return lora

    def unload_loras(self) -> None:
        """Remove every LoRA: the DiT gets its original weights back, bit for bit."""
        restore(self._dit(), self._lora_originals)
        self.loras.clear()

    # ------------------------------------------------------------------------------------------
    # ControlNet

    def load_controlnet(self, controlnet, graph: str | None = None, *, quantize: int | None = None):
        """Load a Z-Image Turbo Fun ControlNet Union (1.0, 2.0, 2.1, 2.1 lite, Tile 2.1; the layout is read from
        the weights): a .safetensors file, a folder, a Hub repo id holding one file, or
        `owner/repo/file.safetensors` (e.g. alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1/
        Z-Image-Turbo-Fun-Controlnet-Union-2.1-lite-2602-8steps.safetensors). It replaces any loaded one and
        shares the DiT's modules (no copy). graph: "authors" (default, what the weights were trained with) or
        "diffusers"; see zimage_mlx.controlnet. quantize: bits (default: the pipeline's on-the-fly bits)."""
        from .controlnet import ControlNet

        if isinstance(controlnet, ControlNet):
            net = controlnet
        else:
            self.controlnet = None  # free the previous one before reading the next
            net = ControlNet.from_pretrained(controlnet, self._dit(), graph=graph, dtype=self.dtype,
                                             quantize=self.quantize if quantize is None else quantize)
        self.controlnet = net
        return net

    def unload_controlnet(self) -> None:
        """Free the ControlNet's weights."""
        self._check_thread()
        self.controlnet = None
        mx.clear_cache()

    # ------------------------------------------------------------------------------------------
    # The one call

    def generate(self, prompt: str | list[str], *legacy, negative_prompt: str | list[str] | None = None,
                 width: int | None = None, height: int | None = None, steps: int = 8, guidance: float = 0.0,
                 cfg_normalization: float | bool = False, cfg_truncation: float = 1.0, seed: int | list[int] | None = None,
                 num_images: int = 1, latents: mx.array | None = None,
                 callback: Callable[[int, int, mx.array], None] | None = None, max_sequence_length: int = 512,
                 image=None, mask=None, strength: float | None = None, image_latents: mx.array | None = None,
                 release_transformer: bool = False, on_step: Callable[[Step], None] | None = None, cancel=None,
                 control_image=None, control_scale: float | list[float] | None = None, control_start: float = 0.0,
                 control_end: float = 1.0):
        """Generate images; returns a list of PIL images, prompt-major (all images of prompt 0 first).
        Every argument after the prompt is a keyword (positional ones still work, with a DeprecationWarning).

        The seed rule: image k of every prompt uses the noise of seed + k, so several prompts are compared at
        the same seeds (as the CLI does) and any image can be made again alone. With seed=None a seed is
        drawn; each image's seed is in `image.info["seed"]`. `seed` may also be a list, one seed per image of
        each prompt (num_images is then its length): several seeds run as one batch, each image equal to the one
        its seed makes alone. `latents` (B, h, w, 16)
        float32 replaces the noise (B = prompts x num_images). `callback(step, total, latents)` runs
        after every step (step counts from 1). width and height default to 1024, or to the image's size.

        Image to image (diffusers' ZImageImg2ImgPipeline): `image` (a path or a PIL image) and `strength`
        (default 0.6). Only the last steps of the `steps`-step schedule run, ceil(strength x steps) of them
        (see `sampler.strength_start`), starting from sigma * noise + (1 - sigma) * image latents at the first
        kept sigma. The image latents are a sample of the VAE posterior drawn with `image_key(seed + k)`
        (also when `latents` gives the noise). strength 1 is text-to-image with the same seed (the image only
        sets the size); strength 0 runs no step and returns the VAE round trip of the image (decoded image
        latents; diffusers raises an error there).

        Inpainting (diffusers' ZImageInpaintPipeline): add `mask`, a path or PIL image of the image's size,
        white where to repaint (greyscale, binarised at 50%); strength defaults to 1. The kept region is reset
        to the image after every step.

        Resize policy: without width and height the output has the image's size rounded down to multiples of
        16; with both, the image (and mask) are resized to them; with one, the other follows the aspect ratio
        (nearest multiple of 16). Resizing is Lanczos, as diffusers' VaeImageProcessor; the aspect ratio is
        not preserved by cropping. Paths are opened with their EXIF orientation applied.

        `image_latents` (1 or B, h, w, 16), e.g. from `encode_image`, replaces the image's encoding (then
        `image` may be left out: the size is 8 x the latents').

        release_transformer=True frees the DiT after denoising, before decoding (see `release_transformer`):
        for the last image of a process that wants the lowest peak.

        Watching and stopping a run: `on_step(step)` gets each `Step` (with its x0 estimate `denoised`, for
        `fast_preview` or `preview`) after `callback`. `cancel` is any object with `is_set()`, such as a
        `threading.Event` another thread sets: it is checked before encoding, after every step and before
        decoding, and a set token raises `Cancelled` there. Nothing is left half-done: the next call (and the
        prompt cache, LoRAs, freed models) behaves as if the cancelled run never happened.

        ControlNet (after `load_controlnet`): `control_image`, a path or PIL image (an edge, depth, pose, line
        or tile map; the Union model takes any), or a list for several controls, batched into one ControlNet
        pass per step. `control_scale`: one number or one per image (default: the version's recommended
        scale, 0.75 for Union 1.0 and 2.0, 0.9 for 2.1). `control_start`/`control_end`: the part of the steps
        controlled, step i of N when start <= i/N and (i+1)/N <= end. Control images are stretched to the
        output size (Lanczos, aspect ratio not kept); without an image, width and height follow the first
        control image like an input image. Works with text-to-image, image-to-image and inpainting; a 2.x
        ControlNet also gets the mask and the masked image (diffusers' ZImageControlNetInpaintPipeline layout),
        while the kept region is still reset after every step, as in plain inpainting.
        """
        if legacy:  # every keyword argument as passed (locals() holds only the arguments at this point)
            given = {k: v for k, v in locals().items() if k not in ("self", "prompt", "legacy")}
            return self.generate(prompt, **_from_positional(legacy, given))
        self._check_thread()
        if self.parallel is not None and self.parallel.active:  # a job over several ranks
            args = {k: v for k, v in locals().items() if k not in ("self", "legacy")}
            return self.parallel.generate(self, args)
        prompts = _check_prompts(prompt, "prompt")
        init = controls = None
        if control_image is not None or control_scale is not None:
            from .controlnet import control_inputs

            if self.controlnet is None:
                raise InputError("control_image needs a ControlNet: call load_controlnet(...) first")
            controls = control_inputs(control_image, control_scale, control_start, control_end)
        if image is not None or mask is not None or strength is not None or image_latents is not None:
            init = image_input(image, mask, strength, width, height, image_latents)
            width, height = init.width, init.height
        elif controls is not None:
            width, height = output_size(controls.images[0].size, width, height)
        width, height = 1024 if width is None else width, 1024 if height is None else height
        if isinstance(seed, (list, tuple)):  # one seed per image of each prompt: several seeds in one batch
            if not seed:
                raise InputError("seed is an empty list: give at least one seed, or None for a random one")
            if num_images not in (1, len(seed)):
                raise InputError(f"{len(seed)} seeds with num_images={num_images}: give num_images={len(seed)} or leave it out")
            for s in seed:
                validate(seed=s)
            num_images, seed_list = len(seed), [int(s) for s in seed]
            seed = None
        else:
            seed_list = None
        validate(width=width, height=height, steps=steps, guidance=guidance, num_images=num_images, seed=seed)
        negatives = None
        if guidance > 0:
            negatives = _check_prompts("" if negative_prompt is None else negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        elif negative_prompt:
            raise InputError("negative_prompt needs guidance > 0 (Turbo runs without CFG; try --guidance 4 with the Base model)")
        h, w = height // 8, width // 8
        B = len(prompts) * num_images
        self._dit().check_sizes(h, w, [1])
        if seed_list is None:
            seed = random.randint(0, MAX_SEED) if seed is None else seed
            seed_list = [(seed + k) % (MAX_SEED + 1) for k in range(num_images)]
        seeds = [s for _ in prompts for s in seed_list]
        seeded = latents is None  # then the seed alone gives the image back
        if latents is not None:
            if tuple(latents.shape) != (B, h, w, LATENT_CHANNELS):
                raise InputError(f"latents must have shape {(B, h, w, LATENT_CHANNELS)}, got {tuple(latents.shape)}")
        else:
            latents = mx.concatenate([noise(s, h, w) for s in seeds])

        sigmas = self.sigmas(steps, width=width, height=height)
        inpaint = {}
        if init is not None:
            _check_cancel(cancel)
            sigmas, latents, inpaint = self._start_from_image(init, sigmas, latents, seeds)

        control = None
        if controls is not None and len(sigmas) > 1:
            from .controlnet import plan

            _check_cancel(cancel)
            control = plan(self, controls, width, height, init)
        _check_cancel(cancel)
        if len(sigmas) > 1:  # a strength that leaves no step needs no prompt either
            feats = self.encode_prompt(prompts + (negatives or []), max_sequence_length)
            pos = [f for f in feats[: len(prompts)] for _ in range(num_images)]
            neg = [f for f in feats[len(prompts):] for _ in range(num_images)] if negatives else None
            if self.low_memory:
                self.release_text_encoder()
            for step in self.denoise(pos, latents, sigmas, negative_embeds=neg, guidance=guidance,
                                     cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation,
                                     control=control, **inpaint):
                latents = step.latents
                if callback is not None:
                    callback(step.index + 1, step.total, latents)
                if on_step is not None:
                    on_step(step)
                _check_cancel(cancel)
        _check_cancel(cancel)
        if release_transformer:
            mx.eval(latents)
            self.release_transformer()
        images = self.decode(latents)
        for k, image in enumerate(images):
            if seeded:
                image.info["seed"] = seeds[k]
        return images

    def _start_from_image(self, init: "ImageInput", sigmas: list[float], noise: mx.array, seeds: list[int]):
        """The sigmas kept by the strength, the starting latents, and the inpainting blend's arguments."""
        sigmas = sigmas[strength_start(len(sigmas) - 1, init.strength):]
        if init.mask is None and sigmas[0] == 1.0:
            return sigmas, noise, {}  # pure noise: the image latents would be multiplied by 1 - 1 = 0
        z = init.latents if init.latents is not None else self._encode(init.image, init.width, init.height, seeds)
        if z.shape[0] not in (1, noise.shape[0]):
            raise InputError(f"image_latents hold {z.shape[0]} images for a batch of {noise.shape[0]}: give 1 or {noise.shape[0]}")
        latents = scale_noise(z, noise, sigmas[0])
        inpaint = {}
        if init.mask is not None:
            inpaint = dict(mask=mask_latents(init.mask, init.width, init.height, self.vae.scale), image_latents=z,
                           noise=noise)
        mx.eval(latents, z)
        return sigmas, latents, inpaint

    def _encode(self, image, width: int, height: int, seeds: list[int]) -> mx.array:
        """One encoder pass over the image resized to (width, height); one posterior sample per seed, (B, h, w, 16)."""
        mean, std = self.vae.posterior(from_pil(image, width, height))  # (1, h, w, 16)
        eps = mx.concatenate([mx.random.normal(mean.shape, key=image_key(s)) for s in seeds])
        return self.vae.scale_latents(mean + std * eps)

    def encode_image(self, image, width: int | None = None, height: int | None = None, seed: int = 0) -> mx.array:
        """The latents an image-to-image run of this seed starts from: the image (a path or a PIL image) resized
        by generate's policy and encoded, the VAE posterior sampled with `image_key(seed)`; (1, h, w, 16),
        evaluated. Pass them to `generate(image_latents=...)` to encode once for several prompts or strengths."""
        self._check_thread()
        init = image_input(image, None, None, width, height, None)
        validate(seed=seed)
        z = self._encode(init.image, init.width, init.height, [seed])
        mx.eval(z)
        return z


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("generation cancelled")


def _check_prompts(prompt, what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise InputError(f"{what} is an empty list: pass at least one prompt (use \"\" for an empty prompt)")
    return list(prompts)


# generate's arguments in their order before they became keyword-only (0.1.0), for old positional calls.
_POSITIONAL = ("negative_prompt", "width", "height", "steps", "guidance", "cfg_normalization", "cfg_truncation",
               "seed", "num_images", "latents", "callback", "max_sequence_length")
_DEFAULTS = dict(negative_prompt=None, width=None, height=None, steps=8, guidance=0.0, cfg_normalization=False,
                 cfg_truncation=1.0, seed=None, num_images=1, latents=None, callback=None, max_sequence_length=512)


def _from_positional(values: tuple, given: dict) -> dict:
    """generate's keyword arguments from an old positional call (with a DeprecationWarning)."""
    import warnings

    if len(values) > len(_POSITIONAL):
        raise TypeError(f"generate() takes at most {len(_POSITIONAL) + 1} positional arguments, got {len(values) + 1}")
    warnings.warn("pass generate()'s arguments after the prompt by keyword (e.g. width=1024); positional "
                  "arguments are deprecated", DeprecationWarning, stacklevel=3)
    out = dict(given)
    for name, value in zip(_POSITIONAL, values):
        default, passed = _DEFAULTS[name], given[name]
        if not (passed is default or (type(passed) in (int, float, bool) and passed == default)):
            raise TypeError(f"generate() got {name} both by position and by keyword")
        out[name] = value
    return out
