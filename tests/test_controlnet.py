"""ControlNet Union (issue #16): layout detection, parity with diffusers' ZImageControlNetModel,
ZImageControlNetPipeline and ZImageControlNetInpaintPipeline on random weights in every layout, the authors'
graph against a re-implementation of VideoX-Fun's forward written here, several controls in one pass,
the step window, loading and refusing files.

The base DiT here has 6 layers (the reference checkpoint's other components are reused), so that control
blocks spread over it as in the release: 3 blocks at [0, 2, 4] (as 15 at [0, 2, ..., 28] over 30), a
lite-like 2 at [0, 3]. The ControlNet files are what alibaba-pai ships: the ControlNet's own modules in
diffusers names, no prefix, one .safetensors file; 2.0's carries an untrained control_noise_refiner with a
zero before_proj.
"""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import reference
from zimage_mlx import ZImagePipeline
from zimage_mlx.controlnet import ControlNet, ControlPlan, detect
from zimage_mlx.transformer import TransformerArgs, patchify
from zimage_mlx.weights import CheckpointError

N_LAYERS = 6
# name: (control_in_dim, control_layers_places, diffusers' add_control_noise_refiner)
LAYOUTS = {
    "1.0": (16, [0, 2, 4], None),
    "2.0": (33, [0, 2, 4], "control_layers"),
    "2.1": (33, [0, 2, 4], "control_noise_refiner"),
    "lite": (33, [0, 3], "control_noise_refiner"),
}


def build_controlnet(layout: str, path, seed: int, dim: int = 96):
    """A random diffusers ZImageControlNetModel of this layout, written as a released single file."""
    from diffusers import ZImageControlNetModel

    in_dim, places, mode = LAYOUTS[layout]
    kw = dict(control_in_dim=in_dim, control_layers_places=places, control_refiner_layers_places=[0, 1],
              dim=dim, n_refiner_layers=2, n_heads=3, n_kv_heads=3, norm_eps=1e-5, qk_norm=True)
    model = ZImageControlNetModel(add_control_noise_refiner=mode, **kw)
    reference.randomize_(model, seed)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if mode == "control_layers":  # the 2.0 file also holds a control_noise_refiner that was never trained
        twin = ZImageControlNetModel(add_control_noise_refiner="control_noise_refiner", **kw)
        reference.randomize_(twin, seed + 100)
        for k, v in twin.state_dict().items():
            if k.startswith("control_noise_refiner."):
                tensors[k] = torch.zeros_like(v) if k.startswith("control_noise_refiner.0.before_proj.") else v
    save_file(tensors, str(path))
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """diffusers' tiny models run 10-40x faster on one thread than on several on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(reference_checkpoint, tmp_path_factory):
    """A checkpoint folder: the reference one with a 6-layer DiT."""
    root = tmp_path_factory.mktemp("cn") / "Z-Image-Tiny-6"
    root.mkdir()
    for name in ("text_encoder", "tokenizer", "vae", "scheduler", "model_index.json"):
        os.symlink(reference_checkpoint / name, root / name)
    reference.build_transformer(root / "transformer", config={**reference.TRANSFORMER_CONFIG, "n_layers": N_LAYERS},
                                seed=7)
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn_files")
    models = {}
    for i, layout in enumerate(LAYOUTS):
        models[layout] = build_controlnet(layout, folder / f"{layout}.safetensors", seed=20 + i)
    return folder, models


@pytest.fixture(scope="module")
def pipe(base):
    return ZImagePipeline.from_pretrained(base, dtype="float32")


@pytest.fixture(scope="module")
def ref_parts(base, reference_pipeline):
    from diffusers import ZImageTransformer2DModel

    parts = dict(reference_pipeline.components)
    parts["transformer"] = ZImageTransformer2DModel.from_pretrained(base / "transformer").eval()
    return parts


def ref_pipeline(ref_parts, controlnet, inpaint=False):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageControlNetInpaintPipeline, ZImageControlNetPipeline

    parts = dict(ref_parts)
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(parts["scheduler"].config)
    cls = ZImageControlNetInpaintPipeline if inpaint else ZImageControlNetPipeline
    out = cls(**parts, controlnet=controlnet)
    out.set_progress_bar_config(disable=True)
    return out


def picture(width, height, seed=0):
    """An edge-map-like RGB picture (strokes on a dark ground) with some grey texture."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 7 + y * 3) % 256, ((x // 5 + y // 4) % 2) * 200 + 20, (y * 9 + seed * 40) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def noise_nchw(batch, height, width, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 16, height // 8, width // 8)).astype(np.float32)


def check_images(got, ref):
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
        # float32 on both sides: rounding alone can move a pixel across a uint8 boundary, at most 1 level.
        assert a.shape == b.shape and np.abs(a - b).max() <= 1
        assert b.std() > 10  # not a flat image


# ----------------------------------------------------------------------------------------------
# Layout detection


def fake_weights(n_blocks, in_dim, refiner, dim=3840, zero_refiner=False):
    """Key names and shapes of a released file (cheap stand-ins for the big block weights)."""
    w = {"control_all_x_embedder.2-1.weight": mx.zeros((dim, 4 * in_dim), mx.bfloat16),
         "control_all_x_embedder.2-1.bias": mx.zeros((dim,), mx.bfloat16)}
    block = ["attention.to_q.weight", "feed_forward.w1.weight", "adaLN_modulation.0.weight"]
    for i in range(n_blocks):
        for k in block + ["after_proj.weight", "after_proj.bias"] + (["before_proj.weight"] if i == 0 else []):
            w[f"control_layers.{i}.{k}"] = mx.zeros((1,))
    for j in range(2):
        for k in block + (["after_proj.weight"] + (["before_proj.weight"] if j == 0 else []) if refiner else []):
            w[f"control_noise_refiner.{j}.{k}"] = mx.zeros((1,))
    if refiner:
        w["control_noise_refiner.0.before_proj.weight"] = mx.broadcast_to(mx.array(0.0 if zero_refiner else 0.01), (dim, dim))
    return w


def test_detects_every_released_layout():
    turbo = TransformerArgs()  # the released DiT: 30 layers, dim 3840
    # (blocks, channels, refiner with projections, zero before_proj) -> version, places (VideoX-Fun's configs)
    cases = [((6, 16, False, False), "1.0", list(range(0, 30, 5))),
             ((15, 33, True, True), "2.0", list(range(0, 30, 2))),
             ((15, 33, True, False), "2.1", list(range(0, 30, 2))),
             ((3, 33, True, False), "2.1", [0, 10, 20])]  # lite: diffusers' single-file loader calls it 1.0
    for (n, c, refiner, zero), version, places in cases:
        args = detect(fake_weights(n, c, refiner, zero_refiner=zero), turbo)
        assert (args.version, list(args.places)) == (version, places)
    assert "lite" in detect(fake_weights(3, 33, True), turbo).name
    assert "lite" not in detect(fake_weights(15, 33, True), turbo).name
    # diffusers' single-file loader agrees on 1.0, 2.0 and 2.1 but takes lite for 1.0 (then fails on the
    # embedder's shape); we do not
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    def theirs(w):
        return infer_diffusers_model_type({k: torch.from_numpy(np.array(v.astype(mx.float32))) for k, v in w.items()})

    assert theirs(fake_weights(15, 33, True)) == "z-image-turbo-controlnet-2.1"
    assert theirs(fake_weights(15, 33, True, zero_refiner=True)) == "z-image-turbo-controlnet-2.0"
    assert theirs(fake_weights(6, 16, False)) == theirs(fake_weights(3, 33, True)) == "z-image-turbo-controlnet"
    # diffusers without control_noise_refiner (its 2.0 conversion drops it) is still 2.0
    w = {k: v for k, v in fake_weights(15, 33, True).items() if not k.startswith("control_noise_refiner")}
    assert detect(w, turbo).version == "2.0"


@pytest.mark.parametrize("weights,message", [
    (fake_weights(4, 33, True), "cannot be spread evenly"),  # 4 blocks over 30 layers
    (fake_weights(15, 20, True), "matches no Union version"),
    (fake_weights(15, 16, True), "plain control_noise_refiner"),
    (fake_weights(15, 33, True, dim=3072), "width 3072"),
    ({"layers.0.attention.to_q.weight": mx.zeros((1,))}, "DiT checkpoint"),
    ({"controlnet_blocks.0.weight": mx.zeros((1,))}, "not a Z-Image ControlNet"),
])
def test_refuses_unknown_layouts(weights, message):
    with pytest.raises(CheckpointError, match=message):
        detect(weights, TransformerArgs())


def test_refuses_foreign_files(pipe, base, tmp_path):
    with pytest.raises(CheckpointError, match="DiT checkpoint"):
        pipe.load_controlnet(base / "transformer")
    build_controlnet("2.1", tmp_path / "wide.safetensors", seed=3, dim=120)  # for a model of another width
    with pytest.raises(CheckpointError, match="width 120"):
        pipe.load_controlnet(tmp_path / "wide.safetensors")
    save_file({"down_blocks.0.weight": torch.zeros(2)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(CheckpointError, match="not a Z-Image ControlNet"):
        pipe.load_controlnet(tmp_path / "sd.safetensors")
    with pytest.raises(CheckpointError, match="not a .safetensors"):
        (tmp_path / "x.pth").write_bytes(b"0")
        pipe.load_controlnet(tmp_path / "x.pth")


def test_loads_folders_and_shares_the_dit(pipe, files, tmp_path):
    folder, models = files
    (tmp_path / "lite").mkdir()
    models["lite"].save_pretrained(tmp_path / "lite")  # diffusers' folder: config.json + weights
    net = pipe.load_controlnet(tmp_path / "lite")
    assert net.args.version == "2.1" and net.args.places == (0, 3) and net.graph == "authors"
    assert pipe.load_controlnet(folder / "lite.safetensors", graph="diffusers").graph == "diffusers"
    # only the ControlNet's own weights: nothing of the DiT is held twice
    from mlx.utils import tree_flatten

    names = [k for k, _ in tree_flatten(net.parameters())]
    assert names and all(k.startswith(("control_all_x_embedder.", "control_layers.", "control_noise_refiner."))
                         for k in names)
    n_own = sum(p.size for _, p in tree_flatten(net.parameters()))
    assert n_own == sum(v.numel() for v in models["lite"].state_dict().values())
    pipe.unload_controlnet()
    assert pipe.controlnet is None


# ----------------------------------------------------------------------------------------------
# Parity with diffusers (the diffusers graph)


def our_residuals(pipe, net, x_nchw, t, caps, contexts, scales):
    """Our residuals per DiT layer for control contexts (K, C, h, w) at scales, one DiT forward."""
    dit = pipe.transformer
    x = mx.array(x_nchw.transpose(0, 2, 3, 1))
    tokens = net.embed(dit, mx.array(np.stack(contexts).transpose(0, 2, 3, 1)))
    hook = ControlPlan(net, tokens, list(scales), 0.0, 1.0).at(0, 1)
    hook.record = {}
    dit(x, mx.array(t), [mx.array(c) for c in caps], control=hook)
    return {k: np.array(v) for k, v in hook.record.items()}


def their_residuals(model, ref_parts, x_nchw, t, caps, context, scale):
    from diffusers import ZImageControlNetModel

    ZImageControlNetModel.from_transformer(model, ref_parts["transformer"])
    with torch.no_grad():
        out = model([torch.from_numpy(a)[:, None] for a in x_nchw], torch.from_numpy(t),
                    [torch.from_numpy(c) for c in caps], [torch.from_numpy(context)[:, None]] * len(x_nchw),
                    conditioning_scale=scale)
    return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_residuals_match_diffusers(pipe, files, ref_parts, layout):
    folder, models = files
    net = pipe.load_controlnet(folder / f"{layout}.safetensors", graph="diffusers")
    rng = np.random.default_rng(1)
    in_dim = LAYOUTS[layout][0]
    x = rng.standard_normal((2, 16, 6, 10)).astype(np.float32)  # 15 image tokens, padded to 32
    caps = [rng.standard_normal((n, 48)).astype(np.float32) for n in (5, 40)]  # ragged captions
    t = np.array([0.3, 0.3], np.float32)
    ctx = rng.standard_normal((in_dim, 6, 10)).astype(np.float32)
    ref = their_residuals(models[layout], ref_parts, x, t, caps, ctx, 0.8)
    got = our_residuals(pipe, net, x, t, caps, [ctx], [0.8])
    assert sorted(got) == sorted(ref) == list(LAYOUTS[layout][1])
    for k in ref:
        L = ref[k].shape[1]
        scale = np.abs(ref[k]).max()
        assert scale > 1e-2
        # the caption pads beyond each item's length are not compared: diffusers leaves them zero-padded
        for b, n in enumerate((32 + 32, 32 + 64)):
            np.testing.assert_allclose(got[k][b, :n], ref[k][b, :n], atol=1e-4 * scale, rtol=0)
        assert L == got[k].shape[1]


def test_several_controls_are_one_pass_and_add_up(pipe, files, ref_parts, monkeypatch):
    folder, models = files
    net = pipe.load_controlnet(folder / "2.1.safetensors", graph="diffusers")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    caps = [rng.standard_normal((7, 48)).astype(np.float32)]
    t = np.array([0.6], np.float32)
    ctxs = [rng.standard_normal((33, 8, 8)).astype(np.float32) for _ in range(2)]
    ref = [their_residuals(models["2.1"], ref_parts, x, t, caps, c, s) for c, s in zip(ctxs, (0.9, 0.4))]
    from zimage_mlx import controlnet as cn

    batches = []
    orig = cn.ControlBlock.__call__
    monkeypatch.setattr(cn.ControlBlock, "__call__", lambda self, c, *a: batches.append(c.shape[0]) or orig(self, c, *a))
    got = our_residuals(pipe, net, x, t, caps, ctxs, [0.9, 0.4])
    # one ControlNet pass for both controls: every control block ran once, on a batch of 2
    assert batches == [2] * (2 + 3)
    for k in got:
        want = ref[0][k] + ref[1][k]
        np.testing.assert_allclose(got[k], want, atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_images_match_diffusers(pipe, files, ref_parts, layout):
    folder, models = files
    pipe.load_controlnet(folder / f"{layout}.safetensors", graph="diffusers")
    control = picture(64, 48)  # stretched to the output size, as diffusers does
    latents = noise_nchw(1, 48, 32)
    ref = ref_pipeline(ref_parts, models[layout])(
        prompt="a tower", width=32, height=48, num_inference_steps=2, guidance_scale=0.0, control_image=control,
        controlnet_conditioning_scale=0.8, latents=torch.from_numpy(latents)).images
    got = pipe.generate("a tower", width=32, height=48, steps=2, control_image=control, control_scale=0.8,
                        latents=mx.array(latents.transpose(0, 2, 3, 1)))
    check_images(got, ref)
    if layout == "lite":  # and the control matters: without it the image differs
        plain = pipe.generate("a tower", width=32, height=48, steps=2, latents=mx.array(latents.transpose(0, 2, 3, 1)))
        assert np.abs(np.asarray(plain[0], np.int16) - np.asarray(got[0], np.int16)).max() > 8


def test_images_match_diffusers_with_cfg_and_two_prompts(pipe, files, ref_parts):
    folder, models = files
    pipe.load_controlnet(folder / "2.1.safetensors", graph="diffusers")
    control = picture(48, 32, seed=1)
    latents = noise_nchw(2, 32, 48, seed=3)
    kw = dict(width=48, height=32, control_image=control)
    ref = ref_pipeline(ref_parts, models["2.1"])(
        prompt=["a tower", "海边的灯塔"], negative_prompt=["blurry", "blurry"], num_inference_steps=2, guidance_scale=2.0,
        controlnet_conditioning_scale=0.6, latents=torch.from_numpy(latents), **kw).images
    got = pipe.generate(["a tower", "海边的灯塔"], negative_prompt="blurry", steps=2, guidance=2.0, control_scale=0.6,
                        latents=mx.array(latents.transpose(0, 2, 3, 1)), **kw)
    check_images(got, ref)


@pytest.mark.parametrize("layout", ["2.0", "2.1", "lite"])
def test_inpainting_matches_diffusers(pipe, files, ref_parts, layout, monkeypatch):
    folder, models = files
    pipe.load_controlnet(folder / f"{layout}.safetensors", graph="diffusers")
    image, control = picture(48, 32, seed=2), picture(48, 32, seed=3)
    mask = Image.new("L", (48, 32))
    mask.paste(255, (16, 8, 40, 24))
    latents = noise_nchw(1, 32, 48, seed=4)
    ref = ref_pipeline(ref_parts, models[layout], inpaint=True)(
        prompt="a door", image=image, mask_image=mask, control_image=control, width=48, height=32,
        num_inference_steps=2, guidance_scale=0.0, controlnet_conditioning_scale=0.9,
        latents=torch.from_numpy(latents)).images
    # diffusers' ControlNet inpainting starts from noise and never resets the kept region (the mask and the
    # masked image reach the model only through the control context); ours also resets the kept region after
    # every step, as plain inpainting does. That reset is switched off here to compare the rest.
    monkeypatch.setattr(ZImagePipeline, "_start_from_image", lambda self, init, sigmas, noise, seeds: (sigmas, noise, {}))
    got = pipe.generate("a door", image=image, mask=mask, control_image=control, steps=2, control_scale=0.9,
                        latents=mx.array(latents.transpose(0, 2, 3, 1)))
    check_images(got, ref)


# ----------------------------------------------------------------------------------------------
# The authors' graph (VideoX-Fun), against a re-implementation of its forward written here


def authors_forward(tr, cn, version, places, x, t, cap, ctx, scale):
    """VideoX-Fun's z_image_transformer2d_control.py forward for one item, with diffusers' modules: the
    2.x refiner-stage control (control_noise_refiner for 2.1, the control_layers themselves for 2.0) runs
    before the DiT's noise refiner and its residuals enter the DiT's own stream; the control layers read the
    DiT's unified sequence; the residuals are added after DiT layers `places`. Returns the output tokens."""
    with torch.no_grad():
        adaln = tr.t_embedder(t * tr.t_scale)
        xs, caps, _, x_pos, cap_pos, x_pad, cap_pad = cn.patchify_and_embed([x[:, None]], [cap], 2, 1)
        h = tr.all_x_embedder["2-1"](xs[0])
        h[x_pad[0]] = tr.x_pad_token
        c = cn.control_all_x_embedder["2-1"](cn.patchify([ctx[:, None]], 2, 1)[0])
        c[x_pad[0]] = tr.x_pad_token
        h, c, x_rope = h[None], c[None], tr.rope_embedder(x_pos[0])[None]
        x_mask = torch.ones((1, h.shape[1]), dtype=torch.bool)
        hints = []
        if version != "1.0":
            for block in (cn.control_layers if version == "2.0" else cn.control_noise_refiner):
                c = block(c, h, x_mask, x_rope, adaln)
            *hints, c = c.unbind(0)
        for i, block in enumerate(tr.noise_refiner):
            h = block(h, x_mask, x_rope, adaln)
            if hints:
                h = h + hints[i] * scale
        cp = tr.cap_embedder(caps[0])
        cp[cap_pad[0]] = tr.cap_pad_token
        # caption pads sit at the following positions (diffusers' helper lists more rows; it uses the first ones)
        cp, cap_rope = cp[None], tr.rope_embedder(cap_pos[0])[None, : cp.shape[0]]
        for block in tr.context_refiner:
            cp = block(cp, torch.ones((1, cp.shape[1]), dtype=torch.bool), cap_rope)
        if version == "1.0":
            for block in cn.control_noise_refiner:
                c = block(c, x_mask, x_rope, adaln)
        unified, rope = torch.cat([h, cp], 1), torch.cat([x_rope, cap_rope], 1)
        u_mask = torch.ones((1, unified.shape[1]), dtype=torch.bool)
        cu = torch.cat([c, cp], 1)
        for block in cn.control_layers:
            cu = block(cu, unified, u_mask, rope, adaln)
        *hints, _ = cu.unbind(0)
        for i, layer in enumerate(tr.layers):
            unified = layer(unified, u_mask, rope, adaln)
            if i in places:
                unified = unified + hints[places.index(i)] * scale
        return tr.all_final_layer["2-1"](unified, adaln)[0].numpy()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_authors_graph_matches_a_reimplementation(pipe, files, ref_parts, layout):
    folder, models = files
    version = "2.1" if layout == "lite" else layout
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 8, 6)).astype(np.float32)
    cap = rng.standard_normal((9, 48)).astype(np.float32)
    ctx = rng.standard_normal((LAYOUTS[layout][0], 8, 6)).astype(np.float32)
    want = authors_forward(ref_parts["transformer"], models[layout], version, LAYOUTS[layout][1],
                           torch.from_numpy(x), torch.tensor([0.4]), torch.from_numpy(cap), torch.from_numpy(ctx), 0.7)
    outs = {}
    for graph in ("authors", "diffusers"):
        net = pipe.load_controlnet(folder / f"{layout}.safetensors", graph=graph)
        hook = ControlPlan(net, net.embed(pipe.transformer, mx.array(ctx.transpose(1, 2, 0))[None]), [0.7], 0, 1).at(0, 1)
        out = pipe.transformer(mx.array(x.transpose(1, 2, 0))[None], mx.array([0.4]), [mx.array(cap)], control=hook)
        outs[graph] = np.array(patchify(out))[0]  # (12 tokens, 64)
    n = outs["authors"].shape[0]
    np.testing.assert_allclose(outs["authors"], want[:n], atol=1e-4 * np.abs(want).max(), rtol=0)
    gap = np.abs(outs["authors"] - outs["diffusers"]).max()
    # the graphs differ exactly where the refiner-stage residuals exist: in 2.x, not in 1.0
    assert (gap == 0) if layout == "1.0" else (gap > 1e-3 * np.abs(want).max())


# ----------------------------------------------------------------------------------------------
# Window, scale 0, inputs


def test_window_and_zero_scale(pipe, files, dit_forwards):
    folder, _ = files
    net = pipe.load_controlnet(folder / "lite.safetensors")
    tokens = mx.zeros((2, 32, 96))
    plan = ControlPlan(net, tokens, [0.9, 0.0], 0.25, 0.75)
    assert [plan.at(i, 4) is not None for i in range(4)] == [False, True, True, False]
    assert plan.at(1, 4).scales == [0.9] and plan.at(1, 4).tokens.shape[0] == 1  # scale 0: not run at all
    latents = mx.array(noise_nchw(1, 32, 32).transpose(0, 2, 3, 1))
    control = picture(32, 32)
    # scale 0 gives the plain image exactly
    plain = pipe.generate("a cat", steps=2, width=32, height=32, latents=latents)[0]
    zero = pipe.generate("a cat", steps=2, control_image=control, control_scale=0.0, latents=latents)[0]
    assert zero.size == (32, 32)  # the size follows the control image
    assert np.array_equal(np.asarray(plain), np.asarray(zero))


def test_image_to_image_under_control(pipe, files, monkeypatch):
    from zimage_mlx import controlnet as cn

    folder, _ = files
    pipe.load_controlnet(folder / "2.1.safetensors")
    seen = []
    orig = cn.ControlPlan.at
    monkeypatch.setattr(cn.ControlPlan, "at", lambda self, i, total: seen.append((i, total)) or orig(self, i, total))
    photo, control = picture(32, 48, seed=6), picture(32, 48, seed=7)
    got = pipe.generate("a house", image=photo, strength=0.5, steps=4, seed=2, control_image=control)[0]
    assert seen == [(0, 2), (1, 2)]  # the 2 steps the strength keeps, each controlled
    plain = pipe.generate("a house", image=photo, strength=0.5, steps=4, seed=2)[0]
    assert got.size == plain.size == (32, 48)
    assert np.abs(np.asarray(got, np.int16) - np.asarray(plain, np.int16)).max() > 8


def test_bad_control_input(pipe, files, tmp_path):
    folder, _ = files
    pipe.unload_controlnet()
    with pytest.raises(ValueError, match="load_controlnet"):
        pipe.generate("a cat", control_image=picture(32, 32), steps=1)
    pipe.load_controlnet(folder / "1.0.safetensors")
    for kw, message in [(dict(control_scale=[0.5, 0.5]), "2 control scales for 1"),
                        (dict(control_scale=float("nan")), "control scale"),
                        (dict(control_start=0.6, control_end=0.5), "below control_end"),
                        (dict(control_end=1.5), "control_end")]:
        with pytest.raises(ValueError, match=message):
            pipe.generate("a cat", control_image=picture(32, 32), steps=1, **kw)
    with pytest.raises(ValueError, match="no such file"):
        pipe.generate("a cat", control_image=tmp_path / "missing.png", steps=1)


# ----------------------------------------------------------------------------------------------
# CLI


def run_cli(*args):
    from click.testing import CliRunner

    from zimage_mlx import cli

    return CliRunner().invoke(cli.main, ["generate", *map(str, args)])


def test_cli_generates_records_and_replays(pipe, base, files, tmp_path):
    folder, _ = files
    control = tmp_path / "edges.png"
    picture(48, 32, seed=5).save(control)
    out = tmp_path / "out.png"
    r = run_cli("a bridge", "-m", base, "--controlnet", folder / "2.1.safetensors", "--control", f"{control}:0.7",
                "--control-end", "0.5", "--steps", 2, "--seed", 3, "--dtype", "float32", "-o", out)
    assert r.exit_code == 0, r.output
    pipe.load_controlnet(folder / "2.1.safetensors")
    want = pipe.generate("a bridge", steps=2, seed=3, control_image=control, control_scale=0.7, control_end=0.5)[0]
    got = Image.open(out)
    assert got.size == (48, 32)  # the size of the control image
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    text = got.text
    assert text["controlnet"] == "2.1.safetensors" and text["controlnet_graph"] == "authors"  # names, no paths
    assert json.loads(text["controls"]) == [{"image": "edges.png", "scale": 0.7}]
    assert (text["control_start"], text["control_end"]) == ("0", "0.5")
    again = tmp_path / "again.png"
    r = run_cli("--from-image", out, "-m", base, "-o", again)  # a local ControlNet file must be named again
    assert r.exit_code == 2 and "the local ControlNet 2.1.safetensors; give it again with --controlnet" in r.stderr
    # the control image is found next to the PNG; the ControlNet where --controlnet says
    r = run_cli("--from-image", out, "-m", base, "--controlnet", folder / "2.1.safetensors", "-o", again)
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), np.asarray(want))
    # the default scale is the version's recommended one (2.1: 0.9), and it is recorded
    r = run_cli("a bridge", "-m", base, "--controlnet", folder / "2.1.safetensors", "--control", control,
                "--steps", 1, "--seed", 3, "-o", tmp_path / "default.png")
    assert r.exit_code == 0, r.output
    assert json.loads(Image.open(tmp_path / "default.png").text["controls"])[0]["scale"] == 0.9


@pytest.mark.parametrize("args,message", [
    (["--control", "IMG"], "--control needs --controlnet"),
    (["--controlnet", "CN"], "--controlnet needs at least one --control"),
    (["--controlnet", "CN", "--control", "IMG:x"], "is not a number"),
    (["--controlnet", "CN", "--control", "missing.png"], "no such file"),
    (["--controlnet", "TMP/none.safetensors", "--control", "IMG"], "does not exist"),
    (["--controlnet", "CN", "--control", "IMG", "--control-start", "0.9", "--control-end", "0.2"], "below"),
])
def test_cli_bad_control_input_fails_before_loading(base, files, tmp_path, monkeypatch, args, message):
    folder, _ = files
    picture(32, 32).save(tmp_path / "c.png")
    loaded = []
    monkeypatch.setattr(ZImagePipeline, "from_pretrained", classmethod(lambda *a, **k: loaded.append(1)))
    subs = {"IMG": str(tmp_path / "c.png"), "CN": str(folder / "lite.safetensors"), "TMP": str(tmp_path)}
    args = [subs.get(a, a) for a in args]
    args = [a.replace("IMG", subs["IMG"]).replace("TMP", str(tmp_path)) for a in args]
    r = run_cli("a cat", "-m", base, "-o", tmp_path / "x.png", *args)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not loaded


def test_control_maps(monkeypatch):
    from zimage_mlx.controlnet import control_map

    photo = picture(80, 60)
    assert control_map(photo, "none", 32, 32) is photo
    cv2 = pytest.importorskip("cv2")
    edges = np.asarray(control_map(photo, "canny", 48, 32))
    assert edges.shape == (32, 48, 3) and set(np.unique(edges)) == {0, 255}
    grey = np.asarray(photo.resize((48, 32), Image.Resampling.LANCZOS).convert("L"))
    assert np.array_equal(edges[..., 0], cv2.Canny(grey, 100, 200))
    lines = np.asarray(control_map(photo, "lines", 48, 32))
    assert lines.shape == (32, 48, 3) and lines.max() == 255
    monkeypatch.setitem(__import__("sys").modules, "cv2", None)
    with pytest.raises(ValueError, match=r"zimage-mlx\[control\]"):
        control_map(photo, "canny", 48, 32)


# ----------------------------------------------------------------------------------------------
# Conversion and quantization


def test_convert_and_quantize(pipe, base, files, tmp_path):
    import mlx.nn as nn
    from click.testing import CliRunner

    from zimage_mlx import cli
    from zimage_mlx.convert import convert_controlnet

    folder, _ = files
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 16, 4, 4)).astype(np.float32)
    caps, t = [rng.standard_normal((6, 48)).astype(np.float32)], np.array([0.5], np.float32)
    residuals = {}
    for layout in ("2.0", "lite"):
        ctx = [rng.standard_normal((33, 4, 4)).astype(np.float32)]
        want = our_residuals(pipe, pipe.load_controlnet(folder / f"{layout}.safetensors"), x, t, caps, ctx, [1.0])
        convert_controlnet(folder / f"{layout}.safetensors", tmp_path / layout, dtype="float32", base=base)
        net = pipe.load_controlnet(tmp_path / layout)
        assert net.args.version == ("2.0" if layout == "2.0" else "2.1") and "control_noise_refiner" not in (
            net if layout == "2.0" else {})
        got = our_residuals(pipe, net, x, t, caps, ctx, [1.0])
        assert all(np.array_equal(got[k], want[k]) for k in want)  # a float32 conversion changes nothing
        residuals[layout] = (ctx, want)
    r = CliRunner().invoke(cli.main, ["convert", "--controlnet", str(folder / "lite.safetensors"), str(tmp_path / "q4"),
                                      "--quantize", "4", "--group-size", "32", "--dtype", "float32", "--base", str(base)])
    assert r.exit_code == 0, r.output
    net = pipe.load_controlnet(tmp_path / "q4")
    assert isinstance(net.control_all_x_embedder["2-1"], nn.Linear)  # 132 (here 4 x 33) inputs: kept
    block = net.control_layers[0]
    assert (block.attention.to_q.bits, block.feed_forward.w2.bits) == (4, 4)
    assert block.adaLN_modulation[0].bits == block.after_proj.bits == block.before_proj.bits == 8
    ctx, want = residuals["lite"]
    got = our_residuals(pipe, net, x, t, caps, ctx, [1.0])
    for k in want:  # 4-bit weights: close, not equal
        err = np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])
        assert 0 < err < 0.3
    with pytest.raises(ValueError, match="already exists"):
        convert_controlnet(folder / "lite.safetensors", tmp_path / "q4", base=base)


def test_example_script(base, files, tmp_path, monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    folder, _ = files
    picture(32, 32).save(tmp_path / "edges.png")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["controlnet.py", "--model", str(base), "--controlnet",
                                      str(folder / "lite.safetensors"), "--control", str(tmp_path / "edges.png"),
                                      "--width", "32", "--height", "32", "--steps", "1",
                                      "--output", str(tmp_path / "out.png")])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "controlnet.py"), run_name="__main__")
    assert "Union 2.1 lite" in capsys.readouterr().out and Image.open(tmp_path / "out.png").size == (32, 32)
