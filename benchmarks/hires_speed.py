"""The hires fix against direct generation at the doubled size: time and peak memory on this machine.

Direct: `steps` steps at 2 x size. Hires: `steps` steps at size, then the second pass at 2 x size with strength
0.35 over a `steps`-step schedule (ceil(0.35 x steps) steps run), Lanczos or latent. Rounds interleave the
three so that machine drift hits all alike; reports the median seconds and each one's peak (mx.get_peak_memory,
reset before each run). Without --model it builds the tests' tiny reference checkpoint (needs the test extras):
on it the numbers show the shape of the costs (steps at each size, the extra decode and encode), not a real
model's seconds.

    PYTHONPATH=. python benchmarks/hires_speed.py --size 256 --steps 8
    PYTHONPATH=. python benchmarks/hires_speed.py --model Tongyi-MAI/Z-Image-Turbo --size 512 --rounds 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def checkpoint(model: str | None) -> str:
    if model:
        return model
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import reference

    return str(reference.build_checkpoint(Path(tempfile.mkdtemp()) / "Z-Image-Tiny"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--size", type=int, default=256, help="the first pass's side; direct runs at twice it")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import mlx.core as mx

    from zimage_mlx import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(checkpoint(args.model), dtype="float32" if not args.model else "auto")
    s, big = args.size, 2 * args.size
    runs = {f"direct {big}x{big}, {args.steps} steps": dict(width=big, height=big),
            f"hires 2x lanczos ({s} -> {big})": dict(width=s, height=s, hires_scale=2),
            f"hires 2x latent ({s} -> {big})": dict(width=s, height=s, hires_scale=2, hires_upscaler="latent")}
    pipe.generate("warm up", width=s, height=s, steps=1, seed=0)
    times = {k: [] for k in runs}
    peaks = {}
    for _ in range(args.rounds):
        for name, kw in runs.items():
            mx.reset_peak_memory()
            t = time.perf_counter()
            pipe.generate("a lighthouse on a cliff at dusk", steps=args.steps, seed=1, **kw)
            times[name].append(time.perf_counter() - t)
            peaks[name] = mx.get_peak_memory() / 1e6
    print(f"{platform.machine()} {platform.processor() or ''}, {mx.default_device()}, "
          f"{args.model or 'tiny reference checkpoint'}, float32")
    print("| run | seconds (median) | peak MB |\n|---|---|---|")
    for name in runs:
        print(f"| {name} | {statistics.median(times[name]):.2f} | {peaks[name]:.0f} |")


if __name__ == "__main__":
    main()
