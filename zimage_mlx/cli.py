"""The `zimage-mlx` command line: `generate` here; other commands register on the `main` group.

Everything is checked before the model loads (loading the release takes a while), expected mistakes end
in one `Error: ...` line with exit code 2, and images are written to a temporary file that is renamed
into place, so an interrupted run leaves no half-written PNG. Progress bars live here, not in the library.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import secrets
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import click
from click.core import ParameterSource

from . import __version__

# The pipeline's DEFAULT_MODEL, repeated so that `--help` does not import MLX (a test checks they agree).
DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
DEFAULT_OUTPUT = "zimage-{seed}.png"
# Tried in order when --output is not given, until every image gets its own file name.
DEFAULT_OUTPUTS = (DEFAULT_OUTPUT, "zimage-{prompt_index}-{seed}.png", "zimage-{index}-{seed}.png")
SAMPLER_NAME = "Euler (flow match)"

from .cli_common import (Command, Group, Progress, UserError, describe_os_error, expected_errors,  # noqa: E402,F401
                         report_bug)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="zimage-mlx")
def main():
    """Z-Image Turbo text-to-image, natively in MLX."""


# ------------------------------------------------------------------------------------------------
# generate


@main.command()
@click.argument("prompt", required=False)
@click.option("--prompt", "prompt_option", metavar="TEXT", help="The prompt, as an alternative to the argument.")
@click.option("--prompt-file", metavar="FILE", help="One prompt per non-empty line ('-' reads stdin).")
@click.option("--negative-prompt", metavar="TEXT", help="What to steer away from; needs --guidance > 0.")
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help="A Hugging Face repo id or a checkpoint folder.")
@click.option("--quantize", type=click.Choice(["4", "8"]), help="Quantize on the fly: the DiT to 4 or 8 bits, the text encoder to 8.")
@click.option("--lora", "lora_specs", metavar="PATH[:SCALE]", multiple=True,
              help="Apply a LoRA (.safetensors file or Hub repo id) at SCALE (default 1); repeat to stack several.")
@click.option("--size", metavar="WxH", help="Image size, e.g. 1024x768 (or 1024 for a square).  [default: 1024x1024]")
@click.option("--width", type=int, help="Image width in pixels, a multiple of 16.")
@click.option("--height", type=int, help="Image height in pixels, a multiple of 16.")
@click.option("--image", "init_image", metavar="FILE",
              help="Start from this image (image to image). The output takes its size rounded down to multiples of "
                   "16, unless --size/--width/--height resize it (Lanczos).")
@click.option("--mask", metavar="FILE", help="Inpaint: repaint where this mask is white (same size as --image).")
@click.option("--strength", type=float, metavar="0..1",
              help="How much of --image to repaint: 0 keeps it, 1 starts from pure noise; ceil(strength x steps) "
                   "of the steps run.  [default: 0.6, with --mask 1]")
@click.option("--controlnet", metavar="PATH|ID",
              help="A Z-Image Turbo Fun ControlNet Union (1.0, 2.0, 2.1, 2.1 lite, Tile): .safetensors file, folder, "
                   "Hub repo/FILE.safetensors. The authors run 2.1 (-8steps files) at 8 steps, 1.0 at 9, 2.0 at 25.")
@click.option("--control", "control_specs", metavar="IMAGE[:SCALE]", multiple=True,
              help="A control map (edges, depth with near = white, pose, lines, tile) and its strength; repeat for "
                   "several (one ControlNet pass). SCALE defaults to the authors': 0.9 for Union 2.1 (lite, "
                   "8-step), 0.75 for 1.0 and 2.0; 0.65-1 is the useful range.")
@click.option("--control-type", type=click.Choice(["none", "canny", "lines"]), default="none", show_default=True,
              help="Compute the map from a photo: canny edges, or lines (LSD, a stand-in for MLSD); needs "
                   "pip install 'zimage-mlx[control]'.")
@click.option("--control-start", type=float, default=0.0, show_default=True, metavar="0..1",
              help="First part of the steps without control.")
@click.option("--control-end", type=float, default=1.0, show_default=True, metavar="0..1",
              help="Control only the steps up to this fraction.")
@click.option("--controlnet-graph", type=click.Choice(["authors", "diffusers"]), default="authors", show_default=True,
              help="Union 2.x refiner residuals into the DiT's stream (authors, as trained) or not (diffusers).")
@click.option("--steps", type=int, default=8, show_default=True, help="Denoising steps.")
@click.option("--guidance", type=float, default=0.0, show_default=True,
              help="CFG scale; Turbo is distilled to run without it (0).")
@click.option("--cfg-normalization", type=float, default=0.0, is_flag=False, flag_value=1.0, metavar="[FACTOR]",
              help="Cap the guided prediction's norm at FACTOR times the positive one's (alone: 1).")
@click.option("--cfg-truncation", type=float, default=1.0, show_default=True,
              help="Stop guidance once t = 1 - sigma passes this value.")
@click.option("--seed", type=int, multiple=True, help="Random seed; repeat for several (default: a random one).")
@click.option("--num-images", type=int, default=1, show_default=True,
              help="Images per prompt and seed; image k uses seed + k.")
@click.option("--batch-size", type=int, metavar="N",
              help="Images of one prompt that go through the DiT together, each identical to the one made alone. "
                   "[default: chosen from free memory on a GPU; 1 on a CPU, where batching measured no faster]")
@click.option("-o", "--output", metavar="TEMPLATE",
              help="Output .png path with {seed}, {index}, {prompt_index}; a folder ending in / is allowed.  "
                   f"[default: {DEFAULT_OUTPUT}]")
@click.option("--overwrite", is_flag=True, help="Replace existing files (by default nothing is overwritten).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="Compute dtype; auto is float32 on CPU, float16 on M1/M2 for checkpoints "
                   "that pass the float16 checks, else bfloat16 (--verbose says why).")
@click.option("--low-memory", is_flag=True, help="Load the text encoder only while encoding; decode in tiles.")
@click.option("--metadata/--no-metadata", default=True, show_default=True,
              help="Store the settings in the PNG (A1111 `parameters` chunk included).")
@click.option("--from-image", metavar="PNG",
              help="Take prompt, seed, steps, guidance, size and model from a PNG's metadata; flags override.")
@click.option("--quiet", is_flag=True, help="Print only the output paths.")
@click.option("--preview", "preview_path", metavar="FILE",
              help="Rewrite FILE (.png, .jpg or .webp) after every step with a cheap preview of the image forming, "
                   "to watch it in an image viewer.")
@click.option("--enhance", is_flag=True,
              help="First rewrite each prompt into a detailed one with the text encoder's own Qwen3 (seeded by the "
                   "image seed); printed, and stored in the PNG next to the original.")
@click.option("--verbose", is_flag=True, help="Also print why the compute dtype was chosen.")
@click.option("--parallel", type=click.Choice(["auto", "data", "tensor", "cfg"]),
              help="Under mlx.launch (several processes, one job): split the images over the ranks (data), shard "
                   "the model (tensor), or run the two CFG branches on two ranks (cfg). auto: data with at least "
                   "as many images as ranks, cfg for a CFG run on 2 ranks, else tensor.  [default: auto]")
@click.pass_context
def generate(ctx, prompt, prompt_option, prompt_file, negative_prompt, model, quantize, size, width, height, steps,
             guidance, cfg_normalization, cfg_truncation, seed, num_images, output, overwrite, dtype, low_memory,
             metadata, from_image, quiet, lora_specs, init_image, mask, strength, preview_path, enhance, controlnet,
             control_specs, control_type, control_start, control_end, controlnet_graph, verbose, batch_size, parallel):
    """Generate images from a prompt (or several: --prompt-file), one file per prompt, seed and image.

    \b
      zimage-mlx generate "a red fox in the snow, golden hour" --seed 42
      zimage-mlx generate --prompt-file prompts.txt --seed 1 --seed 2 --size 1024x768 -o out/{prompt_index}-{seed}.png
      zimage-mlx generate --from-image zimage-42.png --steps 12 -o again.png
      zimage-mlx generate "the same street at night" --image street.jpg --strength 0.7
      zimage-mlx generate "a red vintage car" --image street.jpg --mask car-mask.png
      zimage-mlx generate "a portrait, watercolor" --lora watercolor.safetensors:0.8
      zimage-mlx generate "a cat on a windowsill" --enhance --seed 7
      zimage-mlx generate "a glass house" --controlnet union-2.1-lite-8steps.safetensors --control photo.jpg --control-type canny
    """
    from .pipeline import MAX_SEED, image_input, open_image, validate  # MLX and transformers load here, not for --help
    from .sampler import strength_start

    def given(name):
        return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)

    # 1. Everything the user typed, checked before the model loads.
    prompts = read_prompts(prompt, prompt_option, prompt_file)
    width, height = parse_size(size, width, height)
    quantize = int(quantize) if quantize else None
    loras = [parse_lora(spec) for spec in lora_specs]
    replayed_original = None
    controls = [parse_control(spec) for spec in control_specs]
    model_path, lora_paths, controlnet_path = None, None, None  # what --from-image found in the HF cache
    if from_image is not None:
        saved = read_image_settings(from_image)
        if given("init_image"):  # a new image brings its own size; the stored one would resize it
            saved.pop("width", None), saved.pop("height", None)
        else:
            init_image = saved_file(from_image, saved.get("image"))
            mask = mask if given("mask") else saved_file(from_image, saved.get("mask"))
        strength = strength if given("strength") else saved.get("strength")
        if not prompts and "original_prompt" in saved:  # an enhanced image: replay its rewrite, no LLM run
            replayed_original = saved["original_prompt"]
        prompts = prompts or [saved["prompt"]]
        seed = seed or ((saved["seed"],) if "seed" in saved else ())
        steps = steps if given("steps") else saved.get("steps", steps)
        guidance = guidance if given("guidance") else saved.get("guidance", guidance)
        cfg_normalization = cfg_normalization if given("cfg_normalization") else saved.get("cfg_normalization", cfg_normalization)
        cfg_truncation = cfg_truncation if given("cfg_truncation") else saved.get("cfg_truncation", cfg_truncation)
        width = width or saved.get("width")
        height = height or saved.get("height")
        model = model if given("model") else saved.get("model", model)
        # "quantize" (the on-the-fly bits) since the PNG also records a converted folder's own quantization
        quantize = quantize if given("quantize") else saved.get("quantize", saved.get("quantization", quantize))
        dtype = dtype if given("dtype") else saved.get("dtype", dtype)
        loras = loras if given("lora_specs") else saved.get("loras", loras)
        if not given("control_specs"):  # --controlnet alone names where the stored ControlNet is
            controlnet = controlnet if given("controlnet") else saved.get("controlnet", controlnet)
            controls = [(saved_file(from_image, n), v) for n, v in saved.get("controls", controls)]
            control_type = control_type if given("control_type") else saved.get("control_type", control_type)
            control_start = control_start if given("control_start") else saved.get("control_start", control_start)
            control_end = control_end if given("control_end") else saved.get("control_end", control_end)
            controlnet_graph = controlnet_graph if given("controlnet_graph") else saved.get("controlnet_graph",
                                                                                             controlnet_graph)
        if not given("negative_prompt") and guidance > 0:  # a stored negative prompt only matters with CFG
            negative_prompt = saved.get("negative_prompt")
        if (given("model") and "#" in str(saved.get("model", "")) and model_label(model) != saved["model"]
                and not quiet):
            click.echo(f"Note: the image was made with {saved['model']}; the configs of --model {model_label(model)} "
                       "differ", err=True)
        model_path, lora_paths, controlnet_path = replay_sources(
            from_image, model, given("model"), loras, given("lora_specs"), controlnet,
            given("controlnet") or given("control_specs"),
            lambda line: None if quiet else click.echo(line, err=True))
    if not prompts:
        raise UserError("no prompt: pass it as an argument, with --prompt or --prompt-file, or use --from-image")
    init = None
    if init_image is not None or mask is not None or strength is not None:
        if init_image is None:
            raise UserError(f"{'--mask' if mask is not None else '--strength'} needs --image")
        with expected_errors():
            init = image_input(open_image(init_image, "--image"), open_image(mask, "--mask") if mask else None,
                               strength, width, height)
        width, height = init.width, init.height
    control = control_settings(controlnet_path or controlnet, controls, control_type, control_start, control_end,
                               width, height, init is not None)
    if control:
        width, height = control["width"], control["height"]
    width, height = width or 1024, height or 1024
    negative_prompt = negative_prompt or None
    with expected_errors():
        validate(width=width, height=height, steps=steps, guidance=guidance, num_images=num_images)
        for s in seed:
            validate(seed=s)
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if negative_prompt and guidance == 0:
        raise UserError("--negative-prompt needs --guidance > 0 (Turbo runs without CFG; try --guidance 4 with Base)")
    if not (math.isfinite(cfg_normalization) and cfg_normalization >= 0):
        raise UserError(f"--cfg-normalization must be a number >= 0, got {cfg_normalization}")
    if not (math.isfinite(cfg_truncation) and cfg_truncation >= 0):
        raise UserError(f"--cfg-truncation must be a number >= 0, got {cfg_truncation}")
    if guidance == 0 and (given("cfg_normalization") or given("cfg_truncation")) and not quiet:
        click.echo("Warning: --cfg-normalization and --cfg-truncation do nothing without --guidance > 0", err=True)

    seeds = list(seed) or [random.randint(0, MAX_SEED)]
    # One image per (prompt, seed, k), prompt-major like the pipeline; image k of a seed uses seed + k.
    jobs = [(p, (s + k) % (MAX_SEED + 1)) for p in range(len(prompts)) for s in seeds for k in range(num_images)]
    group, mode, rank0 = None, None, True
    if parallel is not None or distributed_launch():  # one job over the ranks mlx.launch started
        from . import distributed

        with expected_errors():
            group = distributed.init()
            if group.size() > 1:
                mode = distributed.choose_mode(parallel or "auto", group.size(), len(jobs), guidance)
            else:
                group = None
        rank0 = group is None or group.rank() == 0
        quiet = quiet or not rank0  # rank 0 alone prints and writes files
        preview_path = preview_path if rank0 else None
    paths = plan_outputs(output, jobs, overwrite) if rank0 else [None] * len(jobs)
    preview_file = plan_preview(preview_path, paths) if preview_path is not None else None
    source, image_settings, denoising_steps = {}, {}, steps
    if init is not None:
        source = dict(image=init.image, mask=init.mask, strength=init.strength)
        image_settings = dict(image=Path(init_image).name, strength=init.strength,  # names only: no local path
                              mask=Path(mask).name if mask else None)
        denoising_steps = steps - strength_start(steps, init.strength)  # the strength skips the first ones
    model_name = model_label(model)
    lora_labels = [model_label(name) for name, _ in loras]
    with expected_errors():  # a missing, unreadable or foreign LoRA fails here, before the model loads
        from .lora import LoraWarning, read_lora

        lora_files = [(read_lora(name), scale) for name, scale in (lora_paths or loras)]

    # 2. The model, once for all images.
    from .pipeline import ZImagePipeline
    from .text_encoder import PromptTruncatedWarning
    from .weights import resolve_model

    import mlx.core as mx

    def say(message):
        if not quiet:
            click.echo(message, err=True)

    progress = Progress(enabled=not quiet)
    mx.reset_peak_memory()
    t_start = time.perf_counter()
    with expected_errors():
        root = resolve_model(model_path or model)  # a Hub download shows its own progress bars
        progress.status(f"Loading {model_name} ...")  # on a terminal only, so that a failure stays one line
        try:
            with warnings.catch_warnings(record=True) as load_warnings:  # float16 forced on a failing checkpoint
                pipe = ZImagePipeline.from_pretrained(root, dtype=dtype, quantize=quantize, low_memory=low_memory,
                                                      **(dict(group=group, parallel=mode) if group is not None else {}))
        finally:
            progress.status("")
    show_warnings(load_warnings, set(), quiet)
    t_loaded = time.perf_counter()
    say(f"Loaded {model_name} in {t_loaded - t_start:.1f} s ({describe_pipeline(pipe)})")
    if not quiet:
        slow_blas_hint()
    if verbose:
        say(f"Dtype: {pipe.reason}")
    for lora_file, scale in lora_files:
        with expected_errors(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LoraWarning)
            pipe.load_lora(lora_file, scale, fuse=False)  # beside the layers: no second copy of the DiT
        for w in caught:
            say(f"Warning: {w.message}")
        say(f"Applied LoRA {lora_file.name} at scale {format_number(scale)}")
    control_kw, control_info = {}, {}
    if control:
        with expected_errors():
            net = pipe.load_controlnet(control["files"], graph=controlnet_graph)
        scales = [net.args.scale if s is None else s for s in control["scales"]]
        say(f"Loaded ControlNet {net.args.name}, graph {net.graph}, scale {', '.join(map(format_number, scales))}")
        control_kw = dict(control_image=control["maps"], control_scale=scales, control_start=control_start,
                          control_end=control_end)
        control_info = dict(controlnet=model_label(controlnet), controls=list(zip(control["paths"], scales)),
                            control_type=control_type, control_start=control_start, control_end=control_end,
                            controlnet_graph=net.graph)

    # The rewrites, one per image (a seeded rewrite is its image seed's), become the prompts of the jobs.
    originals = [replayed_original] * len(jobs) if replayed_original is not None else [None] * len(jobs)
    if enhance and replayed_original is None:
        originals = [prompts[p] for p, _ in jobs]
        with expected_errors():
            prompts = enhance_jobs(pipe, prompts, jobs, say, progress)
        jobs = [(i, s) for i, (_, s) in enumerate(jobs)]

    def info_for(i):  # the PNG metadata of job i
        if not metadata:
            return None
        p, s = jobs[i]
        return png_info(dict(prompt=prompts[p], negative_prompt=negative_prompt or "", seed=s, steps=steps,
                             guidance=guidance, cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation,
                             width=width, height=height, model=model_name,
                             quantization=pipe.quantization["transformer"],
                             text_encoder_quantization=pipe.quantization["text_encoder"], quantize=pipe.quantize,
                             dtype=pipe.dtype, **image_settings, original_prompt=originals[i],
                             loras=[(n, scale) for n, (_, scale) in zip(lora_labels, loras)], **control_info))

    if mode == "data":
        from .distributed import generate_files

        def make(p, s, last, callback):
            if last:  # this rank's final image: free the text encoder before its denoising
                pipe.encode_prompt([prompts[p]] + ([negative_prompt or ""] if guidance > 0 else []))
                pipe.release_text_encoder()
            return pipe.generate(prompts[p], negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                                 guidance=guidance, cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation,
                                 seed=s, num_images=1, callback=callback, release_transformer=last, **source,
                                 **control_kw)[0]

        with expected_errors():
            steps_done, step_seconds = generate_files(
                pipe, jobs, make,
                lambda i, image: save_png(image, paths[i], info_for(i), overwrite), Progress(enabled=not quiet),
                lambda i, rank, seconds: click.echo(str(paths[i]) if quiet else (
                    f"Saved {paths[i]} (seed {jobs[i][1]}, rank {rank}"
                    + (f", {denoising_steps} steps at {seconds / max(denoising_steps, 1):.2f} s/step)" if seconds else ")"))))
            steps_done *= denoising_steps
        say(f"Done: {len(jobs)} images on {group.size()} ranks in {time.perf_counter() - t_start:.1f} s "
            f"({step_seconds / max(steps_done, 1):.2f} s/step on rank 0, load {t_loaded - t_start:.1f} s), "
            f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB on rank 0")
        return

    # 3. Prompts are encoded a few at a time (one text-encoder load each in --low-memory mode); the
    # pipeline's prompt cache then serves `generate`, so step times measure denoising only. Once the last
    # prompts are encoded the text encoder is freed (Qwen3-4B: 7.8 GB in bfloat16) before their denoising,
    # and the DiT is freed before the last image is decoded: the peak is the largest phase, not a sum.
    shown = set()
    steps_done, step_seconds = 0, 0.0
    chunk = 8
    batch = batch_size or auto_batch_size(pipe, width, height)
    if batch > 1 and len(jobs) > 1:
        say(f"Batch size {batch}" + ("" if batch_size else " (auto)"))
    with expected_errors(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptTruncatedWarning)
        for first, last in batches(jobs, batch):
            i, (p, s) = first, jobs[first]
            if i == 0 or (p != jobs[i - 1][0] and p % chunk == 0):
                progress.status("Encoding prompts ...")
                with pipe.parallel.collective("encoding prompts") if pipe.parallel else nullcontext():
                    pipe.encode_prompt(prompts[p: p + chunk] + ([negative_prompt or ""] if guidance > 0 else []))
                if p + chunk >= len(prompts):  # every prompt left is cached: free the encoder before denoising
                    pipe.release_text_encoder()
                progress.status("")
            show_warnings(caught, shown, quiet)
            seeds_here = [jobs[j][1] for j in range(first, last)]
            progress.start(f"image {i + 1}/{len(jobs)} seed {s}" if last - first == 1 else
                           f"images {first + 1}-{last}/{len(jobs)} seeds {', '.join(map(str, seeds_here))}")
            images = pipe.generate(prompts[p], negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                                   guidance=guidance, cfg_normalization=cfg_normalization,
                                   cfg_truncation=cfg_truncation, seed=seeds_here if last - first > 1 else s,
                                   callback=progress, release_transformer=last == len(jobs), **source, **control_kw,
                                   on_step=preview_writer(pipe, preview_file) if preview_file else None)
            progress.finish()
            show_warnings(caught, shown, quiet)
            steps_done += denoising_steps * len(images)
            step_seconds += progress.step_seconds
            for i, image in zip(range(first, last), images):
                if not rank0:
                    continue
                save_png(image, paths[i], info_for(i), overwrite)
                if quiet:
                    click.echo(str(paths[i]))
                else:
                    click.echo(f"Saved {paths[i]} (seed {jobs[i][1]}, {denoising_steps} steps at "
                               f"{progress.step_seconds / max(denoising_steps * len(images), 1):.2f} s/step"
                               f"{' per image' if len(images) > 1 else ''}, "
                               f"decode {progress.total_seconds - progress.step_seconds:.1f} s)")
    total = time.perf_counter() - t_start
    n = len(jobs)
    say(f"Done: {n} image{'s' * (n > 1)} in {total:.1f} s ({step_seconds / max(steps_done, 1):.2f} s/step, "
        f"load {t_loaded - t_start:.1f} s), peak memory {mx.get_peak_memory() / 1e9:.2f} GB")


def batches(jobs: list[tuple[int, int]], size: int):
    """(first, end) index ranges of consecutive jobs with the same prompt, at most `size` long."""
    first = 0
    for i in range(1, len(jobs) + 1):
        if i == len(jobs) or jobs[i][0] != jobs[first][0] or i - first == size:
            yield first, i
            first = i


def auto_batch_size(pipe, width: int, height: int, cap: int = 8) -> int:
    """How many images of one prompt to denoise together. On a CPU 1: batching was measured no faster there
    (benchmarks/README.md, "Batching"), the GEMMs are already large. On a GPU as many as fit in the memory left
    after the weights, counting per image the DiT step's activations (0.97 GB at 1024x1024 in bfloat16,
    measured; scaled by pixels and dtype) and the VAE decode's (taken as 2.4 GB at 1024x1024, the measured
    tiled-decode peak, as a margin), and keeping a quarter of the memory free."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu or pipe.parallel:
        return 1
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        total = int(info.get("max_recommended_working_set_size") or info.get("memory_size"))
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return 1
    scale = width * height / 1024**2 * (2 if pipe.dtype == "float32" else 1)
    per_image = (0.97e9 + 2.4e9) * scale
    free = 0.75 * total - mx.get_active_memory()
    return max(1, min(cap, int(free // per_image)))


def enhance_jobs(pipe, prompts: list[str], jobs: list[tuple[int, int]], say, progress) -> list[str]:
    """The rewritten prompt of each (prompt, seed) job, seeded by the job's image seed (in one call, so that
    --low-memory loads the text encoder once); each is printed once."""
    todo = list(dict.fromkeys(jobs))
    progress.status(f"Enhancing {len(todo)} prompt{'s' * (len(todo) > 1)} ...")
    try:
        texts = pipe.enhance_prompt([prompts[p] for p, _ in todo], seed=[s for _, s in todo])
    finally:
        progress.status("")
    rewrites = dict(zip(todo, texts))
    for (p, s), text in rewrites.items():
        say(f"Enhanced prompt {p + 1} (seed {s}): {text}" if len(prompts) > 1 else f"Enhanced prompt (seed {s}): {text}")
    return [rewrites[job] for job in jobs]


# ------------------------------------------------------------------------------------------------
# enhance


@main.command("enhance")
@click.argument("prompt")
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help="A Hugging Face repo id or a checkpoint folder.")
@click.option("--seed", type=int, help="Sampling seed (default: a random one).")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--max-tokens", type=int, default=512, show_default=True, help="Longest rewrite, in tokens.")
@click.option("--system-prompt", metavar="TEXT", help="Replace the built-in instructions given to the model.")
@click.option("--quantize", type=click.Choice(["4", "8"]), help="Quantize the text encoder on the fly (to 8 bits either way).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="Compute dtype; auto is bfloat16 on an Apple GPU, float32 on CPU.")
def enhance_command(prompt, model, seed, temperature, max_tokens, system_prompt, quantize, dtype):
    """Print a detailed rewrite of PROMPT, written by the checkpoint's own Qwen3 text encoder.

    \b
      zimage-mlx enhance "a cat on a windowsill" --seed 7
      zimage-mlx generate "$(zimage-mlx enhance 'a lighthouse in a storm')" --seed 7
    """
    from .enhance import PromptEnhancer
    from .pipeline import default_dtype, validate
    from .text_encoder import TextEncoder
    from .text_encoder import default_bits as text_encoder_bits
    from .weights import resolve_model

    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    if not (math.isfinite(temperature) and 0 <= temperature <= 5):
        raise UserError(f"--temperature must be a number in [0, 5] (0 is greedy), got {temperature}")
    with expected_errors():
        validate(seed=seed)
        root = resolve_model(model)
        dtype = default_dtype() if dtype == "auto" else dtype
        encoder = TextEncoder.from_pretrained(root, dtype="bfloat16" if dtype == "float16" else dtype,
                                              quantize=text_encoder_bits(int(quantize) if quantize else None))
        enhancer = PromptEnhancer.from_text_encoder(encoder, root)
        live = sys.stdout.isatty()  # on a terminal the rewrite appears as it is written
        text = enhancer.enhance(prompt, system_prompt=system_prompt, max_tokens=max_tokens, temperature=temperature,
                                seed=seed, callback=(lambda piece: click.echo(piece, nl=False)) if live else None)
    click.echo("" if live else text)


# ------------------------------------------------------------------------------------------------
# Arguments


def read_prompts(prompt: str | None, prompt_option: str | None, prompt_file: str | None) -> list[str]:
    """The prompts from the argument, --prompt or --prompt-file (one per non-empty line); [] if none given."""
    given = [x for x in (prompt, prompt_option, prompt_file) if x is not None]
    if len(given) > 1:
        raise UserError("give the prompt once: as an argument, with --prompt or with --prompt-file")
    if prompt_file is None:
        return given
    try:
        if prompt_file == "-":
            text = sys.stdin.read()
        else:
            text = Path(prompt_file).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read prompt file {prompt_file}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"prompt file {prompt_file} is not UTF-8 text") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {prompt_file} has no prompts (one per non-empty line)")
    return prompts


def parse_size(size: str | None, width: int | None, height: int | None) -> tuple[int | None, int | None]:
    """--size WxH (or a single number for a square) into width and height; None where nothing was given."""
    if size is None:
        return width, height
    if width is not None or height is not None:
        raise UserError("give either --size or --width/--height, not both")
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x×*X,]\s*(\d+)\s*)?", size)
    if not m:
        raise UserError(f"--size must look like 1024x768 (width x height) or 1024, got {size!r}")
    w = int(m.group(1))
    return w, int(m.group(2)) if m.group(2) else w


def parse_scaled(spec: str, option: str, metavar: str, example: str, default):
    """OPTION NAME[:SCALE] into (name, scale, or `default` without one); a file whose name has a colon is taken
    whole."""
    name, sep, scale = spec.rpartition(":")
    if not sep or Path(spec).expanduser().exists():
        return spec, default
    try:
        value = float(scale)
    except ValueError:
        raise UserError(f"{option} {spec}: the scale {scale!r} after the last ':' is not a number") from None
    if not name or not math.isfinite(value):
        raise UserError(f"{option} {spec}: give {metavar}[:SCALE] with a finite number as SCALE, e.g. {example}")
    return name, value


def parse_lora(spec: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] into (path or Hub id, scale)."""
    return parse_scaled(spec, "--lora", "PATH", "style.safetensors:0.8", 1.0)


def parse_control(spec) -> tuple[str, float | None]:
    """--control IMAGE[:SCALE] into (path, scale or None for the ControlNet's default); a stored pair passes."""
    if isinstance(spec, (tuple, list)):
        return spec[0], spec[1]
    return parse_scaled(spec, "--control", "IMAGE", "edges.png:0.8", None)


def control_settings(controlnet, controls, control_type, start, end, width, height, has_image) -> dict:
    """Check the ControlNet options before the model loads; returns {} without controls, else the ControlNet's
    files, the control maps (computed from photos with --control-type, at the output size), their paths and
    scales, and the output size (the first control image's when neither --image nor a size says otherwise)."""
    if not controls:
        if controlnet:
            raise UserError("--controlnet needs at least one --control IMAGE")
        return {}
    if not controlnet:
        raise UserError("--control needs --controlnet (a ControlNet Union file, folder or Hub id)")
    from .controlnet import control_inputs, control_map, resolve_controlnet
    from .pipeline import output_size

    with expected_errors():
        files = resolve_controlnet(controlnet)[0]
        inputs = control_inputs([open_control(path) for path, _ in controls], [s for _, s in controls], start, end)
        if not has_image:
            width, height = output_size(inputs.images[0].size, width, height)
        maps = [control_map(im, control_type, width, height) for im in inputs.images]
    files = controlnet if Path(controlnet).expanduser().exists() else files[0]  # a Hub id: the file downloaded
    return dict(files=files, maps=maps, scales=inputs.scales, width=width, height=height,
                paths=[Path(p).name for p, _ in controls])  # names only: no local path in the metadata


def open_control(path):
    from .pipeline import open_image

    return open_image(path, f"--control {path}")


def replay_sources(png: str, model, model_given: bool, loras, loras_given: bool, controlnet, controlnet_given: bool,
                   say) -> tuple[str | None, list, str | None]:
    """For --from-image: the model, LoRAs and ControlNet to load, without fetching anything the command
    line did not name. What comes from the PNG is used only when the local Hugging Face cache holds it (a
    Hub id); a local folder or file it names must be given again (--model, --lora, --controlnet). Returns
    the local path to load for each of them (None: the name as given), after saying what will be loaded."""
    from .weights import hub_cached, is_hub_id

    def local(name, what, option, patterns=None):
        if is_hub_id(name):
            found = hub_cached(name, patterns or ["*.safetensors"])
            if found is None:
                raise UserError(f"--from-image {png} was made with the {what} {name}, which is not in the local "
                                f"Hugging Face cache; name it to download it: {option} {name}")
            if found.is_dir() and patterns is None:  # a LoRA/ControlNet repo: the one .safetensors in it
                files = sorted(found.rglob("*.safetensors"))
                if len(files) != 1:
                    raise UserError(f"--from-image {png}: the cached {what} {name} holds {len(files)} .safetensors "
                                    f"files; name one with {option}")
                found = files[0]
            return str(found)
        raise UserError(f"--from-image {png} was made with the local {what} {name}; give it again with {option} "
                        f"{'FOLDER' if '#' in str(name) else 'FILE'}")

    from .weights import HUB_PATTERNS

    model_path = None if model_given else local(model, "model", "--model", HUB_PATTERNS)
    lora_paths = list(loras) if loras_given else [(local(name, "LoRA", "--lora"), scale) for name, scale in loras]
    controlnet_path = controlnet
    if controlnet and not controlnet_given:
        controlnet_path = local(controlnet, "ControlNet", "--controlnet")
    cached = " (from the Hugging Face cache)"
    say(f"From {Path(png).name}: model {model}" + (cached if model_path else ""))
    for name, scale in loras:
        say(f"From {Path(png).name}: LoRA {name} at scale {format_number(scale)}" + ("" if loras_given else cached))
    if controlnet:
        say(f"From {Path(png).name}: ControlNet {controlnet}" + ("" if controlnet_given else cached))
    return model_path, lora_paths, controlnet_path


def saved_file(png: str, name: str | None) -> str | None:
    """An input image the PNG names (by file name): next to the PNG, else in the current folder."""
    if not name:
        return name
    beside = Path(png).expanduser().parent / name
    return str(beside) if beside.exists() else name


def model_label(model: str) -> str:
    """weights.model_label, imported when used (the CLI's --help does not load MLX)."""
    from .weights import model_label as label

    return label(model)


def plan_outputs(template: str | None, jobs: list[tuple[int, int]], overwrite: bool) -> list[Path]:
    """One path per image from the --output template; refuse repeats, existing files (unless --overwrite)
    and folders that cannot be created."""
    folder = None
    if template is not None and (template.endswith(("/", os.sep)) or Path(template).expanduser().is_dir()):
        folder, template = template, None
    templates = [template] if template is not None else [str(Path(folder or "") / t) for t in DEFAULT_OUTPUTS]
    for t in templates:
        paths = [render_output(t, index=i, prompt_index=p, seed=s) for i, (p, s) in enumerate(jobs)]
        if len(set(paths)) == len(paths):
            break
    else:
        repeated = next(p for p in paths if paths.count(p) > 1)
        raise UserError(f"--output {template!r} names {repeated} for several images: put {{seed}}, {{index}} or "
                        f"{{prompt_index}} in it, e.g. 'image-{{index}}.png'")
    for path in paths:
        if path.suffix.lower() != ".png":
            raise UserError(f"--output must name .png files (the settings are stored in PNG text chunks), got {path}")
        if path.is_dir():
            raise UserError(f"{path} is a folder; --output must name a .png file")
        if path.exists() and not overwrite:
            more = sum(p.exists() for p in paths) - 1
            also = f" (and {more} more)" if more else ""
            raise UserError(f"{path}{also} already exists; pass --overwrite to replace it or choose another --output")
    for parent in sorted({p.parent for p in paths}):
        ancestor = parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UserError(f"cannot create the folder {parent}: {ancestor} is a file")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to {ancestor}: permission denied")
    return paths


def plan_preview(path: str, outputs: list[Path]) -> Path:
    """--preview FILE: an image file (by suffix) in an existing, writable folder, not one of the outputs."""
    preview = Path(path).expanduser()
    if preview.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"--preview must name a .png, .jpg or .webp file, got {path}")
    if preview.is_dir():
        raise UserError(f"--preview {path} is a folder; name an image file")
    if not preview.parent.is_dir() or not os.access(preview.parent, os.W_OK | os.X_OK):
        raise UserError(f"--preview {path}: the folder {preview.parent} does not exist or is not writable")
    if any(preview.resolve() == p.resolve() for p in outputs):
        raise UserError(f"--preview {path} is also an output file; give it another name")
    return preview


def preview_writer(pipe, path: Path):
    """An on_step callback that rewrites `path` with the step's fast preview; through a temporary file and a
    rename, so a viewer never reads a half-written image."""
    def write(step):
        image = pipe.fast_preview(step)[0]
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # same suffix: PIL picks the format from it
        image.convert("RGB").save(tmp)
        os.replace(tmp, path)

    return write


def render_output(template: str, **fields) -> Path:
    try:
        return Path(template.format(**fields)).expanduser()
    except KeyError as e:
        raise UserError(f"--output has an unknown field {{{e.args[0]}}}: use {{seed}}, {{index}} or {{prompt_index}}") from None
    except (ValueError, IndexError) as e:
        raise UserError(f"--output {template!r} is not a valid template ({e}); write {{seed}}, {{index}} or "
                        "{prompt_index}, and double the other braces") from None


# ------------------------------------------------------------------------------------------------
# PNG metadata


def png_info(settings: dict):
    """Text chunks: one per setting (read back by --from-image), `Software`, and an A1111-style
    `parameters` chunk that image browsers and web UIs read."""
    from PIL.PngImagePlugin import PngInfo

    quant = settings["quantization"]
    text = {
        "prompt": settings["prompt"],
        "negative_prompt": settings["negative_prompt"],
        "seed": str(settings["seed"]),
        "steps": str(settings["steps"]),
        "guidance": format_number(settings["guidance"]),
        "cfg_normalization": format_number(settings["cfg_normalization"]),
        "cfg_truncation": format_number(settings["cfg_truncation"]),
        "width": str(settings["width"]),
        "height": str(settings["height"]),
        "model": settings["model"],
        "quantization": str(quant) if quant else "none",  # what the DiT runs at, stored or on the fly
        **({"text_encoder_quantization": str(settings["text_encoder_quantization"] or "none"),
            "quantize": str(settings.get("quantize") or "none")}  # the on-the-fly bits: what a replay asks for
           if "text_encoder_quantization" in settings else {}),
        "dtype": settings["dtype"],
        **({"image": settings["image"], "strength": format_number(settings["strength"])} if settings.get("image") else {}),
        **({"mask": settings["mask"]} if settings.get("mask") else {}),
        **({"original_prompt": settings["original_prompt"]} if settings.get("original_prompt") is not None else {}),
        **({"loras": json.dumps([{"name": n, "scale": s} for n, s in settings["loras"]], ensure_ascii=False)}
           if settings.get("loras") else {}),
        **({"controlnet": settings["controlnet"],
            "controls": json.dumps([{"image": n, "scale": s} for n, s in settings["controls"]], ensure_ascii=False),
            "control_type": settings["control_type"], "control_start": format_number(settings["control_start"]),
            "control_end": format_number(settings["control_end"]), "controlnet_graph": settings["controlnet_graph"]}
           if settings.get("controlnet") else {}),
        "version": __version__,
        "Software": f"zimage-mlx {__version__}",
        "parameters": a1111_parameters(settings),
    }
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)  # Pillow writes iTXt (UTF-8) when the text is not Latin-1
    return info


def a1111_parameters(s: dict) -> str:
    """`prompt\\nNegative prompt: ...\\nSteps: 8, Sampler: ..., CFG scale: 0, Seed: 1, Size: WxH, ...`"""
    fields = {"Steps": s["steps"], "Sampler": SAMPLER_NAME, "CFG scale": format_number(s["guidance"]),
              "Seed": s["seed"], "Size": f"{s['width']}x{s['height']}", "Model": s["model"]}
    if s["guidance"] > 0 and s["cfg_normalization"]:
        fields["CFG normalization"] = format_number(s["cfg_normalization"])
    if s["guidance"] > 0 and s["cfg_truncation"] != 1.0:
        fields["CFG truncation"] = format_number(s["cfg_truncation"])
    if s["quantization"]:
        fields["Quantization"] = f"{s['quantization']}-bit"
    if s.get("text_encoder_quantization") and s["text_encoder_quantization"] != s["quantization"]:
        fields["Text encoder quantization"] = f"{s['text_encoder_quantization']}-bit"
    if s.get("loras"):
        fields["LoRA"] = ", ".join(f"{n}:{format_number(v)}" for n, v in s["loras"])
    if s.get("image"):
        fields["Denoising strength"] = format_number(s["strength"])
    if s.get("controlnet"):
        fields["ControlNet"] = s["controlnet"]
        fields["Control"] = ", ".join(f"{Path(n).name}:{format_number(v)}" for n, v in s["controls"])
    fields["Dtype"] = s["dtype"]
    fields["Version"] = f"zimage-mlx {__version__}"
    lines = [s["prompt"]]
    if s["negative_prompt"]:
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    lines.append(", ".join(f"{k}: {a1111_value(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def a1111_value(v) -> str:
    v = str(v)
    return json.dumps(v, ensure_ascii=False) if any(c in v for c in ',:"\n') else v


def format_number(x: float) -> str:
    return f"{float(x):g}" if float(x) == round(float(x), 6) else repr(float(x))


def parse_a1111_parameters(text: str) -> dict:
    """The prompt, negative prompt and `Key: value` fields of an A1111 `parameters` chunk."""
    lines = text.strip("\n").split("\n")
    fields = {}
    if re.match(r"\s*Steps: ", lines[-1]):
        for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', lines.pop()):
            fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields["prompt"] = "\n".join(prompt)
    fields["negative_prompt"] = "\n".join(negative)
    return fields


def read_image_settings(path: str) -> dict:
    """The settings stored in an image by `generate` (or, failing that, in an A1111 `parameters` chunk)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(Path(path).expanduser()) as im:
            im.load()
            text = dict(getattr(im, "text", None) or im.info)
    except FileNotFoundError:
        raise UserError(f"--from-image {path}: no such file") from None
    except UnidentifiedImageError:
        raise UserError(f"--from-image {path} is not an image Pillow can read") from None
    except OSError as e:
        raise UserError(f"cannot read --from-image {path}: {describe_os_error(e)}") from None
    text = {k: v for k, v in text.items() if isinstance(v, str)}
    if "prompt" in text and "seed" in text:
        raw = {k: text[k] for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "cfg_normalization",
                                    "cfg_truncation", "width", "height", "model", "quantization", "quantize", "dtype",
                                    "loras", "image", "mask", "strength", "original_prompt", "controlnet", "controls",
                                    "control_type", "control_start", "control_end", "controlnet_graph") if k in text}
    elif "parameters" in text:
        a = parse_a1111_parameters(text["parameters"])
        raw = {"prompt": a["prompt"], "negative_prompt": a["negative_prompt"], "seed": a.get("Seed")}
        if "Size" in a:
            raw["width"], _, raw["height"] = a["Size"].partition("x")
        if "zimage-mlx" in a.get("Version", ""):
            raw.update(steps=a.get("Steps"), guidance=a.get("CFG scale"), cfg_normalization=a.get("CFG normalization"),
                       cfg_truncation=a.get("CFG truncation"), model=a.get("Model"), dtype=a.get("Dtype"),
                       quantization=a.get("Quantization", "none").removesuffix("-bit"))
        # else: another tool's steps, CFG scale and model name mean nothing for Z-Image Turbo; keep ours.
        raw = {k: v for k, v in raw.items() if v is not None}
    else:
        raise UserError(f"--from-image {path} has no generation settings in its metadata (no prompt and seed)")
    settings = {}
    for key, value in raw.items():
        try:
            if key in ("seed", "steps", "width", "height"):
                settings[key] = int(value)
            elif key in ("guidance", "cfg_normalization", "cfg_truncation", "strength", "control_start", "control_end"):
                settings[key] = float(value)
            elif key in ("quantization", "quantize"):
                settings[key] = None if value in ("", "none") else int(value)
            elif key == "loras":
                settings[key] = saved_loras(path, value)
            elif key == "controls":
                settings[key] = saved_controls(path, value)
            else:
                settings[key] = value
        except ValueError:
            raise UserError(f"--from-image {path}: the metadata's {key} {value!r} is not a number") from None
    if settings.get("dtype") not in ("bfloat16", "float16", "float32"):
        settings.pop("dtype", None)
    return settings


def saved_loras(path: str, value: str) -> list[tuple[str, float]]:
    """The `loras` chunk: a JSON list of {"name", "scale"}."""
    try:
        return [(str(x["name"]), float(x["scale"])) for x in json.loads(value)]
    except (ValueError, TypeError, KeyError):
        raise UserError(f"--from-image {path}: the metadata's loras {value!r} is not a list of names and scales") from None


def saved_controls(path: str, value: str) -> list[tuple[str, float]]:
    """The `controls` chunk: a JSON list of {"image", "scale"}."""
    try:
        return [(str(x["image"]), float(x["scale"])) for x in json.loads(value)]
    except (ValueError, TypeError, KeyError):
        raise UserError(f"--from-image {path}: the metadata's controls {value!r} is not a list of images and scales") from None


# ------------------------------------------------------------------------------------------------
# Output


def save_png(image, path: Path, info, overwrite: bool) -> None:
    """Write to a temporary file next to `path`, then move it into place: never a half-written PNG, and
    never a replaced file unless `overwrite` (a hard link fails if the name was taken meanwhile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # "x": honours the umask, unlike mkstemp's 0600
            image.save(f, format="PNG", pnginfo=info)
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise UserError(f"{path} appeared while generating; not overwriting it (pass --overwrite)") from None
        except OSError:  # file systems without hard links (exFAT)
            if path.exists():
                raise UserError(f"{path} appeared while generating; not overwriting it (pass --overwrite)") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def distributed_launch() -> bool:
    """Whether mlx.launch (or mpirun) started this process as one rank of a job."""
    from .distributed import launched

    return launched()


def describe_pipeline(pipe) -> str:
    """`float32, 4-bit`, `float32 (stored bfloat16), DiT 4-bit, text encoder 8-bit`, ...: what really runs."""
    stored = getattr(pipe, "stored_dtype", None)
    parts = [pipe.dtype + (f" (stored {stored})" if stored and stored != pipe.dtype else "")]
    parts += describe_quantization(getattr(pipe, "quantization", None) or {"transformer": pipe.quantize})
    if getattr(pipe, "parallel", None) is not None:
        parts.append(f"{pipe.parallel.mode}-parallel over {pipe.parallel.size} ranks")
    if pipe.low_memory:
        parts.append("low memory")
    return ", ".join(parts)


def describe_quantization(q: dict) -> list[str]:
    dit, te = q.get("transformer"), q.get("text_encoder")
    if dit and te and dit != te:
        return [f"DiT {dit}-bit", f"text encoder {te}-bit"]
    if dit:
        return [f"{dit}-bit" if te == dit or "text_encoder" not in q else f"DiT {dit}-bit"]
    return [f"text encoder {te}-bit"] if te else []


BLAS_HINT = ("Note: MLX's CPU backend runs on its bundled reference BLAS, which is slow; for several times the "
             "speed: apt-get install libopenblas0-pthread, then run with "
             "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
_blas_hint_shown = False


def reference_blas(maps: str) -> bool:
    """Whether a process's memory map (/proc/self/maps) holds a BLAS but no optimized one (OpenBLAS, MKL, BLIS)."""
    libs = {line.split()[-1].lower() for line in maps.splitlines() if "/" in line}
    fast = any(k in p for p in libs for k in ("openblas", "mkl", "blis"))
    return not fast and any("libblas" in p.rsplit("/", 1)[-1] for p in libs)


def slow_blas_hint() -> None:
    """Once per process, on stderr: how to get a fast BLAS when MLX runs on the CPU with the reference one
    (Linux: MLX's CPU wheel bundles netlib's libblas). The library stays silent; only the CLI says this."""
    global _blas_hint_shown
    if _blas_hint_shown or not sys.platform.startswith("linux"):
        return
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    _blas_hint_shown = True
    if reference_blas(maps):
        click.echo(BLAS_HINT, err=True)


def show_warnings(caught: list, shown: set, quiet: bool) -> None:
    """Prompt truncation and float16 overflow as one `Warning:` line (once per message); other warnings as
    Python shows them."""
    from .fp16 import Float16OverflowWarning
    from .text_encoder import PromptTruncatedWarning

    while caught:
        w = caught.pop(0)
        if not issubclass(w.category, (PromptTruncatedWarning, Float16OverflowWarning)):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        elif str(w.message) not in shown and not quiet:
            shown.add(str(w.message))
            click.echo(f"Warning: {w.message}", err=True)


# cli_convert and zimage_mlx.convert import no MLX at module level (MLX loads when a conversion runs).
from .cli_convert import convert_command  # noqa: E402

main.add_command(convert_command, "convert")


# ------------------------------------------------------------------------------------------------
# serve


@main.command()
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help="A Hugging Face repo id or a checkpoint folder, loaded once at start.")
@click.option("--quantize", type=click.Choice(["4", "8"]), help="Quantize on the fly: the DiT to 4 or 8 bits, the text encoder to 8.")
@click.option("--low-memory", is_flag=True, help="Load the text encoder only while encoding; decode in tiles.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="Compute dtype; auto as for generate (float32 on CPU, float16 on M1/M2 when "
                   "the checkpoint passes the float16 checks, else bfloat16).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback needs --api-key (or --insecure-no-auth).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port; 0 picks a free one.")
@click.option("--api-key", envvar="ZIMAGE_MLX_API_KEY", metavar="KEY",
              help="Require this key (Authorization: Bearer KEY or X-API-Key: KEY) on every route but /health and "
                   "the page. "
                   "Also read from ZIMAGE_MLX_API_KEY, which keeps it out of `ps`.")
@click.option("--queue-size", type=click.IntRange(1, 1000), default=8, show_default=True,
              help="Jobs that may wait behind the running one; more get 503 with Retry-After.")
@click.option("--lora-dir", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Folder of .safetensors LoRAs that requests may name (by file name, without the extension).")
@click.option("--max-side", type=click.IntRange(16, 8192), default=2048, show_default=True,
              help="Largest width or height a request may ask for (a multiple of 16).")
@click.option("--max-n", type=click.IntRange(1, 64), default=4, show_default=True, help="Most images per request.")
@click.option("--max-steps", type=click.IntRange(1, 1000), default=50, show_default=True, help="Most steps per request.")
@click.option("--max-body", type=click.FloatRange(0.001, 4096), default=64, show_default=True, metavar="MB",
              help="Largest request body, in MB (uploads included); larger ones get 413.")
@click.option("--allowed-host", "allowed_host", multiple=True, metavar="NAME",
              help="Also accept this Host header (besides localhost, 127.0.0.1, [::1], host.docker.internal); repeat.")
@click.option("--insecure-no-auth", is_flag=True, help="Allow a non-loopback --host without --api-key.")
def serve(model, quantize, low_memory, dtype, host, port, api_key, queue_size, lora_dir, max_side, max_n, max_steps,
          max_body, allowed_host, insecure_no_auth):
    """Serve the model over HTTP: the OpenAI images API, an A1111 subset, a job API with live previews, and a
    web page at /. Loads the model first, then prints `listening on http://HOST:PORT`.

    \b
      zimage-mlx serve --port 8000
      curl http://127.0.0.1:8000/v1/images/generations -H 'Content-Type: application/json' \\
           -d '{"prompt": "a red fox in the snow", "size": "1024x1024", "seed": 42}'
    """
    import ipaddress

    if max_side % 16:
        raise UserError(f"--max-side must be a multiple of 16, got {max_side}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name
        loopback = False
    if not loopback and not api_key and not insecure_no_auth:
        raise UserError(f"--host {host} is reachable from other machines: give --api-key KEY (or set "
                        "ZIMAGE_MLX_API_KEY), or pass --insecure-no-auth if you really mean it")
    try:
        from .server import ServerConfig, allowed_hosts, serve as run_server
        from .server_engine import JobRunner
    except ImportError as e:
        raise UserError(f"the server needs its extra dependencies: pip install 'zimage-mlx[serve]' ({e})") from None
    try:
        from .server import bind_socket

        bind_socket(host, port).close()  # a taken port or a bad address fails before the model loads
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    quantize = int(quantize) if quantize else None
    name = Path(model.rstrip("/")).name.lower() or "z-image"
    cfg = ServerConfig(model_id=name, model_aliases=(model,), api_key=api_key or None,
                       allowed_hosts=allowed_hosts(host, allowed_host), max_side=max_side, max_n=max_n,
                       max_steps=max_steps, max_body=int(max_body * 2**20),
                       lora_dir=Path(lora_dir) if lora_dir else None,
                       default_width=min(1024, max_side), default_height=min(1024, max_side))

    def load():
        from .pipeline import ZImagePipeline
        from .weights import resolve_model

        return ZImagePipeline.from_pretrained(resolve_model(model), dtype=dtype, quantize=quantize,
                                              low_memory=low_memory)

    runner = JobRunner(load, queue_size=queue_size)
    click.echo(f"Loading {model} ...", err=True)
    with expected_errors():
        runner.start()
    slow_blas_hint()
    run_server(runner, cfg, host, port, announce=lambda line: click.echo(line) or sys.stdout.flush())
    # Shut down cleanly (jobs answered, worker stopped). MLX 0.32 on Linux aborts now and then in its static
    # destructors once a worker thread has used it (exit code 134), so the process ends here with code 0.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


from .cli_train import train_command  # noqa: E402

main.add_command(train_command, "train")
