"""The `zimage-mlx` command line: a dispatcher. Each command is a module of this package (generate, enhance,
serve, convert, train, upscale) that translates flags to the library and presents what it does; `common` holds the
one-line errors and progress, `options` the shared options, `output` where images go. Command modules load
MLX only when they run, so `zimage-mlx --help` stays light."""

import click

from .._version import __version__
from .common import Group
from .convert import convert_command
from .enhance import enhance_command
from .generate import generate
from .serve import serve
from .train import train_command
from .upscale import upscale_command


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="zimage-mlx")
def main():
    """Z-Image Turbo text-to-image, natively in MLX."""


for _command, _name in ((generate, "generate"), (enhance_command, "enhance"), (serve, "serve"),
                        (convert_command, "convert"), (train_command, "train"), (upscale_command, "upscale")):
    main.add_command(_command, _name)
