"""ZImagePipeline: prompt in, images out, with the three models held in memory between calls.

Follows diffusers' `pipelines/z_image/pipeline_z_image.py`: the prompt is encoded by Qwen3 (second to
last hidden state), float32 noise is denoised by flow-match Euler with the DiT's prediction negated,
and the FLUX VAE decodes. Work is lazy: the pipeline evaluates once after encoding and once per step.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx

from . import fp16, kernels
from .enhance import PromptEnhancer, check_options
from .errors import Cancelled, InputError
from .fp16 import Float16OverflowWarning
from .hires import run_second_passes, upscale_recipe
from .inputs import LATENT_CHANNELS, MAX_SEED, ImageInput, image_input, mask_latents, open_image, validate  # noqa: F401
from .lora import Lora, apply_lora, read_lora, restore
from .noise import image_key, noise, variety_steps, vary
from .recipe import DEFAULT_MODEL, ControlRef, LoraRef, Recipe, check_prompts, file_name
from .sampler import (FlowMatchScheduler, apply_cfg, euler_step, guidance_for_step, model_time, scale_noise,
                      strength_start)
from .text_encoder import TextEncoder
from .text_encoder import default_bits as text_encoder_bits
from .tiles import TiledDiT
from .transformer import ZImageTransformer
from .vae import VAE, auto_tile_size, from_pil, to_pil
from .sources import read_config, resolve_model
from .weights import model_label, stored_bits

PROMPT_CHUNK = 8  # prompts encoded together by a run (the prompt cache holds 32)
LOW_MEMORY_TILE = 64  # latent pixels (512 image pixels) per VAE tile side in low-memory mode


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
        self.controlnet_label: str | None = None  # its path-free name, for metadata
        self.label = model_label(root)  # the model's path-free name (from_pretrained: as it was named)
        self._owner = threading.get_ident()
        self.parallel = None  # a distributed.Parallel when loaded with a group of several ranks
        self.transformer_file: str | None = None  # the DiT file that replaced the checkpoint's (its name)
        self.siglip = None  # Omni: the SigLIP2 tower (None while freed in low-memory mode)
        self.siglip_processor = None  # Omni: its processor's settings; set for an Omni folder (see omni.py)
        self._omni_cache = None  # (reference list, size, OmniConditions) of the current call

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError(
                "this ZImagePipeline belongs to the thread that loaded it and was called from another one: "
                "MLX streams are thread-affine, so make every call from one thread (use a queue to hand it work)")

    @classmethod
    def from_pretrained(cls, model=DEFAULT_MODEL, dtype: str = "auto", quantize: int | None = None,
                        low_memory: bool = False, *, group=None, parallel: str = "auto",
                        timeout: float | None = None, transformer=None,
                        label: str | None = None) -> "ZImagePipeline":
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
        label: the model's name in the images' metadata (default: the Hub id, or the folder's name and config
        hash: `weights.model_label`).
        transformer: a DiT file (ComfyUI's single-file .safetensors, or a .gguf) that replaces the checkpoint's:
        a GGUF's Q8_0, Q4_0 and Q4_1 blocks stay quantized, other types are dequantized (see gguf_dit.py).
        """
        if transformer is not None:
            if group is not None and group.size() > 1:
                raise InputError("a DiT file ({transformer}) cannot be split over several ranks yet", "transformer",
                                 ("transformer",))
            pipe = cls._with_dit_file(model, transformer, dtype, quantize, low_memory)
            pipe.label = label or model_label(model)
            return pipe
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
        pipe.label = label or model_label(model)
        pipe.reason = choice.reason
        if not low_memory:
            pipe.text_encoder = pipe._load_text_encoder()
        from .omni import is_omni_folder

        if is_omni_folder(root):
            from .siglip import SiglipProcessor

            pipe.siglip_processor = SiglipProcessor.from_pretrained(root / "siglip_processor")
            if not low_memory:
                pipe.siglip = pipe._load_siglip()
        return pipe

    def _load_siglip(self):
        from .siglip import SiglipVisionModel

        return SiglipVisionModel.from_pretrained(self.root / "siglip", dtype="bfloat16" if self.dtype == "float16" else self.dtype)

    @classmethod
    def _with_dit_file(cls, model, file, dtype: str, quantize: int | None, low_memory: bool) -> "ZImagePipeline":
        """from_pretrained with the DiT from one file (dit_file.py): the base's text encoder, VAE and configs."""
        from .dit_file import load_dit_file

        root = resolve_model(model)
        choice = fp16.choose_dtype("bfloat16" if dtype == "auto" and mx.default_device() != mx.cpu else dtype, None)
        transformer = load_dit_file(file, read_config(root / "transformer"), dtype=choice.dtype, quantize=quantize)
        quantization = {"transformer": transformer.stored_bits or quantize,
                        "text_encoder": stored_bits(read_config(root / "text_encoder")) or text_encoder_bits(quantize)}
        pipe = cls(transformer, None, VAE.from_pretrained(root / "vae"), FlowMatchScheduler.from_pretrained(root / "scheduler"),
                   root=root, dtype=choice.dtype, low_memory=low_memory, quantize=quantize, quantization=quantization)
        pipe.transformer_file = Path(file).name  # recorded in each image's recipe
        pipe.reason = f"{choice.reason}; DiT from {transformer.source}"
        if not low_memory:
            pipe.text_encoder = pipe._load_text_encoder()
        return pipe

    def _load_text_encoder(self) -> TextEncoder:
        # The text encoder stays bfloat16 when the DiT runs float16: its activations on the real weights are
        # measured only for the hidden state (13,754 at position 0, 4.8x below float16's limit),
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
        prompts = check_prompts(prompt, "prompt")
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

    def cache_prompt(self, prompt: str, features: mx.array, max_sequence_length: int = 512) -> None:
        """Give the prompt cache a prompt's features encoded elsewhere (training encodes its captions once), so
        that a run with that prompt loads no text encoder."""
        self._prompt_cache[(prompt, max_sequence_length)] = features

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
        prompts = check_prompts(prompt, "prompt")
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

    def sigmas(self, steps: int, *, width: int, height: int) -> list[float]:
        """The sigmas of a `steps`-step run at this size (steps + 1 values, the last 0): sigmas(8, width=1024,
        height=768)."""
        if width is None or height is None:
            raise TypeError("sigmas() needs width= and height=")
        seq_len = (height // 16) * (width // 16)
        return [float(s) for s in self.scheduler.sigmas(steps, seq_len)]

    def denoise(self, prompt_embeds: list[mx.array], latents: mx.array, sigmas: list[float], *,
                negative_embeds: list[mx.array] | None = None, guidance: float = 0.0,
                cfg_normalization: float | bool = False, cfg_truncation: float = 1.0, mask: mx.array | None = None,
                image_latents: mx.array | None = None, noise: mx.array | None = None,
                control=None, early_embeds: list[mx.array] | None = None, early_steps: int = 0,
                tile: int | None = None, omni=None) -> Iterator[Step]:
        """Run the sampler, yielding a `Step` after each DiT step (len(sigmas) - 1 of them).

        prompt_embeds: one caption per latent; latents: (B, h, w, 16) float32 latents at sigmas[0] (pure
        noise when sigmas[0] is 1). With guidance > 0, negative_embeds (one per latent) give CFG as diffusers
        defines it: pos + guidance * (pos - neg); the positive and negative branches run as one batch.

        Inpainting (as diffusers' ZImageInpaintPipeline): with `mask` (B or 1, h, w, 1; 1 = repaint, 0 = keep),
        `image_latents` (B or 1, h, w, 16) and the `noise` the start was made with, every step ends with
        x = (1 - mask) * scale_noise(image_latents, noise, sigma_next) + mask * x: the kept region follows the
        image, noised to the next sigma, and is the clean image latents after the last step (sigma 0).

        control: a `controlnet.ControlPlan` (made by generate from control images) whose residuals each step adds.
        early_embeds (one per latent) replace prompt_embeds for the first `early_steps` steps (variety).
        tile: compute each step's velocity on overlapping tiles of `tile` pixels a side, blended (MultiDiffusion,
        see zimage_mlx.tiles); not with `control`.
        omni: an `omni.OmniConditions` (references encoded; empty for text only) runs an Omni DiT's omni sequence;
        each prompt embedding is then the list of its caption segments' features (omni.encode_segments).

        A float16 DiT (the scaled graph) is checked after every step: if the step's output holds a non-finite
        value, the step is redone with bfloat16 GEMMs (the float16 weights cast to bfloat16 as each layer
        runs: no second copy of the DiT, a transient copy of one layer's weight and one extra pass over the
        weights per step), the rest of the run stays in bfloat16, and a `Float16OverflowWarning` is issued.
        """
        B = latents.shape[0]
        if len(prompt_embeds) != B or (negative_embeds is not None and len(negative_embeds) != B):
            raise ValueError("need one prompt embedding (and one negative) per latent")
        dit = self._dit()
        if tile is not None and control is None:
            dit = TiledDiT(dit, tile)
        if omni is not None:
            from .omni import OmniDiT

            dit = OmniDiT(dit, omni)
        x = latents.astype(mx.float32)
        total = len(sigmas) - 1
        guard = dit.scaled and dit.dtype == mx.float16  # one isfinite reduction per step, evaluated with it
        activations = None  # mx.bfloat16 once a step has overflowed float16
        for i in range(total):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            g = guidance_for_step(guidance, sigma, cfg_truncation) if negative_embeds is not None else 0.0
            t = mx.full((B,), model_time(sigma), dtype=mx.float32)
            hook = control.at(i, total) if control is not None else None
            caps = early_embeds if early_embeds is not None and i < early_steps else prompt_embeds
            while True:
                kw = {} if activations is None else {"activations": activations}
                if hook is not None:
                    kw["control"] = hook
                if g > 0 and hook is None and self.parallel is not None and self.parallel.mode == "cfg":
                    both = self.parallel.guided(dit, x, t, caps, negative_embeds, **kw)  # a branch per rank
                    pred = apply_cfg(both[:B], both[B:], g, cfg_normalization)
                elif g > 0:
                    both = dit(mx.concatenate([x, x]), mx.concatenate([t, t]),
                                            list(caps) + list(negative_embeds), **kw)
                    pred = apply_cfg(both[:B], both[B:], g, cfg_normalization)
                else:
                    pred = dit(x, t, caps, **kw).astype(mx.float32)
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
            raise InputError("LoRAs are not supported with tensor parallelism yet: choose data or cfg for {parallel}",
                             "parallel", ("parallel",))
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

    def load_controlnet(self, controlnet, graph: str | None = None, *, quantize: int | None = None,
                        label: str | None = None):
        """Load a Z-Image Turbo Fun ControlNet Union (1.0, 2.0, 2.1, 2.1 lite, Tile 2.1; the layout is read from
        the weights): a .safetensors file, a folder, a Hub repo id holding one file, or
        `owner/repo/file.safetensors` (e.g. alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1/
        Z-Image-Turbo-Fun-Controlnet-Union-2.1-lite-2602-8steps.safetensors). It replaces any loaded one and
        shares the DiT's modules (no copy). graph: "authors" (default, what the weights were trained with) or
        "diffusers"; see zimage_mlx.controlnet. quantize: bits (default: the pipeline's on-the-fly bits). label: its
        name in the images' metadata (default: the file name or Hub id given)."""
        from .controlnet import ControlNet

        if isinstance(controlnet, ControlNet):
            net = controlnet
        else:
            self.controlnet = None  # free the previous one before reading the next
            net = ControlNet.from_pretrained(controlnet, self._dit(), graph=graph, dtype=self.dtype,
                                             quantize=self.quantize if quantize is None else quantize)
        self.controlnet = net
        self.controlnet_label = label or (model_label(controlnet) if isinstance(controlnet, (str, Path)) else None)
        return net

    def unload_controlnet(self) -> None:
        """Free the ControlNet's weights."""
        self._check_thread()
        self.controlnet = self.controlnet_label = None
        mx.clear_cache()

    # ------------------------------------------------------------------------------------------
    # Making images: generate(prompt, **keywords) builds a Recipe and runs it

    def generate(self, prompt, *, negative_prompt: str | list[str] | None = None, width: int | None = None,
                 height: int | None = None, steps: int = 8, guidance: float = 0.0, cfg_normalization: float = 0.0,
                 cfg_truncation: float = 1.0, seed: int | list[int] | None = None, num_images: int = 1,
                 latents: mx.array | None = None, max_sequence_length: int = 512, image=None, mask=None,
                 strength: float | None = None, image_latents: mx.array | None = None,
                 release_transformer: bool = False, on_step: Callable[[Step], None] | None = None, cancel=None,
                 control_image=None, control_scale: float | list[float] | None = None, control_start: float = 0.0,
                 control_end: float = 1.0, variety: float = 0.0, variety_until: float = 0.5,
                 hires_scale: float | None = None, hires_strength: float = 0.35, hires_steps: int | None = None,
                 hires_upscaler: str = "lanczos", tile: int | None = None, reference_images=None) -> list:
        """Generate images; returns a list of PIL images, prompt-major (all images of prompt 0 first). `prompt`
        is a string, a list of them, or a `Recipe` (then the other keywords but the run's own, `latents`,
        `release_transformer`, `on_step` and `cancel`, must be left out). Each image carries its seed
        (`image.info["seed"]`) and its one-image `Recipe` (`image.info["recipe"]`, for `recipe.to_png()`).

        The seed rule: image k of every prompt uses the noise of seed + k, so several prompts are compared at
        the same seeds (as the CLI does) and any image can be made again alone. With seed=None a seed is
        drawn. `seed` may also be a list, one seed per image of each prompt (num_images is then its length):
        several seeds run as one batch, each image equal to the one its seed makes alone. `latents`
        (B, h, w, 16) float32 replaces the noise (B = prompts x num_images). width and height default to 1024,
        or to the image's size.

        Image to image (diffusers' ZImageImg2ImgPipeline): `image` (a path or a PIL image) and `strength`
        (default 0.6). Only the last steps of the `steps`-step schedule run, ceil(strength x steps) of them
        (see `sampler.strength_start`), starting from sigma * noise + (1 - sigma) * image latents at the first
        kept sigma. The image latents are a sample of the VAE posterior drawn with `image_key(seed + k)`
        (also when `latents` gives the noise). strength 1 is text-to-image with the same seed (the image only
        sets the size); strength 0 runs no step and returns the VAE round trip of the image.

        Inpainting (diffusers' ZImageInpaintPipeline): add `mask`, a path or PIL image of the image's size,
        white where to repaint (greyscale, binarised at 50%); strength defaults to 1. The kept region is reset
        to the image after every step.

        Resize policy: without width and height the output has the image's size rounded down to multiples of
        16; with both, the image (and mask) are resized to them; with one, the other follows the aspect ratio
        (nearest multiple of 16). Resizing is Lanczos, as diffusers' VaeImageProcessor; the aspect ratio is
        not preserved by cropping. Paths are opened with their EXIF orientation applied.
        `image_latents` (1 or B, h, w, 16), e.g. from `encode_image`, replaces the image's encoding (then
        `image` may be left out: the size is 8 x the latents').

        release_transformer=True frees the DiT after denoising, before decoding (see `release_transformer`).
        `on_step(step)` gets each `Step` (with its x0 estimate `denoised`, for `fast_preview` or `preview`).
        `cancel` is any object with `is_set()`, such as a `threading.Event`: it is checked before encoding,
        after every step and before decoding, and a set token raises `Cancelled` there; the next call behaves
        as if the cancelled run never happened.

        ControlNet (after `load_controlnet`): `control_image`, a path or PIL image, or a list for several
        controls, batched into one ControlNet pass per step. `control_scale`: one number or one per image
        (default: the version's recommended scale). `control_start`/`control_end`: the part of the steps
        controlled, step i of N when start <= i/N and (i+1)/N <= end. Control images are stretched to the
        output size; without an image, width and height follow the first control image like an input image.

        variety: seeded noise of variety x their std added to the prompt embeddings for the steps
        i/N < variety_until (more different images across seeds; 0 changes nothing). hires_scale (1-4): the
        hires fix, a second image-to-image pass at that scale with hires_strength over hires_steps steps
        (default: steps); hires_upscaler "lanczos" (the decoded image) or "latent" (see zimage_mlx.hires).
        tile: a pass from an image (image to image, the hires pass) larger than `tile` pixels a side is denoised in
        overlapping tiles, blended every step (MultiDiffusion: a lower peak); the hires pass's default is 1024.
        reference_images (a Z-Image-Omni folder only): a path or PIL image, or a list of up to 4, each encoded once
        per call at its own size (VAE latents and SigLIP2 features, see zimage_mlx.omni); without width and height
        the output takes the last reference's size. An Omni folder runs text-only prompts through the omni
        sequence as well.
        """
        run = dict(latents=latents, release_transformer=release_transformer, on_step=on_step, cancel=cancel)
        if isinstance(prompt, Recipe):
            return self.run(prompt, **run)
        recipe = recipe_from_keywords(
            prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps, guidance=guidance,
            cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation, seed=seed, num_images=num_images,
            max_sequence_length=max_sequence_length, image=image, mask=mask, strength=strength,
            image_latents=image_latents, control_image=control_image, control_scale=control_scale,
            control_start=control_start, control_end=control_end, variety=variety, variety_until=variety_until,
            hires_scale=hires_scale, hires_strength=hires_strength, hires_steps=hires_steps,
            hires_upscaler=hires_upscaler, tile=tile, reference_images=reference_images)
        return self.run(recipe, **run)

    def upscale(self, image, *, scale: float = 2.0, prompt: str | None = None, strength: float | None = None,
                steps: int | None = None, seed: int | None = None, tile: int | None = None, **run) -> list:
        """The hires fix's second pass over any image (a path or a PIL image): Lanczos to scale x its size
        (multiples of 16), then image-to-image at `strength` (0.35). For one of ours, its stored prompt, seed
        and steps are the defaults. `run`: run()'s keywords (on_step, cancel...). See zimage_mlx.hires."""
        return self.run(upscale_recipe(image, scale=scale, prompt=prompt, strength=strength, steps=steps,
                                       seed=seed, tile=tile), **run)

    def run(self, recipe: Recipe, *, latents: mx.array | None = None, release_transformer: bool = False,
            on_step: Callable[[Step], None] | None = None, cancel=None, batch_size: int | None = None,
            release: bool = False, on_image: Callable[[int, object], None] | None = None,
            on_enhanced: Callable[[int, Recipe], None] | None = None) -> list:
        """Make the images of a `Recipe`: validate and settle it, draw its seed if it has none, apply its LoRAs
        (when it names them; None keeps what is loaded), rewrite its prompts when `enhance` (one rewrite per
        image, seeded by its seed; `on_enhanced(k, image_recipe)` as each is ready), and denoise and decode
        `batch_size` images of one prompt at a time (None: all at once). `on_image(k, image)` gets each image
        as it is made. `release=True` is for a process's last use of the pipeline: the text encoder is freed
        once every prompt is encoded and the DiT before the last decode. See `generate` for the rest."""
        self._check_thread()
        recipe = self.prepare(recipe)
        if self.parallel is not None and self.parallel.active:  # a job over several ranks
            return self.parallel.run(self, recipe, latents=latents, on_step=on_step, cancel=cancel,
                                     release=release or release_transformer, on_image=on_image)
        self._sync_loras(recipe)
        items = recipe.images()
        if latents is not None and tuple(latents.shape[1:]) != (recipe.height // 8, recipe.width // 8, LATENT_CHANNELS) \
                or latents is not None and latents.shape[0] != len(items):
            raise InputError(f"latents must have shape {(len(items), recipe.height // 8, recipe.width // 8, LATENT_CHANNELS)}, "
                             f"got {tuple(latents.shape)}", "latents")
        if recipe.enhance and recipe.original_prompt is None:
            items = self._enhance(items, cancel, on_enhanced)
        images = []
        z = recipe.init_latents
        for lo, hi in batches([r.prompt for r in items], batch_size):
            last, batch = hi == len(items), items[lo:hi]
            if z is not None and z.shape[0] == len(items) > 1:  # one row per image: this batch's rows
                batch = [x.replace(init_latents=z[lo:hi]) for x in batch]
            described = [self.describe(r) for r in batch]  # before release_transformer frees the ControlNet
            free, hires = (release or release_transformer) and last, recipe.hires_scale is not None
            made = self._make(batch, None if latents is None else latents[lo:hi], prompts=[r.prompt for r in items],
                              release=release, release_transformer=free and not hires, on_step=on_step, cancel=cancel,
                              decode=not (hires and recipe.hires_upscaler == "latent"))
            if hires:  # the hires fix: each image's second pass (hires.py)
                made = run_second_passes(self, batch, made, prompts=[r.prompt for r in items], release=release,
                                         release_transformer=free, on_step=on_step, cancel=cancel)
            for k, (r, image) in enumerate(zip(described, made), lo):
                image.info["recipe"] = r
                if latents is None:
                    image.info["seed"] = r.seed
                if on_image is not None:
                    on_image(k, image)
            images += made
        return images

    def auto_batch_size(self, width: int, height: int, cap: int = 8) -> int:
        """How many images of one prompt to denoise together. On a CPU 1: batching was measured no faster there
        (benchmarks/README.md, "Batching"), the GEMMs are already large. On a GPU as many as fit in the memory left
        after the weights, counting per image the DiT step's activations (0.97 GB at 1024x1024 in bfloat16,
        measured; scaled by pixels and dtype) and the VAE decode's (taken as 2.4 GB at 1024x1024, the measured
        tiled-decode peak, as a margin), and keeping a quarter of the memory free."""
        if mx.default_device() == mx.cpu or self.parallel:
            return 1
        try:
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            total = int(info.get("max_recommended_working_set_size") or info.get("memory_size"))
        except (AttributeError, TypeError, ValueError, RuntimeError):
            return 1
        scale = width * height / 1024**2 * (2 if self.dtype == "float32" else 1)
        per_image = (0.97e9 + 2.4e9) * scale
        free = 0.75 * total - mx.get_active_memory()
        return max(1, min(cap, int(free // per_image)))

    def prepare(self, recipe: Recipe) -> Recipe:
        """A recipe checked, its size and strength settled and its seed decided (what `run` makes)."""
        if not isinstance(recipe, Recipe):
            raise TypeError(f"expected a Recipe, got {type(recipe).__name__}")
        recipe = recipe.validate().settle().validate()
        if recipe.reference_images and self.siglip_processor is None:
            raise InputError("{reference_images} need a Z-Image-Omni model (a folder with siglip/ and "
                             "siglip_processor/)", "reference_images", ("reference_images",))
        if self.siglip_processor is not None:
            from .omni import check_omni_run

            check_omni_run(recipe, self.dtype)
        if recipe.controls and self.controlnet is None:
            raise InputError("{controls} need a ControlNet: call load_controlnet(...) first", "controls", ("controls",))
        self._dit().check_sizes(recipe.height // 8, recipe.width // 8, [1])
        if recipe.hires_scale is not None:
            self._dit().check_sizes(recipe.hires_size[1] // 8, recipe.hires_size[0] // 8, [1])
        if self.parallel is not None and self.parallel.active and recipe.seed is None:
            return recipe.replace(seed=self.parallel.agree_seed(None))
        return recipe.with_seed()

    def describe(self, recipe: Recipe) -> Recipe:
        """The recipe as this pipeline makes it: its model, quantization, dtype, LoRAs and ControlNet filled in."""
        net = self.controlnet if recipe.controls else None
        return recipe.replace(
            model=self.label, transformer=self.transformer_file, quantization=self.quantization["transformer"],
            text_encoder_quantization=self.quantization["text_encoder"], quantize=self.quantize, dtype=self.dtype,
            loras=[LoraRef(model_label(name), scale) for name, scale in self.loras],
            controlnet=(recipe.controlnet or self.controlnet_label) if net is not None else None,
            controlnet_graph=net.graph if net is not None else None,
            controls=[ControlRef(c.image, net.args.scale if c.scale is None else c.scale) for c in recipe.controls])

    def _sync_loras(self, recipe: Recipe) -> None:
        """Make the applied LoRAs those the recipe names (None: leave them)."""
        if recipe.loras is None:
            return
        want = [(str(x.load) if not isinstance(x.load, Lora) else x.load.name, float(x.scale)) for x in recipe.loras]
        if want == self.loras:
            return
        self.unload_loras()
        try:
            for ref in recipe.loras:
                self.load_lora(ref.load, ref.scale, fuse=False)  # beside the layers: no second copy of the DiT
        except Exception:
            self.unload_loras()
            raise

    def _enhance(self, items: list[Recipe], cancel, on_enhanced) -> list[Recipe]:
        """Each image's prompt rewritten, seeded by its seed (one call: --low-memory loads the encoder once)."""
        _check_cancel(cancel)
        todo = list(dict.fromkeys((r.prompt, r.seed) for r in items))
        texts = self.enhance_prompt([p for p, _ in todo], seed=[s for _, s in todo])
        rewrites = dict(zip(todo, texts))
        out = [r.replace(prompt=rewrites[(r.prompt, r.seed)], original_prompt=r.prompt) for r in items]
        for k, r in enumerate(out):
            if on_enhanced is not None:
                on_enhanced(k, r)
        return out

    def _make(self, batch: list[Recipe], latents, *, prompts: list[str], release: bool, release_transformer: bool,
              on_step, cancel, decode: bool = True) -> list:
        """Denoise and decode images that differ only in prompt and seed (one DiT batch); without `decode`,
        the final latents."""
        r = batch[0]
        h, w = r.height // 8, r.width // 8
        seeds = [x.seed for x in batch]
        if latents is None:
            latents = mx.concatenate([noise(s, h, w) for s in seeds])
        sigmas = self.sigmas(r.steps, width=r.width, height=r.height)
        inpaint, init = {}, None
        if r.has_image:
            _check_cancel(cancel)
            init = ImageInput(r.init_image, r.init_mask, r.init_latents, r.width, r.height, r.strength)
            sigmas, latents, inpaint = self._start_from_image(init, sigmas, latents, seeds)
        control = None
        if r.controls and len(sigmas) > 1:
            from .controlnet import ControlInputs, plan

            _check_cancel(cancel)
            inputs = ControlInputs([c.pixels for c in r.controls], [c.scale for c in r.controls], r.control_start,
                                   r.control_end)
            control = plan(self, inputs, r.width, r.height, init)
        _check_cancel(cancel)
        if len(sigmas) > 1:  # a strength that leaves no step needs no prompt either
            latents = self._denoise_batch(batch, latents, sigmas, control, inpaint, prompts, release, on_step, cancel)
        _check_cancel(cancel)
        if release_transformer:
            mx.eval(latents)
            self.release_transformer()
        return self.decode(latents) if decode else latents

    def _denoise_batch(self, batch, latents, sigmas, control, inpaint, prompts, release, on_step, cancel):
        r = batch[0]
        if self.siglip_processor is not None:  # an Omni folder: always the omni sequence (omni.py)
            return self._denoise_omni(batch, latents, sigmas, release, on_step, cancel)
        negatives = [x.negative_prompt or "" for x in batch] if r.guidance > 0 else []
        self._encode_chunk(batch[0].prompt, prompts, negatives[:1], r.max_sequence_length, release)
        feats = self.encode_prompt([x.prompt for x in batch] + negatives, r.max_sequence_length)
        pos, neg = feats[: len(batch)], feats[len(batch):] or None
        if r.tile is not None and r.has_image:  # MultiDiffusion, for passes from an image
            inpaint = dict(inpaint, tile=r.tile)
        if r.variety > 0:  # variety 0 adds no op at all
            inpaint = dict(inpaint, early_embeds=[vary(p, x.seed, r.variety) for p, x in zip(pos, batch)],
                           early_steps=variety_steps(r.variety_until, len(sigmas) - 1))
        for step in self.denoise(pos, latents, sigmas, negative_embeds=neg, guidance=r.guidance,
                                 cfg_normalization=r.cfg_normalization, cfg_truncation=r.cfg_truncation,
                                 control=control, **inpaint):
            latents = step.latents
            if on_step is not None:
                on_step(step)
            _check_cancel(cancel)
        return latents

    def _denoise_omni(self, batch, latents, sigmas, release, on_step, cancel):
        """An Omni folder's denoising: the references encoded once per call, each prompt split around them."""
        from .omni import encode_segments, prompt_segments

        r = batch[0]
        cond = self._omni_conditions(r)
        encoder = self.text_encoder or self._load_text_encoder()
        prompts = [x.prompt for x in batch] + ([x.negative_prompt or "" for x in batch] if r.guidance > 0 else [])
        feats = [encode_segments(encoder, prompt_segments(p, len(cond)), r.max_sequence_length) for p in prompts]
        mx.eval(feats)
        if self.text_encoder is None:
            encoder.release()
        elif release or self.low_memory:
            self.release_text_encoder()
        del encoder
        pos, neg = feats[: len(batch)], feats[len(batch):] or None
        for step in self.denoise(pos, latents, sigmas, negative_embeds=neg, guidance=r.guidance,
                                 cfg_normalization=r.cfg_normalization, cfg_truncation=r.cfg_truncation, omni=cond):
            latents = step.latents
            if on_step is not None:
                on_step(step)
            _check_cancel(cancel)
        return latents

    def _omni_conditions(self, r: Recipe):
        """The recipe's references encoded (VAE latents, mode; SigLIP grids), once per call: the batches of one
        call share the opened list. The SigLIP tower is loaded for the encoding in low-memory mode."""
        from .omni import OmniConditions, reference_pixels, resized_reference

        key = (r.width, r.height)
        if self._omni_cache is not None and self._omni_cache[0] is r.reference_pixels and self._omni_cache[1] == key:
            return self._omni_cache[2]
        refs = [resized_reference(im, r.width, r.height) for im in r.reference_pixels]
        latents, grids = [], []
        if refs:
            tower = self.siglip or self._load_siglip()
            for im in refs:
                mean, _ = self.vae.posterior(reference_pixels(im))  # (1, h, w, 16): the mode, as diffusers
                latents.append(self.vae.scale_latents(mean)[0])
                grids.append(tower.encode(self.siglip_processor, im).astype(mx.float32))
                mx.eval(latents[-1], grids[-1])
            del tower
            if self.siglip is None:
                mx.clear_cache()
        cond = OmniConditions(latents, grids)
        self._omni_cache = (r.reference_pixels, key, cond)
        return cond

    def _encode_chunk(self, prompt: str, prompts: list[str], negative: list[str], max_sequence_length: int,
                      release: bool) -> None:
        """Encode the prompts of a run a few (8) at a time, from `prompt` on, when `prompt` is not cached yet
        (with the negative prompt); free the text encoder once the last are cached when `release` or in
        low-memory mode, before their denoising: the peak is the largest phase, not a sum."""
        unique = list(dict.fromkeys(prompts))
        i = unique.index(prompt)
        if (prompt, max_sequence_length) not in self._prompt_cache or (
                negative and (negative[0], max_sequence_length) not in self._prompt_cache):
            self.encode_prompt(unique[i: i + PROMPT_CHUNK] + negative, max_sequence_length)
        if (release or self.low_memory) and i + PROMPT_CHUNK >= len(unique):
            self.release_text_encoder()

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


def batches(prompts: list[str], size: int | None):
    """(first, end) ranges of the images to denoise together: all of them (size None), else consecutive images
    of one prompt, at most `size` of them."""
    if size is None:
        yield 0, len(prompts)
        return
    first = 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[first] or i - first == size:
            yield first, i
            first = i


def recipe_from_keywords(prompt, *, negative_prompt=None, seed=None, num_images=1, image=None, mask=None,
                         image_latents=None, control_image=None, control_scale=None, reference_images=None,
                         **fields) -> Recipe:
    """generate()'s keywords as a Recipe: a seed list is one seed per image; images and masks are opened."""
    check_prompts(prompt, "prompt")
    if isinstance(fields.get("cfg_normalization"), bool):  # True meant 1.0
        fields["cfg_normalization"] = float(fields["cfg_normalization"])
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        negative_prompt = check_prompts(negative_prompt, "negative_prompt")
    if isinstance(seed, (list, tuple)):  # one seed per image of each prompt: several seeds in one batch
        if seed and num_images not in (1, len(seed)):
            raise InputError(f"{len(seed)} seeds with num_images={num_images}: give num_images={len(seed)} or "
                             "leave it out", "num_images")
        seed, num_images = list(seed), 1
    if image_latents is not None and not (isinstance(image_latents, mx.array) and image_latents.ndim == 4
                                          and image_latents.shape[-1] == LATENT_CHANNELS):
        raise TypeError(f"image_latents must be an mx.array of shape (1 or B, h, w, {LATENT_CHANNELS})")
    controls = []
    if control_image is not None or control_scale is not None:
        from .controlnet import control_inputs

        checked = control_inputs(control_image, control_scale, fields["control_start"], fields["control_end"])
        names = control_image if isinstance(control_image, (list, tuple)) else [control_image]
        controls = [ControlRef(file_name(n), s, im) for n, s, im in zip(names, checked.scales, checked.images)]
    return Recipe(prompt=prompt if isinstance(prompt, str) else list(prompt), negative_prompt=negative_prompt or None,
                  seed=seed, num_images=num_images, image=file_name(image), mask=file_name(mask),
                  init_image=None if image is None else open_image(image, "image"),
                  init_mask=None if mask is None else open_image(mask, "mask"), init_latents=image_latents,
                  controls=controls, **_references(reference_images), **fields)


def _references(images) -> dict:
    """reference_images (a path or PIL image, or a list of them) as the recipe's names and opened images."""
    if images is None:
        return {}
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    return dict(reference_images=[file_name(x) for x in images],
                reference_pixels=[open_image(x, "reference image", "reference_images") for x in images])
