"""The MLX DiT against diffusers' ZImageTransformer2DModel on the same random weights and inputs."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from zimage_mlx import transformer as T
from zimage_mlx.transformer import ZImageTransformer
from zimage_mlx.weights import CheckpointError

# float32: both sides compute the same math in float32 with different summation orders (GEMM blocking,
# softmax, norms), so differences are rounding noise: ~1e-6 of the output's scale. 1e-4 of the
# reference's largest value leaves room for that and for deeper real models, yet a single wrong sign,
# order or offset anywhere produces errors of order 1e-1..1 of scale (see test_traps_are_caught).
FP32_REL_TOL = 1e-4
# bfloat16 (8-bit mantissa, ~4e-3 relative per rounding): measured max error over these cases is
# ~1.5e-2 of the output's scale after 6 blocks; 5e-2 bounds it while still failing on a real bug.
BF16_REL_TOL = 5e-2


@pytest.fixture(scope="module")
def torch_dit(reference_checkpoint):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel.from_pretrained(reference_checkpoint / "transformer", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def mlx_dit(reference_checkpoint):
    return ZImageTransformer.from_pretrained(reference_checkpoint / "transformer", dtype="float32")


def make_inputs(batch, h, w, cap_lens, t, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 16, h, w)).astype(np.float32)
    caps = [rng.standard_normal((n, 48)).astype(np.float32) for n in cap_lens]
    ts = np.full((batch,), t, dtype=np.float32) if np.isscalar(t) else np.asarray(t, np.float32)
    return x, caps, ts


def run_torch(model, x, caps, ts):
    with torch.no_grad():
        out = model(
            [torch.from_numpy(xi)[:, None] for xi in x], torch.from_numpy(ts), [torch.from_numpy(c) for c in caps],
            return_dict=False,
        )[0]
    return np.stack([o[:, 0].float().numpy() for o in out]).transpose(0, 2, 3, 1)  # (B, h, w, C)


def run_mlx(model, x, caps, ts):
    out = model(mx.array(x.transpose(0, 2, 3, 1)), mx.array(ts), [mx.array(c) for c in caps])
    return np.array(out.astype(mx.float32))


def rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


CASES = [
    # (batch, h, w, caption lengths, t)
    (1, 8, 8, [31], 0.5),  # 16 image tokens: padded to 32
    (1, 16, 16, [32], 0.0),  # 64 image tokens: a multiple of 32, no image padding
    (1, 6, 10, [1], 1.0),  # non-square, 15 tokens
    (1, 12, 8, [33], 0.5),  # non-square the other way, 24 tokens
    (1, 10, 14, [100], 0.25),  # 35 image tokens, long caption
    (2, 8, 12, [5, 40], [0.0, 0.7]),  # batch of two with different caption lengths (mask path)
    (2, 8, 8, [3, 20], 1.0),  # batch of two, same padded caption length (no mask)
]


@pytest.mark.parametrize("batch,h,w,cap_lens,t", CASES)
def test_parity_float32(torch_dit, mlx_dit, batch, h, w, cap_lens, t):
    x, caps, ts = make_inputs(batch, h, w, cap_lens, t)
    ref = run_torch(torch_dit, x, caps, ts)
    ours = run_mlx(mlx_dit, x, caps, ts)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < FP32_REL_TOL


def test_batch_equals_single(mlx_dit):
    x, caps, ts = make_inputs(2, 8, 12, [5, 40], [0.3, 0.3])
    both = run_mlx(mlx_dit, x, caps, ts)
    for i in range(2):
        one = run_mlx(mlx_dit, x[i : i + 1], caps[i : i + 1], ts[i : i + 1])
        np.testing.assert_allclose(both[i : i + 1], one, rtol=0, atol=1e-5 * np.abs(one).max())


def test_bf16_single_file_checkpoint(reference_transformer_bf16, torch_dit):
    """The bf16 single-file variant loads (no index) and stays within the measured bf16 bound."""
    assert not list(reference_transformer_bf16.glob("*.index.json"))
    model = ZImageTransformer.from_pretrained(reference_transformer_bf16, dtype="bfloat16")
    assert model.layers[0].attention.to_q.weight.dtype == mx.bfloat16
    errs = []
    for batch, h, w, cap_lens, t in CASES[:3] + CASES[5:6]:
        x, caps, ts = make_inputs(batch, h, w, cap_lens, t)
        ref = run_torch(torch_dit, x, caps, ts)
        out = model(mx.array(x.transpose(0, 2, 3, 1)), mx.array(ts), [mx.array(c) for c in caps])
        assert out.dtype == mx.bfloat16
        errs.append(rel_err(np.array(out.astype(mx.float32)), ref))
    assert max(errs) < BF16_REL_TOL, errs


def test_float32_weights_load_into_bf16_compute(reference_checkpoint):
    model = ZImageTransformer.from_pretrained(reference_checkpoint / "transformer", dtype="bfloat16")
    assert all(v.dtype == mx.bfloat16 for _, v in nn.utils.tree_flatten(model.parameters()))


def test_strict_loading(reference_checkpoint, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "transformer"
    shutil.copytree(reference_checkpoint / "transformer", folder)
    shard = sorted(folder.glob("*-00001-of-*.safetensors"))[0]
    tensors = load_file(shard)
    victim = sorted(tensors)[0]
    tensors["layers.0.attention.extra.weight"] = tensors.pop(victim)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="missing 1 key.*" + victim.replace(".", r"\.") + ".*unexpected"):
        ZImageTransformer.from_pretrained(folder)


def test_comfy_single_file_names_map_to_diffusers(reference_checkpoint):
    """ComfyUI's naming (fused qkv, out, q_norm, x_embedder, final_layer, prefix) sanitizes to the same weights."""
    from zimage_mlx.weights import load_safetensors

    weights = load_safetensors(reference_checkpoint / "transformer")
    comfy = {}
    for k, w in weights.items():
        k = k.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        k = k.replace(".to_out.0.", ".out.").replace(".norm_q.", ".q_norm.").replace(".norm_k.", ".k_norm.")
        comfy["model.diffusion_model." + k] = w[0] if k.endswith("pad_token") else w
    for k in [k for k in comfy if k.endswith(".attention.to_q.weight")]:
        base = k.removesuffix("to_q.weight")
        comfy[base + "qkv.weight"] = mx.concatenate([comfy.pop(base + n + ".weight") for n in ("to_q", "to_k", "to_v")])
    comfy["model.diffusion_model.norm_final.weight"] = mx.ones((96,))
    sanitized = ZImageTransformer.sanitize(comfy)
    assert set(sanitized) == set(weights)
    for k in weights:
        assert mx.array_equal(sanitized[k], weights[k]), k
    assert set(ZImageTransformer.sanitize(sanitized)) == set(weights)  # idempotent


def test_size_limits(mlx_dit):
    with pytest.raises(ValueError, match="too large"):
        mlx_dit.check_sizes(1026, 8, [10])
    with pytest.raises(ValueError, match="too long"):
        mlx_dit.check_sizes(8, 8, [1510])
    mlx_dit.check_sizes(1024, 1024, [1500])


# ---------------------------------------------------------------------------------------------
# Every DiT trap of model-spec section 11 is caught: flip it and parity fails by a wide margin.


def _rotate_half_rope(x, cos, sin):
    B, L, H, D = x.shape
    xf = x.astype(mx.float32)
    x0, x1 = xf[..., : D // 2], xf[..., D // 2 :]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return mx.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1).astype(x.dtype)


def _flux_patchify(x):  # (c, ph, pw) packing instead of (ph, pw, c)
    B, h, w, C = x.shape
    x = x.reshape(B, h // 2, 2, w // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(B, (h // 2) * (w // 2), 4 * C)


def _flux_unpatchify(tokens, h, w):
    B, _, P = tokens.shape
    C = P // 4
    x = tokens.reshape(B, h // 2, w // 2, C, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(B, h, w, C)


_ORIG_POSITIONS = ZImageTransformer.positions


def _unpadded_offset_positions(h, w, cap_len):
    pos = _ORIG_POSITIONS(h, w, cap_len)
    n_img = (h // 2) * (w // 2)
    pos[:n_img, 0] = cap_len + 1  # the trap: image t-position from the unpadded caption length
    return pos


def _mutate(name, model, monkeypatch):
    blocks = model.noise_refiner + model.context_refiner + model.layers
    mod_blocks = [b for b in blocks if "adaLN_modulation" in b]
    orig_mod = T.TransformerBlock.modulation
    orig_unpatchify = T.unpatchify
    orig_embed = T.timestep_embedding
    if name == "output sign":
        monkeypatch.setattr(T, "unpatchify", lambda tok, h, w: -orig_unpatchify(tok, h, w))
    elif name == "time convention (sigma instead of 1 - sigma)":
        monkeypatch.setattr(T, "timestep_embedding", lambda t, *a: orig_embed(1000.0 - t, *a))
    elif name == "modulation chunk order":
        monkeypatch.setattr(T.TransformerBlock, "modulation", lambda self, a: orig_mod(self, a)[::-1])
    elif name == "SiLU before block adaLN":
        monkeypatch.setattr(T.TransformerBlock, "modulation", lambda self, a: orig_mod(self, nn.silu(a)))
    elif name == "no SiLU in final layer":
        model.all_final_layer["2-1"].adaLN_modulation[0] = nn.Identity()
    elif name == "no 1 + scale":
        monkeypatch.setattr(T.TransformerBlock, "modulation", lambda self, a: [m - (i % 2 == 0) for i, m in enumerate(orig_mod(self, a))])
    elif name == "no sandwich post-norm":
        for b in blocks:
            b.attention_norm2 = nn.Identity()
    elif name == "rotate-half RoPE":
        monkeypatch.setattr(T, "apply_rope", _rotate_half_rope)
    elif name == "FLUX patch channel order":
        monkeypatch.setattr(T, "patchify", _flux_patchify)
        monkeypatch.setattr(T, "unpatchify", _flux_unpatchify)
    elif name == "unpadded caption position offset":
        monkeypatch.setattr(ZImageTransformer, "positions", staticmethod(_unpadded_offset_positions))
    elif name == "pad tokens not substituted (zeros)":
        model.x_pad_token = mx.zeros_like(model.x_pad_token)
        model.cap_pad_token = mx.zeros_like(model.cap_pad_token)
    elif name == "no padding to 32 (pad tokens never attended)":
        monkeypatch.setattr(T, "padded", lambda n: n)
    else:
        raise AssertionError(name)
    assert mod_blocks


TRAPS = [
    "output sign",
    "time convention (sigma instead of 1 - sigma)",
    "modulation chunk order",
    "SiLU before block adaLN",
    "no SiLU in final layer",
    "no 1 + scale",
    "no sandwich post-norm",
    "rotate-half RoPE",
    "FLUX patch channel order",
    "unpadded caption position offset",
    "pad tokens not substituted (zeros)",
    "no padding to 32 (pad tokens never attended)",
]


@pytest.mark.parametrize("trap", TRAPS)
def test_traps_are_caught(trap, reference_checkpoint, torch_dit, monkeypatch):
    # 15 image tokens and a 7-token caption: both padded; t = 0.3 so that sigma != 1 - sigma.
    x, caps, ts = make_inputs(1, 6, 10, [7], 0.3, seed=3)
    ref = run_torch(torch_dit, x, caps, ts)
    model = ZImageTransformer.from_pretrained(reference_checkpoint / "transformer")
    assert rel_err(run_mlx(model, x, caps, ts), ref) < FP32_REL_TOL  # unmutated: parity holds
    _mutate(trap, model, monkeypatch)
    assert rel_err(run_mlx(model, x, caps, ts), ref) > 100 * FP32_REL_TOL


@pytest.mark.parametrize("batch,h,w,cap_lens,t", [CASES[0], CASES[5]])
def test_parity_float32_generic_kernels(torch_dit, mlx_dit, batch, h, w, cap_lens, t, monkeypatch):
    """The path Apple GPUs take (mx.fast attention, nn.silu), forced on the CPU, matches the reference too."""
    from zimage_mlx import kernels

    monkeypatch.setattr(kernels, "FAST_CPU_PATH", False)
    x, caps, ts = make_inputs(batch, h, w, cap_lens, t)
    assert rel_err(run_mlx(mlx_dit, x, caps, ts), run_torch(torch_dit, x, caps, ts)) < FP32_REL_TOL


def test_bfloat16_stays_bfloat16_through_every_block(reference_transformer_bf16, monkeypatch):
    """No silent float32 promotion: what leaves each block, attention and FFN is bfloat16 (RoPE and the
    timestep embedding compute in float32 inside, as the reference does, and cast back)."""
    model = ZImageTransformer.from_pretrained(reference_transformer_bf16, dtype="bfloat16")
    seen = []
    for cls in (T.TransformerBlock, T.Attention, T.FeedForward, T.FinalLayer):
        def wrapped(self, *a, _orig=cls.__call__, _name=cls.__name__, **k):
            out = _orig(self, *a, **k)
            seen.append((_name, out.dtype))
            return out
        monkeypatch.setattr(cls, "__call__", wrapped)
    for batch, h, w, cap_lens, t in (CASES[0], CASES[5]):
        x, caps, ts = make_inputs(batch, h, w, cap_lens, t)
        model(mx.array(x.transpose(0, 2, 3, 1)), mx.array(ts), [mx.array(c) for c in caps])
    names = {n for n, _ in seen}
    assert names == {"TransformerBlock", "Attention", "FeedForward", "FinalLayer"}
    assert all(d == mx.bfloat16 for _, d in seen), [s for s in seen if s[1] != mx.bfloat16]


def test_each_block_is_evaluated_before_the_next_is_built(mlx_dit, monkeypatch):
    """kernels.cut (an mx.eval) after every noise-refiner and main block: a step's graph then holds one
    block's activations (benchmarks/dit_peak_probe.py)."""
    from zimage_mlx import kernels

    calls = []
    real_eval = mx.eval
    monkeypatch.setattr(kernels.mx, "eval", lambda *a: (calls.append(len(a)), real_eval(*a))[1])
    x, caps, ts = make_inputs(*CASES[0])
    run_mlx(mlx_dit, x, caps, ts)
    a = mlx_dit.args
    assert len(calls) == a.n_refiner_layers + a.n_layers

    calls.clear()
    monkeypatch.setattr(kernels, "CUT_GRAPHS", False)
    run_mlx(mlx_dit, x, caps, ts)
    assert calls == []


def test_compiled_forward_matches_plain(mlx_dit):
    """Under mx.compile the cuts step aside (nothing may be evaluated while tracing) and the result holds."""
    x, caps, ts = make_inputs(*CASES[0])
    xm, tm, cm = mx.array(x.transpose(0, 2, 3, 1)), mx.array(ts), [mx.array(c) for c in caps]
    compiled = mx.compile(lambda x, t, c: mlx_dit(x, t, [c]))
    np.testing.assert_allclose(np.array(compiled(xm, tm, cm[0])), np.array(mlx_dit(xm, tm, cm)), rtol=1e-5, atol=1e-5)
