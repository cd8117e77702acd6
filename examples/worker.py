"""Run images in the background with the library's worker: one thread owns the model, jobs queue in order.

An app (a GUI, a bot, a notebook) submits Recipes and reads each job's events; nothing here is HTTP. Each
image comes back encoded with its recipe in its metadata, so `zimage-mlx generate --from-image` replays it.

    python examples/worker.py "a lighthouse at dusk" --out-dir worker
"""

import argparse
import os
import sys
from pathlib import Path

from zimage_mlx.recipe import Recipe
from zimage_mlx.worker import Worker

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("prompt", nargs="?", default="a lighthouse at dusk, oil painting")
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="Hub id or checkpoint folder")
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--seed", type=int, default=7)
parser.add_argument("--out-dir", default="worker")
args = parser.parse_args()


def load():  # runs on the worker's thread, which then makes every MLX call
    from zimage_mlx import ZImagePipeline

    return ZImagePipeline.from_pretrained(args.model)


worker = Worker(load, queue_size=4)
worker.start()  # loads the model; a load error is raised here
recipe = Recipe(args.prompt, width=args.width, height=args.height, steps=args.steps, seed=args.seed, num_images=2)
job = worker.submit(recipe, output_format="png", previews=False)
extra = worker.submit(recipe.replace(prompt="never made"))  # queued behind the first...
worker.cancel(extra)  # ...and taken off the queue before it starts
job.done.wait()
for type_, data in job.events:  # queued, started, step..., done (or failed / cancelled)
    print(type_, {k: v for k, v in data.items() if k != "preview"})
if job.status != "completed":
    raise SystemExit(f"{job.status}: {job.error.message if job.error else ''}")
out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
for data, made in zip(job.images, job.recipes):
    path = out / f"worker-{made.seed}.png"
    path.write_bytes(data)  # the PNG holds its recipe: Recipe.from_png(path)
    print(path)
print("cancelled:", extra.status)
worker.shutdown(wait=10)
# MLX 0.32 on Linux aborts now and then in its static destructors once a worker thread has used it (exit code
# 134, as `zimage-mlx serve` notes): end here, everything written.
sys.stdout.flush()
os._exit(0)
