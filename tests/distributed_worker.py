"""One rank of the distributed tests (tests/test_distributed.py runs it under `mlx.launch`).

    distributed_worker.py JOB OUT [CHECKPOINT ...]

JOB "pair" (2 ranks): tensor parallelism on CHECKPOINT (DiT output on OUT/inputs.npz, a batch of images, an
8-bit image),
the API's auto mode (data: 2 prompts x 2 images; cfg: one CFG image), `run` in data mode (3 images, on_image,
release; every rank writes OUT/recipes-RANK.json) and the CLI in data mode (3 images, after OUT/pair.npz).
JOB "three" (3 ranks): the tensor-parallel DiT of CHECKPOINT on OUT/inputs.npz. JOB "mismatch": the start check with another
CHECKPOINT on rank 1 (two given). JOB "die": rank 1 exits in the middle of a gather.
Rank 0 writes OUT/<job>.npz; every rank ends with os._exit so that a test never waits on interpreter teardown.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def dit_output(pipe, inputs: Path) -> np.ndarray:
    import mlx.core as mx

    d = np.load(inputs)
    caps = [mx.array(d["cap0"]), mx.array(d["cap1"])]
    out = pipe.transformer(mx.array(d["x"]), mx.array(d["t"]), caps)
    return np.array(out.astype(mx.float32))


def tensor_job(group, out: Path, checkpoint: str, results: dict) -> None:
    from zimage_mlx.pipeline import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(checkpoint, dtype="float32", group=group, parallel="tensor")
    results["dit"] = dit_output(pipe, out / "inputs.npz")
    results["te_sharded"] = np.array(pipe.parallel.text_encoder_sharded)
    images = pipe.generate(["a red fox", "a cat on a roof"], width=64, height=64, steps=2, seed=5)
    for k, im in enumerate(images):
        results[f"tensor_{k}"] = np.asarray(im)


def main() -> None:
    job, out = sys.argv[1], Path(sys.argv[2])
    from zimage_mlx import distributed

    group = distributed.init()
    results = {}
    if job == "pair":
        tensor_job(group, out, sys.argv[3], results)
        from zimage_mlx.pipeline import ZImagePipeline

        pipe = ZImagePipeline.from_pretrained(sys.argv[3], dtype="float32", quantize=8, group=group, parallel="tensor")
        results["tensor_q8"] = np.asarray(pipe.generate("a red fox", width=64, height=64, steps=2, seed=5)[0])
        pipe = ZImagePipeline.from_pretrained(sys.argv[3], dtype="float32", group=group, parallel="auto")
        images = pipe.generate(["a red fox", "a cat on a roof"], width=64, height=64, steps=2, seed=[11, 40])
        for k, im in enumerate(images):
            results[f"data_{k}"] = np.asarray(im)
            results[f"data_seed_{k}"] = np.array(im.info["seed"])
        image = pipe.generate("a red fox", negative_prompt="blurry", guidance=3.0, width=64, height=64, steps=2,
                              seed=5)[0]
        results["cfg"] = np.asarray(image)
        # Parallel.run in data mode: 3 images on 2 ranks (the last round half full), rank 0's on_image in order,
        # every rank's images with their recipes, the DiT freed after each rank's last image (release).
        from zimage_mlx.recipe import Recipe

        calls = []
        recipe = Recipe(prompt=(out / "prompts.txt").read_text().splitlines(), width=64, height=64, steps=2, seed=3)
        images = pipe.run(recipe, release=True, on_image=lambda j, im: calls.append((j, im.info["seed"])))
        for k, im in enumerate(images):
            results[f"run_{k}"] = np.asarray(im)
        results["run_calls"] = np.array(calls).reshape(-1, 2)
        results["run_released"] = np.array(pipe.transformer is None)
        (out / f"recipes-{group.rank()}.json").write_text(json.dumps(
            [dict(im.info["recipe"].to_dict(), seed_info=im.info["seed"]) for im in images]))
    elif job == "three":  # the DiT alone: no text encoder, so no transformers import in 3 more processes
        from zimage_mlx.distributed import load_sharded_transformer

        class Holder:
            transformer = load_sharded_transformer(Path(sys.argv[3]) / "transformer", group, "float32", None)

        results["dit"] = dit_output(Holder, out / "inputs.npz")
    elif job == "mismatch":  # rank 1 gets another folder
        try:
            distributed.start(group, "data", sys.argv[3 + group.rank()], dtype="float32", quantize=None, timeout=60)
        except distributed.DistributedError as e:
            print(f"DistributedError: {e}", flush=True)
            os._exit(4)
    elif job == "die":
        import mlx.core as mx

        par = distributed.Parallel(group, "data", timeout=60)
        if group.rank() == 1:  # vanishes without a word; status 0, else mlx.launch would end rank 0 itself
            time.sleep(0.5)
            os._exit(0)
        try:
            par.gather_images(None)
        except distributed.DistributedError as e:
            print(f"DistributedError: {e}", flush=True)
            os._exit(4)
        mx.eval(mx.zeros(1))
    if group.rank() == 0:
        np.savez(out / f"{job}.npz", **results)
    if job == "pair":  # the CLI last, so that the pipeline's results are written whatever it does
        from zimage_mlx.cli import main as cli

        try:
            cli(["generate", "--prompt-file", str(out / "prompts.txt"), "--seed", "3", "--size", "64", "--steps",
                 "2", "-m", sys.argv[3], "-o", str(out / "cli" / "{index}.png"), "--parallel", "data", "--quiet"],
                standalone_mode=False)
        except Exception as e:  # noqa: BLE001 - test_cli_data_parallel_files_equal_a_serial_run reports it
            print(f"CLI failed: {type(e).__name__}: {e}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
