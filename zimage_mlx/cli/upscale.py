"""`zimage-mlx upscale`: the hires fix's second pass over any image (zimage_mlx.hires): Lanczos to SCALE x its
size, then image-to-image at a low strength. Everything is checked, and the output named, before the model
loads."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..metadata import number
from .common import Command, Progress, describe_pipeline, expected_errors
from .options import dtype_option, low_memory_option, model_option, quantize_option
from .output import plan_outputs, save_png


@click.command("upscale", cls=Command)
@click.argument("image", metavar="IMAGE")
@click.option("--scale", type=float, default=2.0, show_default=True, help="Output size / input size (1-4); "
              "sides rounded to multiples of 16.")
@click.option("--prompt", metavar="TEXT", help="What the image shows.  [default: the one stored in IMAGE, else none]")
@click.option("--strength", type=float, metavar="0..1", help="What the pass may change.  [default: 0.35]")
@click.option("--steps", type=int, help="The pass's schedule; ceil(strength x steps) run.  [default: IMAGE's, else 8]")
@click.option("--seed", type=int, help="[default: IMAGE's, else a random one]")
@click.option("--tile", type=int, default=1024, show_default=True, metavar="PIXELS",
              help="Above this size a side, denoise in overlapping tiles blended every step (MultiDiffusion).")
@model_option()
@quantize_option()
@dtype_option()
@low_memory_option()
@click.option("-o", "--output", metavar="FILE", help="Output .png.  [default: IMAGE-x{SCALE}.png, in the current folder]")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@click.option("--quiet", is_flag=True, help="Print only the output path.")
def upscale_command(image, scale, prompt, strength, steps, seed, tile, model, quantize, dtype, low_memory, output,
                    overwrite, quiet):
    """Upscale IMAGE SCALE times, redrawing its details with the model (the hires fix's second pass).

    \b
      zimage-mlx upscale zimage-42.png --scale 2
      zimage-mlx upscale photo.jpg --prompt "a harbour at dusk" --strength 0.3 -o harbour-2x.png
    """
    from ..hires import upscale_recipe

    with expected_errors():
        recipe = upscale_recipe(image, scale=scale, prompt=prompt, strength=strength, steps=steps, seed=seed,
                                tile=tile)
        recipe = recipe.with_seed()
        name = output or f"{Path(image).stem}-x{number(scale)}.png"
        path = plan_outputs(name, [(0, recipe.seed)], overwrite)[0]
        pipe = load(model, quantize, dtype, low_memory, quiet)
        progress = Progress(enabled=not quiet)
        progress.start(f"{recipe.width}x{recipe.height} seed {recipe.seed}")
        made = pipe.run(recipe, release=True, on_step=progress.on_step)[0]
        progress.finish()
        save_png(made, path, made.info["recipe"].to_png(), overwrite)
    click.echo(str(path) if quiet else f"Saved {path} ({made.width}x{made.height}, seed {recipe.seed}, strength "
               f"{number(recipe.strength)}, prompt {recipe.prompt!r})")


def load(model: str, quantize, dtype: str, low_memory: bool, quiet: bool):
    from ..pipeline import ZImagePipeline
    from ..sources import resolve_model
    from ..weights import model_label
    from .options import bits

    t = time.perf_counter()
    pipe = ZImagePipeline.from_pretrained(resolve_model(model), dtype=dtype, quantize=bits(quantize),
                                          low_memory=low_memory)
    pipe.label = model_label(model)
    if not quiet:
        click.echo(f"Loaded {pipe.label} in {time.perf_counter() - t:.1f} s ({describe_pipeline(pipe)})", err=True)
    return pipe
