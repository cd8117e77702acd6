"""Seed variety and the hires fix (issue #25): variety's seeded embedding noise, the second pass as our
image-to-image made by hand, metadata both ways (ours and A1111's infotext), the CLI and `upscale`."""

from __future__ import annotations

import copy
import itertools

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zimage_mlx import ZImagePipeline, cli
from zimage_mlx.errors import InputError
from zimage_mlx.hires import target_size, upscale_latents
from zimage_mlx.noise import image_key, noise, variety_key, variety_steps
from zimage_mlx.recipe import ControlRef, Recipe


@pytest.fixture(scope="module")
def pipe(reference_checkpoint):
    return ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------------------------
# Variety


def test_variety_key_is_its_own_draw():
    keys = [variety_key(5), image_key(5), mx.random.key(5), variety_key(6)]
    for a, b in itertools.combinations(keys, 2):
        assert not mx.array_equal(a, b)
    assert variety_steps(0.5, 8) == 4 and variety_steps(0.0, 8) == 0 and variety_steps(1.0, 3) == 3
    assert variety_steps(0.5, 3) == 2  # steps 0 and 1 (1/3 < 0.5), not 2


def test_variety_same_seed_same_pixels_and_zero_is_untouched(pipe, monkeypatch):
    base = pixels(pipe.generate("a fox", width=32, height=32, steps=2, seed=3)[0])
    zero = pixels(pipe.generate("a fox", width=32, height=32, steps=2, seed=3, variety=0.0, variety_until=0.9)[0])
    np.testing.assert_array_equal(base, zero)  # bit for bit
    a = pixels(pipe.generate("a fox", width=32, height=32, steps=2, seed=3, variety=1.0)[0])
    b = pixels(pipe.generate("a fox", width=32, height=32, steps=2, seed=3, variety=1.0)[0])
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - base).mean() > 0.5

    import zimage_mlx.run as run  # variety 0 never draws its noise

    monkeypatch.setattr(run, "vary", lambda *a: pytest.fail("vary called at variety 0"))
    pipe.generate("a fox", width=32, height=32, steps=2, seed=3)


def spread(pipe, variety: float) -> float:
    """The mean pairwise mean |difference| of 4 seeds' images made from one starting noise: the part of the seeds'
    difference that variety makes. (On the tiny random checkpoint the seeds' own noise dominates: their images
    are ~65 levels apart with or without variety, while a different prompt moves an image ~4 levels.)"""
    latents = mx.concatenate([noise(9, 4, 4)] * 4)
    ims = [pixels(im) for im in pipe.generate("a fox", width=32, height=32, steps=2, seed=[1, 2, 3, 4],
                                               latents=latents, variety=variety, variety_until=1.0)]
    return float(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(ims, 2)]))


def test_variety_spreads_the_seeds(pipe):
    spreads = [spread(pipe, v) for v in (0.0, 0.5, 2.0)]  # measured 0, 2.7, 5.5
    assert spreads[0] == 0 and 1 < spreads[1] < spreads[2] - 1, spreads


def test_variety_is_checked_and_recorded():
    with pytest.raises(InputError, match="variety must be"):
        Recipe(prompt="x", variety=-1).validate()
    with pytest.raises(InputError, match="variety_until"):
        Recipe(prompt="x", variety_until=1.5).validate()
    r = Recipe(prompt="x", seed=1, width=32, height=32, variety=0.25, variety_until=0.4)
    assert "Variety: 0.25, Variety until: 0.4" in r.to_infotext()
    again = Recipe.from_infotext(r.to_infotext())
    assert (again.variety, again.variety_until) == (0.25, 0.4)
    text = r.to_png_text()
    assert (text["variety"], text["variety_until"]) == ("0.25", "0.4")
    assert "variety" not in Recipe(prompt="x", seed=1, width=32, height=32).to_png_text()


# ------------------------------------------------------------------------------------------------
# Hires fix


def test_target_size_and_checks():
    assert target_size(32, 48, 2) == (64, 96) and target_size(40, 40, 1.5) == (64, 64)  # 60 -> 64
    r = Recipe(prompt="x", width=1024, height=1024, hires_scale=2)
    assert r.validate().hires_size == (2048, 2048)
    for bad, match in [(dict(hires_scale=1), "hires_scale must be a number above 1"),
                       (dict(hires_scale=4.5), "hires_scale"), (dict(hires_scale=2, hires_strength=2), "hires_strength"),
                       (dict(hires_scale=2, hires_upscaler="esrgan"), "hires_upscaler must be one of lanczos, latent"),
                       (dict(hires_steps=4), "hires_steps needs hires_scale"),
                       (dict(width=4096, height=1024, hires_scale=3), "12288x3072 pixels, above the limit of 8192")]:
        with pytest.raises(InputError, match=match):
            Recipe(prompt="x", **{"width": 1024, "height": 1024, **bad}).validate()
    with pytest.raises(InputError, match="above the limit of 1536") as e:
        Recipe(prompt="x", width=1024, height=1024, hires_scale=2).validate(max_side=1536)
    assert e.value.field == "hires_scale"


def by_hand(pipe, prompt, seed, *, size=32, steps=2, scale=2, strength=0.5, hires_steps=None):
    first = pipe.generate(prompt, width=size, height=size, steps=steps, seed=seed)[0]
    big = first.resize((size * scale, size * scale), resample=Image.Resampling.LANCZOS)
    return pipe.generate(prompt, image=big, strength=strength, steps=hires_steps or steps, seed=seed)[0]


def test_hires_is_the_two_passes_by_hand(pipe):
    made = pipe.generate("a fox", width=32, height=32, steps=2, seed=4, hires_scale=2, hires_strength=0.5,
                         hires_steps=3)[0]
    assert made.size == (64, 64)
    hand = by_hand(pipe, "a fox", 4, hires_steps=3)
    assert np.abs(pixels(made) - pixels(hand)).max() <= 1
    r = made.info["recipe"]
    assert (r.width, r.hires_scale, r.hires_strength, r.hires_steps, r.hires_upscaler) == (32, 2, 0.5, 3, "lanczos")


def test_latent_upscaler_resizes_the_latents(pipe):
    z = mx.random.normal((1, 4, 6, 16), key=mx.random.key(0))
    up = upscale_latents(z, 8, 12)
    import torch

    ref = torch.nn.functional.interpolate(torch.from_numpy(np.array(z)).permute(0, 3, 1, 2), size=(8, 12),
                                          mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.array(up), ref, atol=1e-6)
    made = pipe.generate("a fox", width=32, height=32, steps=2, seed=4, hires_scale=2, hires_strength=0.5,
                         hires_upscaler="latent")[0]
    assert made.size == (64, 64)
    first = []  # the first pass's final latents, by hand
    pipe.generate("a fox", width=32, height=32, steps=2, seed=4, on_step=lambda step: first.append(step.latents))
    first = first[-1]
    hand = pipe.generate("a fox", image_latents=upscale_latents(first, 8, 8), strength=0.5, steps=2, seed=4)[0]
    assert np.abs(pixels(made) - pixels(hand)).max() <= 1


# ------------------------------------------------------------------------------------------------
# Metadata


def test_hires_metadata_both_ways():
    r = Recipe(prompt="x", seed=1, width=32, height=32, hires_scale=2, hires_strength=0.4, hires_steps=3,
               hires_upscaler="latent")
    text = r.to_infotext()
    assert "Denoising strength: 0.4, Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent" in text
    for again in (Recipe.from_infotext(text), Recipe.from_png(_png(r))):
        assert (again.hires_scale, again.hires_strength, again.hires_steps, again.hires_upscaler, again.strength) \
            == (2, 0.4, 3, "latent", None)
    i2i = r.replace(image="in.png", strength=0.6)
    text = i2i.to_infotext()
    assert "Denoising strength: 0.6, Hires strength: 0.4, Hires upscale: 2" in text
    again = Recipe.from_infotext(text)
    assert (again.strength, again.hires_strength) == (0.6, 0.4)


def _png(r: Recipe) -> Image.Image:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "PNG", pnginfo=r.to_png())
    buf.seek(0)
    return Image.open(buf)


def test_a1111_hires_infotext():
    text = ("a castle\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 12, Size: 512x512, "
            "Model: z_image_turbo, Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 10, "
            "Hires upscaler: R-ESRGAN 4x+, Version: v1.10.1")
    r = Recipe.from_infotext(text)
    assert (r.hires_scale, r.hires_strength, r.hires_steps, r.hires_upscaler) == (1.5, 0.45, 10, "lanczos")
    assert r.strength is None and r.validate().hires_size == (768, 768)
    other = Recipe.from_infotext(text.replace("z_image_turbo", "sdxl").replace("R-ESRGAN 4x+", "Latent (nearest)"))
    assert (other.hires_steps, other.hires_upscaler) == (None, "latent")  # another model's steps do not apply


# ------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture()
def cli_loads(pipe, monkeypatch):
    calls = []

    def load(cls, *a, **k):
        calls.append(a)
        return copy.copy(pipe)

    monkeypatch.setattr(ZImagePipeline, "from_pretrained", classmethod(load))
    return calls


def run(*args):
    return CliRunner().invoke(cli.main, list(map(str, args)))


def cli_replays(m, png, tmp_path) -> None:
    """--from-image on `png` gives its pixels and its metadata again."""
    r = run("generate", "--from-image", png, "-m", m, "-o", tmp_path / "again.png", "--overwrite")
    assert r.exit_code == 0, r.output
    with Image.open(png) as a, Image.open(tmp_path / "again.png") as b:
        np.testing.assert_array_equal(pixels(b), pixels(a))
        assert dict(b.text) == dict(a.text)


def test_cli_hires_is_the_two_passes_by_hand_and_replays(pipe, cli_loads, reference_checkpoint, tmp_path):
    m = str(reference_checkpoint)
    r = run("generate", "a fox", "-m", m, "--size", 32, "--steps", 2, "--seed", 4, "--hires", 2,
            "--hires-strength", 0.5, "--hires-steps", 3, "-o", tmp_path / "h.png")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "h.png") as im:
        meta, got = dict(im.text), pixels(im)
    assert got.shape == (64, 64, 3)
    assert (meta["hires_scale"], meta["hires_strength"], meta["hires_steps"], meta["hires_upscaler"]) == (
        "2", "0.5", "3", "lanczos")
    assert np.abs(got - pixels(by_hand(pipe, "a fox", 4, hires_steps=3))).max() <= 1
    cli_replays(m, tmp_path / "h.png", tmp_path)


def test_cli_variety_is_the_apis_and_replays(pipe, cli_loads, reference_checkpoint, tmp_path):
    m = str(reference_checkpoint)
    r = run("generate", "a fox", "-m", m, "--size", 32, "--steps", 2, "--seed", 4, "--variety", 0.5,
            "--variety-until", 0.25, "-o", tmp_path / "v.png")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "v.png") as im:
        meta, got = dict(im.text), pixels(im)
    assert (meta["variety"], meta["variety_until"]) == ("0.5", "0.25") and "Variety: 0.5" in meta["parameters"]
    api = pipe.generate("a fox", width=32, height=32, steps=2, seed=4, variety=0.5, variety_until=0.25)[0]
    np.testing.assert_array_equal(got, pixels(api))
    cli_replays(m, tmp_path / "v.png", tmp_path)


def test_cli_hires_too_large_before_loading(cli_loads, reference_checkpoint, tmp_path):
    r = run("generate", "a fox", "-m", reference_checkpoint, "--size", 4096, "--hires", 3, "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and "--hires" in r.stderr and "above the limit of 8192" in r.stderr, r.output
    assert cli_loads == []


# ------------------------------------------------------------------------------------------------
# upscale


def test_upscale_is_the_second_pass(pipe, cli_loads, reference_checkpoint, tmp_path):
    first = pipe.generate("a fox", width=32, height=32, steps=2, seed=4)[0]
    first.save(tmp_path / "fox.png", pnginfo=first.info["recipe"].to_png())
    r = run("upscale", tmp_path / "fox.png", "--scale", 2, "--strength", 0.5, "-m", reference_checkpoint,
            "-o", tmp_path / "up.png")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "up.png") as im:
        got, meta = pixels(im), dict(im.text)
    assert got.shape == (64, 64, 3) and (meta["prompt"], meta["seed"], meta["image"]) == ("a fox", "4", "fox.png")
    hand = by_hand(pipe, "a fox", 4)  # the stored prompt, seed and steps are the defaults
    assert np.abs(got - pixels(hand)).max() <= 1
    api = pipe.upscale(tmp_path / "fox.png", scale=2, strength=0.5)[0]
    np.testing.assert_array_equal(pixels(api), got)
    # its PNG replays: the input image is found next to it
    r = run("generate", "--from-image", tmp_path / "up.png", "-m", reference_checkpoint, "-o", tmp_path / "again.png")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "again.png") as im:
        np.testing.assert_array_equal(pixels(im), got)


@pytest.mark.parametrize("args, fragment", [
    (["--scale", 5], "--scale must be a number in [1, 4]"),
    (["--scale", 1], "--scale must be above 1"),
    (["--scale", 4, "--strength", 2], "--strength must be a number in [0, 1]"),
])
def test_upscale_refuses_before_loading(args, fragment, cli_loads, reference_checkpoint, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    r = run("upscale", tmp_path / "in.png", *args, "-m", reference_checkpoint, "-o", tmp_path / "o.png")
    assert r.exit_code == 2 and fragment in r.stderr, r.output
    assert cli_loads == [] and not (tmp_path / "o.png").exists()


def test_upscale_too_large_and_corrupt(cli_loads, reference_checkpoint, tmp_path):
    Image.new("RGB", (3000, 16)).save(tmp_path / "wide.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = run("upscale", tmp_path / "wide.png", "--scale", 3, "-m", reference_checkpoint)
    assert r.exit_code == 2 and "9008x48 pixels" in r.stderr and "limit of 8192" in r.stderr, r.output
    r = run("upscale", tmp_path / "bad.png", "-m", reference_checkpoint)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "not an image Pillow can read" in lines[0], r.output
    assert cli_loads == []


# ------------------------------------------------------------------------------------------------
# Server


def test_server_parsers_read_hires_and_variety():
    from zimage_mlx.server import ServerConfig
    from zimage_mlx.server.a1111 import parse_a1111
    from zimage_mlx.server.core import ApiError
    from zimage_mlx.server.jobs import parse_native

    cfg = ServerConfig(max_side=512)
    r, _ = parse_native({"prompt": "p", "width": 64, "height": 64, "variety": 0.5,
                         "hires": {"scale": 2, "steps": 3, "upscaler": "latent"}}, cfg)
    assert (r.variety, r.hires_scale, r.hires_steps, r.hires_upscaler, r.hires_strength) == (0.5, 2, 3, "latent", 0.35)
    r, _ = parse_a1111({"prompt": "p", "width": 64, "height": 48, "enable_hr": True, "hr_resize_x": 128,
                        "hr_resize_y": 96, "hr_upscaler": "Latent", "hr_second_pass_steps": 0,
                        "denoising_strength": 0.5}, cfg, img2img=False)
    assert (r.hires_size, r.hires_upscaler, r.hires_steps, r.hires_strength) == ((128, 96), "latent", None, 0.5)
    r, _ = parse_a1111({"prompt": "p", "hr_scale": 2, "denoising_strength": 0.5}, cfg, img2img=False)
    assert r.hires_scale is None  # without enable_hr, as in A1111
    for parse, body, param, fragment in [
            (parse_native, {"hires": {"scale": 8}}, "hires.scale", "at most 4"),
            (parse_native, {"hires": {"scale": 2, "size": 3}}, "hires", "not size"),
            (parse_native, {"width": 512, "height": 512, "hires": {"scale": 2}}, "hires.scale", "limit of 512"),
            (parse_native, {"variety": -1}, "variety", "variety"),
            (lambda b, c: parse_a1111(b, c, img2img=False), {"enable_hr": True, "hr_upscaler": "SwinIR 4x"},
             "hr_upscaler", "'SwinIR 4x' is not available"),
            (lambda b, c: parse_a1111(b, c, img2img=False), {"enable_hr": True, "hr_scale": 5}, "hr_scale", "hr_scale"),
            (lambda b, c: parse_a1111(b, c, img2img=False), {"enable_hr": True, "hr_resize_x": 128, "hr_resize_y": 64},
             "hr_resize_x", "aspect ratio")]:
        with pytest.raises(ApiError) as e:
            parse({"prompt": "p", "width": 64, "height": 64, **body}, cfg)
        got = e.value.body["error"]["param"]
        assert got == param and fragment in str(e.value), (got, str(e.value))


def test_a1111_enable_hr_is_the_apis_hires(pipe, reference_checkpoint):
    import base64
    import io

    import httpx
    from server_fakes import LiveServer

    from zimage_mlx.server import ServerConfig
    from zimage_mlx.worker import Worker

    worker = Worker(lambda: ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32"), queue_size=2)
    worker.start(timeout=120)
    with LiveServer(worker, ServerConfig(model_id="z-image-tiny", max_side=256)) as server:
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=300, json={
            "prompt": "a fox", "width": 32, "height": 32, "steps": 2, "seed": 4, "enable_hr": True, "hr_scale": 2,
            "hr_upscaler": "Lanczos", "hr_second_pass_steps": 3, "denoising_strength": 0.5})
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        native = httpx.post(f"{server.url}/v1/images/generations", timeout=300, json={
            "prompt": "a fox", "size": "32x32", "steps": 2, "seed": 4, "hires": {"scale": 2, "strength": 0.5, "steps": 3}})
        assert native.status_code == 200, native.text
        openai = Image.open(io.BytesIO(base64.b64decode(native.json()["data"][0]["b64_json"])))
    worker.shutdown(wait=30)
    expected = pipe.generate("a fox", width=32, height=32, steps=2, seed=4, hires_scale=2, hires_strength=0.5,
                             hires_steps=3)[0]
    assert got.size == (64, 64)
    np.testing.assert_array_equal(pixels(got), pixels(expected))
    np.testing.assert_array_equal(pixels(openai), pixels(expected))
    assert "Hires upscale: 2, Hires steps: 3, Hires upscaler: Lanczos" in json_info(r)


def json_info(r) -> str:
    import json

    return json.loads(r.json()["info"])["infotexts"][0]


# ------------------------------------------------------------------------------------------------
# MultiDiffusion tiles


def test_tile_spans():
    from zimage_mlx.tiles import spans

    assert spans(32, 128) == [(0, 32)]
    assert spans(32, 16) == [(0, 16), (8, 24), (16, 32)]
    for n, size in [(64, 16), (100, 32), (130, 64), (96, 32)]:
        got = spans(n, size)
        assert got[0][0] == 0 and got[-1][1] == n and all(e - s == size and s % 2 == 0 for s, e in got)
        assert all(b[0] < a[1] - size // 4 + 1 for a, b in zip(got, got[1:]))  # each overlaps the next


def photo(size: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray((np.stack([x * 3, y * 2, (x + y) * 5 % 256], -1) % 256).astype(np.uint8))


def test_one_tile_is_the_untiled_pass_exactly(pipe):
    kw = dict(image=photo(64), strength=0.6, steps=3, seed=2)
    untiled = pipe.generate("a fox", **kw)[0]
    tiled = pipe.generate("a fox", tile=128, **kw)[0]  # one 128-pixel tile covers 64x64: through TiledDiT
    np.testing.assert_array_equal(pixels(tiled), pixels(untiled))


def step_peak(pipe, tile) -> float:
    feats = pipe.encode_prompt(["a fox"])
    x = noise(1, 32, 32)
    mx.eval(x)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for _ in pipe.denoise(feats, x, pipe.sigmas(4, width=256, height=256)[2:], tile=tile):
        pass
    return mx.get_peak_memory() - base


def test_several_tiles_lower_the_peak_and_leave_no_seam(pipe):
    from zimage_mlx.tiles import spans

    untiled, tiled = step_peak(pipe, None), step_peak(pipe, 128)
    assert tiled < untiled / 2, (untiled, tiled)  # measured 12.5 MB and 1.6 MB above the latents at 256x256
    im = pixels(pipe.generate("a fox", image=photo(256), strength=0.6, steps=3, seed=2, tile=128)[0])
    cols = np.abs(np.diff(im.astype(np.float64), axis=1)).mean(axis=(0, 2))  # column c+1 - column c
    rows = np.abs(np.diff(im.astype(np.float64), axis=0)).mean(axis=(1, 2))
    borders = sorted({8 * v - 1 for s, e in spans(32, 16) for v in (s, e) if 0 < v < 32})  # pixel c | c+1
    for diffs in (cols, rows):  # measured at the borders 20.2 and 22.3 levels, elsewhere 20.4 and 22.9
        elsewhere = np.delete(diffs, borders).mean()
        assert diffs[borders].mean() <= 1.1 * elsewhere, (diffs[borders], elsewhere)


def test_tile_is_checked_and_recorded():
    for bad in (100, 120, 4.5):
        with pytest.raises(InputError, match="tile"):
            Recipe(prompt="x", tile=bad).validate()
    r = Recipe(prompt="x", seed=1, width=32, height=32, image="in.png", strength=0.5, tile=512)
    assert "Tile: 512" in r.to_infotext() and r.to_png_text()["tile"] == "512"
    assert Recipe.from_png(_png(r)).tile == 512 and Recipe.from_infotext(r.to_infotext()).tile == 512


# ------------------------------------------------------------------------------------------------
# The hires pass under a (Union Tile) ControlNet


@pytest.fixture(scope="module")
def tile_net(tmp_path_factory):
    """A random ControlNet Union 2.1 file over the reference DiT's 2 layers (a Tile one has the same layout)."""
    import reference
    from diffusers import ZImageControlNetModel
    from safetensors.torch import save_file

    cfg = reference.TRANSFORMER_CONFIG
    model = ZImageControlNetModel(control_in_dim=33, control_layers_places=[0, 1], control_refiner_layers_places=[0, 1],
                                  add_control_noise_refiner="control_noise_refiner", dim=cfg["dim"],
                                  n_refiner_layers=2, n_heads=cfg["n_heads"], n_kv_heads=cfg["n_kv_heads"],
                                  norm_eps=1e-5, qk_norm=True)
    reference.randomize_(model, 31)
    path = tmp_path_factory.mktemp("tile") / "tile.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture()
def netted(pipe, tile_net):
    """The module's pipeline with the tile ControlNet loaded, unloaded afterwards."""
    pipe.load_controlnet(tile_net)
    yield pipe
    pipe.unload_controlnet()


def controlled_by_hand(pipe, prompt, seed, *, scale, strength=0.7, steps=2):
    """generate; Lanczos x2 of the 8-bit image; image to image with that image as the control image."""
    first = pipe.generate(prompt, width=32, height=32, steps=steps, seed=seed)[0]
    big = first.resize((64, 64), resample=Image.Resampling.LANCZOS)
    return pipe.generate(prompt, image=big, strength=strength, steps=steps, seed=seed, control_image=big,
                         control_scale=scale)[0]


def test_hires_control_is_the_two_passes_by_hand(netted):
    pipe = netted
    made = pipe.generate("a fox", width=32, height=32, steps=2, seed=4, hires_scale=2, hires_strength=0.7,
                         hires_control=True, hires_control_scale=0.8)[0]
    hand = controlled_by_hand(pipe, "a fox", 4, scale=0.8)
    assert made.size == (64, 64) and np.abs(pixels(made) - pixels(hand)).max() <= 1
    plain = pipe.generate("a fox", width=32, height=32, steps=2, seed=4, hires_scale=2, hires_strength=0.7)[0]
    assert np.abs(pixels(made) - pixels(plain)).mean() > 0.5  # the ControlNet does act on the second pass
    r = made.info["recipe"]
    assert (r.hires_control, r.hires_control_scale, r.controlnet, r.controls) == ("tile.safetensors", 0.8, None, [])
    default = pipe.generate("a fox", width=32, height=32, steps=2, seed=4, hires_scale=2, hires_strength=0.7,
                            hires_control=True)[0]
    assert default.info["recipe"].hires_control_scale == 0.9  # Union 2.1's recommended scale
    assert np.abs(pixels(default) - pixels(controlled_by_hand(pipe, "a fox", 4, scale=None))).max() <= 1
    # the metadata both ways, and a replay through the API
    again = Recipe.from_png(_png(r))
    assert (again.hires_control, again.hires_control_scale) == ("tile.safetensors", 0.8)
    assert "Hires ControlNet: tile.safetensors, Hires control scale: 0.8" in r.to_infotext()
    assert Recipe.from_infotext(r.to_infotext()).hires_control == "tile.safetensors"
    np.testing.assert_array_equal(pixels(pipe.run(again)[0]), pixels(made))


def test_hires_control_is_checked(pipe):
    base = dict(prompt="x", width=32, height=32)
    for bad, match in [(dict(hires_control=True), "hires_control needs hires_scale"),
                       (dict(hires_scale=2, hires_control_scale=0.5), "hires_control_scale needs hires_control"),
                       (dict(hires_scale=2, hires_control=True, hires_control_scale=3), r"\[-2, 2\]"),
                       (dict(hires_scale=2, hires_control=1), "must be a ControlNet's name or True"),
                       (dict(hires_scale=2, hires_control=True, hires_upscaler="latent"), "needs the lanczos"),
                       (dict(hires_scale=2, hires_control="b.safetensors", controlnet="a.safetensors",
                             controls=[ControlRef("c.png")]), "one ControlNet serves both passes")]:
        with pytest.raises(InputError, match=match):
            Recipe(**base, **bad).validate()
    with pytest.raises(InputError, match="hires_control needs a ControlNet: call load_controlnet"):
        pipe.generate("x", width=32, height=32, steps=1, seed=1, hires_scale=2, hires_control=True)


def test_cli_hires_control_is_the_two_passes_by_hand_and_replays(netted, cli_loads, reference_checkpoint, tile_net,
                                                                  tmp_path):
    pipe, m = netted, str(reference_checkpoint)
    out = tmp_path / "c.png"
    r = run("generate", "a fox", "-m", m, "--size", 32, "--steps", 2, "--seed", 4, "--hires", 2,
            "--hires-strength", 0.7, "--hires-control", tile_net, "--hires-control-scale", 0.8, "-o", out)
    assert r.exit_code == 0, r.output
    assert "hires pass scale 0.8" in r.output
    with Image.open(out) as im:
        meta, got = dict(im.text), pixels(im)
    assert (meta["hires_control"], meta["hires_control_scale"]) == ("tile.safetensors", "0.8")  # a name, no path
    assert "controlnet" not in meta  # the first pass is not controlled
    assert np.abs(got - pixels(controlled_by_hand(pipe, "a fox", 4, scale=0.8))).max() <= 1
    r = run("generate", "--from-image", out, "-m", m, "-o", tmp_path / "again.png")  # the local file: name it again
    assert r.exit_code == 2 and "the local hires ControlNet tile.safetensors; give it again with --hires-control" \
        in r.stderr, r.output
    r = run("generate", "--from-image", out, "-m", m, "--hires-control", tile_net, "-o", tmp_path / "again.png")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "again.png") as im:
        np.testing.assert_array_equal(pixels(im), got)
        assert dict(im.text) == meta


def test_cli_hires_control_with_another_controlnet_is_refused(cli_loads, reference_checkpoint, tile_net, tmp_path):
    other = tmp_path / "other" / "tile.safetensors"  # the same name, another file
    other.parent.mkdir()
    other.write_bytes(tile_net.read_bytes())
    Image.new("RGB", (32, 32)).save(tmp_path / "edges.png")
    r = run("generate", "a fox", "-m", reference_checkpoint, "--size", 32, "--hires", 2, "--controlnet", other,
            "--control", tmp_path / "edges.png", "--hires-control", tile_net, "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and "--hires-control must be the --controlnet file" in r.stderr, r.output
    assert cli_loads == []
