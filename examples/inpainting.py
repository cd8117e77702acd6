"""Inpainting: repaint only where a mask is white; the rest of the image is kept as it is.

The mask is an image of the same size as the picture (greyscale, white = repaint, binarised at 50%). The
strength defaults to 1 (the masked region is drawn from scratch); lower keeps some of what was there.

    python examples/inpainting.py street.jpg car-mask.png "a red vintage car"
"""

import argparse

from zimage_mlx import ZImagePipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("image", help="the picture to edit")
parser.add_argument("mask", help="white where to repaint, black where to keep; the picture's size")
parser.add_argument("prompt", nargs="?", default="a red vintage car")
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="Hub id or checkpoint folder")
parser.add_argument("--strength", type=float, default=1.0)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--output", default="inpainting.png")
args = parser.parse_args()

pipe = ZImagePipeline.from_pretrained(args.model)
image = pipe.generate(args.prompt, image=args.image, mask=args.mask, strength=args.strength, steps=args.steps,
                      seed=args.seed)[0]
image.save(args.output)
print(f"{args.output} ({image.width}x{image.height}, seed {image.info['seed']})")
