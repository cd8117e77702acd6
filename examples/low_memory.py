"""Generate on a Mac with little memory: the text encoder lives only while a prompt is encoded, and the
VAE decodes in tiles. Prints the peak memory so you can compare with and without --no-low-memory.

    python examples/low_memory.py "a watercolor map of an island" --output low_memory.png
"""

import argparse
import time

import mlx.core as mx

from zimage_mlx import ZImagePipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("prompt", nargs="?", default="a watercolor map of a small island, hand lettering")
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="Hub id or checkpoint folder")
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--seed", type=int, default=3)
parser.add_argument("--no-low-memory", dest="low_memory", action="store_false", help="for comparison")
parser.add_argument("--output", default="low_memory.png")
args = parser.parse_args()

start = time.perf_counter()
pipe = ZImagePipeline.from_pretrained(args.model, low_memory=args.low_memory)
image = pipe.generate(args.prompt, width=args.width, height=args.height, steps=args.steps, seed=args.seed)[0]
image.save(args.output)
print(f"{args.output}: {time.perf_counter() - start:.1f} s, peak memory {mx.get_peak_memory() / 1e9:.2f} GB "
      f"(low_memory={args.low_memory})")
