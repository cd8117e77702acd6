"""Run in a child process by tests/test_studio.py (so torch and the test fixtures don't dominate the resident
set): load a checkpoint in a Worker, make an image, unload, make it again; print the numbers as JSON.

    python tests/unload_rss.py CHECKPOINT
"""

from __future__ import annotations

import gc
import json
import sys
import time


def main(path: str) -> dict:
    from mlx.utils import tree_flatten

    from zimage_mlx.memory import rss_bytes
    from zimage_mlx.pipeline import ZImagePipeline
    from zimage_mlx.recipe import Recipe
    from zimage_mlx.worker import Worker

    worker = Worker(lambda: ZImagePipeline.from_pretrained(path, dtype="float32"))
    t0 = time.perf_counter()
    worker.start(timeout=300)
    load_s = time.perf_counter() - t0
    recipe = Recipe("a lighthouse", width=64, height=64, steps=2, seed=3)

    def image() -> bytes:
        job = worker.submit(recipe)
        job.done.wait(300)
        assert job.status == "completed", job.error
        return job.images[0]

    first = image()
    pipe = worker.pipeline
    parts = [pipe.transformer, pipe.text_encoder and pipe.text_encoder.model, pipe.vae]
    weights = sum(v.nbytes for m in parts if m is not None for _, v in tree_flatten(m.parameters()))
    del pipe, parts
    gc.collect()
    loaded = rss_bytes()
    assert worker.unload(60)
    unloaded = rss_bytes()
    again = image()
    worker.shutdown(wait=10)
    return {"weights_bytes": weights, "rss_loaded": loaded, "rss_unloaded": unloaded,
            "rss_drop": loaded - unloaded, "drop_fraction": (loaded - unloaded) / weights,
            "same_image": first == again, "load_s": round(load_s, 2)}


if __name__ == "__main__":
    import os

    out = main(sys.argv[1])
    print(json.dumps(out), flush=True)
    os._exit(0)  # MLX 0.32 on Linux may abort in its static destructors once a worker thread used it
