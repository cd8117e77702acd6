#!/usr/bin/env python3
"""Convert a Z-Image checkpoint into an MLX folder: the same code as `zimage-mlx convert`, as a script.

    python convert/convert.py Tongyi-MAI/Z-Image-Turbo z-image-turbo-mlx --quantize 4
    python convert/convert.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from zimage_mlx.cli.convert import convert_command  # noqa: E402

if __name__ == "__main__":
    convert_command(prog_name="convert.py")
