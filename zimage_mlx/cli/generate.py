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
from ..recipe import ControlRef, LoraRef, Recipe
from .common import (Command, Progress, UserError, describe_pipeline, expected_errors, flag, show_warnings,
                     slow_blas_hint)
from .options import (dtype_option, low_memory_option, model_option, parse_control, parse_lora, parse_size,
                      quantize_option, read_prompts)
from .output import DEFAULT_OUTPUT, plan_outputs, plan_preview, preview_writer, save_png


@click.command("generate", cls=Command)
@click.argument("prompt", required=False)
@click.option("--prompt", "prompt_option", metavar="TEXT", help="The prompt, as an alternative to the argument.")
@click.option("--prompt-file", metavar="FILE", help="One prompt per non-empty line ('-' reads stdin).")
@click.option("--negative-prompt", metavar="TEXT", help="What to steer away from; needs --guidance > 0.")
@model_option()
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
