"""Load Z-Image Turbo once, generate one image, save it.

    python examples/minimal.py "a red fox in the snow, golden hour" --seed 42
"""

import argparse

from zimage_mlx import ZImagePipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("prompt", nargs="?", default="a red fox in the snow, golden hour, 35 mm photo")
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="Hub id or checkpoint folder")
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--output", default="minimal.png")
args = parser.parse_args()

pipe = ZImagePipeline.from_pretrained(args.model)
image = pipe.generate(args.prompt, width=args.width, height=args.height, steps=args.steps, seed=args.seed)[0]
image.save(args.output)
print(f"{args.output} (seed {image.info['seed']})")
