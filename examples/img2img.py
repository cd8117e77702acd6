"""Image to image: start from a photo or sketch instead of pure noise; `strength` says how much changes.

strength 0.6 (the default) keeps the layout and colours and redraws the rest; 1.0 keeps only the size. The
output has the image's size (rounded down to multiples of 16) unless --width/--height say otherwise.

    python examples/img2img.py street.jpg "the same street at night, neon signs, rain" --strength 0.7
"""

import argparse

from zimage_mlx import ZImagePipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("image", help="the starting image (any format Pillow reads)")
parser.add_argument("prompt", nargs="?", default="the same scene as an oil painting, warm evening light")
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="Hub id or checkpoint folder")
parser.add_argument("--strength", type=float, default=0.6, help="0: the image as it is ... 1: only its size")
parser.add_argument("--width", type=int, help="resize to this width (default: the image's)")
parser.add_argument("--height", type=int, help="resize to this height (default: the image's)")
parser.add_argument("--steps", type=int, default=8, help="of the full schedule; ceil(strength x steps) run")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--output", default="img2img.png")
args = parser.parse_args()

pipe = ZImagePipeline.from_pretrained(args.model)
image = pipe.generate(args.prompt, image=args.image, strength=args.strength, width=args.width, height=args.height,
                      steps=args.steps, seed=args.seed)[0]
image.save(args.output)
print(f"{args.output} ({image.width}x{image.height}, strength {args.strength}, seed {image.info['seed']})")
