"""End to end: our images against diffusers' ZImagePipeline on the reference checkpoint, same noise."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from zimage_mlx import ZImagePipeline
from zimage_mlx.weights import CheckpointError


@pytest.fixture(scope="module")
def pipe(reference_checkpoint):
    return ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32")


def reference_images(ref_pipe, latents_nchw, **kw):
    out = ref_pipe(latents=torch.from_numpy(latents_nchw), output_type="pil", **kw).images
    return [np.asarray(im, dtype=np.int16) for im in out]


def our_images(pipe, latents_nchw, **kw):
    out = pipe.generate(latents=mx.array(latents_nchw.transpose(0, 2, 3, 1)), **kw)
    return [np.asarray(im, dtype=np.int16) for im in out]


def noise_nchw(batch, height, width, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 16, height // 8, width // 8)).astype(np.float32)


CASES = [
    # (name, our kwargs, diffusers kwargs)
    ("square, 8 steps", dict(prompt="a red fox in the snow", width=64, height=64, steps=8),
     dict(prompt="a red fox in the snow", width=64, height=64, num_inference_steps=8, guidance_scale=0.0)),
    ("non-square, 4 steps", dict(prompt="a lighthouse at dusk", width=96, height=48, steps=4),
     dict(prompt="a lighthouse at dusk", width=96, height=48, num_inference_steps=4, guidance_scale=0.0)),
    ("Chinese prompt, 1 step", dict(prompt="一只可爱的猫坐在窗台上", width=48, height=80, steps=1),
     dict(prompt="一只可爱的猫坐在窗台上", width=48, height=80, num_inference_steps=1, guidance_scale=0.0)),
    ("CFG with a negative prompt", dict(prompt="a castle", negative_prompt="blurry, low quality", guidance=3.0,
                                        width=64, height=48, steps=4),
     dict(prompt="a castle", negative_prompt="blurry, low quality", guidance_scale=3.0, width=64, height=48,
          num_inference_steps=4)),
    ("CFG, normalization and truncation", dict(prompt="a castle", guidance=4.0, cfg_normalization=True,
                                               cfg_truncation=0.5, width=64, height=64, steps=8),
     dict(prompt="a castle", guidance_scale=4.0, cfg_normalization=True, cfg_truncation=0.5, width=64, height=64,
          num_inference_steps=8)),
    ("CFG normalization factor 1.5, 2 prompts x 2 images",
     dict(prompt=["a castle", "海边的灯塔"], guidance=2.0, cfg_normalization=1.5, width=48, height=48, steps=2,
          num_images=2),
     dict(prompt=["a castle", "海边的灯塔"], guidance_scale=2.0, cfg_normalization=1.5, width=48, height=48,
          num_inference_steps=2, num_images_per_prompt=2)),
]


@pytest.mark.parametrize("name,ours,theirs", CASES, ids=[c[0] for c in CASES])
def test_images_match_diffusers(pipe, reference_pipeline, name, ours, theirs):
    batch = (len(ours["prompt"]) if isinstance(ours["prompt"], list) else 1) * ours.get("num_images", 1)
    latents = noise_nchw(batch, ours["height"], ours["width"])
    ref = reference_images(reference_pipeline, latents, **theirs)
    got = our_images(pipe, latents, **ours)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape == (ours["height"], ours["width"], 3)
        # float32 on both sides: only rounding differs, which can move a pixel across a rounding
        # boundary of the uint8 conversion: at most 1 level of 255.
        assert np.abs(a - b).max() <= 1
        # and the comparison is not vacuous: the image is not flat or saturated
        assert b.std() > 10 and ((b > 0) & (b < 255)).mean() > 0.5


def test_forward_count_without_and_with_cfg(pipe, dit_forwards):
    calls = dit_forwards()
    pipe.generate("a cat", width=32, height=32, steps=8, seed=1)
    assert calls == [1] * 8  # 8 steps, 8 forwards, no ninth
    calls.clear()
    pipe.generate("a cat", width=32, height=32, steps=8, seed=1, guidance=3.0)
    assert calls == [2] * 8  # CFG: 8 batched passes of two (positive + negative)
    calls.clear()
    pipe.generate("a cat", width=32, height=32, steps=8, seed=1, guidance=3.0, cfg_truncation=0.5)
    t = [1 - s for s in pipe.sigmas(8, width=32, height=32)[:-1]]
    assert calls == [2 if ti <= 0.5 else 1 for ti in t]  # truncated steps run the positive branch only


def test_seeds(pipe):
    a = pipe.generate("a cat", width=32, height=32, steps=2, seed=7)[0]
    b = pipe.generate("a cat", width=32, height=32, steps=2, seed=7)[0]
    c = pipe.generate("a cat", width=32, height=32, steps=2, seed=8)[0]
    assert a.info["seed"] == 7
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    d = pipe.generate("a cat", width=32, height=32, steps=2)[0]  # seed drawn and reported
    e = pipe.generate("a cat", width=32, height=32, steps=2, seed=d.info["seed"])[0]
    assert np.array_equal(np.asarray(d), np.asarray(e))


def test_batch_equals_one_at_a_time(pipe):
    prompts = ["a cat", "一只狗在草地上奔跑, long prompt " * 3]
    batch = pipe.generate(prompts, width=32, height=48, steps=2, seed=100, num_images=2)
    assert [im.info["seed"] for im in batch] == [100, 101, 100, 101]  # image k of every prompt: seed + k
    for k, im in enumerate(batch):
        alone = pipe.generate(prompts[k // 2], width=32, height=48, steps=2, seed=100 + k % 2)[0]
        # The batched DiT pads ragged captions and masks them; the same math in a different batch
        # shape can round differently in the last bits: at most 1 level of 255.
        assert np.abs(np.asarray(im, np.int16) - np.asarray(alone, np.int16)).max() <= 1


def test_callback_and_preview(pipe):
    seen = []
    pipe.generate("a cat", width=32, height=32, steps=3, seed=1,
                  on_step=lambda s: seen.append((s.index + 1, s.total, s.latents.shape)))
    assert seen == [(1, 3, (1, 4, 4, 16)), (2, 3, (1, 4, 4, 16)), (3, 3, (1, 4, 4, 16))]
    feats = pipe.encode_prompt("a cat")
    steps = list(pipe.denoise(feats, mx.random.normal((1, 4, 4, 16), key=mx.random.key(0)), pipe.sigmas(3, width=32, height=32)))
    assert [s.index for s in steps] == [0, 1, 2]
    # the x0 estimate at the last step is the final latent (sigma_next = 0): x + sigma * pred
    np.testing.assert_allclose(np.array(steps[-1].denoised), np.array(steps[-1].latents), atol=1e-5)
    # The full preview of a step is the VAE decode of its x0 estimate: at the last step, the final image.
    first, last = pipe.preview(steps[0])[0], pipe.preview(steps[-1])[0]
    assert first.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(pipe.decode(steps[0].denoised)[0]))
    final = pipe.generate("a cat", width=32, height=32, steps=3, latents=mx.random.normal((1, 4, 4, 16), key=mx.random.key(0)))[0]
    assert np.abs(np.asarray(last, np.int16) - np.asarray(final, np.int16)).max() <= 1
    assert np.abs(np.asarray(first, np.int16) - np.asarray(final, np.int16)).max() > 10  # step 0 is not the end


def test_low_memory_mode_gives_the_same_image(reference_checkpoint, pipe):
    low = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32", low_memory=True)
    a = low.generate("a cat", width=32, height=32, steps=2, seed=3)[0]
    b = pipe.generate("a cat", width=32, height=32, steps=2, seed=3)[0]
    assert low.text_encoder is None
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1

    # freeing the DiT before the decode changes nothing in the image; afterwards the pipeline says why it can't
    c = low.generate("a cat", width=32, height=32, steps=2, seed=3, release_transformer=True)[0]
    assert np.array_equal(np.asarray(c), np.asarray(a)) and low.transformer is None
    with pytest.raises(RuntimeError, match="release_transformer"):
        low.generate("a cat", width=32, height=32, steps=2, seed=3)
    assert low.encode_prompt("a dog")[0].shape[-1] == pipe.transformer.args.cap_feat_dim  # encoding still works


@pytest.mark.parametrize("kwargs,match", [
    (dict(width=100), "multiple of 16"),
    (dict(height=0), "multiple of 16"),
    (dict(width=16384), "8192"),
    (dict(steps=0), "steps"),
    (dict(guidance=-1.0), "guidance"),
    (dict(num_images=0), "num_images"),
    (dict(seed=-5), "seed"),
    (dict(negative_prompt="ugly"), "guidance > 0"),
    (dict(latents=mx.zeros((1, 3, 3, 16))), "shape"),
])
def test_bad_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.generate("a cat", **{"width": 32, "height": 32, **kwargs})


def test_bad_prompt_type(pipe):
    with pytest.raises(TypeError, match="prompt"):
        pipe.generate(None, width=32, height=32)
    with pytest.raises(TypeError, match="prompt"):
        pipe.generate(["ok", 3], width=32, height=32)


def test_hub_offline_error(tmp_path):
    """HF_HUB_OFFLINE is read when huggingface_hub is imported: set in a fresh process, before that."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("from zimage_mlx import ZImagePipeline\n"
            "from zimage_mlx.errors import CheckpointError\n"
            "try:\n    ZImagePipeline.from_pretrained('Tongyi-MAI/Z-Image-Turbo')\n"
            "except CheckpointError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "local folder" in out.stdout
    # offline mode held: the cache was asked, not the network (a network attempt names another error)
    assert "(LocalEntryNotFoundError)" in out.stdout or "(OfflineModeIsEnabled)" in out.stdout, out.stdout


def test_not_a_checkpoint(tmp_path, checkpoint_copy):
    with pytest.raises(CheckpointError, match="does not exist"):
        ZImagePipeline.from_pretrained(tmp_path / "nowhere")
    (checkpoint_copy / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(CheckpointError, match="FluxPipeline"):
        ZImagePipeline.from_pretrained(checkpoint_copy)
