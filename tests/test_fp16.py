"""float16 that never overflows (issue 18): the scaled graph, the per-step guard and bfloat16 redo, the
checkpoint statistics and dtype="auto", on stress checkpoints (shared/docs/fp16.md 5.1).

The stress checkpoints are diffusers' ZImageTransformer2DModel with random weights whose modulated blocks'
pre-norm weights are inflated (reference.stress_): their SwiGLU product reaches 1e5 and more, as the release's
does (284,507, fp16.md 1.2). The float32 forward is the reference: it is checked against diffusers in
test_transformer.py, and here the float16 graph must equal it in real arithmetic.
"""

from __future__ import annotations

import re
import shutil
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

import reference
from zimage_mlx import fp16, kernels
from zimage_mlx import transformer as T
from zimage_mlx.fp16 import Float16OverflowWarning
from zimage_mlx.transformer import ZImageTransformer

# Narrow: 3 heads of 128 (the release's head size), all three kinds of block twice.
NARROW = dict(reference.TRANSFORMER_CONFIG, dim=384, n_heads=3, n_kv_heads=3, axes_dims=[32, 48, 48])
# Wide: the release's GEMM shapes cost ~100 s per forward pair on this 2-core CPU at dim 3840, so the test runs
# dim 1280 (10 heads of 128, FFN 3413); benchmarks/fp16_error.py measures dim 3840 (benchmarks/README.md).
WIDE = dict(reference.WIDE_TRANSFORMER_CONFIG, dim=1280, n_heads=10, n_kv_heads=10)
STRESS = dict(ffn=100.0, attention=100.0)  # SwiGLU product ~1.4e5 (measured below), FFN output ~4e4
# float16 keeps 11 significant bits (2^-11 = 4.9e-4 per rounding); the errors of a few blocks add up to a
# few 1e-4 (measured: 5.7e-4 at dim 3840, 6.9e-4 at dim 384 with six blocks), and bfloat16 is ~1e-2.
FP16_REL_L2 = 1e-3


def inputs(h=8, w=8, cap_len=8, t=0.5, seed=0, cap_dim=48):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((1, h, w, 16)).astype(np.float32))
    caps = [mx.array(rng.standard_normal((cap_len, cap_dim)).astype(np.float32))]
    return x, mx.array([t], dtype=mx.float32), caps


def forward(model, *args, **kw):
    return np.array(model(*args, **kw).astype(mx.float32))


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def narrow_stress(tmp_path_factory):
    return reference.build_stress_transformer(tmp_path_factory.mktemp("stress") / "transformer", config=NARROW, **STRESS)


@pytest.fixture(scope="module")
def narrow_fp32(narrow_stress):
    return ZImageTransformer.from_pretrained(narrow_stress, dtype="float32")


def probe_products(monkeypatch) -> list[float]:
    """Record max |silu(w1 x) * w3 x| of every plain-graph FFN (the float32 reference's)."""
    seen, orig = [], kernels.silu_mul

    def silu_mul(a, b):
        out = orig(a, b)
        seen.append(float(mx.abs(out).max().item()))
        return out

    monkeypatch.setattr(kernels, "silu_mul", silu_mul)
    return seen


def test_naive_float16_overflows_on_the_stress_checkpoint(narrow_stress, narrow_fp32, monkeypatch):
    """Negative control: the stress is real. In float32 the SwiGLU product passes float16's 65,504, and the
    plain graph in float16 (what dtype="float16" ran before) gives non-finite output; the scaled one does not."""
    products = probe_products(monkeypatch)
    ref = forward(narrow_fp32, *inputs())
    monkeypatch.undo()
    assert max(products) > 65504 and np.isfinite(ref).all()
    naive = ZImageTransformer.from_pretrained(narrow_stress, dtype="float16")
    naive.graph = "plain"
    assert not np.isfinite(forward(naive, *inputs())).all()
    naive.graph = "auto"  # float16 weights: the scaled graph
    out = forward(naive, *inputs())
    assert np.isfinite(out).all() and rel_l2(out, ref) <= FP16_REL_L2


def test_scaled_float16_is_finite_and_accurate_on_the_wide_preset(tmp_path, monkeypatch):
    folder = reference.build_stress_transformer(tmp_path / "transformer", config=WIDE, **STRESS)
    args = inputs(8, 8, 8)
    products = probe_products(monkeypatch)
    ref = forward(ZImageTransformer.from_pretrained(folder, dtype="float32"), *args)
    monkeypatch.undo()
    assert max(products) > 65504  # the plain float16 graph would store inf here
    model = ZImageTransformer.from_pretrained(folder, dtype="float16")
    assert model.scaled
    out = forward(model, *args)
    assert np.isfinite(out).all()
    assert rel_l2(out, ref) <= FP16_REL_L2, rel_l2(out, ref)


@pytest.mark.parametrize("which", ["reference", "stress"])
def test_scaled_graph_equals_plain_graph_in_float32(which, reference_checkpoint, narrow_stress, narrow_fp32,
                                                    monkeypatch):
    """The constants are exact: the scaled graph run in float32 is the plain graph. Powers of two only move
    exponents and the post-norms' epsilon is compensated, so the difference is float32 rounding at most.
    Without the epsilon compensation the same check fails (the test can tell)."""
    if which == "reference":
        model = ZImageTransformer.from_pretrained(reference_checkpoint / "transformer", dtype="float32")
        args = inputs(6, 10, 7, t=0.3)
    else:
        model, args = narrow_fp32, inputs()
    plain = forward(model, *args)
    model.graph = "scaled"
    try:
        scaled = forward(model, *args)
        assert rel_l2(scaled, plain) <= 1e-6
        monkeypatch.setattr(T, "_norm_scaled", lambda norm, h, c: mx.fast.rms_norm(h, norm.weight, norm.eps))
        assert rel_l2(forward(model, *args), plain) > 1e-6
    finally:
        model.graph = "auto"


def test_every_linear_output_is_float16_and_the_residual_float32(narrow_stress, monkeypatch):
    """No silent float32 promotion: every token-width GEMM writes float16 (bfloat16 in a redone step), the
    timestep MLP and the modulation linears compute in float32 by design, and every block takes and returns
    the float32 residual stream."""
    model = ZImageTransformer.from_pretrained(narrow_stress, dtype="float16")
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    seen, blocks = [], []
    orig_call, orig_linear, orig_block = nn.Linear.__call__, T._linear, T.TransformerBlock.__call__

    def linear_call(self, x):
        out = orig_call(self, x)
        seen.append((names[id(self)], out.dtype))
        return out

    def linear(layer, x):
        out = orig_linear(layer, x)
        if layer.weight.dtype != x.dtype:  # the bfloat16 redo bypasses Linear.__call__
            seen.append((names[id(layer)], out.dtype))
        return out

    def block(self, x, *a, **k):
        out = orig_block(self, x, *a, **k)
        blocks.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(nn.Linear, "__call__", linear_call)
    monkeypatch.setattr(T, "_linear", linear)
    monkeypatch.setattr(T.TransformerBlock, "__call__", block)
    for activations, dtype in ((None, mx.float16), (mx.bfloat16, mx.bfloat16)):
        seen.clear(), blocks.clear()
        model(*inputs(), activations=activations)
        assert {n for n, _ in seen} == set(names.values())  # every Linear ran
        for name, d in seen:
            modulation = "adaLN_modulation" in name or name.startswith("t_embedder")
            assert d == (mx.float32 if modulation else dtype), (name, d)
        assert len(blocks) == 6 and all(b == (mx.float32, mx.float32) for b in blocks), blocks


def test_quantized_float16_and_its_bfloat16_redo(reference_checkpoint):
    """8-bit layers with float16 scales run the scaled graph too, and the bfloat16 redo casts their scales."""
    folder = reference_checkpoint / "transformer"
    args = inputs(6, 10, 7, t=0.3)
    ref = forward(ZImageTransformer.from_pretrained(folder, dtype="float32"), *args)
    model = ZImageTransformer.from_pretrained(folder, dtype="float16", quantize=8)
    assert model.layers[0].feed_forward.w2.scales.dtype == mx.float16 and model.scaled  # w2: in 256
    out = forward(model, *args)
    redo = forward(model, *args, activations=mx.bfloat16)
    # 8-bit weights: ~4e-3 of rel L2 on this checkpoint; bfloat16 activations: ~1e-2 more.
    assert rel_l2(out, ref) < 1e-2, rel_l2(out, ref)
    assert rel_l2(redo, out) < 3e-2, rel_l2(redo, out)


# ---------------------------------------------------------------------------------------------
# The pipeline: a step that overflows even the scaled graph is redone in bfloat16


@pytest.fixture(scope="module")
def overflow_checkpoint(reference_checkpoint, tmp_path_factory):
    """The reference checkpoint with a DiT stressed until even the scaled product overflows float16:
    ffn x1000 makes the product ~1e7, 1e7 / 32 > 65,504."""
    root = tmp_path_factory.mktemp("overflow") / "ckpt"
    shutil.copytree(reference_checkpoint, root, ignore=shutil.ignore_patterns("transformer"))
    reference.build_stress_transformer(root / "transformer", ffn=1000.0, attention=1.0)
    return root


def test_overflowing_step_is_redone_in_bfloat16_with_one_warning(overflow_checkpoint, monkeypatch):
    from zimage_mlx.pipeline import ZImagePipeline

    with pytest.warns(Float16OverflowWarning, match="std of layers.0.ffn_norm1 is .* >= 0.42"):
        pipe = ZImagePipeline.from_pretrained(overflow_checkpoint, dtype="float16", low_memory=True)
    assert pipe.transformer.scaled and pipe.reason.startswith("float16 (requested); the checkpoint fails")
    calls, orig = [], ZImageTransformer.__call__

    def recording(self, x, t, caps, activations=None):
        out = orig(self, x, t, caps, activations=activations)
        calls.append((activations, bool(mx.isfinite(out).all().item())))
        return out

    monkeypatch.setattr(ZImageTransformer, "__call__", recording)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = pipe.generate("a red fox", width=64, height=64, steps=3, seed=1)[0]
    overflow = [w for w in caught if issubclass(w.category, Float16OverflowWarning)]
    assert len(overflow) == 1 and "step 1 of 3" in str(overflow[0].message)
    # Step 1 in float16 overflows, is redone in bfloat16; steps 2 and 3 go straight to bfloat16.
    assert calls == [(None, False), (mx.bfloat16, True), (mx.bfloat16, True), (mx.bfloat16, True)]
    pixels = np.asarray(image, dtype=np.float32)
    assert np.isfinite(pixels).all() and pixels.std() > 1  # a real image, not a black one


def test_stressed_checkpoint_needs_no_redo(reference_checkpoint, tmp_path, dit_forwards):
    """At the release's magnitudes (product ~1e5) the scaled graph holds: no warning, one forward per step."""
    from zimage_mlx.pipeline import ZImagePipeline

    root = tmp_path / "ckpt"
    shutil.copytree(reference_checkpoint, root, ignore=shutil.ignore_patterns("transformer"))
    reference.build_stress_transformer(root / "transformer", **STRESS)
    with pytest.warns(Float16OverflowWarning, match="requested"):  # x100 norm weights fail ComfyUI's std gate
        pipe = ZImagePipeline.from_pretrained(root, dtype="float16", low_memory=True)
    calls = dit_forwards()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Float16OverflowWarning)
        image = pipe.generate("a red fox", width=64, height=64, steps=2, seed=1)[0]
    assert len(calls) == 2 and np.asarray(image).std() > 1


# ---------------------------------------------------------------------------------------------
# Statistics, the float16 gate, dtype="auto"


def torch_linear_weights(folder):
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel.from_pretrained(folder, dtype=torch.float32)
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}, model.state_dict()


def test_statistics_match_the_reference_stack(reference_checkpoint, narrow_stress):
    """max |w| over every Linear, the small-weight fraction and ComfyUI's gate statistic
    (torch.std(..., unbiased=False) of layers.{n-2}.ffn_norm1.weight), computed with torch on diffusers' model."""
    for folder, passes in ((reference_checkpoint / "transformer", True), (narrow_stress, False)):
        model = ZImageTransformer.from_pretrained(folder, dtype="float16")
        stats = model.fp16_stats
        linears, sd = torch_linear_weights(folder)
        assert set(fp16.linear_names(model.args)) == set(linears)  # the statistics see every Linear
        w_max = max(float(w.abs().max()) for w in linears.values())
        np.testing.assert_allclose(stats["max_abs_weight"], w_max, rtol=1e-3)  # the float16 cast: 2^-11
        small = sum(int(((w.abs() < 2**-14) & (w != 0)).sum()) for w in linears.values())
        total = sum(w.numel() for w in linears.values())
        assert abs(stats["small_weight_fraction"] - small / total) <= 1e-3 * small / total + 1e-7
        key = f"layers.{model.args.n_layers - 2}.ffn_norm1.weight"
        assert stats["ffn_norm1_std_key"] == key
        np.testing.assert_allclose(stats["ffn_norm1_std"], float(torch.std(sd[key], unbiased=False)), rtol=2e-3)
        assert fp16.verdict(stats)[0] is passes
        assert set(stats["layers"]) == {f"{p}.{i}" for p in ("noise_refiner", "context_refiner", "layers") for i in range(2)}


def test_statistics_bound_the_measured_activations(narrow_stress, narrow_fp32, monkeypatch):
    """The per-block bounds are worst cases: the float32 forward's SwiGLU products stay below them."""
    stats = ZImageTransformer.from_pretrained(narrow_stress, dtype="float16").fp16_stats
    products = probe_products(monkeypatch)
    forward(narrow_fp32, *inputs())
    bound = max(v["product"] for v in stats["layers"].values())
    assert max(products) <= bound


def test_gate_and_auto_dtype():
    passing = {"max_abs_weight": 14.0, "max_abs_weight_layer": "layers.6.feed_forward.w2", "ffn_norm1_std": 0.3,
               "ffn_norm1_std_key": "layers.28.ffn_norm1.weight"}
    base = dict(passing, ffn_norm1_std=0.42)  # the gate is strict: ComfyUI's std < 0.42
    huge = dict(passing, max_abs_weight=70000.0)
    assert fp16.verdict(passing)[0] and not fp16.verdict(base)[0] and not fp16.verdict(huge)[0]
    assert not fp16.verdict(dict(passing, max_abs_weight="inf"))[0]

    m1, m3 = ("Apple M1 Pro", "applegpu_g13s"), ("Apple M3 Max", "applegpu_g15s")
    assert fp16.is_m1_or_m2(*m1) and fp16.is_m1_or_m2("Apple M2") and fp16.is_m1_or_m2("", "applegpu_g14g")
    assert not fp16.is_m1_or_m2(*m3) and not fp16.is_m1_or_m2("Apple M4", "applegpu_g16s")
    assert not fp16.is_m1_or_m2("NVIDIA H200") and not fp16.is_m1_or_m2("Apple M12")
    c = fp16.choose_dtype("auto", passing, gpu=m1)
    assert c.dtype == "float16" and not c.pending and "M1 Pro" in c.reason
    c = fp16.choose_dtype("auto", base, gpu=m1)
    assert c.dtype == "bfloat16" and "0.42" in c.reason
    assert fp16.choose_dtype("auto", None, gpu=m1).pending
    assert fp16.choose_dtype("auto", passing, gpu=m3).dtype == "bfloat16"
    assert fp16.choose_dtype("float16", base, gpu=m3).dtype == "float16"  # asked for: honoured
    assert fp16.choose_dtype("auto", passing, gpu=None).dtype == "float32"  # this CPU
    assert fp16.gpu_name() is None  # the CPU is never float16


def test_auto_on_cpu_is_float32_and_says_why(reference_checkpoint, tmp_path):
    from click.testing import CliRunner

    from zimage_mlx import cli
    from zimage_mlx.pipeline import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(reference_checkpoint, low_memory=True)
    assert pipe.dtype == "float32" and "CPU" in pipe.reason
    args = ["generate", "a cat", "-m", str(reference_checkpoint), "--size", "32", "--steps", "1", "--seed", "1"]
    r = CliRunner().invoke(cli.main, args + ["--verbose", "-o", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    assert f"Dtype: {pipe.reason}" in r.stderr
    r = CliRunner().invoke(cli.main, args + ["-o", str(tmp_path / "b.png")])
    assert r.exit_code == 0 and "Dtype:" not in r.stderr


def test_convert_stores_the_statistics(reference_checkpoint, tmp_path):
    import json

    from zimage_mlx.convert import convert

    convert(reference_checkpoint, tmp_path / "out", dtype="float16", quantize=8)
    config = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    loaded = ZImageTransformer.from_pretrained(reference_checkpoint / "transformer", dtype="float16").fp16_stats
    stored = fp16.stored(config)
    assert stored is not None and fp16.verdict(stored)[0]
    np.testing.assert_allclose(stored["max_abs_weight"], loaded["max_abs_weight"], rtol=1e-3)
    np.testing.assert_allclose(stored["ffn_norm1_std"], loaded["ffn_norm1_std"], rtol=1e-3)
    for block, bounds in loaded["layers"].items():
        for k, v in bounds.items():
            np.testing.assert_allclose(stored["layers"][block][k], v, rtol=1e-2, err_msg=f"{block} {k}")
    # A folder with stored statistics is not read twice at load: they come from config.json.
    assert ZImageTransformer.from_pretrained(tmp_path / "out" / "transformer", dtype="float16").fp16_stats == stored


def test_lora_on_float16_weights_is_rechecked(reference_checkpoint):
    """A LoRA that would push a merged weight past float16's range is refused before anything changes; one that
    fits updates the statistics."""
    from zimage_mlx.lora import LoraError, map_lora
    from zimage_mlx.pipeline import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float16", low_memory=True)
    layer = pipe.transformer.layers[0].feed_forward.w2
    before, stats = layer.weight, pipe.transformer.fp16_stats
    rng = np.random.default_rng(0)
    down = mx.array(rng.standard_normal((4, layer.weight.shape[1])).astype(np.float32))
    up = mx.array(rng.standard_normal((layer.weight.shape[0], 4)).astype(np.float32))
    lora = map_lora({"layers.0.feed_forward.w2.lora_A.weight": down, "layers.0.feed_forward.w2.lora_B.weight": up})
    with pytest.raises(LoraError, match="beyond float16"):
        pipe.load_lora(lora, scale=1e5)
    assert pipe.transformer.layers[0].feed_forward.w2.weight is before and pipe.loras == []
    pipe.load_lora(lora, scale=10.0)
    after = pipe.transformer.fp16_stats
    assert after is not stats and after["max_abs_weight"] > stats["max_abs_weight"]
    merged = float(mx.abs(pipe.transformer.layers[0].feed_forward.w2.weight.astype(mx.float32)).max().item())
    assert after["max_abs_weight"] == pytest.approx(max(merged, stats["max_abs_weight"]), rel=1e-3)
    # Beside the layers (what the CLI does): the same effective weights are checked, and the step runs in float16.
    pipe.unload_loras()
    pipe.load_lora(lora, scale=10.0, fuse=False)
    beside = pipe.transformer.fp16_stats["max_abs_weight"]
    assert beside == pytest.approx(after["max_abs_weight"], rel=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Float16OverflowWarning)
        image = pipe.generate("a cat", width=32, height=32, steps=1, seed=0)[0]
    assert np.asarray(image).std() > 1


def test_auto_on_an_m1_judges_the_checkpoint_at_load(reference_checkpoint, overflow_checkpoint, monkeypatch):
    """On an M1 (faked: this is a CPU) auto loads float16 and keeps it when the statistics computed at load
    pass; a checkpoint that fails them (std of the ffn_norm1 weights far above 0.42) is loaded in bfloat16."""
    from zimage_mlx.pipeline import ZImagePipeline

    monkeypatch.setattr(fp16, "gpu_name", lambda: ("Apple M1", "applegpu_g13g"))
    pipe = ZImagePipeline.from_pretrained(reference_checkpoint, low_memory=True)
    assert pipe.dtype == "float16" and pipe.transformer.dtype == mx.float16 and pipe.transformer.scaled
    assert pipe.reason.startswith("float16: Apple M1 has no native bfloat16 and the checkpoint passes")
    pipe = ZImagePipeline.from_pretrained(overflow_checkpoint, low_memory=True)
    assert pipe.dtype == "bfloat16" and pipe.transformer.dtype == mx.bfloat16 and not pipe.transformer.scaled
    assert "would run float16 faster, but std of layers.0.ffn_norm1" in pipe.reason


def test_cli_shows_the_overflow_as_one_warning_line(overflow_checkpoint, tmp_path):
    from click.testing import CliRunner

    from zimage_mlx import cli

    out = tmp_path / "fox.png"
    r = CliRunner().invoke(cli.main, ["generate", "a fox", "-m", str(overflow_checkpoint), "--size", "32", "--steps",
                                      "2", "--seed", "3", "--dtype", "float16", "--verbose", "-o", str(out)])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if "overflowed float16" in line]
    assert lines == ["Warning: step 1 of 2 overflowed float16; it and the remaining steps run in bfloat16 "
                     "(dtype='bfloat16' avoids the retry)"]
    assert "Dtype: float16 (requested); the checkpoint fails the float16 checks" in r.stderr
    requested = [line for line in r.stderr.splitlines() if "float16 was requested" in line]
    assert len(requested) == 1
    assert re.fullmatch(r"Warning: float16 was requested but std of layers\.0\.ffn_norm1 is [\d.]+ >= 0\.42 .*"
                        r"expect steps redone in bfloat16 \(dtype='bfloat16' avoids the retries\)", requested[0])
    assert np.asarray(__import__("PIL.Image").Image.open(out)).std() > 1
