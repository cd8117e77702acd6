"""Distributed generation: 2 and 3 CPU processes on loopback under `mlx.launch --backend ring`, against the
same work done by one process (which test_pipeline checks against diffusers).

The launches start when the module's first test runs and work while the single-process expectations are
computed here; each is bounded by LAUNCH_TIMEOUT. tests/distributed_worker.py is the rank's side.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from zimage_mlx import ZImagePipeline, distributed

WORKER = Path(__file__).parent / "distributed_worker.py"
ROOT = Path(__file__).parent.parent
LAUNCH_TIMEOUT = 150  # s, for one launch (process start, imports and model loads dominate on a busy CPU)
LAUNCHER = shutil.which("mlx.launch")

pytestmark = pytest.mark.skipif(
    LAUNCHER is None or not mx.distributed.is_available(),
    reason="mlx.launch or MLX's distributed backends are not available in this environment")

PROMPTS = ["a red fox", "a cat on a roof"]
CLI_PROMPTS = ["a lighthouse", "a red fox", "a bowl of soup"]  # 3 images on 2 ranks: the last round is half full


def launch(n: int, job: str, out: Path, *args, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [LAUNCHER, "--backend", "ring", "-n", str(n), "--hosts", "127.0.0.1", "--starting-port", str(port),
           "--env", f"PYTHONPATH={ROOT}", "--", sys.executable, str(WORKER), job, str(out), *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the launch ran past {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def four_heads(reference_checkpoint, tmp_path_factory) -> Path:
    """The reference checkpoint with a 4-head DiT (dim 128): 2 ranks can split it (the reference's 3 heads not),
    and each rank's attention output slice (64 wide) holds whole quantization groups of 64."""
    import reference

    root = tmp_path_factory.mktemp("four_heads") / "ckpt"
    shutil.copytree(reference_checkpoint, root, ignore=shutil.ignore_patterns("transformer"))
    reference.build_transformer(root / "transformer", config=dict(reference.TRANSFORMER_CONFIG, dim=128, n_heads=4,
                                                                  n_kv_heads=4))
    return root


@pytest.fixture(scope="module")
def inputs() -> dict:
    rng = np.random.default_rng(0)
    return dict(x=rng.standard_normal((2, 8, 8, 16)).astype(np.float32), t=np.array([0.3, 0.7], np.float32),
                cap0=rng.standard_normal((5, 48)).astype(np.float32), cap1=rng.standard_normal((9, 48)).astype(np.float32))


@pytest.fixture(scope="module")
def launches(four_heads, reference_checkpoint, inputs, tmp_path_factory):
    """Start the 2-rank and 3-rank jobs at once; the fixture's value waits for one and returns its results."""
    port = random.randrange(20000, 60000, 100)
    procs = {}
    for name, n, ckpt in (("pair", 2, four_heads), ("three", 3, reference_checkpoint)):
        out = tmp_path_factory.mktemp(name)
        np.savez(out / "inputs.npz", **inputs)
        (out / "prompts.txt").write_text("\n".join(CLI_PROMPTS) + "\n")
        procs[name] = (launch(n, name, out, ckpt, port=port + 10 * n), out)
    done = {}

    def wait(name):
        if name not in done:
            proc, out = procs[name]
            rc, stdout, stderr = finish(proc)
            # mlx.launch exits 0 whatever its ranks did: rank 0's results file tells that the job ran through
            assert rc == 0 and (out / f"{name}.npz").is_file(), f"{name} launch failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
            done[name] = (dict(np.load(out / f"{name}.npz")), out, stdout)
        return done[name]

    yield wait
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def single_dit(transformer, inputs) -> np.ndarray:
    out = transformer(mx.array(inputs["x"]), mx.array(inputs["t"]), [mx.array(inputs["cap0"]), mx.array(inputs["cap1"])])
    return np.array(out.astype(mx.float32))


def test_degrees_that_do_not_divide_the_heads_are_refused():
    assert distributed.working_degrees(30) == [1, 2, 3, 5, 6, 10, 15, 30]
    with pytest.raises(ValueError, match=r"4 ranks .* 30 attention heads .*use 1, 2, 3, 5, 6, 10, 15 or 30 ranks"):
        distributed.check_degree(30, 4)
    with pytest.raises(ValueError, match="8 ranks"):
        distributed.check_degree(30, 8)
    for d in (1, 2, 3, 5, 6):
        distributed.check_degree(30, d)


def test_auto_mode():
    assert distributed.choose_mode("auto", 2, n_images=4, guidance=0) == "data"
    assert distributed.choose_mode("auto", 2, n_images=1, guidance=4) == "cfg"
    assert distributed.choose_mode("auto", 4, n_images=1, guidance=4) == "tensor"
    assert distributed.choose_mode("auto", 2, n_images=1, guidance=0) == "tensor"
    assert distributed.choose_mode("tensor", 2, n_images=8, guidance=0) == "tensor"
    with pytest.raises(ValueError, match="parallel must be one of"):
        distributed.choose_mode("pipeline", 2, 1, 0)


class _FakeGroup:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_sharded_dit_slices_add_up(reference_checkpoint):
    """Without a launch: the ranks' slices of every block cover the full weights exactly once."""
    from zimage_mlx.transformer import ZImageTransformer

    full = ZImageTransformer.from_pretrained(reference_checkpoint / "transformer")
    shards = []
    for rank in range(3):
        m = ZImageTransformer.from_pretrained(reference_checkpoint / "transformer")
        distributed.shard_transformer(m, _FakeGroup(rank, 3))
        shards.append(m)
    layer = lambda m: m.layers[1]  # noqa: E731
    for name in ("to_q", "to_k", "to_v"):
        joined = mx.concatenate([layer(m).attention[name].weight for m in shards], axis=0)
        np.testing.assert_array_equal(np.array(joined), np.array(layer(full).attention[name].weight))
    out = mx.concatenate([layer(m).attention.to_out[0].linear.weight for m in shards], axis=1)
    np.testing.assert_array_equal(np.array(out), np.array(layer(full).attention.to_out[0].weight))
    w2 = mx.concatenate([layer(m).feed_forward.w2.linear.weight for m in shards], axis=1)
    np.testing.assert_array_equal(np.array(w2), np.array(layer(full).feed_forward.w2.weight))
    assert [layer(m).attention.n_heads for m in shards] == [1, 1, 1]
    with pytest.raises(ValueError, match="use 1 or 3 ranks"):
        distributed.shard_transformer(ZImageTransformer.from_pretrained(reference_checkpoint / "transformer"),
                                      _FakeGroup(0, 2))


def test_different_model_folders_are_told_apart(checkpoint_copy, reference_checkpoint):
    assert distributed.fingerprint(checkpoint_copy) == distributed.fingerprint(reference_checkpoint)
    config = checkpoint_copy / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"n_layers": 2', '"n_layers": 1'))
    assert distributed.fingerprint(checkpoint_copy) != distributed.fingerprint(reference_checkpoint)


# The tests from here on take `launches` only to start the long jobs first: they run while these work.


def test_ranks_with_different_model_folders_refuse_to_start(launches, checkpoint_copy, reference_checkpoint, tmp_path):
    config = checkpoint_copy / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"n_layers": 2', '"n_layers": 1'))
    rc, out, err = finish(launch(2, "mismatch", tmp_path, reference_checkpoint, checkpoint_copy,
                                 port=random.randrange(20000, 60000, 100)), timeout=60)
    # Every rank refuses with this line, unless mlx.launch ended it first because the other had (mlx.launch
    # itself exits 0 whatever its ranks did: its "Node with rank N exited with code C" lines tell).
    assert "DistributedError: rank 1 has another model folder (configs and weight files) than rank 0" in out
    codes = dict(re.findall(r"rank (\d) exited with code (-?\d+)", err))
    assert sorted(codes) == ["0", "1"] and "4" in codes.values() and all(c in ("4", "-15") for c in codes.values())


def test_a_rank_that_dies_ends_the_job_with_one_message(launches, tmp_path):
    t0 = time.monotonic()
    rc, out, err = finish(launch(2, "die", tmp_path, port=random.randrange(20000, 60000, 100)), timeout=60)
    assert "DistributedError: rank 0 lost its connection to another rank" in out
    assert "rank 0 exited with code 4" in err
    assert time.monotonic() - t0 < 60


def test_an_unreachable_rank_ends_the_job_after_the_timeout(launches, tmp_path):
    """Rank 0 of a 2-rank ring whose rank 1 never starts: MLX would wait forever; the watchdog ends it."""
    port = random.randrange(20000, 60000, 100)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(f'[["127.0.0.1:{port}"], ["127.0.0.1:{port + 1}"]]')
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLX_HOSTFILE=str(hostfile), MLX_RANK="0",
               **{distributed.TIMEOUT_ENV: "1"})
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", "from zimage_mlx import distributed; distributed.init()"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGTERM
    assert "rank 0: no progress for 1 s while connecting to the other ranks" in p.stderr
    assert time.monotonic() - t0 < 40


def test_quantized_layers_shard_exactly():
    """Without a launch: a 4-bit layer cut by input features (each rank's partial output, summed as the
    all-reduce would) or by output features (concatenated) gives the whole layer's output."""
    import copy

    import mlx.nn as nn

    layer = nn.Linear(256, 96, bias=True)
    full = nn.QuantizedLinear.from_linear(layer, group_size=64, bits=4)
    x = mx.random.normal((3, 256), key=mx.random.key(0))
    want = np.array(full(x))
    parts = []
    real = mx.distributed.all_sum
    mx.distributed.all_sum = lambda a, **kw: a  # this rank's partial sum
    try:
        for rank in range(2):
            start, stop = distributed._bounds(256, 2, rank, 64)
            parts.append(np.array(distributed.ShardedToAll(copy.deepcopy(full), start, stop, _FakeGroup(rank, 2),
                                                           input_slice=True)(x)))
    finally:
        mx.distributed.all_sum = real
    bias = np.array(full.bias)
    np.testing.assert_allclose(parts[0] + parts[1] - bias, want, rtol=1e-5, atol=1e-5)  # the bias once, not twice
    rows = []
    for rank in range(3):
        part = copy.deepcopy(full)
        distributed._take_rows(part, *distributed._bounds(96, 3, rank))
        rows.append(np.array(part(x)))
    np.testing.assert_array_equal(np.concatenate(rows, axis=-1), want)


def check_dit(results, transformer, inputs):
    ref = single_dit(transformer, inputs)
    got = results["dit"]
    # The ranks sum partial products in another order than one process: float32 rounding only.
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


def check_tensor(results, pipe, inputs):
    check_dit(results, pipe.transformer, inputs)
    images = pipe.generate(PROMPTS, width=64, height=64, steps=2, seed=5)
    for k, im in enumerate(images):
        a, b = results[f"tensor_{k}"].astype(int), np.asarray(im).astype(int)
        assert a.shape == b.shape == (64, 64, 3)
        assert np.abs(a - b).max() <= 1  # rounding can move a pixel across a uint8 boundary
        assert b.std() > 10  # not a flat image


def test_two_rank_tensor_parallel_equals_one_process(launches, four_heads, inputs):
    pipe = ZImagePipeline.from_pretrained(four_heads, dtype="float32")
    results, _, _ = launches("pair")
    assert results["te_sharded"]  # 4 heads and 2 KV heads split over 2 ranks
    check_tensor(results, pipe, inputs)


def test_three_rank_tensor_parallel_on_three_heads(launches, reference_checkpoint, inputs):
    from zimage_mlx.text_encoder import model_args
    from zimage_mlx.transformer import ZImageTransformer
    from zimage_mlx.sources import read_config

    results, _, _ = launches("three")
    check_dit(results, ZImageTransformer.from_pretrained(reference_checkpoint / "transformer"), inputs)
    # 3 ranks would replicate the reference text encoder: its 2 KV heads do not split in 3
    assert not distributed.text_encoder_shardable(model_args(read_config(reference_checkpoint / "text_encoder")), 3)


def test_quantized_tensor_parallel_equals_one_process(launches, four_heads):
    """8-bit on the fly: each rank quantizes its slices, in the same groups as one process quantizes the whole."""
    pipe = ZImagePipeline.from_pretrained(four_heads, dtype="float32", quantize=8)
    results, _, _ = launches("pair")
    one = np.asarray(pipe.generate(PROMPTS[0], width=64, height=64, steps=2, seed=5)[0]).astype(int)
    assert np.abs(results["tensor_q8"].astype(int) - one).max() <= 1
    assert one.std() > 10


def test_data_and_cfg_parallel_equal_one_process(launches, four_heads):
    pipe = ZImagePipeline.from_pretrained(four_heads, dtype="float32")
    results, _, _ = launches("pair")
    # data: seed=[11, 40] for 2 prompts: image j is prompt j // 2 with seed [11, 40][j % 2] (generate's seed
    # rule), made alone on rank j % 2: bit-identical to one process making it alone.
    for j in range(4):
        alone = pipe.generate(PROMPTS[j // 2], width=64, height=64, steps=2, seed=[11, 40][j % 2])[0]
        assert int(results[f"data_seed_{j}"]) == [11, 40][j % 2]
        np.testing.assert_array_equal(results[f"data_{j}"], np.asarray(alone))
    # cfg: the branches on two ranks vs one process's batch of both (another batch shape: rounding only).
    one = np.asarray(pipe.generate("a red fox", negative_prompt="blurry", guidance=3.0, width=64, height=64, steps=2,
                                   seed=5)[0]).astype(int)
    assert np.abs(results["cfg"].astype(int) - one).max() <= 1
    assert one.std() > 10


def test_run_in_data_mode_gives_every_rank_the_images_and_rank_0_the_callbacks(launches, four_heads):
    """`pipe.run(recipe, release=True, on_image=...)` on 2 ranks in data mode: 3 images (the last round half
    full), each equal to one process making it alone; rank 0's on_image gets them in order, rank 1's never;
    every rank's images carry their one-image recipe and seed; each rank freed its DiT after its last image."""
    import json

    from zimage_mlx.recipe import Recipe

    pipe = ZImagePipeline.from_pretrained(four_heads, dtype="float32")
    results, out, _ = launches("pair")
    assert results["run_calls"].tolist() == [[0, 3], [1, 3], [2, 3]]
    assert bool(results["run_released"])
    for j, prompt in enumerate(CLI_PROMPTS):
        alone = pipe.run(Recipe(prompt=prompt, width=64, height=64, steps=2, seed=3))[0]
        np.testing.assert_array_equal(results[f"run_{j}"], np.asarray(alone))
        for rank in (0, 1):
            got = json.loads((out / f"recipes-{rank}.json").read_text())[j]
            assert got.pop("seed_info") == 3
            assert got == alone.info["recipe"].to_dict()


def test_generate_files_is_gone():
    """One way to run over the ranks: Parallel.run (the CLI passes on_image to write its files)."""
    assert not hasattr(distributed, "generate_files") and not hasattr(distributed.Parallel, "generate")


def test_cli_data_parallel_files_equal_a_serial_run(launches, four_heads, tmp_path):
    from zimage_mlx import cli

    _, out, stdout = launches("pair")
    serial = tmp_path / "serial"
    r = CliRunner().invoke(cli.main, ["generate", "--prompt-file", str(out / "prompts.txt"), "--seed", "3", "--size",
                                      "64", "--steps", "2", "-m", str(four_heads), "-o", str(serial / "{index}.png"),
                                      "--quiet"])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in serial.iterdir())
    assert names == ["0.png", "1.png", "2.png"]
    assert sorted(p.name for p in (out / "cli").iterdir()) == names
    for name in names:
        assert (out / "cli" / name).read_bytes() == (serial / name).read_bytes()
    # rank 0 alone prints: each path once
    printed = [line for line in stdout.splitlines() if line.endswith(".png")]
    assert sorted(Path(p).name for p in printed) == names
