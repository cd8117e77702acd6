"""Z-Image-Omni: the SigLIP2 tower against transformers, the omni DiT against diffusers' transformer, and whole
images against diffusers' ZImageOmniPipeline on a random-weight Omni checkpoint built here, same latents."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

import reference
from zimage_mlx import ZImagePipeline
from zimage_mlx.errors import InputError
from zimage_mlx.omni import OmniConditions, omni_forward
from zimage_mlx.siglip import SiglipProcessor, SiglipVisionModel
from zimage_mlx.transformer import ZImageTransformer

SIGLIP_CONFIG = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                     num_patches=16)  # a 4x4 learned position grid, resized to every image's grid
PROCESSOR = dict(patch_size=8, max_num_patches=24)
OMNI_DIT_CONFIG = dict(reference.TRANSFORMER_CONFIG, siglip_feat_dim=24)


def build_siglip(path, seed=5, config=SIGLIP_CONFIG):
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    model = Siglip2VisionModel(Siglip2VisionConfig(**config))
    reference.randomize_(model, seed)
    model.eval().save_pretrained(path / "siglip", safe_serialization=True)
    processor = Siglip2ImageProcessor(**PROCESSOR)
    processor.save_pretrained(path / "siglip_processor")
    return model, processor


@pytest.fixture(scope="module")
def omni_checkpoint(reference_checkpoint, tmp_path_factory):
    """The reference checkpoint with an Omni DiT (siglip_feat_dim), a SigLIP2 tower and its processor."""
    root = tmp_path_factory.mktemp("omni") / "Z-Image-Omni-Tiny"
    shutil.copytree(reference_checkpoint, root, ignore=shutil.ignore_patterns("transformer"))
    reference.build_transformer(root / "transformer", config=OMNI_DIT_CONFIG, seed=3)
    build_siglip(root)
    index = dict(reference.MODEL_INDEX, _class_name="ZImageOmniPipeline",
                 siglip=["transformers", "Siglip2VisionModel"], siglip_processor=["transformers", "Siglip2ImageProcessor"])
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def image(w, h, seed):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.5, 0.2]) + rng.normal(0, 40, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# Components


def test_siglip_matches_transformers(tmp_path):
    ref, processor = build_siglip(tmp_path)
    ours, ours_p = SiglipVisionModel.from_pretrained(tmp_path / "siglip"), SiglipProcessor.from_pretrained(tmp_path / "siglip_processor")
    for w, h in [(80, 64), (50, 130)]:  # two sizes: a 3x4-ish and a tall grid, both resized from the 4x4 table
        im = image(w, h, w)
        inputs = processor(images=[im], return_tensors="pt")
        gh, gw = inputs.spatial_shapes[0].tolist()
        with torch.no_grad():
            expected = ref(**inputs).last_hidden_state[0, : gh * gw].numpy().reshape(gh, gw, -1)
        patches, grid = ours_p(im)
        assert grid == (gh, gw) and gh != gw
        np.testing.assert_allclose(np.array(patches), inputs.pixel_values[0, : gh * gw].numpy(), atol=1e-6)
        # float32 on both sides, a different summation order only
        np.testing.assert_allclose(np.array(ours(patches, grid)), expected, atol=1e-4)


def test_omni_dit_matches_diffusers(tmp_path):
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(**OMNI_DIT_CONFIG)
    reference.randomize_(model, 3)
    model.eval().save_pretrained(tmp_path)
    ours = ZImageTransformer.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    # (reference latent sizes, SigLIP grids, caption segment lengths): text only, one and two references
    for refs, grids, caps in [([], [], [7]), ([(6, 4)], [(3, 5)], [5, 40, 3]),
                              ([(6, 4), (4, 10)], [(3, 5), (7, 2)], [5, 4, 33, 3])]:
        lat, x = [r(16, h, w) for h, w in refs], r(16, 8, 6)
        segs, sig = [r(n, 48) for n in caps], [r(h, w, 24) for h, w in grids]
        with torch.no_grad():
            expected = model(x=[[torch.from_numpy(a)[:, None] for a in lat] + [torch.from_numpy(x)[:, None]]],
                             t=torch.tensor([0.3]), cap_feats=[[torch.from_numpy(s) for s in segs]],
                             siglip_feats=[[torch.from_numpy(s) for s in sig] + [None]] if refs else [None],
                             image_noise_mask=[[0] * len(refs) + [1]], return_dict=False)[0][0][:, 0].numpy()
        cond = OmniConditions([mx.array(a.transpose(1, 2, 0)) for a in lat], [mx.array(s) for s in sig])
        got = omni_forward(ours, mx.array(x.transpose(1, 2, 0)), mx.array([0.3]), [mx.array(s) for s in segs], cond)
        # float32; outputs of magnitude ~4 through 2 + 2 + 2 blocks
        np.testing.assert_allclose(np.array(got).transpose(2, 0, 1), expected, atol=2e-4)


# ----------------------------------------------------------------------------------------------
# End to end against ZImageOmniPipeline


@pytest.fixture(scope="module")
def reference_omni(omni_checkpoint):
    from diffusers import ZImageOmniPipeline, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Siglip2ImageProcessor, Siglip2VisionModel

    base = ZImagePipeline.from_pretrained(str(omni_checkpoint), dtype=torch.float32,
                                          transformer=ZImageTransformer2DModel.from_pretrained(omni_checkpoint / "transformer"))
    pipe = ZImageOmniPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                              tokenizer=base.tokenizer, transformer=base.transformer,
                              siglip=Siglip2VisionModel.from_pretrained(omni_checkpoint / "siglip").eval(),
                              siglip_processor=Siglip2ImageProcessor.from_pretrained(omni_checkpoint / "siglip_processor"))
    pipe.set_progress_bar_config(disable=True)

    # diffusers 0.42 encodes the references with `self.vae.encode(image.bfloat16())`: with a float32 VAE that is
    # a dtype mismatch (an error), and it would round the pixels to bfloat16 first. The same method without
    # the cast: the float32 reference our float32 run is compared with.
    def prepare_image_latents(images, batch_size, device, dtype):
        out = []
        for im in images:
            z = pipe.vae.encode(im.to(device=device, dtype=dtype)).latent_dist.mode()[0]
            out.append(((z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor).unsqueeze(1).to(dtype))
        return [out.copy() for _ in range(batch_size)]

    pipe.prepare_image_latents = prepare_image_latents
    return pipe


@pytest.fixture(scope="module")
def omni_pipe(omni_checkpoint):
    return ZImagePipeline.from_pretrained(omni_checkpoint, dtype="float32")


REFS = [image(80, 64, 1), image(64, 96, 2)]  # different sizes (and aspect ratios)

CASES = [
    ("text only", [], 0.0),
    ("one reference", REFS[:1], 0.0),
    ("two references of different sizes", REFS, 0.0),
    ("text only, CFG", [], 3.0),
    ("one reference, CFG", REFS[:1], 3.0),
    ("two references, CFG", REFS, 3.0),
]


@pytest.mark.parametrize("name,refs,guidance", CASES, ids=[c[0] for c in CASES])
def test_images_match_diffusers_omni(omni_pipe, reference_omni, name, refs, guidance):
    latents = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    kw = dict(negative_prompt="blurry") if guidance else {}
    expected = reference_omni(image=list(refs) or None, prompt="a red fox", width=64, height=64, num_inference_steps=2,
                              guidance_scale=guidance, latents=torch.from_numpy(latents), **kw).images[0]
    got = omni_pipe.generate("a red fox", reference_images=list(refs) or None, width=64, height=64, steps=2,
                             guidance=guidance, latents=mx.array(latents.transpose(0, 2, 3, 1)), **kw)[0]
    a, b = np.asarray(got, np.int16), np.asarray(expected, np.int16)
    # float32 on both sides: a pixel may cross a rounding boundary of the uint8 conversion, 1 level at most
    print(f"{name}: max |diff| {np.abs(a - b).max()} levels, mean {np.abs(a - b).mean():.4f}, std {b.std():.1f}")
    assert np.abs(a - b).max() <= 1
    assert b.std() > 10


# ----------------------------------------------------------------------------------------------
# zimage-mlx convert of an Omni folder


def test_convert_float32_gives_the_same_image(omni_checkpoint, omni_pipe, tmp_path):
    from click.testing import CliRunner

    from zimage_mlx import cli

    dst = tmp_path / "omni-f32"
    result = CliRunner().invoke(cli.main, ["convert", str(omni_checkpoint), str(dst), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    summary = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "float32, from" in summary["siglip"] and "siglip_processor" in summary
    assert sorted(p.name for p in dst.iterdir()) == ["model_index.json", "scheduler", "siglip", "siglip_processor",
                                                      "text_encoder", "tokenizer", "transformer", "vae"]
    index = json.loads((dst / "model_index.json").read_text())
    assert index["siglip"] == ["transformers", "Siglip2VisionModel"] and "siglip_processor" in index
    config = json.loads((dst / "siglip" / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization" not in config
    pipe = ZImagePipeline.from_pretrained(dst, dtype="float32")
    kw = dict(reference_images=REFS[:1], width=64, height=64, steps=2, seed=4)
    a = np.asarray(pipe.generate("a red fox", **kw)[0], np.int16)
    b = np.asarray(omni_pipe.generate("a red fox", **kw)[0], np.int16)
    # float32 weights written as read: the same arithmetic, the same pixels (1 level allowed for a rounding edge)
    print(f"converted float32: max |diff| {np.abs(a - b).max()} levels")
    assert np.abs(a - b).max() <= 1 and b.std() > 10


WIDE_SIGLIP = dict(SIGLIP_CONFIG, hidden_size=64, intermediate_size=96)  # widths that group size 32 divides


@pytest.fixture(scope="module")
def omni_wide(omni_checkpoint, tmp_path_factory):
    """The Omni checkpoint with a 64-wide tower (the fixture's 24-wide one has no quantizable layer)."""
    root = tmp_path_factory.mktemp("omni-wide") / "Z-Image-Omni-Wide"
    shutil.copytree(omni_checkpoint, root, ignore=shutil.ignore_patterns("transformer", "siglip"))
    reference.build_transformer(root / "transformer", config=dict(OMNI_DIT_CONFIG, siglip_feat_dim=64), seed=3)
    build_siglip(root, config=WIDE_SIGLIP)
    return root


def test_convert_quantized_tower(omni_wide, tmp_path):
    import mlx.nn as nn

    from zimage_mlx.convert import convert

    dst = tmp_path / "omni-q8"
    result = convert(omni_wide, dst, dtype="float32", quantize=8, group_size=32)
    assert "8-bit (group 32)" in result["siglip"][1]
    config = json.loads((dst / "siglip" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    pipe = ZImagePipeline.from_pretrained(dst, dtype="float32")
    modules = dict(pipe.siglip.named_modules())
    linear = [p for p, m in modules.items() if isinstance(m, nn.Linear)]
    quantized = [p for p, m in modules.items() if isinstance(m, nn.QuantizedLinear)]
    # every attention and MLP Linear at 8 bits; the patch projection (and position table, layer norms) float
    assert linear == ["embeddings.patch_embedding"]
    assert len(quantized) == 6 * WIDE_SIGLIP["num_hidden_layers"] and {modules[p].bits for p in quantized} == {8}
    assert isinstance(modules["embeddings.position_embedding"], nn.Embedding)
    # The DiT keeps its SigLIP embedder float, as the other embedders; its SigLIP refiner is quantized.
    assert type(pipe.transformer.siglip_embedder[1]) is nn.Linear
    assert isinstance(pipe.transformer.siglip_refiner[0].attention.to_q, nn.QuantizedLinear)

    float_tower = SiglipVisionModel.from_pretrained(omni_wide / "siglip")
    processor = SiglipProcessor.from_pretrained(dst / "siglip_processor")
    for im in REFS:
        got, expected = np.array(pipe.siglip.encode(processor, im)), np.array(float_tower.encode(processor, im))
        err = np.abs(got - expected).max() / np.abs(expected).max()
        print(f"8-bit tower, grid {got.shape[:2]}: max |diff| {err:.5f} of the largest |feature|")
        # 8-bit affine, group 32: each weight off by at most 1/510 of its group's range (~0.2%); through 2
        # layers and the final layer norm this measured 0.7% of the largest feature: 2% leaves room
        # and still fails a tower that lost a layer or got 4-bit.
        assert err < 0.02
    out = pipe.generate("a red fox", reference_images=REFS[:1], width=64, height=64, steps=2, seed=4)[0]
    assert out.size == (64, 64)


def test_convert_refuses_a_tower_of_another_width(omni_checkpoint, omni_wide, tmp_path):
    from zimage_mlx.convert import convert
    from zimage_mlx.weights import CheckpointError

    mixed = tmp_path / "mixed"
    shutil.copytree(omni_checkpoint, mixed, ignore=shutil.ignore_patterns("siglip"))
    shutil.copytree(omni_wide / "siglip", mixed / "siglip")
    with pytest.raises(CheckpointError, match="SigLIP tower .* has hidden size 64 but the DiT .* SigLIP features of 24"):
        convert(mixed, tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists()


def test_references_change_the_image_and_are_recorded(omni_pipe):
    plain = omni_pipe.generate("a red fox", width=64, height=64, steps=2, seed=3)[0]
    with_ref = omni_pipe.generate("a red fox", reference_images=REFS[:1], width=64, height=64, steps=2, seed=3)[0]
    assert np.abs(np.asarray(plain, np.int16) - np.asarray(with_ref, np.int16)).max() > 5
    assert len(with_ref.info["recipe"].reference_pixels) == 1


def test_references_size_and_refusals(omni_pipe, tmp_path):
    # no size given: the last reference's, rounded down to multiples of 16 (diffusers' rule)
    out = omni_pipe.generate("a fox", reference_images=[REFS[0], image(100, 70, 4)], steps=1, seed=1)[0]
    assert out.size == (96, 64)
    with pytest.raises(InputError, match="at least 64"):
        omni_pipe.generate("a fox", reference_images=[image(40, 80, 1)], width=64, height=64, steps=1)
    with pytest.raises(InputError, match="at most 4"):
        omni_pipe.generate("a fox", reference_images=REFS * 3, width=64, height=64, steps=1)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="not an image"):
        omni_pipe.generate("a fox", reference_images=[bad], width=64, height=64, steps=1)


def test_low_memory_frees_the_tower(omni_checkpoint):
    pipe = ZImagePipeline.from_pretrained(omni_checkpoint, dtype="float32", low_memory=True)
    assert pipe.siglip is None and pipe.siglip_processor is not None
    out = pipe.generate("a fox", reference_images=REFS[:1], width=64, height=64, steps=1, seed=0)[0]
    assert pipe.siglip is None and pipe.text_encoder is None and out.size == (64, 64)


def test_png_metadata_names_the_references(omni_pipe, tmp_path):
    from zimage_mlx.recipe import Recipe

    path = tmp_path / "fox-ref.png"
    REFS[0].save(path)
    out = omni_pipe.generate("a fox", reference_images=[path], width=64, height=64, steps=1, seed=2)[0]
    recipe = out.info["recipe"]
    assert recipe.reference_images == ["fox-ref.png"]
    out.save(tmp_path / "out.png", pnginfo=recipe.to_png())
    back = Recipe.from_png(tmp_path / "out.png")
    assert back.reference_images == ["fox-ref.png"] and back.seed == 2 and back.prompt == "a fox"


def test_a_replayed_recipe_needs_its_references(omni_pipe):
    from zimage_mlx.recipe import Recipe

    recipe = Recipe(prompt="a fox", width=64, height=64, steps=1, seed=1, reference_images=["fox.png"])
    with pytest.raises(InputError, match="give them again"):
        omni_pipe.run(recipe)
    out = omni_pipe.run(recipe.replace(reference_pixels=REFS[:1]))[0]
    assert out.size == (64, 64)


def test_turbo_refuses_references(reference_checkpoint):
    pipe = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32")
    assert pipe.siglip_processor is None
    with pytest.raises(InputError, match="Z-Image-Omni"):
        pipe.generate("a fox", reference_images=REFS[:1], width=64, height=64, steps=1)


def test_unsupported_options_are_refused(omni_pipe):
    with pytest.raises(InputError, match="variety"):
        omni_pipe.generate("a fox", width=64, height=64, steps=1, variety=0.5)


def test_cli_references_give_the_api_pixels_and_replay(omni_pipe, omni_checkpoint, tmp_path, monkeypatch):
    """generate --reference: the API's pixels; the PNG names the references by file name and --from-image finds
    them beside it; an unreadable reference is one error line before anything loads."""
    from click.testing import CliRunner

    from zimage_mlx import cli

    ref = tmp_path / "fox-ref.png"
    REFS[0].save(ref)
    out, again = tmp_path / "out.png", tmp_path / "again.png"
    args = ["-m", str(omni_checkpoint), "--size", "64", "--steps", "2", "--seed", "4", "--dtype", "float32"]
    r = CliRunner().invoke(cli.main, ["generate", "the fox in the snow", "--reference", str(ref), *args, "-o", str(out)])
    assert r.exit_code == 0, r.output
    want = omni_pipe.generate("the fox in the snow", reference_images=[ref], width=64, height=64, steps=2, seed=4)[0]
    with Image.open(out) as got:
        np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
        assert json.loads(got.text["reference_images"]) == ["fox-ref.png"]
    r = CliRunner().invoke(cli.main, ["generate", "--from-image", str(out), "-m", str(omni_checkpoint), "-o", str(again)])
    assert r.exit_code == 0, r.output
    with Image.open(out) as a, Image.open(again) as b:
        np.testing.assert_array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
    loads = []
    monkeypatch.setattr(ZImagePipeline, "from_pretrained", classmethod(lambda *a, **k: loads.append(1)))
    (tmp_path / "bad.png").write_text("not an image")
    r = CliRunner().invoke(cli.main, ["generate", "a fox", "--reference", str(tmp_path / "bad.png"), *args,
                                      "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and r.stderr.startswith("Error: --reference") and len(r.stderr.splitlines()) == 1
    assert not loads


# ----------------------------------------------------------------------------------------------
# The server: OpenAI edits and native jobs with references (a real Worker and app, TestClient)


def png_bytes(im) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def b64(im) -> str:
    import base64

    return base64.b64encode(png_bytes(im)).decode()


def app_client(worker, **cfg):
    from starlette.testclient import TestClient

    from zimage_mlx.server import ServerConfig, create_app

    return TestClient(create_app(worker, ServerConfig(max_side=256, **cfg)), base_url="http://localhost",
                      raise_server_exceptions=False)


def error_param(r, status: int = 400):
    assert r.status_code == status, r.text
    return r.json()["error"]["param"]


@pytest.fixture(scope="module")
def omni_server(omni_checkpoint):
    from zimage_mlx.worker import Worker

    worker = Worker(lambda: ZImagePipeline.from_pretrained(omni_checkpoint, dtype="float32"), queue_size=4)
    worker.start(timeout=300)
    yield app_client(worker, model_id="z-image-omni-tiny", max_input_pixels=256 * 256), worker
    worker.shutdown(wait=30)


def png_pixels(data: bytes):
    import io

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")), dict(im.text)


def test_server_references_give_the_api_pixels(omni_server, omni_pipe):
    """/v1/images/edits with two image[] parts (multipart and JSON) and a native job with base64 references: the
    pixels of `generate(prompt, reference_images=[a, b])`, the references recorded by file name."""
    import base64
    import time

    client, worker = omni_server
    assert worker.omni is True
    want = np.asarray(omni_pipe.generate("the fox in the room", reference_images=REFS, width=64, height=64, steps=2,
                                         seed=5)[0])
    form = {"prompt": "the fox in the room", "seed": "5", "steps": "2", "size": "64x64"}
    files = [("image[]", ("fox.png", png_bytes(REFS[0]), "image/png")),
             ("image[]", ("room.png", png_bytes(REFS[1]), "image/png"))]
    r = client.post("/v1/images/edits", data=form, files=files)
    assert r.status_code == 200, r.text
    got, text = png_pixels(base64.b64decode(r.json()["data"][0]["b64_json"]))
    np.testing.assert_array_equal(got, want)
    assert json.loads(text["reference_images"]) == ["fox.png", "room.png"] and r.json()["zimage"]["comments"] == []
    r = client.post("/v1/images/edits", json={"prompt": "the fox in the room", "seed": 5, "steps": 2, "size": "64x64",
                                              "image": [b64(REFS[0]), b64(REFS[1])]})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(png_pixels(base64.b64decode(r.json()["data"][0]["b64_json"]))[0], want)

    r = client.post("/v1/jobs", json={"prompt": "the fox in the room", "seed": 5, "steps": 2, "size": "64x64",
                                      "reference_images": [b64(REFS[0]), "data:image/png;base64," + b64(REFS[1])]})
    assert r.status_code == 202, r.text
    job, deadline = r.json()["id"], time.time() + 120
    while (status := client.get(f"/v1/jobs/{job}").json()["status"]) in ("queued", "running") and time.time() < deadline:
        time.sleep(0.1)
    assert status == "completed"
    np.testing.assert_array_equal(png_pixels(client.get(f"/v1/jobs/{job}/images/0").content)[0], want)


def test_server_refuses_bad_references_before_queueing(omni_server):
    client, worker = omni_server
    loads = worker.loads

    def edit(parts, **form):
        files = [(name, (f"{k}.png", data, "image/png")) for k, (name, data) in enumerate(parts)]
        return client.post("/v1/images/edits", data={"prompt": "a fox", "size": "64x64", **form}, files=files)

    ref = png_bytes(REFS[0])
    assert error_param(edit([("image[]", ref), ("mask", ref)])) == "mask"  # Omni edits take no mask
    assert error_param(edit([("image[]", ref)] * 5)) == "image[]"  # at most 4
    assert error_param(edit([("image", ref), ("image", b"not an image")])) == "image"  # unreadable
    r = edit([("image[]", png_bytes(image(40, 80, 1)))])  # under 64 px a side: the Recipe's check
    assert error_param(r) == "image[]" and "at least 64" in r.json()["error"]["message"]
    assert error_param(edit([("image[]", png_bytes(image(300, 300, 1)))]), 413) == "image[]"  # over the pixel cap
    assert error_param(edit([("image[]", ref)], strength="0.5")) == "strength"
    for refs in ([b64(REFS[0])] * 5, ["bm90IGFuIGltYWdl"], [b64(image(40, 80, 1))], "x"):
        r = client.post("/v1/jobs", json={"prompt": "a fox", "size": "64x64", "reference_images": refs})
        assert error_param(r) == "reference_images"
    assert worker.queued() == [] and worker.running is None and worker.loads == loads


class StubPipeline:
    """A loaded pipeline as the worker sees it: Omni when it has a siglip_processor; records the recipes run."""

    def __init__(self, omni: bool):
        self.siglip_processor = object() if omni else None
        self.recipes = []

    def run(self, recipe, **kw):
        self.recipes.append(recipe)
        r = recipe.settle()
        im = Image.new("RGB", (r.width, r.height))
        im.info["recipe"] = r.replace(strength=r.strength or 0.6) if r.has_image else r  # as the pipeline records
        return [im]


def test_edits_wait_for_the_load_to_know_the_model():
    """While the model loads, whether it is Omni is unknown: an edit waits for the load (its job would wait in the
    queue anyway), then is parsed as the loaded model's."""
    import threading
    import time

    from zimage_mlx.worker import Worker

    gate, pipe = threading.Event(), StubPipeline(omni=True)
    worker = Worker(lambda: (gate.wait(30), pipe)[1])
    worker.start(wait=False)
    client, result = app_client(worker), {}
    files = [("image[]", ("a.png", png_bytes(REFS[0]), "image/png")), ("image[]", ("b.png", png_bytes(REFS[1]), "image/png"))]
    thread = threading.Thread(target=lambda: result.update(r=client.post(
        "/v1/images/edits", data={"prompt": "a fox", "size": "64x64", "seed": "1"}, files=files)))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive() and worker.omni is None and worker.queued() == []
    gate.set()
    thread.join(30)
    assert result["r"].status_code == 200, result["r"].text
    recipe = pipe.recipes[0]
    assert worker.omni is True and recipe.reference_images == ["a.png", "b.png"] and not recipe.has_image
    assert [im.size for im in recipe.reference_pixels] == [im.size for im in REFS]
    worker.shutdown(wait=10)


def test_a_turbo_server_keeps_its_edits_and_refuses_references():
    from zimage_mlx.worker import Worker

    pipe = StubPipeline(omni=False)
    worker = Worker(lambda: pipe)
    worker.start(timeout=10)
    client = app_client(worker)
    assert worker.omni is False
    r = client.post("/v1/jobs", json={"prompt": "a fox", "reference_images": [b64(REFS[0])]})
    assert error_param(r) == "reference_images" and "Z-Image-Omni" in r.json()["error"]["message"]
    files = [("image[]", ("a.png", png_bytes(REFS[0]), "image/png")), ("image[]", ("b.png", b"unread", "image/png"))]
    r = client.post("/v1/images/edits", data={"prompt": "a fox", "seed": "1"}, files=files)
    assert r.status_code == 200, r.text
    assert pipe.recipes[0].has_image and not pipe.recipes[0].reference_pixels and "first of the 2" in \
        r.json()["zimage"]["comments"][0]
    worker.shutdown(wait=10)
