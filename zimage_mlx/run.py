"""How a Recipe becomes images: `generate(prompt, **keywords)` builds one, `run(recipe)` makes it.

`RecipeRunner` is the part of `ZImagePipeline` that turns a `Recipe` into images with the pipeline's stages
(encode_prompt, denoise, decode; pipeline.py): it validates and settles the recipe, draws its seed, applies its
LoRAs, rewrites its prompts when asked, batches its images, starts from an input image, runs ControlNet, seed
variety and the hires fix, and gives every image its own recipe (`image.info["recipe"]`).
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from .errors import Cancelled, InputError
from .hires import run_second_passes, upscale_recipe
from .inputs import LATENT_CHANNELS, ImageInput, image_input, mask_latents, open_image, validate
from .lora import Lora
from .noise import image_key, noise, variety_steps, vary
from .recipe import ControlRef, LoraRef, Recipe, check_prompts, file_name
from .sampler import Step, scale_noise, strength_start
from .vae import from_pil
from .weights import model_label

PROMPT_CHUNK = 8  # prompts encoded together by a run (the prompt cache holds 32)


class RecipeRunner:
    """ZImagePipeline's recipe-running methods (a mixin: it uses the pipeline's stages and state)."""

    def generate(self, prompt, *, negative_prompt: str | list[str] | None = None, width: int | None = None,
                 height: int | None = None, steps: int = 8, guidance: float = 0.0, cfg_normalization: float = 0.0,
                 cfg_truncation: float = 1.0, seed: int | list[int] | None = None, num_images: int = 1,
                 latents: mx.array | None = None, max_sequence_length: int = 512, image=None, mask=None,
                 strength: float | None = None, image_latents: mx.array | None = None,
                 release_transformer: bool = False, on_step: Callable[[Step], None] | None = None, cancel=None,
                 control_image=None, control_scale: float | list[float] | None = None, control_start: float = 0.0,
                 control_end: float = 1.0, variety: float = 0.0, variety_until: float = 0.5,
                 hires_scale: float | None = None, hires_strength: float = 0.35, hires_steps: int | None = None,
                 hires_upscaler: str = "lanczos", hires_control: bool | str | None = None,
                 hires_control_scale: float | None = None, tile: int | None = None, reference_images=None) -> list:
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

        variety, variety_until: seed variety (noise.vary). hires_scale, hires_strength, hires_steps,
        hires_upscaler, hires_control (True: the loaded Tile ControlNet on the second pass), hires_control_scale:
        the hires fix (zimage_mlx.hires); tile: MultiDiffusion tiles for passes from an image (zimage_mlx.tiles).
        reference_images (Z-Image-Omni folders): up to 4 paths or PIL images, each encoded once per call at its
        own size (zimage_mlx.omni); without width and height the output takes the last reference's size.
        docs/hires.md and docs/omni.md say more.
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
            hires_upscaler=hires_upscaler, hires_control=hires_control, hires_control_scale=hires_control_scale,
            tile=tile, reference_images=reference_images)
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
        _check_latents(latents, recipe, len(items))
        if recipe.enhance and recipe.original_prompt is None:
            items = self._enhance(items, cancel, on_enhanced)
        prompts, images = [r.prompt for r in items], []
        for lo, hi in batches(prompts, batch_size):
            made = self._run_batch(recipe, items, lo, hi, None if latents is None else latents[lo:hi], prompts,
                                   release=release, free=(release or release_transformer) and hi == len(items),
                                   on_step=on_step, cancel=cancel)
            for k, image in enumerate(made, lo):
                if latents is not None:
                    image.info.pop("seed")  # the caller's noise: the seed alone does not give the image back
                if on_image is not None:
                    on_image(k, image)
            images += made
        return images

    def _run_batch(self, recipe: Recipe, items: list[Recipe], lo: int, hi: int, latents, prompts: list[str], *,
                   release: bool, free: bool, on_step, cancel) -> list:
        """Images lo..hi of a run (one DiT batch), each with its recipe and seed in `info`; `free`: the run's
        last batch of a last use (the DiT is freed before its last decode)."""
        batch, z = items[lo:hi], recipe.init_latents
        if z is not None and z.shape[0] == len(items) > 1:  # one row per image: this batch's rows
            batch = [x.replace(init_latents=z[lo:hi]) for x in batch]
        described = [self.describe(r) for r in batch]  # before release_transformer frees the ControlNet
        hires = recipe.hires_scale is not None
        made = self._make(batch, latents, prompts=prompts, release=release, release_transformer=free and not hires,
                          on_step=on_step, cancel=cancel, decode=not (hires and recipe.hires_upscaler == "latent"))
        if hires:  # the hires fix: each image's second pass (hires.py)
            made = run_second_passes(self, batch, made, prompts=prompts, release=release, release_transformer=free,
                                     on_step=on_step, cancel=cancel)
        for r, image in zip(described, made):
            image.info.update(recipe=r, seed=r.seed)
        return made

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
        if recipe.hires_control and self.controlnet is None:
            raise InputError("{hires_control} needs a ControlNet: call load_controlnet(...) first", "hires_control",
                             ("hires_control",))
        self._dit().check_sizes(recipe.height // 8, recipe.width // 8, [1])
        if recipe.hires_scale is not None:
            self._dit().check_sizes(recipe.hires_size[1] // 8, recipe.hires_size[0] // 8, [1])
        if self.parallel is not None and self.parallel.active and recipe.seed is None:
            return recipe.replace(seed=self.parallel.agree_seed(None))
        return recipe.with_seed()

    def describe(self, recipe: Recipe) -> Recipe:
        """The recipe as this pipeline makes it: its model, quantization, dtype, LoRAs and ControlNet filled in."""
        net = self.controlnet if recipe.controls else None
        hires = self.controlnet if recipe.hires_control and recipe.hires_scale is not None else None
        return recipe.replace(
            hires_control=(recipe.hires_control if isinstance(recipe.hires_control, str) else
                           self.controlnet_label or hires.args.name) if hires is not None else None,
            hires_control_scale=(hires.args.scale if recipe.hires_control_scale is None else
                                 recipe.hires_control_scale) if hires is not None else None,
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
        return _follow(self.denoise(pos, latents, sigmas, negative_embeds=neg, guidance=r.guidance,
                                    cfg_normalization=r.cfg_normalization, cfg_truncation=r.cfg_truncation,
                                    control=control, **inpaint), latents, on_step, cancel)

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
        return _follow(self.denoise(pos, latents, sigmas, negative_embeds=neg, guidance=r.guidance,
                                    cfg_normalization=r.cfg_normalization, cfg_truncation=r.cfg_truncation,
                                    omni=cond), latents, on_step, cancel)

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


def _check_latents(latents, recipe: Recipe, n: int) -> None:
    """The caller's noise, when given, has one row per image of the recipe's size."""
    want = (n, recipe.height // 8, recipe.width // 8, LATENT_CHANNELS)
    if latents is not None and tuple(latents.shape) != want:
        raise InputError(f"latents must have shape {want}, got {tuple(latents.shape)}", "latents")


def _follow(steps, latents, on_step, cancel):
    """Run a denoising generator to its end, handing each Step to on_step and checking cancel after it; the
    final latents (`latents` when no step runs)."""
    for step in steps:
        latents = step.latents
        if on_step is not None:
            on_step(step)
        _check_cancel(cancel)
    return latents


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
