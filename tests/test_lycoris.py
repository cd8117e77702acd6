"""LoKr, LoHa, DoRA, PEFT's LoKr/LoHa and DiffSynth LoRAs against diffusers with the update added by hand.

diffusers cannot load LyCORIS files for Z-Image, so the reference is built here from the published formulas
(shared/docs/formats.md): each test writes random factors over every Linear layer of the tiny reference DiT in
one naming convention, computes the update of every layer in torch, adds it to diffusers' weights, and compares
32x32 two-step images made from the same latents.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch

import reference
from test_lora import (LATENTS, PROMPT, SIZE, assert_same_weights, attention_blocks, dequantize, ours, quantize,
                       snapshot)
from zimage_mlx import ZImagePipeline
from zimage_mlx import lora as lora_mod
from zimage_mlx.lora import LoraLinear, LoraWarning, layer_dims, linear_layers

AI_TOOLKIT_ALPHA = 9999220736.0  # what ai-toolkit stores for a full-rank LoKr (bf16): must be ignored


@pytest.fixture(scope="module")
def pipe(reference_checkpoint):
    return ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32")


@pytest.fixture(autouse=True)
def no_lora_left(request):
    yield
    if "pipe" in request.fixturenames:
        request.getfixturevalue("pipe").unload_loras()


@pytest.fixture(scope="module")
def dims(pipe):
    return {name: layer_dims(m) for name, m in linear_layers(pipe.transformer).items()}


@pytest.fixture(scope="module")
def base_image(pipe):
    return ours(pipe)


@pytest.fixture(scope="module")
def ref(reference_checkpoint):
    return reference.load_reference_pipeline(reference_checkpoint)


def weights(ref) -> dict[str, torch.Tensor]:
    return {k.removesuffix(".weight"): v.detach().clone() for k, v in ref.transformer.state_dict().items()}


def theirs(ref, deltas: dict[str, torch.Tensor]) -> np.ndarray:
    """diffusers' image with each layer's weight plus its delta (then put back)."""
    params = dict(ref.transformer.named_parameters())
    saved = {n: params[f"{n}.weight"].detach().clone() for n in deltas}
    with torch.no_grad():
        for n, d in deltas.items():
            params[f"{n}.weight"].add_(d)
        try:
            image = ref(prompt=PROMPT, latents=torch.from_numpy(LATENTS), num_inference_steps=2, guidance_scale=0.0,
                        **SIZE).images[0]
        finally:
            for n, w in saved.items():
                params[f"{n}.weight"].copy_(w)
    return np.asarray(image, dtype=np.int16)


# ----------------------------------------------------------------------------------------------
# Kinds: random factors for one module of shape (out, in) and their update, from the formulas


def split(n: int) -> tuple[int, int]:
    """n = a * b with a the largest divisor not above sqrt(n) (LyCORIS' factorization, roughly)."""
    a = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return a, n // a


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def target_std(i: int) -> float:
    return 0.6 / math.sqrt(i)  # as big as test_lora.py's rank-4 LoRAs: tens of levels on the image


def lokr(shape, g, W, *, full: bool, peft=None):
    """LoKr: w1 full (or factored on odd seeds) and w2 factored with an alpha, or both full with ai-toolkit's alpha.
    peft: (r, alpha) of a PEFT adapter (no alpha tensor; scale alpha / r even with full halves)."""
    (p, q), (r, s) = split(shape[0]), split(shape[1])
    parts = {"lokr_w1": g.standard_normal((p, r))}
    if full:
        parts["lokr_w2"] = g.standard_normal((q, s))
        w2, scale = t(parts["lokr_w2"]), 1.0
        if peft is None:
            parts["alpha"] = torch.tensor(AI_TOOLKIT_ALPHA, dtype=torch.bfloat16)
    else:
        if g.integers(2) and peft is None:  # w1 factored too, at another rank: the scale takes w2_b's
            a = parts.pop("lokr_w1")
            parts["lokr_w1_a"], parts["lokr_w1_b"] = a[:, :2], g.standard_normal((2, r))
        parts["lokr_w2_a"], parts["lokr_w2_b"] = g.standard_normal((q, 4)), g.standard_normal((4, s))
        w2 = t(parts["lokr_w2_a"]) @ t(parts["lokr_w2_b"])
        alpha = float(g.integers(1, 9))
        scale = alpha / 4
        if peft is None:
            parts["alpha"] = np.array(alpha, np.float32)
    if peft is not None:
        scale = peft[1] / peft[0]
    w1 = t(parts["lokr_w1"]) if "lokr_w1" in parts else t(parts["lokr_w1_a"]) @ t(parts["lokr_w1_b"])
    c = target_std(shape[1]) / float(torch.kron(w1, w2).std()) / scale
    key = "lokr_w2" if full else "lokr_w2_b"
    parts[key] = (parts[key] * c).astype(np.float32)
    return parts, scale * torch.kron(w1, w2 * c)


def loha(shape, g, W, *, peft=None):
    o, i = shape
    parts = {"hada_w1_a": g.standard_normal((o, 4)), "hada_w1_b": g.standard_normal((4, i)),
             "hada_w2_a": g.standard_normal((o, 4)), "hada_w2_b": g.standard_normal((4, i))}
    alpha = float(g.integers(1, 9))
    scale = alpha / 4 if peft is None else peft[1] / peft[0]
    if peft is None:
        parts["alpha"] = np.array(alpha, np.float32)
    w1 = t(parts["hada_w1_a"]) @ t(parts["hada_w1_b"])
    w2 = t(parts["hada_w2_a"]) @ t(parts["hada_w2_b"])
    c = target_std(i) / float((w1 * w2).std()) / scale
    parts["hada_w2_a"] = (parts["hada_w2_a"] * c).astype(np.float32)
    return parts, scale * w1 * (t(parts["hada_w2_a"]) @ t(parts["hada_w2_b"]))


def dora(shape, g, W, *, rows: bool):
    """A kohya-style LoRA with a LyCORIS dora_scale: magnitudes per output row or per input column."""
    o, i = shape
    down = (g.standard_normal((4, i)) / math.sqrt(i)).astype(np.float32)
    up = (g.standard_normal((o, 4)) * 0.3).astype(np.float32)
    alpha = float(g.integers(1, 9))
    merged = W + alpha / 4 * (t(up) @ t(down))
    axis = 1 if rows else 0
    norm = merged.norm(dim=axis, keepdim=True)
    m = (norm * t(g.uniform(0.7, 1.3, norm.shape))).numpy()
    parts = {"lora_down.weight": down, "lora_up.weight": up, "alpha": np.array(alpha, np.float32), "dora_scale": m}
    return parts, t(m) * merged / (norm + torch.finfo(torch.float32).eps) - W


KINDS = {
    "LoKr full (ai-toolkit alpha ignored)": lambda shape, g, W, n: lokr(shape, g, W, full=True),
    "LoKr factored + alpha": lambda shape, g, W, n: lokr(shape, g, W, full=False),
    "LoHa": lambda shape, g, W, n: loha(shape, g, W),
    # per output row on even modules and the fused qkv (whose columns span three layers), per input column on odd
    "DoRA": lambda shape, g, W, n: dora(shape, g, W, rows=n == "qkv" or n % 2 == 0),
}


# ----------------------------------------------------------------------------------------------
# Namings: (module name in the file, the diffusers layers it covers)

COMFY = {"all_x_embedder.2-1": "x_embedder", "all_final_layer.2-1.linear": "final_layer.linear",
         "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1"}


def modules(naming: str, dims) -> list[tuple[str, list[str]]]:
    if naming == "ComfyUI fused qkv/out":
        out = []
        for blk in attention_blocks(dims):
            out.append((f"diffusion_model.{blk}.attention.qkv", [f"{blk}.attention.to_{p}" for p in "qkv"]))
        for n in dims:
            if ".attention.to_" in n and not n.endswith("to_out.0"):
                continue
            out.append(("diffusion_model." + COMFY.get(n, n.replace(".attention.to_out.0", ".attention.out")), [n]))
        return out
    prefix = {"ai-toolkit diffusion_model.": "diffusion_model.", "transformer.": "transformer.", "bare": ""}
    if naming == "SimpleTuner lycoris_":
        return [("lycoris_" + n.replace(".", "_"), [n]) for n in dims]
    return [(prefix[naming] + n, [n]) for n in dims]


NAMINGS = ("ai-toolkit diffusion_model.", "transformer.", "bare", "SimpleTuner lycoris_", "ComfyUI fused qkv/out")


def build(kind, naming, dims, W, seed, key=lambda module, role: f"{module}.{role}"):
    """(file tensors, expected delta per diffusers layer)."""
    g = np.random.default_rng(seed)
    tensors, deltas = {}, {}
    for j, (module, names) in enumerate(modules(naming, dims)):
        shape = (sum(dims[n][0] for n in names), dims[names[0]][1])
        w = torch.cat([W[n] for n in names])
        parts, delta = KINDS[kind](shape, g, w, "qkv" if len(names) > 1 else j)
        for role, v in parts.items():
            tensors[key(module, role)] = v
        for n, d in zip(names, torch.split(delta, [dims[n][0] for n in names])):
            deltas[n] = d
    return tensors, deltas


def save(path, tensors):
    from safetensors.torch import save_file

    save_file({k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, dtype=np.float32))
               for k, v in tensors.items()}, str(path))
    return path


def check(pipe, ref, base_image, path, deltas, dims, **kw):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraWarning)  # every key is used
        lora = pipe.load_lora(path, **kw)
    assert set(lora.layers) == set(dims)
    got = ours(pipe)
    # float32 on both sides, the update built here in MLX and there in torch: rounding only.
    assert np.abs(got - theirs(ref, deltas)).max() <= 1
    assert np.abs(got - base_image).mean() > 5  # the adapter does something visible
    return got


# ----------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("naming", NAMINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_formula(kind, naming, pipe, ref, dims, base_image, tmp_path):
    tensors, deltas = build(kind, naming, dims, weights(ref), seed=hash((kind, naming)) % 1000)
    check(pipe, ref, base_image, save(tmp_path / "a.safetensors", tensors), deltas, dims)


@pytest.mark.parametrize("kind", ["LoKr", "LoHa"])
def test_peft_layout_scales_alpha_over_r(kind, pipe, ref, dims, base_image, tmp_path):
    """PEFT's base_model.model.* keys, r and alpha in adapter_config.json, alpha / r even with full halves."""
    config = {"peft_type": kind.upper(), "r": 4, "alpha": 6, "alpha_pattern": {"to_k": 2},
              "target_modules": sorted(dims)}
    g = np.random.default_rng(11)
    tensors, deltas = {}, {}
    for n, shape in dims.items():
        peft = (4, 2 if n.endswith("to_k") else 6)
        parts, deltas[n] = (lokr(shape, g, None, full="adaLN" in n, peft=peft) if kind == "LoKr"
                            else loha(shape, g, None, peft=peft))
        tensors.update({f"base_model.model.{n}.{role}": v for role, v in parts.items()})
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    check(pipe, ref, base_image, save(folder / "adapter_model.safetensors", tensors), deltas, dims)


def test_diffsynth_lora(pipe, ref, dims, base_image, tmp_path):
    """DiffSynth / ModelScope: bare names, lora_A.default.weight, no alpha (scale 1)."""
    g = np.random.default_rng(12)
    tensors, deltas = {}, {}
    for n, (o, i) in dims.items():
        a = (g.standard_normal((4, i)) / math.sqrt(i)).astype(np.float32)
        b = (g.standard_normal((o, 4)) * 0.3).astype(np.float32)
        tensors[f"{n}.lora_A.default.weight"], tensors[f"{n}.lora_B.default.weight"] = a, b
        deltas[n] = t(b) @ t(a)
    check(pipe, ref, base_image, save(tmp_path / "diffsynth.safetensors", tensors), deltas, dims)


# ----------------------------------------------------------------------------------------------
# Stacking, side paths, quantized layers, unloading


def stack(ref_w, dims, tmp_path, seed=5):
    files = []
    for kind, naming in (("LoKr factored + alpha", "ai-toolkit diffusion_model."), ("LoHa", "SimpleTuner lycoris_"),
                         ("DoRA", "ComfyUI fused qkv/out")):
        tensors, deltas = build(kind, naming, dims, ref_w, seed)
        files.append((save(tmp_path / f"{kind[:4]}.safetensors", tensors), deltas))
    return files


def test_stacked_merged_and_beside(pipe, ref, dims, tmp_path):
    """A LoKr merged, a LoHa beside the layers at 0.7, then a DoRA at -0.5 that reads the weight both made; the
    reference applies them one after the other the same way. Unloading restores every bit."""
    W = weights(ref)
    (f1, d1), (f2, d2), (f3, _) = stack(W, dims, tmp_path)
    before = snapshot(pipe.transformer)
    pipe.load_lora(f1)
    pipe.load_lora(f2, 0.7, fuse=False)
    pipe.load_lora(f3, -0.5)
    layers = linear_layers(pipe.transformer)
    assert all(isinstance(m, LoraLinear) and m.dense is not None and m.down is None for m in layers.values())
    got = ours(pipe)
    lora3 = lora_mod.read_lora(f3)
    deltas = {}
    for n in dims:  # the DoRA's formula on the weight the first two made: W2 + k (W' - W2)
        w2 = W[n] + d1[n] + 0.7 * d2[n]
        layer = lora3.layers[n]
        merged = w2 + layer.factor * t(np.array(layer.delta()))
        m = t(np.array(layer.dora_scale.astype(mx.float32)))
        axis = 1 if m.shape[0] == w2.shape[0] and m.numel() == w2.shape[0] else 0
        m = m.reshape(-1, 1) if axis else m.reshape(1, -1)
        dora_w = m * merged / (merged.norm(dim=axis, keepdim=True) + torch.finfo(torch.float32).eps)
        deltas[n] = d1[n] + 0.7 * d2[n] - 0.5 * (dora_w - w2)
    assert np.abs(got - theirs(ref, deltas)).max() <= 1
    pipe.unload_loras()
    assert_same_weights(pipe.transformer, before)


def test_quantized_layers_get_a_dense_update_beside_them(reference_checkpoint, ref, dims, tmp_path):
    q = quantize(ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32"), bits=4)
    d = dequantize(quantize(ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32"), bits=4))
    before, q_base = snapshot(q.transformer), ours(q)
    files = stack(weights(ref), dims, tmp_path, seed=6)
    for p in (q, d):
        for (f, _), s in zip(files, (1.0, 0.8, -0.6)):
            p.load_lora(f, s)
    quantized = [m for m in linear_layers(q.transformer).values() if isinstance(m, LoraLinear)]
    assert len(quantized) == len(dims) - 3 and all(m.dense.dtype == mx.float32 for m in quantized)
    got = ours(q)
    # beside the quantized layer or merged into its exact float copy: the same sums in another order
    assert np.abs(got - ours(d)).max() <= 1
    assert np.abs(got - q_base).mean() > 5
    q.unload_loras()
    assert_same_weights(q.transformer, before)
    assert np.array_equal(ours(q), q_base)


def test_lycoris_names_map_forward():
    name = lora_mod.layer_name
    assert name("lycoris_layers_12_attention_to_out_0") == "layers.12.attention.to_out.0"
    assert name("lycoris_noise_refiner_1_adaLN_modulation_0") == "noise_refiner.1.adaLN_modulation.0"
    assert name("lycoris_all_final_layer_2-1_adaLN_modulation_1") == "all_final_layer.2-1.adaLN_modulation.1"
    assert name("lycoris_layers_3_attention_qkv") == "layers.3.attention.qkv"
    assert name("lycoris_x_embedder") == "all_x_embedder.2-1"
    assert name("lycoris_t_embedder_mlp_2") == "t_embedder.mlp.2"
    assert name("lycoris_layers_3_attention_to_x") == "layers_3_attention_to_x"  # unknown: matches nothing


def test_column_dora_on_fused_qkv_is_refused(pipe, dims, tmp_path):
    from zimage_mlx.lora import LoraError

    f = save(tmp_path / "d.safetensors", {
        "diffusion_model.layers.0.attention.qkv.lora_down.weight": np.zeros((4, 96), np.float32),
        "diffusion_model.layers.0.attention.qkv.lora_up.weight": np.zeros((288, 4), np.float32),
        "diffusion_model.layers.0.attention.qkv.dora_scale": np.ones((1, 96), np.float32)})
    with pytest.raises(LoraError, match="per input column"):
        pipe.load_lora(f)
    assert pipe.loras == []
