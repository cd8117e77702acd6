"""Bytes moved per DiT step by each parallel mode, the loopback run's compute/communication split, and a
projection for 2 and 4 Macs.

    python benchmarks/distributed_bytes.py              # the byte table and the projection (instant)
    python benchmarks/distributed_bytes.py --loopback   # also the measured 2-rank loopback split (~2 min)
    python benchmarks/distributed_bytes.py --shard-memory  # also what a rank holds after loading its shard

1. Bytes: the real model's DiT (dim 3840, 30 heads, 30 + 2 + 2 blocks) is built with lazy random weights
   (never evaluated), sharded as `zimage_mlx.distributed` shards it, and run as a lazy graph with
   `mx.distributed.all_sum` / `all_gather` replaced by recorders: the table adds up the sizes of the
   collectives our code issues, in bfloat16 (the dtype on a Mac). Caption: 128 tokens (a long prompt,
   padded). Ring collectives: an all-reduce of S bytes sends 2(N-1)/N x S per rank, an all-gather of S per
   rank sends (N-1) x S.
2. Loopback (measured): `mlx.launch --backend ring -n 2 --hosts 127.0.0.1` on this CPU, a reduced DiT of the
   real head size (dim 256 = 2 heads x 128, 1 block + 1 + 1 refiners, cap_feat_dim 2560) at 256x256,
   float32: the sharded forward's time with the real all-reduces and with them replaced by the identity
   (compute alone); communication is the difference. And all-reduces of one real 512² block's output
   (1152 x 3840 float32, 17.7 MB) alone.
3. Projection (not measured) for 2 Macs, for 3 and 5 (tensor parallelism cannot use 4: 30 heads) and for
   4 (data parallelism): communication per step = sum over collectives of (bytes sent per rank /
   bandwidth + steps of the ring x latency), for Thunderbolt 5 with JACCL (about 8 GB/s and 25 us, measured
   by hotwa/mlx-jaccl-cluster between M4 Pro Mac minis, as cited in /work/shared/docs/landscape.md) and
   10 GbE (1.25 GB/s line rate and 50 us: nominal figures, assumed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zimage_mlx import distributed, kernels  # noqa: E402
from zimage_mlx.transformer import TransformerArgs, ZImageTransformer  # noqa: E402

SIZES = (512, 1024, 2048)
CAPTION_TOKENS = 128
BF16 = 2
LINKS = {  # name: (bytes/s, latency s, source)
    "Thunderbolt 5 (JACCL)": (8e9, 25e-6, "measured by hotwa/mlx-jaccl-cluster (M4 Pro minis), via landscape.md"),
    "10 GbE (ring/TCP)": (1.25e9, 50e-6, "nominal line rate, assumed latency"),
}


class FakeGroup:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@contextmanager
def recording(size: int):
    """Replace the collectives by recorders: (kind, elements of this rank's input) for each call; the outputs
    have the right shapes (values do not matter: nothing is evaluated)."""
    calls = []
    sum_, gather = mx.distributed.all_sum, mx.distributed.all_gather

    def all_sum(x, **kw):
        calls.append(("all_sum", x.size))
        return x

    def all_gather(x, **kw):
        calls.append(("all_gather", x.size))
        return mx.concatenate([x] * size)

    mx.distributed.all_sum, mx.distributed.all_gather = all_sum, all_gather
    try:
        yield calls
    finally:
        mx.distributed.all_sum, mx.distributed.all_gather = sum_, gather


def sent_per_rank(kind: str, elements: int, n: int, itemsize: int) -> float:
    s = elements * itemsize
    return 2 * (n - 1) / n * s if kind == "all_sum" else (n - 1) * s


def hops(kind: str, n: int) -> int:
    return 2 * (n - 1) if kind == "all_sum" else n - 1


def tensor_calls(px: int, n: int) -> list:
    old = kernels.CUT_GRAPHS
    kernels.CUT_GRAPHS = False  # a lazy graph: nothing is evaluated
    try:
        model = ZImageTransformer(TransformerArgs())
        distributed.shard_transformer(model, FakeGroup(0, n))
        with recording(n) as calls:
            model(mx.zeros((1, px // 8, px // 8, 16)), mx.zeros((1,)), [mx.zeros((CAPTION_TOKENS, 2560))])
        return calls
    finally:
        kernels.CUT_GRAPHS = old


def cfg_calls(px: int) -> list:
    par = distributed.Parallel(FakeGroup(0, 2), "cfg", timeout=60)
    with recording(2) as calls:
        x = mx.zeros((1, px // 8, px // 8, 16))
        par.guided(lambda x, t, c: x, x, mx.zeros((1,)), [None], [None])
    return calls


def data_calls(px: int, n: int) -> list:
    from PIL import Image

    par = distributed.Parallel(FakeGroup(0, n), "data", timeout=60)
    with recording(n) as calls:
        par.gather_images(Image.new("RGB", (px, px)))
    return calls


def table(n_steps: int = 8) -> list[dict]:
    rows = []
    for px in SIZES:
        for n in (2, 3, 5):  # 4 ranks cannot split 30 heads: 4 Macs run data parallel
            t = tensor_calls(px, n)
            rows.append(dict(mode="tensor", px=px, ranks=n, collectives=len(t),
                             payload=sum(e for _, e in t) * BF16,
                             sent=sum(sent_per_rank(k, e, n, BF16) for k, e in t),
                             hops=sum(hops(k, n) for k, _ in t)))
        c = cfg_calls(px)
        rows.append(dict(mode="cfg", px=px, ranks=2, collectives=len(c), payload=sum(e for _, e in c) * BF16,
                         sent=sum(sent_per_rank(k, e, 2, BF16) for k, e in c), hops=sum(hops(k, 2) for k, _ in c)))
        for n in (2, 4):
            d = data_calls(px, n)  # once per image (uint8 pixels); per step: divided by the steps
            rows.append(dict(mode=f"data (per image / {n_steps} steps)", px=px, ranks=n, collectives=len(d),
                             payload=sum(e for _, e in d) / n_steps,
                             sent=sum(sent_per_rank(k, e, n, 1) for k, e in d) / n_steps,
                             hops=sum(hops(k, n) for k, _ in d) / n_steps))
    return rows


def show_table(rows):
    print("\n## Bytes per DiT step (real model dims, bfloat16, caption 128 tokens; counted from our collectives)\n")
    print("payload: what one rank puts into the step's collectives; sent per rank: what a ring algorithm makes")
    print("each rank send for them (all-reduce 2(N-1)/N x payload, all-gather (N-1) x payload)\n")
    print("| mode | size | ranks | collectives | payload | sent per rank |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['px']}² | {r['ranks']} | {r['collectives']:g} | {r['payload'] / 1e6:.2f} MB | "
              f"{r['sent'] / 1e6:.2f} MB |")


def show_projection(rows):
    print("\n## Projection (not measured): communication per DiT step\n")
    print("t = sent per rank / bandwidth + ring steps x latency, summed over the step's collectives\n")
    print("| mode | size | ranks | " + " | ".join(LINKS) + " |")
    print("|---|---|---|" + "---|" * len(LINKS))
    for r in rows:
        if r["mode"].startswith("data"):
            continue
        times = [r["sent"] / bw + r["hops"] * lat for bw, lat, _ in LINKS.values()]
        print(f"| {r['mode']} | {r['px']}² | {r['ranks']} | " + " | ".join(f"{t * 1e3:.1f} ms" for t in times) + " |")
    print()
    for name, (bw, lat, src) in LINKS.items():
        print(f"- {name}: {bw / 1e9:g} GB/s, {lat * 1e6:g} us ({src})")


# ----------------------------------------------------------------------------------------------
# Loopback (one rank of `mlx.launch -n 2`)

# Small enough for a shared 2-core CPU: the real head size (128) and caption width, 2 heads, 1 + 1 + 1 blocks.
REDUCED = dict(dim=256, n_heads=2, n_layers=1, n_refiner_layers=1)
LOOPBACK_PX = 256
# One all-reduce of a real 512² block's output in float32: (1024 + 128 tokens, 3840).
BLOCK_PAYLOAD = (1, 1024 + CAPTION_TOKENS, 3840)


def timeit(fn, reps=3):
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def loopback_rank():
    group = mx.distributed.init(strict=True)
    kernels.keep_freed_memory()
    model = ZImageTransformer(TransformerArgs(**REDUCED))
    distributed.shard_transformer(model, group)
    mx.eval(model.parameters())
    x, t = mx.random.normal((1, LOOPBACK_PX // 8, LOOPBACK_PX // 8, 16), key=mx.random.key(0)), mx.array([0.5])
    cap = [mx.random.normal((CAPTION_TOKENS, 2560), key=mx.random.key(1))]
    step = lambda: mx.eval(model(x, t, cap))  # noqa: E731
    with_comm = timeit(step)
    real = mx.distributed.all_sum
    mx.distributed.all_sum = lambda a, **kw: a
    try:
        compute = timeit(step)
    finally:
        mx.distributed.all_sum = real
    # Communication timed directly: each all-reduce's input is evaluated first, then the all-reduce alone
    # (transfer, plus waiting for the other rank).
    inside = []

    def timed(a, **kw):
        mx.eval(a)
        t0 = time.perf_counter()
        out = real(a, **kw)
        mx.eval(out)
        inside.append(time.perf_counter() - t0)
        return out

    mx.distributed.all_sum = timed
    try:
        timed_total = []
        for _ in range(3):
            inside.clear()
            t0 = time.perf_counter()
            step()
            timed_total.append((time.perf_counter() - t0, sum(inside)))
    finally:
        mx.distributed.all_sum = real
    timed_total.sort()
    with recording(2) as calls:
        model(x, t, cap)
    payload = mx.random.normal(BLOCK_PAYLOAD)
    mx.eval(payload)
    one = timeit(lambda: mx.eval(mx.distributed.all_sum(payload, group=group)), reps=10)
    if group.rank() == 0:
        print(json.dumps(dict(with_comm=with_comm, compute=compute, collectives=len(calls),
                              timed_step=timed_total[1][0], timed_comm=timed_total[1][1],
                              payload_bytes=sum(e for _, e in calls) * 4, one_allreduce=one,
                              one_bytes=payload.nbytes)), flush=True)
    sys.stdout.flush()
    os._exit(0)


def loopback():
    launcher = shutil.which("mlx.launch")
    cmd = [launcher, "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--env",
           f"PYTHONPATH={Path(__file__).resolve().parent.parent}", "--", sys.executable, __file__, "--rank"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not line:
        raise SystemExit(f"loopback run failed:\n{p.stdout}\n{p.stderr}")
    r = json.loads(line[0])
    print("\n## Loopback, measured on this CPU (Linux x86, 2 cores), 2 ranks, float32\n")
    print(f"Reduced DiT {REDUCED} at {LOOPBACK_PX}², caption {CAPTION_TOKENS} tokens, median of 3 forwards:\n")
    print("| | time |")
    print("|---|---|")
    comm = r["with_comm"] - r["compute"]
    print(f"| forward with {r['collectives']} all-reduces ({r['payload_bytes'] / 1e6:.1f} MB payload) | "
          f"{r['with_comm'] * 1e3:.0f} ms |")
    print(f"| same, all-reduces replaced by the identity (compute) | {r['compute'] * 1e3:.0f} ms |")
    print(f"| communication (difference of the two) | {comm * 1e3:.0f} ms ({100 * comm / r['with_comm']:.0f}%) |")
    print(f"| forward with each all-reduce timed alone (its input evaluated first) | {r['timed_step'] * 1e3:.0f} ms, "
          f"of which {r['timed_comm'] * 1e3:.0f} ms ({100 * r['timed_comm'] / r['timed_step']:.0f}%) in the all-reduces |")
    print(f"| one all-reduce of {r['one_bytes'] / 1e6:.1f} MB alone (median of 10) | {r['one_allreduce'] * 1e3:.1f} ms "
          f"({r['one_bytes'] / r['one_allreduce'] / 1e9:.2f} GB/s payload) |")


# ----------------------------------------------------------------------------------------------
# What a rank holds after loading its shard (one rank of `mlx.launch -n 2`, or the single process)

MEMORY_DIT = dict(dim=1536, n_heads=12, n_layers=4, n_refiner_layers=2)  # about 1 GB in float32


def memory_rank(folder: str, single: bool):
    from mlx.utils import tree_flatten

    kernels.keep_freed_memory()
    if single:
        model, rank = ZImageTransformer.from_pretrained(folder), 0
        for _, p in tree_flatten(model.parameters()):
            mx.eval(p)
    else:
        group = distributed.init()
        model, rank = distributed.load_sharded_transformer(Path(folder), group, "float32", None), group.rank()
    held = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    print(f"| {'one process' if single else f'rank {rank} of 2'} | {held / 1e9:.3f} GB | "
          f"{mx.get_peak_memory() / 1e9:.3f} GB |", flush=True)
    sys.stdout.flush()
    os._exit(0)


def shard_memory():
    import tempfile

    from mlx.utils import tree_flatten

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        folder.mkdir()
        model = ZImageTransformer(TransformerArgs(**MEMORY_DIT))
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(folder / "model.safetensors"), weights)
        (folder / "config.json").write_text(json.dumps(MEMORY_DIT))
        del model, weights
        print(f"\n## Loading a shard, measured on this CPU: a random DiT {MEMORY_DIT}, float32\n")
        print("| | weights held | peak memory while loading |")
        print("|---|---|---|")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        me = [sys.executable, __file__, "--memory-rank", str(folder)]
        print(subprocess.run(me + ["--single"], capture_output=True, text=True, timeout=300, env=env).stdout.strip())
        p = subprocess.run([shutil.which("mlx.launch"), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--env",
                            f"PYTHONPATH={env['PYTHONPATH']}", "--", *me], capture_output=True, text=True, timeout=300)
        print("\n".join(sorted(ln for ln in p.stdout.splitlines() if ln.startswith("|"))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loopback", action="store_true", help="also run the measured 2-rank loopback split")
    ap.add_argument("--shard-memory", action="store_true", help="also measure what a rank holds after loading")
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory-rank", help=argparse.SUPPRESS)
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank:
        return loopback_rank()
    if args.memory_rank:
        return memory_rank(args.memory_rank, args.single)
    rows = table()
    show_table(rows)
    show_projection(rows)
    if args.loopback:
        loopback()
    if args.shard_memory:
        shard_memory()


if __name__ == "__main__":
    main()
