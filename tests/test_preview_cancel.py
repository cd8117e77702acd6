"""Step previews (the fitted latent -> RGB map), cancelling a run, on_step, and the one-owner-thread rule."""

from __future__ import annotations

import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zimage_mlx import Cancelled, ZImagePipeline, cli
from zimage_mlx import preview as pv

SMALL = dict(width=64, height=64, steps=3)


@pytest.fixture(scope="module")
def pipe(reference_checkpoint):
    return ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32")


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIMAGE_MLX_CACHE", str(tmp_path / "cache"))  # never the real ~/.cache


class LinearVAE:
    """A VAE whose decoder is exactly affine per latent cell: pixels = upsample(z @ A + b). Its encoder is a
    fixed nonlinear function of the image (so the latents span all 16 channels)."""

    scale = 8

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.A = rng.normal(size=(16, 3)).astype(np.float32)
        self.b = rng.normal(size=3).astype(np.float32)
        self.P = rng.normal(size=(3, 16)).astype(np.float32)

    def posterior(self, images):
        B, H, W, _ = images.shape
        cells = images.reshape(B, H // 8, 8, W // 8, 8, 3).mean(axis=(2, 4))
        mean = mx.tanh(cells @ mx.array(self.P)) + mx.sin(3 * cells @ mx.array(np.ascontiguousarray(self.P[:, ::-1])))
        return mean, mx.ones_like(mean)

    def scale_latents(self, z):
        return (z - 0.1) * 0.4

    def decode(self, z):
        rgb = z @ mx.array(self.A) + mx.array(self.b)  # (B, h, w, 3)
        return mx.repeat(mx.repeat(rgb, 8, axis=1), 8, axis=2)


def test_fit_recovers_an_affine_decoder_exactly():
    vae = LinearVAE()
    m = pv.fit(vae)
    np.testing.assert_allclose(m.weight, vae.A, atol=1e-4)
    np.testing.assert_allclose(m.bias, vae.b, atol=1e-4)
    assert m.r2 > 1 - 1e-8


def r2(target, pred):
    return 1 - ((target - pred) ** 2).sum() / ((target - target.mean(axis=(0, 1, 2))) ** 2).sum()


def test_preview_tracks_the_full_decode(pipe):
    """On images the fit never saw, the cheap preview explains most of the variance of the VAE decode averaged
    over each latent cell (a constant colour explains none; the random-weight reference VAE is far less
    linear than the real FLUX VAE, whose published linear factors are well known to work)."""
    m = pv.load_or_fit(pipe.vae, pipe.root / "vae")  # the map fast_preview uses (fitted once, cached beside)
    held_out = pv.fit_images(count=3, size=64, seed=123)
    decoded, previews = [], []
    for im in held_out:
        z = pipe.vae.scale_latents(pipe.vae.posterior(mx.array(im[None]))[0])
        d = np.array(pipe.vae.decode(z))[0]
        h, w = z.shape[1:3]
        decoded.append(d.reshape(h, 8, w, 8, 3).mean(axis=(1, 3)))
        previews.append(np.array(m(z))[0])
    decoded, previews = np.stack(decoded), np.stack(previews)
    assert r2(decoded, previews) > 0.4  # measured 0.55
    for c in range(3):  # every colour channel follows
        assert np.corrcoef(decoded[..., c].ravel(), previews[..., c].ravel())[0, 1] > 0.6


def test_fit_is_cached_beside_the_vae_and_refitted_for_other_weights(pipe, tmp_path, monkeypatch):
    fits = []

    def counting_fit(vae):
        fits.append(vae)
        return pv.LatentRGB(np.full((16, 3), len(fits), np.float32), np.zeros(3, np.float32))

    monkeypatch.setattr(pv, "fit", counting_fit)
    folder = tmp_path / "vae"
    folder.mkdir()
    first = pv.load_or_fit(pipe.vae, folder)
    assert (folder / pv.CACHE_NAME).exists() and len(fits) == 1
    np.testing.assert_array_equal(pv.load_or_fit(pipe.vae, folder).weight, first.weight)
    assert len(fits) == 1
    # other weights have another fingerprint: the cached map is not used for them
    other = LinearVAE()
    other.parameters = lambda: {"w": mx.array(other.A)}
    assert pv.load_or_fit(other, folder).weight[0, 0] == 2 and len(fits) == 2
    # a folder in the Hugging Face cache is left alone: the map goes to the user cache
    hub = tmp_path / "huggingface" / "hub" / "vae"
    hub.mkdir(parents=True)
    pv.load_or_fit(pipe.vae, hub)
    assert not (hub / pv.CACHE_NAME).exists() and list(pv.user_cache_dir().glob("latent_rgb-*.json"))


def test_fast_preview_is_the_map_of_the_x0_estimate(pipe):
    steps = []
    image = pipe.generate("a red fox", seed=4, on_step=steps.append, **SMALL)[0]
    assert [(s.index, s.total) for s in steps] == [(0, 3), (1, 3), (2, 3)]
    full = pipe.fast_preview(steps[0])[0]
    assert full.size == image.size
    rgb = np.array(pipe._latent_rgb(steps[0].denoised))[0]
    expected = (np.clip(rgb / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)
    small = np.asarray(pipe.fast_preview(steps[0].denoised, size=(8, 8))[0])
    np.testing.assert_array_equal(small, expected)  # at latent size the resize is the identity


def test_cancel_stops_between_steps_and_leaves_the_pipeline_exact(pipe, dit_forwards):
    before = np.asarray(pipe.generate("a lighthouse", seed=9, **SMALL)[0])
    calls = dit_forwards()
    cancel = threading.Event()

    def on_step(step):
        if step.index == 1:
            cancel.set()

    with pytest.raises(Cancelled):
        pipe.generate("a lighthouse", seed=9, on_step=on_step, cancel=cancel, **SMALL)
    assert len(calls) == 2  # stopped after the second of three steps, before decoding
    with pytest.raises(Cancelled):  # a token already set: nothing runs
        pipe.generate("a new prompt", seed=9, cancel=cancel, **SMALL)
    assert len(calls) == 2
    after = np.asarray(pipe.generate("a lighthouse", seed=9, cancel=threading.Event(), **SMALL)[0])
    np.testing.assert_array_equal(after, before)


def test_a_pipeline_belongs_to_its_thread(pipe, reference_checkpoint):
    errors = []

    def use_from_another_thread():
        try:
            pipe.generate("a cat", seed=1, **SMALL)
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=use_from_another_thread)
    t.start(), t.join()
    assert errors and "thread" in errors[0]

    results = []

    def own_pipeline():  # a pipeline loaded by a worker thread works there
        worker_pipe = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32")
        results.append(np.asarray(worker_pipe.generate("a cat", seed=1, **SMALL)[0]))

    t = threading.Thread(target=own_pipeline)
    t.start(), t.join()
    np.testing.assert_array_equal(results[0], np.asarray(pipe.generate("a cat", seed=1, **SMALL)[0]))


def test_cli_preview_file(reference_checkpoint, pipe, tmp_path):
    out, preview = tmp_path / "out.png", tmp_path / "watch.png"
    args = ["generate", "a red fox", "--model", str(reference_checkpoint), "--size", "64x64", "--steps", "2",
            "--seed", "3", "-o", str(out), "--preview", str(preview), "--quiet"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    # the file holds the last step's preview
    steps = []
    pipe.generate("a red fox", width=64, height=64, steps=2, seed=3, on_step=steps.append)
    expected = np.asarray(pipe.fast_preview(steps[-1])[0], np.int16)
    got = np.asarray(Image.open(preview).convert("RGB"), np.int16)
    np.testing.assert_array_equal(got, expected)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind

    bad = CliRunner().invoke(cli.main, [*args[:-3], "--preview", str(tmp_path / "watch.gif"), "--overwrite"])
    assert bad.exit_code == 2 and "--preview" in bad.output
