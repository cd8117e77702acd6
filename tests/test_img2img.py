"""Image to image and inpainting (issue #9): parity with diffusers' ZImageImg2ImgPipeline and
ZImageInpaintPipeline on the reference checkpoint, the strength edge cases, the resize policy, the mask
preprocessing, bad input, and the CLI's --image / --mask / --strength.

Parity needs the same randomness on both sides. Ours comes from the seed: the noise is noise(seed) and the
VAE posterior is sampled with image_key(seed). diffusers draws both from its torch generator, so the tests
replace its `randn_tensor` (the noise) and `retrieve_latents` (the posterior sample, mean + std * eps) with
our draws; everything else (preprocessing, encoding, schedule, blending, decoding) runs as diffusers has it.
"""

from __future__ import annotations

import copy
import math
import shutil

import diffusers.pipelines.z_image.pipeline_z_image_img2img as diffusers_img2img
import diffusers.pipelines.z_image.pipeline_z_image_inpaint as diffusers_inpaint
import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from zimage_mlx import ZImagePipeline, cli
from zimage_mlx.inputs import mask_latents, open_image, output_size
from zimage_mlx.noise import image_key, noise
from zimage_mlx.sampler import strength_start


@pytest.fixture(scope="module")
def pipe(reference_checkpoint):
    return ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def reference(reference_pipeline):
    """diffusers' img2img and inpainting pipelines on the reference checkpoint's modules (each its own scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageImg2ImgPipeline, ZImageInpaintPipeline

    out = {}
    for name, cls in (("img2img", ZImageImg2ImgPipeline), ("inpaint", ZImageInpaintPipeline)):
        parts = dict(reference_pipeline.components)
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(reference_pipeline.scheduler.config)
        out[name] = cls(**parts)
        out[name].set_progress_bar_config(disable=True)
    return out


def photo(width: int, height: int) -> Image.Image:
    """A deterministic RGB test picture with edges and gradients (not flat, not saturated)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 5 + 20, y * 6 + 10, (x + y) * 3 + 40 * ((x // 9 + y // 7) % 2)], -1) % 256
    return Image.fromarray(rgb.astype(np.uint8))


def box_mask(width: int, height: int, box) -> Image.Image:
    m = Image.new("L", (width, height))
    m.paste(255, box)
    return m


def gradient_mask(width: int, height: int) -> Image.Image:
    """Grey levels 0..255 left to right: binarisation at 50% decides which side is repainted."""
    row = np.linspace(0, 255, width).round().astype(np.uint8)
    return Image.fromarray(np.tile(row, (height, 1)))


def use_our_randomness(monkeypatch, module, seed: int, width: int, height: int) -> list:
    """Make diffusers' `module` draw our noise(seed) and sample the posterior with image_key(seed)'s draw."""
    h, w = height // 8, width // 8
    nchw = lambda a: torch.from_numpy(np.array(a).transpose(0, 3, 1, 2).copy())  # noqa: E731
    eps, eta = nchw(mx.random.normal((1, h, w, 16), key=image_key(seed))), nchw(noise(seed, h, w))
    calls = []

    def posterior_sample(encoder_output, generator=None, sample_mode="sample"):
        calls.append("encode")
        dist = encoder_output.latent_dist
        return dist.mean + dist.std * eps

    def randn_tensor(shape, **kw):
        calls.append("noise")
        assert tuple(shape) == tuple(eta.shape)
        return eta.clone()

    monkeypatch.setattr(module, "retrieve_latents", posterior_sample)
    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    return calls


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ------------------------------------------------------------------------------------------------
# Parity with diffusers


CASES = [
    # (name, image, mask, strength, steps, output size)
    ("img2img strength 0.3, 8 steps", photo(64, 64), None, 0.3, 8, (64, 64)),
    ("img2img strength 0.6, non-square 50x37 input", photo(50, 37), None, 0.6, 4, (48, 32)),
    ("img2img strength 1.0", photo(64, 64), None, 1.0, 4, (64, 64)),
    ("inpaint strength 1.0, non-square, box mask", photo(50, 37), box_mask(50, 37, (10, 5, 40, 30)), 1.0, 4, (48, 32)),
    ("inpaint strength 0.6, 32x48, grey mask", photo(32, 48), gradient_mask(32, 48), 0.6, 4, (32, 48)),
]


@pytest.mark.parametrize("name,image,mask,strength,steps,size", CASES, ids=[c[0] for c in CASES])
def test_matches_diffusers(pipe, reference, monkeypatch, name, image, mask, strength, steps, size):
    seed, prompt = 5, "a fox in a garden"
    kind = "inpaint" if mask is not None else "img2img"
    calls = use_our_randomness(monkeypatch, diffusers_inpaint if mask else diffusers_img2img, seed, *size)
    extra = {"mask_image": mask} if mask is not None else {}
    ref = reference[kind](prompt=prompt, image=image, strength=strength, num_inference_steps=steps,
                          guidance_scale=0.0, **extra).images[0]
    assert calls[:2] == ["encode", "noise"]  # our draws replaced diffusers' (the inpainting one encodes twice)

    got = pipe.generate(prompt, image=image, mask=mask, strength=strength, steps=steps, seed=seed)[0]
    a, b = pixels(got), pixels(ref)
    assert a.shape == b.shape == (size[1], size[0], 3)
    # float32 on both sides: only rounding differs, which can move a pixel across a rounding boundary of
    # the uint8 conversion: at most 1 level of 255.
    assert np.abs(a - b).max() <= 1
    assert b.std() > 10 and ((b > 0) & (b < 255)).mean() > 0.5  # not a flat or saturated image


def test_diffusers_refuses_a_strength_without_steps(pipe, reference):
    # diffusers raises where no step is left; we return the VAE round trip instead (next test).
    with pytest.raises(ValueError, match="num_inference_steps"):
        reference["img2img"](prompt="a fox", image=photo(32, 32), strength=0.0, num_inference_steps=4,
                             guidance_scale=0.0)


# ------------------------------------------------------------------------------------------------
# Strength


def test_strength_schedule():
    # diffusers' rule: skip int(N - N * strength) of the N sigmas, so ceil(N * strength) steps run...
    assert [8 - strength_start(8, s) for s in (0.0, 0.1, 0.125, 0.3, 0.6, 0.99, 1.0)] == [0, 1, 1, 3, 5, 8, 8]
    assert strength_start(4, 0.6) == 1 and strength_start(1, 0.01) == 0 and strength_start(10, 0.3) == 7


def test_strength_zero_returns_the_vae_round_trip(pipe, dit_forwards, monkeypatch):
    image, seed = photo(50, 37), 11
    forwards = dit_forwards()
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("no step, no prompt encoding"))
    for mask in (None, box_mask(50, 37, (0, 0, 20, 20))):
        got = pipe.generate("a fox", image=image, mask=mask, strength=0.0, steps=8, seed=seed)[0]
        expected = pipe.decode(pipe.encode_image(image, seed=seed))[0]
        np.testing.assert_array_equal(pixels(got), pixels(expected))
    assert forwards == []


def test_strength_one_img2img_is_text_to_image(pipe, monkeypatch):
    t2i = pipe.generate("a fox", width=48, height=32, steps=3, seed=21)[0]
    monkeypatch.setattr(pipe.vae, "posterior", lambda *a: pytest.fail("the image need not be encoded"))
    got = pipe.generate("a fox", image=photo(50, 37), strength=1.0, steps=3, seed=21)[0]
    np.testing.assert_array_equal(pixels(got), pixels(t2i))
    assert got.info["seed"] == 21


def test_steps_run_and_inpainting_keeps_the_image_latents(pipe, dit_forwards):
    image, mask, seed = photo(48, 32), box_mask(48, 32, (8, 8, 40, 24)), 3
    forwards = dit_forwards()
    seen = []
    pipe.generate("a fox", image=image, mask=mask, strength=0.6, steps=8, seed=seed,
                  on_step=lambda s: seen.append((s.index + 1, s.total, s.latents)))
    assert [(i, n) for i, n, _ in seen] == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)] and len(forwards) == 5
    z = np.array(pipe.encode_image(image, seed=seed))
    keep = np.array(mask_latents(mask, 48, 32))[..., 0] == 0  # (1, 4, 6)
    final = np.array(seen[-1][2])
    # Outside the mask the last blend sets the clean image latents: (1 - 0) * z + 0 * x is z exactly.
    np.testing.assert_array_equal(final[keep], z[keep])
    assert np.abs(final[~keep] - z[~keep]).max() > 0.1  # and the masked region was repainted


def test_image_latents_replace_the_encoding(pipe):
    image, seed = photo(50, 37), 8
    z = pipe.encode_image(image, seed=seed)
    assert z.shape == (1, 4, 6, 16)
    direct = pipe.generate("a fox", image=image, strength=0.6, steps=4, seed=seed)[0]
    given = pipe.generate("a fox", image=image, image_latents=z, strength=0.6, steps=4, seed=seed)[0]
    alone = pipe.generate("a fox", image_latents=z, strength=0.6, steps=4, seed=seed)[0]  # size from the latents
    np.testing.assert_array_equal(pixels(given), pixels(direct))
    np.testing.assert_array_equal(pixels(alone), pixels(direct))


def test_batch_image_k_is_seed_plus_k(pipe):
    image = photo(32, 32)
    batch = pipe.generate(["a fox", "a cat"], image=image, strength=0.6, steps=2, seed=40, num_images=2)
    assert [im.info["seed"] for im in batch] == [40, 41, 40, 41]  # image k of every prompt: seed + k
    alone = pipe.generate("a cat", image=image, strength=0.6, steps=2, seed=41)[0]
    # The same math in another batch shape can round differently in the last bits: at most 1 level.
    assert np.abs(pixels(batch[3]) - pixels(alone)).max() <= 1


# ------------------------------------------------------------------------------------------------
# Resize policy, files and masks


def test_output_size_policy():
    assert output_size((50, 37)) == (48, 32)  # rounded down to multiples of 16
    assert output_size((1000, 750), 512, 512) == (512, 512)  # both given: resized to them
    assert output_size((1000, 750), width=512) == (512, 384)  # one given: the aspect ratio gives the other
    assert output_size((750, 1000), height=512) == (384, 512)
    with pytest.raises(ValueError, match="at least 16x16"):
        output_size((12, 40))
    with pytest.raises(ValueError, match="8192"):
        output_size((9000, 100))


def test_explicit_size_resizes_with_lanczos(pipe):
    image = photo(50, 37)
    a = pipe.generate("a fox", image=image, width=64, height=48, strength=0.5, steps=2, seed=2)[0]
    b = pipe.generate("a fox", image=image.resize((64, 48), Image.Resampling.LANCZOS), strength=0.5, steps=2,
                      seed=2)[0]
    assert a.size == (64, 48)
    np.testing.assert_array_equal(pixels(a), pixels(b))


def test_paths_are_opened_with_their_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the stored 40x24 is shown 24x40
    photo(40, 24).save(tmp_path / "rotated.png", exif=exif)
    assert open_image(tmp_path / "rotated.png").size == (24, 40)
    assert open_image(str(tmp_path / "rotated.png")).size == (24, 40)


def test_mask_preprocessing_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (53, 70), dtype=np.uint8))  # resized, then binarised
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    processor = VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    for mask, (width, height) in ((grey, (64, 48)), (rgb, (64, 48)), (grey, (32, 64))):
        full = processor.preprocess(mask, height=height, width=width)
        expected = torch.nn.functional.interpolate(full, size=(height // 8, width // 8), mode="nearest")
        got = np.array(mask_latents(mask, width, height))
        np.testing.assert_array_equal(got[0, :, :, 0], expected[0, 0].numpy())
        assert 0 < got.mean() < 1
    # 128 / 255 is >= 50%, 127 / 255 is not
    levels = Image.fromarray(np.array([[127] * 8 + [128] * 8] * 16, dtype=np.uint8))
    assert np.array(mask_latents(levels, 16, 16))[0, 0, :, 0].tolist() == [0.0, 1.0]


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    photo(64, 48).save(d / "photo.png")
    box_mask(64, 48, (8, 8, 40, 40)).save(d / "mask.png")
    box_mask(48, 48, (8, 8, 40, 40)).save(d / "small-mask.png")
    (d / "notes.png").write_text("not an image")
    return d


BAD = [
    (dict(image="photo.png", mask="small-mask.png"), ValueError, "the mask is 48x48 but the image is 64x48"),
    (dict(image="notes.png"), ValueError, "is not an image"),
    (dict(image="missing.png"), ValueError, "no such file"),
    (dict(image="photo.png", mask="notes.png"), ValueError, "mask .* is not an image"),
    (dict(image="photo.png", strength=1.5), ValueError, r"strength must be a number in \[0, 1\]"),
    (dict(image="photo.png", strength=-0.1), ValueError, "strength"),
    (dict(image="photo.png", strength=math.nan), ValueError, "strength"),
    (dict(image="photo.png", strength=True), ValueError, "strength"),
    (dict(mask="mask.png"), ValueError, "mask needs an image"),
    (dict(strength=0.5), ValueError, "strength needs an image"),
    (dict(image=3), TypeError, "image must be a path or a PIL image"),
    (dict(image="photo.png", width=100), ValueError, "multiple of 16"),
    (dict(image_latents=mx.zeros((1, 4, 4, 3))), TypeError, "image_latents"),
    (dict(image="photo.png", image_latents=mx.zeros((1, 4, 4, 16))), ValueError, r"image_latents must have shape"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[b[2] for b in BAD])
def test_bad_input(pipe, files, kwargs, error, match):
    kwargs = {k: files / v if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match) as e:
        pipe.generate("a fox", steps=1, **kwargs)
    assert "\n" not in str(e.value)


def test_small_image_is_refused(pipe):
    with pytest.raises(ValueError, match="at least 16x16"):
        pipe.generate("a fox", image=photo(12, 40), steps=1)


# ------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture()
def cli_loads(pipe, monkeypatch):
    """from_pretrained serves (a shallow copy of) the module's pipeline; the list counts the loads. The
    copy shares the models, so nothing is loaded again, but the CLI freeing its DiT before the last
    decode leaves the module's pipeline whole."""
    calls = []

    def load(cls, *a, **k):
        calls.append(a)
        return copy.copy(pipe)

    monkeypatch.setattr(ZImagePipeline, "from_pretrained", classmethod(load))
    return calls


def run(*args):
    return CliRunner().invoke(cli.main, ["generate", *map(str, args)])


def test_cli_image_mask_strength_and_from_image(pipe, files, cli_loads, reference_checkpoint, tmp_path):
    m = str(reference_checkpoint)
    r = run("a fox", "-m", m, "--image", files / "photo.png", "--strength", 0.5, "--steps", 4, "--seed", 9,
            "-o", tmp_path / "i2i.png")
    assert r.exit_code == 0, r.output
    assert "(seed 9, 2 steps at " in r.stdout  # strength 0.5 of 4 steps
    with Image.open(tmp_path / "i2i.png") as im:
        meta, got = dict(im.text), pixels(im.convert("RGB"))
    assert (meta["image"], meta["strength"], meta["width"], meta["height"]) == ("photo.png", "0.5",  # no path
                                                                                "64", "48")
    assert "mask" not in meta and "Denoising strength: 0.5" in meta["parameters"]
    expected = pipe.generate("a fox", image=files / "photo.png", strength=0.5, steps=4, seed=9)[0]
    np.testing.assert_array_equal(got, pixels(expected))

    r = run("a fox", "-m", m, "--image", files / "photo.png", "--mask", files / "mask.png", "--steps", 2,
            "--seed", 9, "-o", tmp_path / "inpaint.png")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "inpaint.png") as im:
        meta = dict(im.text)
    assert (meta["mask"], meta["strength"]) == ("mask.png", "1")  # inpainting's default strength

    # --from-image replays image, mask (by name, found next to the PNG) and strength.
    shutil.copy(files / "photo.png", tmp_path), shutil.copy(files / "mask.png", tmp_path)
    r = run("--from-image", tmp_path / "inpaint.png", "-m", m, "-o", tmp_path / "again.png")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "inpaint.png") as a, Image.open(tmp_path / "again.png") as b:
        np.testing.assert_array_equal(pixels(a.convert("RGB")), pixels(b.convert("RGB")))
        assert dict(a.text) == dict(b.text)


CLI_BAD = {
    "mask without image": (["--mask", "mask.png"], "--mask needs an image to start from (--image)"),
    "strength without image": (["--strength", "0.5"], "--strength needs an image to start from (--image)"),
    "not an image": (["--image", "notes.png"], "--image"),
    "missing image": (["--image", "missing.png"], "no such file"),
    "strength above 1": (["--image", "photo.png", "--strength", "1.5"], "strength must be a number in [0, 1]"),
    "strength not a number": (["--image", "photo.png", "--strength", "lots"], "--strength"),
    "mask of another size": (["--image", "photo.png", "--mask", "small-mask.png"], "same size"),
    "mask not an image": (["--image", "photo.png", "--mask", "notes.png"], "--mask"),
}


@pytest.mark.parametrize("case", CLI_BAD)
def test_cli_bad_input_is_one_line_before_loading(case, files, cli_loads, reference_checkpoint, tmp_path):
    args, fragment = CLI_BAD[case]
    args = [str(files / a) if a.endswith(".png") else a for a in args]
    r = run("a fox", "-m", reference_checkpoint, *args, "-o", tmp_path / "out.png")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], r.stderr
    assert cli_loads == [] and not (tmp_path / "out.png").exists()
