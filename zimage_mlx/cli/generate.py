"""`zimage-mlx generate`: flags (and --from-image) -> one Recipe -> images on disk.

The command is five steps, each a function: `replay` (a PNG's recipe with the flags given over it), `plan`
(the recipe checked and settled, the seeds decided, every output file named: all before the model loads),
`load` (the pipeline, its LoRAs and ControlNet), `make` (one `pipeline.run`, several Macs included) and
`save` (each image as it is made, with its recipe in the PNG, atomically). The rules themselves are the
library's; this module translates flags and presents progress.
"""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import click
from click.core import ParameterSource

from ..inputs import MAX_SEED
from ..metadata import number
from ..recipe import ControlRef, LoraRef, Recipe, file_name
from .common import Command, Progress, UserError, describe_pipeline, expected_errors, show_warnings, slow_blas_hint
from .options import (dtype_option, low_memory_option, model_option, parse_control, parse_lora, parse_size,
                      quantize_option, read_prompts)
from .output import DEFAULT_OUTPUT, plan_outputs, plan_preview, preview_writer, save_png


@click.command("generate", cls=Command)
@click.argument("prompt", required=False)
@click.option("--prompt", "prompt_option", metavar="TEXT", help="The prompt, as an alternative to the argument.")
@click.option("--prompt-file", metavar="FILE", help="One prompt per non-empty line ('-' reads stdin).")
@click.option("--negative-prompt", metavar="TEXT", help="What to steer away from; needs --guidance > 0.")
@model_option()
@click.option("--transformer", "transformer_file", metavar="FILE",
              help="Swap in the DiT from one file: ComfyUI's .safetensors or a .gguf (Q8_0/Q4_0/Q4_1 stay quantized).")
@quantize_option()
@click.option("--lora", "lora_specs", metavar="PATH[:SCALE]", multiple=True,
              help="Apply a LoRA (.safetensors file or Hub repo id) at SCALE (default 1); repeat to stack several.")
@click.option("--size", metavar="WxH", help="Image size, e.g. 1024x768 (or 1024 for a square).  [default: 1024x1024]")
@click.option("--width", type=int, help="Image width in pixels, a multiple of 16.")
@click.option("--height", type=int, help="Image height in pixels, a multiple of 16.")
@click.option("--image", "init_image", metavar="FILE",
              help="Start from this image (image to image). The output takes its size rounded down to multiples of "
                   "16, unless --size/--width/--height resize it (Lanczos).")
@click.option("--mask", metavar="FILE", help="Inpaint: repaint where this mask is white (same size as --image).")
@click.option("--reference", "references", metavar="IMAGE", multiple=True,
              help="A reference image for a Z-Image-Omni model (repeat for up to 4): edit or combine them as the "
                   "prompt says. Without a size, the output takes the last reference's.")
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
@click.option("--variety", type=float, default=0.0, show_default=True, metavar="V",
              help="More different images across seeds: seeded noise of V x their spread on the prompt embeddings "
                   "in the early steps (0.1-0.5 is subtle, 1 strong).")
@click.option("--variety-until", type=float, default=0.5, show_default=True, metavar="0..1",
              help="The fraction of the steps that --variety applies to.")
@click.option("--hires", "hires_scale", type=float, metavar="SCALE",
              help="Hires fix: a second image-to-image pass at SCALE (1-4) x the size, sides multiples of 16.")
@click.option("--hires-strength", type=float, default=0.35, show_default=True, metavar="0..1",
              help="The second pass's strength: what it may change.")
@click.option("--hires-steps", type=int, metavar="N", help="The second pass's schedule.  [default: --steps]")
@click.option("--hires-upscaler", type=click.Choice(["lanczos", "latent"]), default="lanczos", show_default=True,
              help="Resize the first image (lanczos) or its latents (latent, bilinear: no decode and encode).")
@click.option("--hires-control", "hires_control", metavar="PATH|ID",
              help="Run the hires pass under this ControlNet Union (a Tile one; as --controlnet takes) with the "
                   "upscaled first image as its control image: it holds the composition at higher strengths. The "
                   "first pass is not controlled by it; the pass is not tiled.")
@click.option("--hires-control-scale", type=float, metavar="SCALE",
              help="The hires ControlNet's strength.  [default: the ControlNet's recommended scale]")
@click.option("--tile", type=int, metavar="PIXELS",
              help="Denoise a pass from an image (--image, --hires) larger than PIXELS a side in overlapping tiles "
                   "blended every step (MultiDiffusion): a lower peak.  [default: 1024 for --hires, else none]")
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
@dtype_option("Compute dtype; auto is float32 on CPU, float16 on M1/M2 for checkpoints that pass the float16 "
              "checks, else bfloat16 (--verbose says why).")
@low_memory_option()
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
def generate(ctx, **options):
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
    o = SimpleNamespace(**options)
    given = {name for name in options
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    with expected_errors():
        job = plan(o, replay(o, given), given)
        pipe = load(job, o)
        make(pipe, job, o)


@dataclass
class Job:
    """What `plan` decided: the recipe and its images, where each goes, what to load, and who speaks."""

    recipe: Recipe
    items: list  # the one-image recipes, in order
    paths: list
    preview: Path | None = None
    model: str = ""  # what to load: the name given, or a local path --from-image found in the HF cache
    controlnet: str | None = None  # the ControlNet file or folder to load
    group: object = None  # the mx.distributed group under mlx.launch
    mode: str | None = None
    rank0: bool = True
    quiet: bool = False
    t_start: float = 0.0  # when loading began, and ended
    t_loaded: float = 0.0

    def say(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)


# ------------------------------------------------------------------------------------------------
# replay: the flags, over a PNG's recipe when --from-image names one

# Which Recipe fields each flag sets: a replay keeps the stored value of every field no flag sets.
FIELDS_OF = {"prompt": ("prompt",), "prompt_option": ("prompt",), "prompt_file": ("prompt",),
             "negative_prompt": ("negative_prompt",), "size": ("width", "height"), "width": ("width",),
             "height": ("height",), "steps": ("steps",), "guidance": ("guidance",),
             "cfg_normalization": ("cfg_normalization",), "cfg_truncation": ("cfg_truncation",), "seed": ("seed",),
             "init_image": ("init_image", "image"), "mask": ("init_mask", "mask"), "strength": ("strength",),
             "lora_specs": ("loras",), "controlnet": ("controlnet",),
             "control_specs": ("controls", "controlnet", "control_type", "control_start", "control_end",
                               "controlnet_graph"),
             "control_type": ("control_type",), "control_start": ("control_start",), "control_end": ("control_end",),
             "controlnet_graph": ("controlnet_graph",), "model": ("model",), "quantize": ("quantize",),
             "dtype": ("dtype",), "enhance": ("enhance",), "transformer_file": ("transformer",),
             "variety": ("variety",), "variety_until": ("variety_until",), "hires_scale": ("hires_scale",),
             "hires_strength": ("hires_strength",), "hires_steps": ("hires_steps",),
             "hires_upscaler": ("hires_upscaler",), "hires_control": ("hires_control",),
             "hires_control_scale": ("hires_control_scale",), "tile": ("tile",),
             "references": ("reference_images", "reference_pixels")}


def replay(o, given: set) -> Recipe:
    """The recipe the flags describe; with --from-image, the stored recipe with the flags given over it.
    Input images are opened and control maps computed here, before anything loads."""
    typed = recipe_from_flags(o)
    if o.from_image is None:
        if not typed.prompts:
            raise UserError("no prompt: pass it as an argument, with --prompt or --prompt-file, or use --from-image")
        return typed
    saved = read_png(o.from_image)
    out = saved.replayed(**{f: getattr(typed, f) for name in given for f in FIELDS_OF.get(name, ())})
    if "init_image" not in given and saved.image:  # the stored input image and mask, beside the PNG
        out = out.replace(init_image=open_input(beside(o.from_image, saved.image), "--image"),
                          init_mask=out.init_mask if "mask" in given else
                          open_input(beside(o.from_image, saved.mask), "--mask"))
    if "references" not in given and saved.reference_images:  # the stored references, beside the PNG
        out = out.replace(reference_pixels=[open_input(beside(o.from_image, n), "--reference")
                                            for n in saved.reference_images])
    if "control_specs" not in given and saved.controls:  # the stored control images, made into maps again
        specs = [(beside(o.from_image, c.image), c.scale) for c in saved.controls]
        out = out.replace(controls=control_refs(out, specs))
    return out


def read_png(path) -> Recipe:
    from ..errors import InputError

    try:
        return Recipe.from_png(path)
    except InputError as e:
        reason = str(e)
        raise UserError(f"--from-image {reason}" if reason.startswith(str(path)) else
                        f"--from-image {path}: {reason}") from None


def recipe_from_flags(o) -> Recipe:
    """The flags as a Recipe: files by name only (no local path reaches the metadata), opened."""
    from ..weights import model_label

    prompts = read_prompts(o.prompt, o.prompt_option, o.prompt_file)
    width, height = parse_size(o.size, o.width, o.height)
    loras = [parse_lora(spec) for spec in o.lora_specs]
    r = Recipe(prompt=prompts[0] if len(prompts) == 1 else prompts, negative_prompt=o.negative_prompt or None,
               reference_images=[file_name(p) for p in o.references],
               reference_pixels=[open_input(p, "--reference") for p in o.references],
               width=width, height=height, steps=o.steps, guidance=o.guidance, cfg_normalization=o.cfg_normalization,
               cfg_truncation=o.cfg_truncation, seed=list(o.seed) or None, num_images=o.num_images,
               image=file_name(o.init_image), mask=file_name(o.mask), strength=o.strength,
               init_image=open_input(o.init_image, "--image"), init_mask=open_input(o.mask, "--mask"),
               loras=[LoraRef(model_label(name), scale, source=name) for name, scale in loras],
               controlnet=model_label(o.controlnet) if o.controlnet else None, control_type=o.control_type,
               control_start=o.control_start, control_end=o.control_end, controlnet_graph=o.controlnet_graph,
               enhance=o.enhance, variety=o.variety, variety_until=o.variety_until, hires_scale=o.hires_scale,
               hires_strength=o.hires_strength, hires_steps=o.hires_steps, hires_upscaler=o.hires_upscaler,
               hires_control=model_label(o.hires_control) if o.hires_control else None,
               hires_control_scale=o.hires_control_scale, tile=o.tile,
               model=o.model, transformer=file_name(o.transformer_file), quantize=int(o.quantize) if o.quantize else None,
               dtype=None if o.dtype == "auto" else o.dtype)
    return r.replace(controls=control_refs(r, [parse_control(spec) for spec in o.control_specs]))


def control_refs(r: Recipe, specs: list) -> list[ControlRef]:
    """The control images (path, scale) opened and made into maps (--control-type) at the output size."""
    if not specs:
        return []
    from ..controlnet import control_refs as make_refs

    images = [open_input(path, f"--control {path}") for path, _ in specs]
    return make_refs([(file_name(path), scale, im) for (path, scale), im in zip(specs, images)], r.control_type,
                     r.width, r.height, None if r.init_image is None else r.init_image.size)


def open_input(path, what: str):
    from ..inputs import open_image

    return None if path is None else open_image(path, what, field=what.split()[0].lstrip("-"))


def beside(png, name: str | None) -> str | None:
    """An input image the PNG names (by file name): next to the PNG, else in the current folder."""
    if not name:
        return name
    path = Path(png).expanduser().parent / name
    return str(path) if path.exists() else name


# ------------------------------------------------------------------------------------------------
# plan: everything checked, every file named, before the model loads


def plan(o, recipe: Recipe, given: set) -> Job:
    if o.batch_size is not None and o.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {o.batch_size}")
    if recipe.controls and not recipe.controlnet:
        raise UserError("--control needs --controlnet (a ControlNet Union file, folder or Hub id)")
    recipe = recipe.validate().settle().validate()
    if recipe.guidance == 0 and ({"cfg_normalization", "cfg_truncation"} & given) and not o.quiet:
        click.echo("Warning: --cfg-normalization and --cfg-truncation do nothing without --guidance > 0", err=True)
    recipe = recipe.replace(seed=recipe.seed or [random.randint(0, MAX_SEED)])
    items = recipe.images()
    job = Job(recipe, items, [], quiet=o.quiet)
    start_ranks(job, o)
    per_prompt = len(recipe.seed_list())
    jobs = [(k // per_prompt, r.seed) for k, r in enumerate(items)]
    job.paths = plan_outputs(o.output, jobs, o.overwrite) if job.rank0 else [None] * len(items)
    if o.preview_path is not None and job.rank0:
        job.preview = plan_preview(o.preview_path, job.paths)
    find_sources(job, o, given)
    return job


def start_ranks(job: Job, o) -> None:
    """Under mlx.launch: join the group and choose the mode; rank 0 alone prints and writes files."""
    from .. import distributed

    if o.parallel is None and not distributed.launched():
        return
    group = distributed.init()
    if group.size() > 1:
        job.group = group
        job.mode = distributed.choose_mode(o.parallel or "auto", group.size(), len(job.items), job.recipe.guidance)
        job.rank0 = group.rank() == 0
        job.quiet = job.quiet or not job.rank0


def find_sources(job: Job, o, given: set) -> None:
    """What to load. For --from-image, what the PNG names and no flag does is taken from the local Hugging
    Face cache only (nothing is downloaded that was not named). LoRAs are read now, so that a missing or
    foreign one fails before the model loads."""
    from ..lora import read_lora

    r = job.recipe
    replaying = o.from_image is not None
    job.model = cached(o, r.model, "model") if replaying and "model" not in given else r.model
    if replaying and "model" in given:
        note_other_model(job, o)
    if replaying and r.transformer and "transformer_file" not in given:
        raise UserError(f"--from-image {o.from_image} was made with the DiT file {r.transformer}; give it again with "
                        "--transformer FILE")
    net = o.controlnet
    if r.controlnet and not ({"controlnet", "control_specs"} & given):
        net = cached(o, r.controlnet, "ControlNet") if replaying else net
    hires = o.hires_control
    if r.hires_control and "hires_control" not in given:
        hires = cached(o, r.hires_control, "hires ControlNet") if replaying else hires
    if not r.hires_control:
        hires = None
    paths = [controlnet_file(x) for x in (net, hires)]
    if net and hires and r.controls and Path(paths[0]).resolve() != Path(paths[1]).resolve():
        raise UserError("--hires-control must be the --controlnet file when both are given: one ControlNet serves "
                        "both passes")
    job.controlnet = paths[0] if net and r.controls else paths[1] if hires else paths[0]
    loras = r.loras or []
    if replaying and "lora_specs" not in given:
        loras = [LoraRef(x.name, x.scale, cached(o, x.name, "LoRA")) for x in loras]
    job.recipe = r.replace(loras=[LoraRef(x.name, x.scale, read_lora(x.load)) for x in loras])
    if replaying:
        say_sources(job, o, given)


def controlnet_file(net: str | None) -> str | None:
    """The ControlNet to load: a local file or folder as given, a Hub id's downloaded file."""
    from ..sources import resolve_controlnet

    if not net:
        return None
    files = resolve_controlnet(net)[0]
    return net if Path(net).expanduser().exists() else str(files[0])


def cached(o, name: str, what: str) -> str:
    """A model, LoRA or ControlNet a PNG names, from the local Hugging Face cache (sources.cached)."""
    from ..errors import NotCachedError
    from ..sources import cached as find

    try:
        return str(find(name, what))
    except NotCachedError as e:
        option = {"model": "--model", "LoRA": "--lora", "ControlNet": "--controlnet",
                  "hires ControlNet": "--hires-control"}[what]
        if e.local:
            raise UserError(f"--from-image {o.from_image} was made with the local {what} {name}; give it again with "
                            f"{option} {'FOLDER' if '#' in str(name) else 'FILE'}") from None
        if "not in the local" in str(e):
            raise UserError(f"--from-image {o.from_image} was made with the {what} {name}, which is not in the local "
                            f"Hugging Face cache; name it to download it: {option} {name}") from None
        raise UserError(f"--from-image {o.from_image}: {e}") from None


def note_other_model(job: Job, o) -> None:
    from ..weights import model_label

    stored = read_png(o.from_image).model or ""
    if "#" in stored and model_label(o.model) != stored:
        job.say(f"Note: the image was made with {stored}; the configs of --model {model_label(o.model)} differ")


def say_sources(job: Job, o, given: set) -> None:
    r, png = job.recipe, Path(o.from_image).name
    cache = " (from the Hugging Face cache)"
    job.say(f"From {png}: model {r.model}" + ("" if "model" in given else cache))
    for x in r.loras:
        job.say(f"From {png}: LoRA {x.name} at scale {number(x.scale)}" + ("" if "lora_specs" in given else cache))
    if r.controlnet:
        job.say(f"From {png}: ControlNet {r.controlnet}"
                + ("" if {"controlnet", "control_specs"} & given else cache))
    if r.hires_control:
        job.say(f"From {png}: hires ControlNet {r.hires_control}" + ("" if "hires_control" in given else cache))


# ------------------------------------------------------------------------------------------------
# load: the model once for all images, with its LoRAs and ControlNet


def load(job: Job, o):
    import mlx.core as mx

    from ..pipeline import ZImagePipeline
    from ..sources import resolve_model
    from ..weights import model_label

    r = job.recipe
    progress = Progress(enabled=not job.quiet)
    mx.reset_peak_memory()
    job.t_start = time.perf_counter()
    root = resolve_model(job.model)  # a Hub download shows its own progress bars
    name = model_label(r.model)
    progress.status(f"Loading {name} ...")  # on a terminal only, so that a failure stays one line
    try:
        with warnings.catch_warnings(record=True) as caught:  # float16 forced on a failing checkpoint
            pipe = ZImagePipeline.from_pretrained(root, dtype=r.dtype or "auto", quantize=r.quantize,
                                                  low_memory=o.low_memory, label=name,
                                                  **(dict(transformer=o.transformer_file) if o.transformer_file else {}),
                                                  **(dict(group=job.group, parallel=job.mode) if job.group else {}))
    finally:
        progress.status("")
    show_warnings(caught, set(), job.quiet)
    job.t_loaded = time.perf_counter()
    source = getattr(pipe.transformer, "source", None)  # a DiT swapped in with --transformer
    job.say(f"Loaded {name} in {job.t_loaded - job.t_start:.1f} s ({describe_pipeline(pipe)}"
            + (f"; DiT from {source}" if source else "") + ")")
    if not job.quiet:
        slow_blas_hint()
    if o.verbose:
        job.say(f"Dtype: {pipe.reason}")
    load_adapters(pipe, job)
    return pipe


def load_adapters(pipe, job: Job) -> None:
    from ..lora import LoraWarning

    r = job.recipe
    for ref in r.loras:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LoraWarning)
            pipe.load_lora(ref.load, ref.scale, fuse=False)  # beside the layers: no second copy of the DiT
        for w in caught:
            job.say(f"Warning: {w.message}")
        job.say(f"Applied LoRA {ref.load.name} at scale {number(ref.scale)}")
    if r.controls or r.hires_control:
        net = pipe.load_controlnet(job.controlnet, graph=r.controlnet_graph,
                                   label=r.controlnet if r.controls else r.hires_control)
        scales = [net.args.scale if c.scale is None else c.scale for c in r.controls]
        hires = net.args.scale if r.hires_control_scale is None else r.hires_control_scale
        job.say(f"Loaded ControlNet {net.args.name}, graph {net.graph}"
                + (f", scale {', '.join(map(number, scales))}" if scales else "")
                + (f", hires pass scale {number(hires)}" if r.hires_control else ""))


# ------------------------------------------------------------------------------------------------
# make and save: one run; each image written as it is made


def make(pipe, job: Job, o) -> None:
    import mlx.core as mx

    from ..text_encoder import PromptTruncatedWarning

    r = job.recipe
    batch = o.batch_size or pipe.auto_batch_size(r.width, r.height)
    if batch > 1 and len(job.items) > 1:
        job.say(f"Batch size {batch}" + ("" if o.batch_size else " (auto)"))
    show = Presenter(pipe, job, o)
    with warnings.catch_warnings(record=True) as show.caught:
        warnings.simplefilter("always", PromptTruncatedWarning)
        pipe.run(r, batch_size=batch, release=True, on_step=show.step, on_image=show.image,
                 on_enhanced=show.enhanced)
    n, steps = len(job.items), max(show.steps_done, 1)
    total = time.perf_counter() - job.t_start
    where = f" on {job.group.size()} ranks" if job.mode == "data" else ""
    job.say(f"Done: {n} image{'s' * (n > 1)}{where} in {total:.1f} s ({show.step_seconds / steps:.2f} s/step"
            f"{' on rank 0' if where else ''}, load {job.t_loaded - job.t_start:.1f} s), peak memory "
            f"{mx.get_peak_memory() / 1e9:.2f} GB{' on rank 0' if where else ''}")


@dataclass
class Presenter:
    """The run's hooks: a progress bar per batch, the --preview file, the rewrites, each image saved and said."""

    pipe: object
    job: Job
    o: object
    caught: list = field(default_factory=list)
    shown: set = field(default_factory=set)
    first: int = 0  # the first image of the batch in progress
    batch: int = 0  # its size (0: no batch started)
    steps_done: int = 0
    step_seconds: float = 0.0
    carry: float = 0.0  # the step seconds of the batch's earlier bars (a first pass before its hires passes)

    def __post_init__(self):
        self.progress = Progress(enabled=not self.job.quiet)
        self.preview = preview_writer(self.pipe, self.job.preview) if self.job.preview else None
        self.made = 0

    def step(self, step) -> None:
        h, w = step.latents.shape[1:3]
        if step.index == 0 and (8 * h, 8 * w) != (self.job.recipe.height, self.job.recipe.width):  # a hires pass
            self.carry += self.progress.step_seconds
            self.progress.start(f"hires pass {8 * w}x{8 * h}")
        elif step.index == 0:
            self.carry = 0.0
            self.first, self.batch = self.made, step.latents.shape[0]
            seeds = [r.seed for r in self.job.items[self.first:self.first + self.batch]]
            n = len(self.job.items)
            self.progress.start(f"image {self.first + 1}/{n} seed {seeds[0]}" if self.batch == 1 else
                                f"images {self.first + 1}-{self.first + self.batch}/{n} seeds {', '.join(map(str, seeds))}")
            show_warnings(self.caught, self.shown, self.job.quiet)
        self.progress.on_step(step)
        if self.preview is not None:
            self.preview(step)

    def enhanced(self, k: int, r: Recipe) -> None:
        prompts = self.job.recipe.prompts
        key = (r.original_prompt, r.seed)
        if key in self.shown:
            return
        self.shown.add(key)
        which = f" {prompts.index(r.original_prompt) + 1}" if len(prompts) > 1 else ""
        self.job.say(f"Enhanced prompt{which} (seed {r.seed}): {r.prompt}")

    def image(self, k: int, image) -> None:
        own = self.batch and self.first <= k < self.first + self.batch
        if own and k == self.first:
            self.progress.finish()
            self.steps_done += self.job.recipe.denoising_steps * self.batch
            self.step_seconds += self.carry + self.progress.step_seconds
        self.made = k + 1
        show_warnings(self.caught, self.shown, self.job.quiet)
        if not self.job.rank0:
            return
        path = self.job.paths[k]
        save_png(image, path, image.info["recipe"].to_png() if self.o.metadata else None, self.o.overwrite)
        if self.job.quiet:
            click.echo(str(path))
        else:
            click.echo(f"Saved {path} (seed {image.info['recipe'].seed}{self.timing(k, own)})")

    def timing(self, k: int, own: bool) -> str:
        steps = self.job.recipe.denoising_steps
        rank = f", rank {k % self.job.group.size()}" if self.job.mode == "data" else ""
        if not own:
            return rank
        per = (self.carry + self.progress.step_seconds) / max(steps * self.batch, 1)
        decode = "" if rank else f", decode {self.progress.total_seconds - self.progress.step_seconds:.1f} s"
        return (f"{rank}, {steps} steps at {per:.2f} s/step{' per image' if self.batch > 1 else ''}{decode}")
