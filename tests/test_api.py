"""The library's calling conventions (issue 20): one seed rule for the API and the CLI, keyword arguments,
our own error types for what a user can fix, and bugs that keep their traceback."""

from __future__ import annotations

import copy
import warnings

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from zimage_mlx import ZImagePipeline, cli, kernels
from zimage_mlx.errors import CheckpointError, InputError, LoraError, ZImageError

SMALL = dict(width=32, height=32, steps=2)


@pytest.fixture(scope="module")
def pipe(reference_checkpoint):
    return ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32")


def pixels(im):
    return np.asarray(im, np.int16)


def test_cli_and_api_make_the_same_images_for_several_prompts(pipe, reference_checkpoint, tmp_path, monkeypatch):
    prompts = ["a red fox", "a blue house"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    r = CliRunner().invoke(cli.main, ["generate", "--prompt-file", tmp_path / "prompts.txt", "-m", reference_checkpoint,
                                      "--size", "32x32", "--steps", "2", "--seed", "5", "--num-images", "2",
                                      "-o", str(tmp_path / "{prompt_index}-{seed}.png"), "--quiet"])
    assert r.exit_code == 0, r.output
    api = pipe.generate(prompts, seed=5, num_images=2, **SMALL)
    assert [im.info["seed"] for im in api] == [5, 6, 5, 6]
    from PIL import Image

    for i, im in enumerate(api):
        cli_image = Image.open(tmp_path / f"{i // 2}-{5 + i % 2}.png")
        # the CLI runs one image at a time, the API one batch: at most 1 level of 255 apart
        assert np.abs(pixels(cli_image) - pixels(im)).max() <= 1


def test_arguments_after_the_prompt_are_keywords(pipe):
    with pytest.raises(TypeError):
        pipe.generate("a cat", None, 32, 32)
    with pytest.raises(TypeError):
        pipe.sigmas(8, 32, 64)
    with pytest.raises(TypeError, match="callback"):
        pipe.generate("a cat", callback=print, **SMALL)  # one progress hook: on_step


def test_user_mistakes_have_our_error_types(pipe):
    for call in (lambda: pipe.generate([], **SMALL), lambda: pipe.encode_prompt([])):
        with pytest.raises(InputError, match="empty list"):
            call()
    with pytest.raises(InputError, match="multiple of 16"):
        pipe.generate("a cat", width=30, height=32)
    with pytest.raises(InputError):
        pipe.generate("a cat", width=32, height=32, seed=-1)
    assert issubclass(CheckpointError, ZImageError) and issubclass(LoraError, ZImageError)
    assert issubclass(InputError, ValueError)  # `except ValueError` in callers keeps working


def test_a_bug_keeps_its_traceback_in_the_cli(pipe, reference_checkpoint, tmp_path, monkeypatch):
    broken_pipe = copy.copy(pipe)

    def broken(*args, **kwargs):
        raise ValueError("[matmul] Last dimension of first input with shape (1,4) must match ...")

    broken_pipe.run = broken
    broken_pipe.release_text_encoder = lambda: None  # the CLI's; this copy shares the module's encoder
    monkeypatch.setattr(ZImagePipeline, "from_pretrained", classmethod(lambda cls, *a, **k: broken_pipe))
    r = CliRunner().invoke(cli.main, ["generate", "a cat", "-m", reference_checkpoint, "--size", "32x32",
                                      "-o", str(tmp_path / "x.png")])
    assert r.exit_code != 2 and isinstance(r.exception, ValueError)  # not turned into "Error: ..."
    assert "internal error" in r.stderr and "Error: [matmul]" not in r.output


def test_cut_keeps_real_errors(monkeypatch):
    x = mx.ones((2, 2))
    assert mx.compile(lambda a: kernels.cut(a * 2))(x).tolist() == [[2, 2], [2, 2]]  # inside compile: left whole

    def failing_eval(*arrays):
        raise ValueError("[broadcast_shapes] Shapes (2,3) and (4,5) cannot be broadcast.")

    monkeypatch.setattr(mx, "eval", failing_eval)
    with pytest.raises(ValueError, match="broadcast"):
        kernels.cut(x)


def test_malloc_change_can_be_turned_off(reference_checkpoint, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv("ZIMAGE_MLX_KEEP_FREED_MEMORY", "0")
    with warnings.catch_warnings():
        ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32", low_memory=True)
    assert calls == [] or mx.default_device() != mx.cpu
    monkeypatch.delenv("ZIMAGE_MLX_KEEP_FREED_MEMORY")
    ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32", low_memory=True)
    assert calls == [1] or mx.default_device() != mx.cpu


def test_a_list_of_seeds_is_one_batch_of_their_images(pipe, dit_forwards):
    alone = [pipe.generate("a cat", seed=s, **SMALL)[0] for s in (3, 10)]
    calls = dit_forwards()
    batch = pipe.generate(["a cat", "a dog"], seed=[3, 10], **SMALL)
    assert calls == [4, 4]  # 2 prompts x 2 seeds through the DiT as one batch, once per step
    assert [im.info["seed"] for im in batch] == [3, 10, 3, 10]
    for got, expected in zip(batch[:2], alone):
        # the same math in another batch shape can round differently in the last bits: at most 1 level of 255
        assert np.abs(pixels(got) - pixels(expected)).max() <= 1
    with pytest.raises(InputError, match="num_images"):
        pipe.generate("a cat", seed=[1, 2], num_images=3, **SMALL)
    with pytest.raises(InputError, match="empty"):
        pipe.generate("a cat", seed=[], **SMALL)


def test_cli_batches_seeds_into_one_dit_batch(pipe, reference_checkpoint, tmp_path, dit_forwards):
    calls = dit_forwards()
    r = CliRunner().invoke(cli.main, ["generate", "a red fox", "-m", reference_checkpoint, "--size", "32x32",
                                      "--steps", "2", "--seed", "4", "--seed", "9", "--num-images", "2",
                                      "--batch-size", "3", "-o", str(tmp_path / "{seed}.png"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert calls == [3, 3, 1, 1]  # seeds 4, 5, 9 as one batch, then 10 alone: 2 steps each
    from PIL import Image

    for seed in (4, 5, 9, 10):
        alone = pipe.generate("a red fox", seed=seed, **SMALL)[0]
        # another batch shape can round differently in the last bits: at most 1 level of 255
        assert np.abs(pixels(Image.open(tmp_path / f"{seed}.png")) - pixels(alone)).max() <= 1
    bad = CliRunner().invoke(cli.main, ["generate", "a red fox", "--batch-size", "0"])
    assert bad.exit_code == 2 and "--batch-size" in bad.output
