"""VAE parity with diffusers' AutoencoderKL on the reference checkpoint's random weights (float32)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import reference
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from mlx.utils import tree_flatten
from PIL import Image

from zimage_mlx.vae import VAE, VAEArgs, auto_tile_size, from_pil, to_pil
from zimage_mlx.weights import CheckpointError, load_into, load_safetensors

SCALE, SHIFT = reference.VAE_CONFIG["scaling_factor"], reference.VAE_CONFIG["shift_factor"]


@pytest.fixture(scope="module")
def vae_dir(reference_checkpoint):
    return reference_checkpoint / "vae"


@pytest.fixture(scope="module")
def torch_vae(vae_dir):
    return AutoencoderKL.from_pretrained(vae_dir).eval()


@pytest.fixture(scope="module")
def vae(vae_dir):
    return VAE.from_pretrained(vae_dir)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def torch_decode(torch_vae, latents: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return nhwc(torch_vae.decode(nchw(latents) / SCALE + SHIFT).sample)


# Batch of 2, non-square (8x12 latents -> 64x96 images).
LATENTS = np.random.default_rng(0).standard_normal((2, 8, 12, 16)).astype(np.float32)
IMAGES = np.random.default_rng(1).uniform(-1, 1, (2, 64, 96, 3)).astype(np.float32)


def test_decode_matches_diffusers(vae, torch_vae):
    ours = vae.decode(mx.array(LATENTS))
    ref = torch_decode(torch_vae, LATENTS)
    assert ours.shape == (2, 64, 96, 3) and ours.dtype == mx.float32
    # Same float32 math in a different order (conv algorithms, GroupNorm sums): measured 8e-6 on outputs
    # of magnitude up to 4 after ~30 layers.
    np.testing.assert_allclose(np.array(ours), ref, atol=5e-5, rtol=0)
    # Pixels: identical except where a value sits on a rounding boundary (then one level apart).
    ref_pil = VaeImageProcessor(vae_scale_factor=16).postprocess(nchw(ref), output_type="pil")
    ours_px = np.stack([np.array(im) for im in to_pil(ours)]).astype(int)
    ref_px = np.stack([np.array(im) for im in ref_pil]).astype(int)
    assert np.abs(ours_px - ref_px).max() <= 1 and (ours_px != ref_px).mean() < 1e-3


def test_to_pil_and_from_pil_match_vae_image_processor():
    proc = VaeImageProcessor(vae_scale_factor=16)
    x = np.random.default_rng(2).uniform(-1.2, 1.2, (2, 16, 24, 3)).astype(np.float32)  # out of range: clamped
    for ours, ref in zip(to_pil(mx.array(x)), proc.postprocess(nchw(x), output_type="pil")):
        assert np.array_equal(np.array(ours), np.array(ref))
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    ours = from_pil([img, img])  # 100x70 -> 96x64, Lanczos, [-1, 1]: bit-identical to diffusers
    assert ours.shape == (2, 64, 96, 3)
    np.testing.assert_array_equal(np.array(ours), nhwc(proc.preprocess([img, img])))
    assert from_pil(img, width=48, height=40).shape == (1, 32, 48, 3)


def test_encode_matches_diffusers(vae, torch_vae):
    key = mx.random.key(7)
    mean, sample = vae.encode(mx.array(IMAGES), key=key)
    eps = np.array(mx.random.normal(mean.shape, key=key))  # the eps encode draws from that key
    with torch.no_grad():
        dist = torch_vae.encode(nchw(IMAGES)).latent_dist
    ref_mean = nhwc((dist.mean - SHIFT) * SCALE)
    ref_sample = nhwc((dist.mean + dist.std * nchw(eps) - SHIFT) * SCALE)
    assert mean.shape == (2, 8, 12, 16)
    # float32, different summation order; measured 2e-6 (mean) and 3e-6 (sample) on values up to 1.3.
    np.testing.assert_allclose(np.array(mean), ref_mean, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.array(sample), ref_sample, atol=2e-5, rtol=0)
    assert vae.encode(mx.array(IMAGES))[1] is None


def test_tiled_decode_blends_exactly_with_a_local_decoder(vae, monkeypatch):
    # A decoder without spatial context (nearest x8 of three latent channels): tiling must then reproduce
    # the untiled output up to float rounding, which checks tile placement, coverage and that the blend
    # weights sum to 1 at every pixel (3x4 tiles, uneven overlaps, batch of 2).
    monkeypatch.setattr(vae, "_decode", lambda z: mx.repeat(mx.repeat(mx.tanh(z[..., :3]), 8, axis=1), 8, axis=2))
    z = mx.random.normal((2, 30, 41, 16), key=mx.random.key(0))
    whole = vae.decode(z)
    tiled = vae.decode(z, tile_size=12)
    np.testing.assert_allclose(np.array(tiled), np.array(whole), atol=1e-6, rtol=0)


def test_tiled_decode_close_to_untiled(tmp_path):
    # 3x3 tiles of 24 latent pixels on a 48x48 latent, every tile border inside the compared image. Each
    # tile has its own GroupNorm statistics and attention (as in diffusers' tiled decode), so tiling is
    # an approximation; random weights amplify it far more than the trained VAE does. Measured: mean |err|
    # 0.037 for an output std of 0.87, spread evenly over the image (no more at the seams).
    # A narrow VAE (8/16 channels) keeps this large image fast on CPU.
    cfg = dict(reference.VAE_CONFIG, block_out_channels=[8, 8, 16, 16], norm_num_groups=4)
    reference.build_vae(tmp_path, config=cfg)
    vae = VAE.from_pretrained(tmp_path)
    z = mx.random.normal((1, 48, 48, 16), key=mx.random.key(1))
    whole, tiled = np.array(vae.decode(z)), np.array(vae.decode(z, tile_size=24))
    err = np.abs(tiled - whole).mean(axis=(0, 3))  # (H, W)
    assert err.mean() < 0.06 * whole.std()
    seams = np.zeros(err.shape[0], bool)
    for s in (12 * 8, 24 * 8, 36 * 8):  # tiles start at latent 0, 12, 24: inner tile edges at 12, 24, 36
        seams[s - 4 : s + 4] = True
    assert err[seams].mean() < 1.5 * err.mean() and err[:, seams].mean() < 1.5 * err.mean()


def to_ldm(state: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers -> LDM / ComfyUI names (written independently of the loader: the reverse renames)."""
    out = {}
    for k, w in state.items():
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("encoder.conv_norm_out", "encoder.norm_out").replace("decoder.conv_norm_out", "decoder.norm_out")
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k = k.replace(f"attn_1.{a}.", f"attn_1.{b}.")
        if "attn_1" in k and w.ndim == 2:
            w = w[:, :, None, None]  # LDM attention projections are 1x1 convs
        for i in range(n_blocks):
            k = k.replace(f"down_blocks.{i}.resnets.", f"down.{i}.block.").replace(f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample.")
            b = n_blocks - 1 - i
            k = k.replace(f"up_blocks.{i}.resnets.", f"up.{b}.block.").replace(f"up_blocks.{i}.upsamplers.0.", f"up.{b}.upsample.")
        out[k] = w.contiguous()
    return out


def test_ldm_single_file_loads_the_same_model(vae, vae_dir, torch_vae, tmp_path):
    from safetensors.torch import save_file

    ldm = to_ldm(torch_vae.state_dict(), len(reference.VAE_CONFIG["block_out_channels"]))
    assert "decoder.up.0.block.2.conv2.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    # A full LDM checkpoint: the VAE under first_stage_model., next to other models' weights.
    full = {f"first_stage_model.{k}": w for k, w in ldm.items()} | {"model.diffusion_model.x.weight": torch.ones(2)}
    save_file(full, tmp_path / "model.safetensors")
    save_file(ldm, tmp_path / "ae.safetensors")
    expected = dict(tree_flatten(vae.parameters()))
    for path in (tmp_path / "ae.safetensors", tmp_path / "model.safetensors"):
        other = dict(tree_flatten(VAE.from_pretrained(path, config=reference.VAE_CONFIG).parameters()))
        # Same keys, and every weight bit-identical: the two models compute the same outputs.
        assert other.keys() == expected.keys() and all(np.array_equal(other[k], expected[k]) for k in expected)
    # Without a config a single file is the FLUX.1 VAE: the tiny weights do not fit, and it says so.
    with pytest.raises(CheckpointError, match="do not fit"):
        VAE.from_pretrained(tmp_path / "ae.safetensors")


def test_sanitize_is_idempotent(vae, vae_dir):
    once = vae.sanitize(load_safetensors(vae_dir))
    twice = vae.sanitize(once)
    assert once.keys() == twice.keys() and all(np.array_equal(once[k], twice[k]) for k in once)
    assert once["encoder.conv_in.weight"].shape == (32, 3, 3, 3) and once["decoder.conv_in.weight"].shape == (64, 3, 3, 16)


def test_quant_convs_supported(tmp_path):
    cfg = dict(reference.VAE_CONFIG, block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1,
               latent_channels=4, use_quant_conv=True, use_post_quant_conv=True, shift_factor=None, scaling_factor=0.5,
               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    ref = reference.build_vae(tmp_path, config=cfg).eval()
    vae = VAE.from_pretrained(tmp_path)
    z = np.random.default_rng(4).standard_normal((1, 6, 10, 4)).astype(np.float32)
    x = IMAGES[:1, :12, :20]
    with torch.no_grad():
        ref_img = nhwc(ref.decode(nchw(z) / 0.5).sample)
        ref_mean = nhwc(ref.encode(nchw(x)).latent_dist.mean * 0.5)
    np.testing.assert_allclose(np.array(vae.decode(mx.array(z))), ref_img, atol=5e-5, rtol=0)
    np.testing.assert_allclose(np.array(vae.encode(mx.array(x))[0]), ref_mean, atol=2e-5, rtol=0)


def test_bfloat16_decode_error(vae_dir, vae):
    # bf16 weights and activations (GroupNorm statistics stay float32): measured mean |err| 0.011 and
    # max 0.06 against float32 on outputs of std 0.75-0.83; in pixels 0.85 levels of 255 on average, 7 at most.
    z = mx.array(LATENTS[:1, :4, :6])  # small: bfloat16 convolutions are slow on CPU
    ours = np.array(VAE.from_pretrained(vae_dir, dtype="bfloat16").decode(z))
    err = np.abs(ours - np.array(vae.decode(z)))
    assert err.mean() < 0.02 and err.max() < 0.15


def test_bad_inputs(vae, vae_dir, tmp_path):
    with pytest.raises(ValueError, match="channels-last"):
        vae.decode(mx.zeros((1, 16, 8, 8)))
    with pytest.raises(ValueError, match="at least 8"):
        vae.decode(mx.zeros((1, 8, 8, 16)), tile_size=4)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(mx.zeros((1, 60, 64, 3)))
    with pytest.raises(CheckpointError, match="neither"):
        VAE.from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="act_fn"):
        VAEArgs.from_dict({"act_fn": "gelu"})
    # Strict loading names a missing weight.
    weights = vae.sanitize(load_safetensors(vae_dir))
    weights.pop("decoder.conv_out.bias")
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        load_into(VAE(vae.args), weights, "VAE")


def test_auto_tile_size():
    assert auto_tile_size(64, 64) is None  # 512x512: whole on any device
    tile = auto_tile_size(256, 256)  # 2048x2048: always tiled
    assert tile is not None and 8 <= tile <= 128


def test_decode_evaluates_block_by_block(vae, monkeypatch):
    """kernels.cut after every ResNet block and upsampler: the decode's graph holds one block at a time."""
    calls = []
    real_eval = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a: (calls.append(len(a)), real_eval(*a))[1])
    np.array(vae.decode(mx.zeros((1, 8, 8, vae.args.latent_channels))))
    dec = vae.decoder
    n_blocks = len(dec.mid_block.resnets) + sum(len(b.resnets) + ("upsamplers" in b) for b in dec.up_blocks)
    assert len(calls) == n_blocks
