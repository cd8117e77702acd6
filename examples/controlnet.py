"""Structure from a control map: an edge map, depth map, pose or sketch guides the layout of the image.

Load a ControlNet Union once (its version is read from the weights), then pass control images to
`generate`; several control images run as one ControlNet pass per step. With --canny the edge map is made
from a photo (needs OpenCV: pip install 'zimage-mlx[control]'); depth and pose maps come ready-made.

    python examples/controlnet.py --controlnet alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1/Z-Image-Turbo-Fun-Controlnet-Union-2.1-lite-2602-8steps.safetensors \\
        --control photo.jpg --canny --prompt "a glass greenhouse in a snowy forest" --output greenhouse.png
"""

import argparse

from zimage_mlx import ZImagePipeline
from zimage_mlx.controlnet import control_map
from zimage_mlx.inputs import open_image

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="Tongyi-MAI/Z-Image-Turbo", help="Hub id or checkpoint folder")
parser.add_argument("--controlnet", required=True, help="ControlNet .safetensors file, folder or Hub repo/FILE")
parser.add_argument("--control", required=True, nargs="+", help="control image(s): edges, depth (near = white), pose")
parser.add_argument("--scale", type=float, nargs="+", help="one per control (default: the version's, 0.9 for 2.1)")
parser.add_argument("--canny", action="store_true", help="make an edge map from each control image (a photo)")
parser.add_argument("--prompt", default="a glass greenhouse in a snowy forest, morning light")
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--steps", type=int, default=8, help="8 for the 2.1 '-8steps' files")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--quantize", type=int, choices=[4, 8], help="quantize the DiT and the ControlNet on the fly")
parser.add_argument("--output", default="controlnet.png")
args = parser.parse_args()

pipe = ZImagePipeline.from_pretrained(args.model, quantize=args.quantize)
net = pipe.load_controlnet(args.controlnet)
print(f"ControlNet {net.args.name}, graph {net.graph}, default scale {net.args.scale}")
controls = [open_image(path) for path in args.control]
if args.canny:
    controls = [control_map(im, "canny", args.width, args.height) for im in controls]
image = pipe.generate(args.prompt, width=args.width, height=args.height, steps=args.steps, seed=args.seed,
                      control_image=controls, control_scale=args.scale)[0]
image.save(args.output)
print(args.output)
