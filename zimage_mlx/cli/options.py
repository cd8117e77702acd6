"""The options and arguments several commands share, and how their values are read."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import click

from ..recipe import DEFAULT_MODEL
from .common import UserError

DTYPE_CHOICES = ["auto", "bfloat16", "float16", "float32"]


def model_option(help_text: str = "A Hugging Face repo id or a checkpoint folder."):
    return click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, help=help_text)


def quantize_option(help_text: str = "Quantize on the fly: the DiT to 4 or 8 bits, the text encoder to 8."):
    return click.option("--quantize", type=click.Choice(["4", "8"]), help=help_text)


def dtype_option(help_text: str = "Compute dtype; auto is float32 on CPU; on an Apple GPU bfloat16, or float16 on "
                                  "M1/M2 when the checkpoint passes the float16 checks."):
    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True, help=help_text)


def low_memory_option():
    return click.option("--low-memory", is_flag=True, help="Load the text encoder only while encoding; decode in tiles.")


def bits(quantize: str | None) -> int | None:
    return int(quantize) if quantize else None


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
