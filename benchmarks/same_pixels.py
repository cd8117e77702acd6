"""Same seeds and settings, same pixels: this checkout against an earlier commit, on the tiny reference checkpoint.

A restructure (the one-recipe redesign) must not move a pixel. This script makes the same images with the code
of REV (a `git worktree` of it in a temporary folder) and with this checkout, each in its own process, through
the Python API and through the CLI, and reports the largest difference per case (0 = identical).

    python benchmarks/same_pixels.py --rev 0e1e329
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# Each case: generate()'s keywords (the API) and the CLI's arguments for the same images.
CASES = {
    "text to image": (dict(prompt="a red fox in the snow", width=48, height=32, steps=3, seed=7),
                      ["a red fox in the snow", "--size", "48x32", "--steps", "3", "--seed", "7"]),
    "two prompts, two images each": (dict(prompt=["a red fox", "一只猫"], width=32, height=32, steps=2, seed=5,
                                          num_images=2),
                                     None),
    "guidance and a negative prompt": (dict(prompt="a castle", negative_prompt="blurry", guidance=2.5,
                                            cfg_truncation=0.6, width=32, height=48, steps=2, seed=3),
                                       ["a castle", "--negative-prompt", "blurry", "--guidance", "2.5",
                                        "--cfg-truncation", "0.6", "--size", "32x48", "--steps", "2", "--seed", "3"]),
    "image to image": (dict(prompt="a fox at night", image="{photo}", strength=0.6, steps=4, seed=11),
                       ["a fox at night", "--image", "{photo}", "--strength", "0.6", "--steps", "4", "--seed", "11"]),
    "inpainting": (dict(prompt="a red car", image="{photo}", mask="{mask}", steps=4, seed=2),
                   ["a red car", "--image", "{photo}", "--mask", "{mask}", "--steps", "4", "--seed", "2"]),
}

RUN = r"""
import json, sys
import numpy as np
from zimage_mlx import ZImagePipeline
args = json.loads(sys.argv[1])
pipe = ZImagePipeline.from_pretrained(args["ckpt"])
for name, kw in args["cases"].items():
    images = pipe.generate(**kw)
    np.save(args["out"] + "/" + name.replace(" ", "_").replace(",", "") + ".npy",
            np.stack([np.asarray(im.convert("RGB")) for im in images]))
"""


def inputs(folder: Path) -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / "photo.png")
    mask = np.zeros((40, 56), np.uint8)
    mask[8:32, 16:48] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return {"photo": str(folder / "photo.png"), "mask": str(folder / "mask.png")}


def fill(value, files: dict):
    if isinstance(value, str):
        return value.format(**files)
    if isinstance(value, list):
        return [fill(v, files) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, files) for k, v in value.items()}
    return value


def make(tree: Path, ckpt: Path, out: Path, files: dict) -> None:
    """The API's images and the CLI's files of every case, with the package in `tree`."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(tree))
    cases = {name: fill(kw, files) for name, (kw, _) in CASES.items()}
    subprocess.run([sys.executable, "-c", RUN, json.dumps({"ckpt": str(ckpt), "cases": cases, "out": str(out)})],
                   check=True, env=env, cwd=tree)
    for name, (_, argv) in CASES.items():
        if argv is None:
            continue
        target = out / (name.replace(" ", "_").replace(",", "") + ".png")
        subprocess.run([sys.executable, "-c", "from zimage_mlx.cli import main; main()", "generate",
                        *fill(argv, files), "-m", str(ckpt), "-o", str(target), "--overwrite", "--quiet"],
                       check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)


def compare(old: Path, new: Path) -> list[tuple[str, str, int]]:
    from PIL import Image

    rows = []
    for a in sorted(old.glob("*.npy")):
        rows.append(("API", a.stem, int(np.abs(np.load(a).astype(int) - np.load(new / a.name).astype(int)).max())))
    for a in sorted(old.glob("*.png")):
        x = np.asarray(Image.open(a).convert("RGB"), int)
        y = np.asarray(Image.open(new / a.name).convert("RGB"), int)
        rows.append(("CLI", a.stem, int(np.abs(x - y).max())))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the earlier commit to compare with")
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/zimage-bench/Z-Image-Tiny"))
    args = ap.parse_args()
    import reference

    if not (args.checkpoint / "model_index.json").exists():
        reference.build_checkpoint(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_tree = tmp / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.rev], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            files = inputs(tmp)
            make(old_tree, args.checkpoint, tmp / "old-out", files)
            make(ROOT, args.checkpoint, tmp / "new-out", files)
            rows = compare(tmp / "old-out", tmp / "new-out")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False)
    print(f"| face | case | largest difference, {args.rev} vs this checkout (levels of 255) |")
    print("|---|---|---|")
    for face, case, diff in rows:
        print(f"| {face} | {case.replace('_', ' ')} | {diff} |")
    if any(d for *_, d in rows):
        raise SystemExit("pixels moved")


if __name__ == "__main__":
    main()
