"""`zimage-mlx convert`: the command line over zimage_mlx.convert (progress and messages live here)."""

from __future__ import annotations

import time

import click

from .common import Command, Progress, expected_errors
from ..convert import DEFAULT_BASE, DTYPE_NAMES, LABELS, convert, convert_controlnet

BITS = ["2", "3", "4", "5", "6", "8"]


@click.command("convert", cls=Command, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("src")
@click.argument("dst")
@click.option("--quantize", type=click.Choice(["4", "8"]),
              help="Quantize the DiT to 4 or 8 bits and the text encoder (and an Omni SigLIP tower) to 8 (the VAE never is).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="Quantization group size: smaller is more accurate and larger.")
@click.option("--dtype", type=click.Choice(list(DTYPE_NAMES)), default="bfloat16", show_default=True,
              help="Dtype of the DiT, text encoder and SigLIP tower weights (float16 keeps the latter two in bfloat16).")
@click.option("--transformer-bits", type=click.Choice(BITS), help="Bits for the DiT alone (overrides --quantize).")
@click.option("--text-encoder-bits", type=click.Choice(BITS), help="Bits for the text encoder alone (overrides --quantize).")
@click.option("--transformer", "transformer_file", metavar="FILE", help="The DiT from one .safetensors file (e.g. ComfyUI's).")
@click.option("--text-encoder", "text_encoder_file", metavar="FILE", help="The text encoder from one .safetensors file.")
@click.option("--vae", "vae_file", metavar="FILE", help="The VAE from one .safetensors file (e.g. ae.safetensors).")
@click.option("--base", metavar="MODEL", help=f"For single files: the folder or Hub id that gives tokenizer, scheduler "
                                              f"and configs (small files only).  [default: {DEFAULT_BASE}]")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--controlnet", is_flag=True,
              help="SRC is a ControlNet Union file (or folder, Hub repo/FILE): write a ControlNet folder, quantized "
                   "with --quantize 4|8 (--base: a checkpoint folder whose DiT it is for; default Z-Image Turbo's).")
def convert_command(src, dst, quantize, group_size, dtype, transformer_bits, text_encoder_bits, transformer_file,
                    text_encoder_file, vae_file, base, force, controlnet):
    """Convert a checkpoint into an MLX folder (optionally quantized) that loads directly.

    SRC is a diffusers checkpoint (a folder or a Hub id), or ComfyUI single files: a folder holding the DiT,
    the text encoder and the VAE (recognised by their tensor names), or a file; --transformer, --text-encoder
    and --vae name single files one by one, replacing SRC's. A Z-Image-Omni checkpoint also gets its SigLIP
    tower (siglip/) and processor settings (siglip_processor/).

    \b
      zimage-mlx convert Tongyi-MAI/Z-Image-Turbo z-image-turbo-mlx
      zimage-mlx convert Tongyi-MAI/Z-Image-Turbo z-image-turbo-q4 --quantize 4
      zimage-mlx convert ComfyUI/models/split_files z-image-turbo-mlx
      zimage-mlx convert --controlnet Z-Image-Turbo-Fun-Controlnet-Union-2.1-lite-2602-8steps.safetensors union-lite-q4 --quantize 4
    """

    progress = Progress()
    if controlnet:
        t0 = time.perf_counter()
        progress.start("Converting the ControlNet")
        with expected_errors():
            nbytes, note = convert_controlnet(src, dst, dtype=dtype, quantize=int(quantize) if quantize else None,
                                              group_size=int(group_size), base=base, force=force, progress=progress)
        progress.finish()
        click.echo(f"Wrote {dst} ({nbytes / 1e9:.2f} GB, {note}) in {time.perf_counter() - t0:.0f} s")
        return
    current = {"name": None}

    def report(name, done, total):
        if current["name"] != name:
            if current["name"]:
                progress.finish()
            current["name"] = name
            progress.start(f"Converting the {LABELS[name]}")
        progress(done, total)

    t0 = time.perf_counter()
    with expected_errors():
        result = convert(src, dst, dtype=dtype, quantize=int(quantize) if quantize else None, group_size=int(group_size),
                         transformer_bits=int(transformer_bits) if transformer_bits else None,
                         text_encoder_bits=int(text_encoder_bits) if text_encoder_bits else None, force=force,
                         transformer=transformer_file, text_encoder=text_encoder_file, vae=vae_file, base=base,
                         progress=report)
    if current["name"]:
        progress.finish()
    for name, (nbytes, note) in result.items():
        click.echo(f"{name:<13} {nbytes / 1e9:7.2f} GB  {note}".rstrip())
    total = sum(n for n, _ in result.values())
    click.echo(f"Wrote {dst} ({total / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
