"""`zimage-mlx enhance`: print a detailed rewrite of a prompt, written by the checkpoint's own Qwen3."""

from __future__ import annotations

import sys

import click

from .common import Command, expected_errors
from .options import bits, dtype_option, model_option, quantize_option


@click.command("enhance", cls=Command)
@click.argument("prompt")
@model_option()
@click.option("--seed", type=int, help="Sampling seed (default: a random one).")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--max-tokens", type=int, default=512, show_default=True, help="Longest rewrite, in tokens.")
@click.option("--system-prompt", metavar="TEXT", help="Replace the built-in instructions given to the model.")
@quantize_option("Quantize the text encoder on the fly (to 8 bits either way).")
@dtype_option("Compute dtype; auto is bfloat16 on an Apple GPU, float32 on CPU.")
def enhance_command(prompt, model, seed, temperature, max_tokens, system_prompt, quantize, dtype):
    """Print a detailed rewrite of PROMPT, written by the checkpoint's own Qwen3 text encoder.

    \b
      zimage-mlx enhance "a cat on a windowsill" --seed 7
      zimage-mlx generate "$(zimage-mlx enhance 'a lighthouse in a storm')" --seed 7
    """
    from ..enhance import PromptEnhancer, check_options
    from ..pipeline import default_dtype
    from ..text_encoder import TextEncoder
    from ..text_encoder import default_bits as text_encoder_bits
    from ..sources import resolve_model

    with expected_errors():
        check_options(max_tokens, temperature, seed)
        root = resolve_model(model)
        dtype = default_dtype() if dtype == "auto" else dtype
        encoder = TextEncoder.from_pretrained(root, dtype="bfloat16" if dtype == "float16" else dtype,
                                              quantize=text_encoder_bits(bits(quantize)))
        enhancer = PromptEnhancer.from_text_encoder(encoder, root)
        live = sys.stdout.isatty()  # on a terminal the rewrite appears as it is written
        text = enhancer.enhance(prompt, system_prompt=system_prompt, max_tokens=max_tokens, temperature=temperature,
                                seed=seed, callback=(lambda piece: click.echo(piece, nl=False)) if live else None)
    click.echo("" if live else text)
