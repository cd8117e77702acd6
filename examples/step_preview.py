"""Watch an image form: save the x0 estimate after every step, with the pipeline's stages.

`generate` is encode -> denoise -> decode; here the stages are called one by one. `pipe.fast_preview(step)`
shows what the image is becoming through a linear map of the latents (milliseconds); with --vae,
`pipe.preview(step)` decodes it with the VAE instead, exact but about one step's time at 1024x1024.

    python examples/step_preview.py "a castle on a hill" --out-dir preview
"""

import argparse
from pathlib import Path

from zimage_mlx import ZImagePipeline
from zimage_mlx.noise import noise

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("prompt", nargs="?", default="a castle on a hill above a misty valley, morning light")
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="Hub id or checkpoint folder")
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--seed", type=int, default=7)
parser.add_argument("--every", type=int, default=1, help="save a preview every N steps")
parser.add_argument("--out-dir", default="preview")
parser.add_argument("--vae", action="store_true", help="decode each preview with the VAE (exact, slow)")
args = parser.parse_args()

out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
pipe = ZImagePipeline.from_pretrained(args.model)

prompt_embeds = pipe.encode_prompt(args.prompt)  # one (L, dim) array per prompt
latents = noise(args.seed, args.height // 8, args.width // 8)  # (1, H/8, W/8, 16), the same noise generate() uses
for step in pipe.denoise(prompt_embeds, latents, pipe.sigmas(args.steps, width=args.width, height=args.height)):
    latents = step.latents
    if (step.index + 1) % args.every == 0:
        path = out / f"step-{step.index + 1:02d}-of-{step.total:02d}.png"
        (pipe.preview(step) if args.vae else pipe.fast_preview(step))[0].save(path)
        print(f"{path} (sigma {step.sigma:.3f})")
final = out / "final.png"
pipe.decode(latents)[0].save(final)
print(final)
