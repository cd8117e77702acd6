"""LoRAs: apply one or several style or subject LoRAs (diffusers, kohya or ComfyUI files) at a scale each.

`load_lora` accepts a .safetensors file, a folder holding one, or a Hub id (`owner/repo` or
`owner/repo/file.safetensors`). By default it is merged into the DiT's float weights (no cost per step;
the touched layers' originals are kept); fuse=False runs it beside the layers (no extra memory, a few percent
more per step), as quantized layers always do. `unload_loras()` puts the original weights back.

    python examples/lora.py watercolor.safetensors:0.8 --prompt "a lighthouse, watercolor"
"""

import argparse

from zimage_mlx import ZImagePipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("lora", nargs="+", help="LoRA file, folder or Hub id, with an optional :SCALE (default 1)")
parser.add_argument("--prompt", default="a lighthouse on a cliff, watercolor")
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="Hub id or checkpoint folder")
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--output", default="lora.png")
parser.add_argument("--without", help="also save the image without the LoRAs here, to compare")
args = parser.parse_args()

pipe = ZImagePipeline.from_pretrained(args.model)
settings = dict(width=args.width, height=args.height, steps=args.steps, seed=args.seed)
for spec in args.lora:
    name, sep, scale = spec.rpartition(":")
    try:
        scale = float(scale) if sep else 1.0
    except ValueError:  # a ':' that is not a scale
        name, scale = spec, 1.0
    name = name if sep else spec
    pipe.load_lora(name, scale)
    print(f"LoRA {name} at scale {scale:g}")
pipe.generate(args.prompt, **settings)[0].save(args.output)
print(args.output)
if args.without:
    pipe.unload_loras()
    pipe.generate(args.prompt, **settings)[0].save(args.without)
    print(args.without)
