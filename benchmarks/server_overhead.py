"""The server's overhead per image against a direct `generate()` call, and the cheap preview's cost against a step.

Same process, same checkpoint, same settings: one pipeline is called directly on the main thread; another
sits behind `zimage-mlx serve`'s app (its Worker thread, a real uvicorn on 127.0.0.1, port 0) and
is called with POST /v1/images/generations over HTTP. Runs alternate (direct, server, direct, ...) so that
drift in machine load hits both. The server's time is the client's: request, queue hand-off, generate, PNG
encode, base64, JSON, response; "outside generate()" subtracts the worker's own generate() time in that
same request (zimage.timings.generate_s), which takes the run-to-run noise of generate itself out. The checkpoint is the test suite's tiny random-weight one (tests/reference.py),
so the generate time is small and the overhead shows clearly; the overhead does not depend on the model.

    python benchmarks/server_overhead.py --sizes 64 256 512 --steps 2 --repeats 5
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/zimage-bench/Z-Image-Tiny"))
    args = ap.parse_args()

    import httpx
    import mlx.core as mx

    import reference
    from server_fakes import LiveServer
    from zimage_mlx.pipeline import ZImagePipeline
    from zimage_mlx.server import ServerConfig
    from zimage_mlx.worker import Worker

    thread_local_streams()
    ckpt = args.checkpoint
    if not (ckpt / "model_index.json").exists():
        reference.build_checkpoint(ckpt)
    direct = ZImagePipeline.from_pretrained(ckpt)
    runner = Worker(lambda: ZImagePipeline.from_pretrained(ckpt), queue_size=2)
    runner.start()
    cfg = ServerConfig(max_side=max(args.sizes))
    print(f"device {mx.default_device()}, dtype {direct.dtype}, steps {args.steps}, repeats {args.repeats} "
          f"(median), tiny reference checkpoint")
    print("| size | direct generate() | through the server | difference | server time outside generate() | of which PNG encode | fast_preview | one step | preview / step |")
    print("|---|---|---|---|---|---|---|---|---|")
    with LiveServer(runner, cfg) as server, httpx.Client(base_url=server.url, timeout=600) as client:
        for size in args.sizes:
            body = {"prompt": "a lighthouse at dusk", "size": f"{size}x{size}", "steps": args.steps, "seed": 1}
            step_times, preview_times = [], []

            def on_step(step, marks=[]):  # noqa: B006 - per size, reset below
                t = time.perf_counter()
                if marks:
                    step_times.append(t - marks[-1])
                t0 = time.perf_counter()
                direct.fast_preview(step)
                preview_times.append(time.perf_counter() - t0)
                marks.append(time.perf_counter())

            def run_direct(with_preview: bool = False):
                t = time.perf_counter()
                direct.generate(body["prompt"], width=size, height=size, steps=args.steps, seed=1,
                                on_step=on_step if with_preview else None)
                return time.perf_counter() - t

            def run_server():
                t = time.perf_counter()
                r = client.post("/v1/images/generations", json=body)
                r.raise_for_status()
                base64.b64decode(r.json()["data"][0]["b64_json"])
                timings = r.json()["zimage"]["timings"]
                return time.perf_counter() - t, timings["encode_s"], timings["generate_s"]

            run_direct(), run_server()  # warm-up: compile, prompt cache, preview fit
            d, s, enc, extra = [], [], [], []
            for _ in range(args.repeats):
                d.append(run_direct())
                t, e, g = run_server()
                s.append(t)
                enc.append(e)
                extra.append(t - g)  # everything but the worker's own generate() call
            on_step.__defaults__[0].clear()
            for _ in range(2):
                run_direct(with_preview=True)
                on_step.__defaults__[0].clear()
            dm, sm = statistics.median(d), statistics.median(s)
            pm = statistics.median(preview_times) * 1e3
            stm = statistics.median(step_times) * 1e3 if step_times else float("nan")
            print(f"| {size}x{size} | {dm * 1e3:.0f} ms | {sm * 1e3:.0f} ms | {(sm - dm) * 1e3:+.0f} ms "
                  f"({(sm - dm) / dm * 100:+.0f} %) | {statistics.median(extra) * 1e3:.1f} ms | "
                  f"{statistics.median(enc) * 1e3:.1f} ms | {pm:.2f} ms | "
                  f"{stm:.0f} ms | {pm / stm * 100:.1f} % |")
    runner.shutdown(wait=10)


def thread_local_streams() -> None:
    """Two threads use MLX here (the direct pipeline on this one, the server's on its worker), but
    zimage_mlx.kernels creates its softmax CPU streams once per process, on the first thread that needs
    them, and MLX streams are thread-affine ("There is no Stream(cpu, N) in current thread" at 256x256).
    `zimage-mlx serve` alone is not affected (one MLX thread); this benchmark gives each thread its own."""
    import threading

    import mlx.core as mx

    from zimage_mlx import kernels

    local = threading.local()

    def streams():
        if not hasattr(local, "streams"):
            local.streams = [mx.new_stream(mx.cpu) for _ in range(max(1, min(4, os.cpu_count() or 1)))]
        return local.streams

    kernels._streams = streams


if __name__ == "__main__":
    main()
