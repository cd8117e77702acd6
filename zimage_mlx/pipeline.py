"""ZImagePipeline: the three models held in memory between calls, and the stages of a generation.

Follows diffusers' `pipelines/z_image/pipeline_z_image.py`: the prompt is encoded by Qwen3 (second to
last hidden state), float32 noise is denoised by flow-match Euler with the DiT's prediction negated,
and the FLUX VAE decodes. Work is lazy: the pipeline evaluates once after encoding and once per step.
Loading, the stages (encode_prompt, denoise, decode, previews) and the adapters (LoRAs, ControlNet) live here;
how a Recipe becomes images (`generate`, `run`) is run.py's `RecipeRunner`, which the pipeline is.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx

from . import fp16, kernels
from .enhance import PromptEnhancer, check_options
from .errors import InputError
from .fp16 import Float16OverflowWarning
from .inputs import MAX_SEED
from .lora import Lora, apply_lora, read_lora, restore
from .recipe import DEFAULT_MODEL, check_prompts
from .run import RecipeRunner
from .sampler import FlowMatchScheduler, Step, apply_cfg, euler_step, guidance_for_step, model_time, scale_noise
from .sources import read_config, resolve_model
from .text_encoder import TextEncoder
from .text_encoder import default_bits as text_encoder_bits
from .tiles import TiledDiT
from .transformer import ZImageTransformer
from .vae import VAE, auto_tile_size, to_pil
from .weights import model_label, stored_bits

LOW_MEMORY_TILE = 64  # latent pixels (512 image pixels) per VAE tile side in low-memory mode


def default_dtype() -> str:
    """bfloat16 on an Apple GPU; float32 on CPU, where MLX's bfloat16 matmul is slow."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def _load_dit(folder: Path, dtype: str, choice, stored_dtype: str | None, quantize: int | None, par):
    """The DiT in the dtype `choice` settles on (fp16.choose_dtype): on M1/M2 without stored statistics it is
    judged on the float16 weights just loaded and loaded again in bfloat16 when they fail; a float16 asked for
    explicitly on a failing checkpoint is honoured, with a warning (the per-step guard catches what overflows).
    `par`: a distributed.Parallel (its ranks load their shards) or None. Returns (transformer, choice)."""
    def load(dt: str):
        if par is not None:
            return par.load_transformer(folder, dt, quantize)
        return ZImageTransformer.from_pretrained(folder, dtype=dt, quantize=quantize)

    transformer = load(choice.dtype)
    if choice.pending:  # M1/M2 and no stored statistics: judged on the float16 weights just loaded
        choice = fp16.choose_dtype(dtype, transformer.fp16_stats, stored=stored_dtype)
        if choice.dtype != "float16":
            transformer = None
            transformer = load(choice.dtype)
    if choice.dtype == "float16" and transformer.fp16_stats is not None:
        ok, why = fp16.verdict(transformer.fp16_stats)
        if not ok:  # asked for explicitly: honoured, with the guard to catch what overflows
            choice.reason += f"; the checkpoint fails the float16 checks: {why}"
            warnings.warn(Float16OverflowWarning(f"float16 was requested but {why}: expect steps redone in "
                                                 "bfloat16 (dtype='bfloat16' avoids the retries)"), stacklevel=3)
    return transformer, choice


class ZImagePipeline(RecipeRunner):
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
        transformer, choice = _load_dit(root / "transformer", dtype, choice, stored_dtype, quantize, par)
        dtype = choice.dtype
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
        pipe._load_omni_parts()
        return pipe

    def _load_omni_parts(self) -> None:
        """A Z-Image-Omni folder's SigLIP2 processor, and its tower unless in low-memory mode (omni.py)."""
        from .omni import is_omni_folder

        if is_omni_folder(self.root):
            from .siglip import SiglipProcessor

            self.siglip_processor = SiglipProcessor.from_pretrained(self.root / "siglip_processor")
            if not self.low_memory:
                self.siglip = self._load_siglip()

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
                pred = self._prediction(dit, x, t, caps, negative_embeds, g, cfg_normalization, kw)
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

    def _prediction(self, dit, x: mx.array, t: mx.array, caps: list, negatives: list | None, g: float,
                    cfg_normalization, kw: dict) -> mx.array:
        """One step's prediction (float32): with guidance g > 0, the positive and negative branches as one batch
        (or one branch per rank in cfg parallelism), combined by CFG."""
        B = x.shape[0]
        if g > 0 and "control" not in kw and self.parallel is not None and self.parallel.mode == "cfg":
            both = self.parallel.guided(dit, x, t, caps, negatives, **kw)  # a branch per rank
        elif g > 0:
            both = dit(mx.concatenate([x, x]), mx.concatenate([t, t]), list(caps) + list(negatives), **kw)
        else:
            return dit(x, t, caps, **kw).astype(mx.float32)
        return apply_cfg(both[:B], both[B:], g, cfg_normalization)

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
