"""Several prompts and several images per prompt from one loaded model.

Each prompt is its own `generate` call with the same seed, so the seed-for-seed comparison between
prompts is fair; image k of a call uses seed + k, so any image can be made again alone.

    python examples/batch_prompts.py --num-images 2 --out-dir batch
"""

import argparse
from pathlib import Path

from zimage_mlx import ZImagePipeline

PROMPTS = [
    "a lighthouse on a cliff at dusk, dramatic clouds",
    "a bowl of ramen on a wooden table, steam, soft window light",
    "一只橘猫趴在窗台上晒太阳，胶片质感",  # Chinese prompts work as well as English ones
]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="Hub id or checkpoint folder")
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--num-images", type=int, default=2)
parser.add_argument("--out-dir", default="batch")
args = parser.parse_args()

out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
pipe = ZImagePipeline.from_pretrained(args.model)
for p, prompt in enumerate(PROMPTS):
    images = pipe.generate(prompt, width=args.width, height=args.height, steps=args.steps, seed=args.seed,
                           num_images=args.num_images)
    for image in images:
        path = out / f"prompt{p}-seed{image.info['seed']}.png"
        image.save(path)
        print(path)
