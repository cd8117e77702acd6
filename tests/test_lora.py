"""LoRA: every supported file convention against diffusers' `load_lora_weights`, exact unloading, stacking,
quantized layers, refusals, Hub ids and the CLI flag.

The tests write random rank-4 LoRAs over every Linear layer of the tiny reference DiT, with B large enough
that a LoRA moves the image by tens of levels, and compare 32x32 two-step images made from the same latents.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlx.utils import tree_flatten
from PIL import Image
from safetensors.torch import save_file

import reference
from zimage_mlx import ZImagePipeline, cli
from zimage_mlx import lora as lora_mod
from zimage_mlx.lora import LoraError, LoraLinear, LoraWarning, layer_dims, linear_layers, read_lora

# peft says this when diffusers loads a second adapter into the same model, which the stacking tests do.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")

RANK = 4
PROMPT = "a red fox in the snow"
SIZE = dict(width=32, height=32)
LATENTS = np.random.default_rng(123).standard_normal((1, 16, 4, 4)).astype(np.float32)  # NCHW, diffusers' layout


@pytest.fixture(scope="module")
def pipe(reference_checkpoint):
    return ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32")


@pytest.fixture(autouse=True)
def no_lora_left(request):
    """Every test starts and ends with the module's pipeline free of LoRAs."""
    yield
    if "pipe" in request.fixturenames:
        request.getfixturevalue("pipe").unload_loras()


@pytest.fixture(scope="module")
def dims(pipe) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear layer of the DiT, by diffusers name."""
    return {name: layer_dims(m) for name, m in linear_layers(pipe.transformer).items()}


@pytest.fixture(scope="module")
def base_image(pipe):
    return ours(pipe)


def ours(pipe) -> np.ndarray:
    image = pipe.generate(PROMPT, steps=2, latents=mx.array(LATENTS.transpose(0, 2, 3, 1)), **SIZE)[0]
    return np.asarray(image, dtype=np.int16)


def theirs(checkpoint, loras: list[tuple[Path, float]]) -> np.ndarray:
    """diffusers' image with the LoRAs loaded by load_lora_weights, on a pipeline of its own."""
    ref = reference.load_reference_pipeline(checkpoint)
    names = [f"lora{i}" for i in range(len(loras))]
    for (path, _), name in zip(loras, names):
        ref.load_lora_weights(str(path), adapter_name=name)
    if any(scale != 1.0 for _, scale in loras):
        ref.set_adapters(names, [scale for _, scale in loras])
    image = ref(prompt=PROMPT, latents=torch.from_numpy(LATENTS), num_inference_steps=2, guidance_scale=0.0,
                **SIZE).images[0]
    return np.asarray(image, dtype=np.int16)


def factors(dims, seed, names=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random (A, B) per layer: A (4, in) with unit-norm rows on average, B (out, 4) large enough to see."""
    g = np.random.default_rng(seed)
    out = {}
    for name in names or dims:
        o, i = dims[name]
        a = g.standard_normal((RANK, i)) / np.sqrt(i)
        b = g.standard_normal((o, RANK)) * 0.3
        out[name] = (a.astype(np.float32), b.astype(np.float32))
    return out


def write(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
    save_file({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, str(path), metadata=metadata)  # copies
    return path


def alphas(names, seed) -> dict[str, float]:
    g = np.random.default_rng(seed)
    return {n: float(g.integers(1, 9)) for n in names}


def kohya(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def attention_blocks(dims) -> list[str]:
    return sorted({n.rsplit(".attention.", 1)[0] for n in dims if ".attention." in n})


# ----------------------------------------------------------------------------------------------
# Formats: each returns (the file we load, the file diffusers loads: the same one when it can read it)


def fmt_diffusers(tmp, dims):
    t = {}
    for n, (a, b) in factors(dims, 1).items():
        t[f"transformer.{n}.lora_A.weight"], t[f"transformer.{n}.lora_B.weight"] = a, b
    f = write(tmp / "diffusers.safetensors", t)
    return f, f


def fmt_peft_default_alpha(tmp, dims):
    t, al = {}, alphas(dims, 2)
    for n, (a, b) in factors(dims, 2).items():
        t[f"{n}.lora_A.default.weight"], t[f"{n}.lora_B.default.weight"] = a, b
        t[f"{n}.alpha"] = np.array(al[n], dtype=np.float32)
    f = write(tmp / "peft.safetensors", t)
    return f, f


def fmt_diffusers_metadata(tmp, dims):
    """lora_alpha and alpha_pattern in diffusers' `lora_adapter_metadata`, as save_lora_weights writes them."""
    t = {}
    for n, (a, b) in factors(dims, 3).items():
        t[f"transformer.{n}.lora_A.weight"], t[f"transformer.{n}.lora_B.weight"] = a, b
    config = {"r": RANK, "lora_alpha": 2, "alpha_pattern": {"layers.0.attention.to_q": 8, "t_embedder.mlp.2": 16, "to_k": 6},
              "target_modules": sorted(dims)}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    f = write(tmp / "metadata.safetensors", t, meta)
    return f, f


def fmt_ai_toolkit(tmp, dims):
    t = {}
    for n, (a, b) in factors(dims, 4).items():
        t[f"diffusion_model.{n}.lora_A.weight"], t[f"diffusion_model.{n}.lora_B.weight"] = a, b
    f = write(tmp / "ai_toolkit.safetensors", t)
    return f, f


def fmt_kohya(tmp, dims):
    t, al = {}, alphas(dims, 5)
    for n, (a, b) in factors(dims, 5).items():
        t[f"{kohya(n)}.lora_down.weight"], t[f"{kohya(n)}.lora_up.weight"] = a, b
        t[f"{kohya(n)}.alpha"] = np.array(al[n], dtype=np.float16)
    f = write(tmp / "kohya.safetensors", t)
    return f, f


def fused(dims, seed):
    """Per attention block a shared A and B stacked over q, k, v; the split equivalent; the other layers."""
    blocks = attention_blocks(dims)
    f = factors(dims, seed)
    qkv = {}
    for blk in blocks:
        a = f[f"{blk}.attention.to_q"][0]
        qkv[blk] = (a, np.concatenate([f[f"{blk}.attention.to_{p}"][1] for p in "qkv"]))
        for p in "qkv":
            f[f"{blk}.attention.to_{p}"] = (a, f[f"{blk}.attention.to_{p}"][1])
    return blocks, qkv, f


def fmt_kohya_fused(tmp, dims):
    """Kohya over ComfyUI's module tree: attention.qkv and attention.out."""
    blocks, qkv, f = fused(dims, 6)
    t = {}
    for blk in blocks:
        t[f"{kohya(blk)}_attention_qkv.lora_down.weight"], t[f"{kohya(blk)}_attention_qkv.lora_up.weight"] = qkv[blk]
        t[f"{kohya(blk)}_attention_qkv.alpha"] = np.array(2.0, dtype=np.float32)
        t[f"{kohya(blk)}_attention_out.lora_down.weight"], t[f"{kohya(blk)}_attention_out.lora_up.weight"] = \
            f[f"{blk}.attention.to_out.0"]
    for n, (a, b) in f.items():
        if ".attention.to_" not in n:
            t[f"{kohya(n)}.lora_down.weight"], t[f"{kohya(n)}.lora_up.weight"] = a, b
    ff = write(tmp / "kohya_fused.safetensors", t)
    return ff, ff


def fmt_comfy_fused(tmp, dims):
    """ComfyUI-native names (qkv, out, x_embedder, final_layer) with lora_A/lora_B: diffusers cannot read
    these, so it gets the same LoRA split into diffusers names (alpha folded into B)."""
    blocks, qkv, f = fused(dims, 7)
    comfy = {"all_x_embedder.2-1": "x_embedder", "all_final_layer.2-1.linear": "final_layer.linear",
             "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1"}
    t, split = {}, {}
    for blk in blocks:
        t[f"diffusion_model.{blk}.attention.qkv.lora_A.weight"], t[f"diffusion_model.{blk}.attention.qkv.lora_B.weight"] = qkv[blk]
        t[f"diffusion_model.{blk}.attention.qkv.alpha"] = np.array(8.0, dtype=np.float32)
        for p in "qkv":
            a, b = f[f"{blk}.attention.to_{p}"]
            split[f"transformer.{blk}.attention.to_{p}.lora_A.weight"] = a
            split[f"transformer.{blk}.attention.to_{p}.lora_B.weight"] = b * (8.0 / RANK)
    for n, (a, b) in f.items():
        if re.search(r"\.attention\.to_[qkv]$", n):
            continue
        name = comfy.get(n, n.replace(".attention.to_out.0", ".attention.out"))
        t[f"diffusion_model.{name}.lora_A.weight"], t[f"diffusion_model.{name}.lora_B.weight"] = a, b
        split[f"transformer.{n}.lora_A.weight"], split[f"transformer.{n}.lora_B.weight"] = a, b
    return write(tmp / "comfy.safetensors", t), write(tmp / "comfy_split.safetensors", split)


def fmt_dot(tmp, dims):
    """The Anime-Z "dot" format, with the redundant qkv and bare out copies (random: they must be skipped)."""
    f = factors(dims, 8)
    junk = factors(dims, 9)
    t = {}
    for n, (a, b) in f.items():
        name = re.sub(r"\.attention\.to_([qkv])$", r".attention.to.\1", n)
        t[f"diffusion_model.{name}.lora.down.weight"], t[f"diffusion_model.{name}.lora.up.weight"] = a, b
    for blk in attention_blocks(dims):
        a = junk[f"{blk}.attention.to_q"][0]
        t[f"diffusion_model.{blk}.attention.qkv.lora.down.weight"] = a
        t[f"diffusion_model.{blk}.attention.qkv.lora.up.weight"] = np.concatenate(
            [junk[f"{blk}.attention.to_{p}"][1] for p in "qkv"])
        t[f"diffusion_model.{blk}.attention.out.lora.down.weight"], t[f"diffusion_model.{blk}.attention.out.lora.up.weight"] = \
            junk[f"{blk}.attention.to_out.0"]
    ff = write(tmp / "dot.safetensors", t)
    return ff, ff


FORMATS = {
    "diffusers": fmt_diffusers,
    "peft .default + alpha": fmt_peft_default_alpha,
    "diffusers + lora_alpha metadata": fmt_diffusers_metadata,
    "ai-toolkit diffusion_model.": fmt_ai_toolkit,
    "kohya lora_unet_ + alpha": fmt_kohya,
    "kohya fused qkv/out": fmt_kohya_fused,
    "ComfyUI fused lora_A/B": fmt_comfy_fused,
    "dot format with redundant keys": fmt_dot,
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_diffusers(fmt, pipe, dims, base_image, reference_checkpoint, tmp_path):
    ours_file, their_file = FORMATS[fmt](tmp_path, dims)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraWarning)  # every key of these files is used
        lora = pipe.load_lora(ours_file)
    assert set(lora.layers) == set(dims)
    got = ours(pipe)
    ref = theirs(reference_checkpoint, [(their_file, 1.0)])
    # float32 on both sides, the LoRA applied merged here and beside the layer in PEFT: rounding only,
    # which can move a pixel across a rounding boundary of the uint8 conversion.
    assert np.abs(got - ref).max() <= 1
    # and the LoRA does something visible, so the comparison is not vacuous
    assert np.abs(got - base_image).mean() > 5


def test_stacking_and_scales(pipe, dims, reference_checkpoint, tmp_path):
    first, _ = fmt_diffusers(tmp_path, dims)
    second, _ = fmt_kohya(tmp_path, dims)
    pipe.load_lora(first, 0.7)
    pipe.load_lora(second, scale=-0.5)
    assert pipe.loras == [(str(first), 0.7), (str(second), -0.5)]
    got = ours(pipe)
    assert np.abs(got - theirs(reference_checkpoint, [(first, 0.7), (second, -0.5)])).max() <= 1
    pipe.unload_loras()
    pipe.load_lora(first, 0.7)
    assert np.abs(ours(pipe) - got).mean() > 2  # the second LoRA mattered


def snapshot(model) -> dict[str, tuple[str, np.ndarray]]:
    """Every parameter's dtype and bits (bfloat16 viewed as uint16: NumPy has no bfloat16)."""
    return {k: (str(v.dtype), np.array(v.view(mx.uint16) if v.dtype == mx.bfloat16 else v))
            for k, v in tree_flatten(model.parameters())}


def assert_same_weights(model, before) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k][0] == before[k][0] and np.array_equal(after[k][1], before[k][1]), k


def test_unload_restores_weights_and_image_exactly(pipe, dims, base_image, tmp_path):
    before = snapshot(pipe.transformer)
    pipe.load_lora(fmt_diffusers(tmp_path, dims)[0])
    pipe.load_lora(fmt_kohya(tmp_path, dims)[0], 0.3)
    assert not np.array_equal(ours(pipe), base_image)
    pipe.unload_loras()
    assert pipe.loras == []
    assert_same_weights(pipe.transformer, before)
    assert np.array_equal(ours(pipe), base_image)


def test_unfused_float_layers_get_the_side_path(pipe, dims, reference_checkpoint, tmp_path):
    """fuse=False: no layer's weights change, and the image is the fused one; mixing both modes unloads too."""
    first, second = fmt_diffusers(tmp_path, dims)[0], fmt_kohya(tmp_path, dims)[0]
    before = snapshot(pipe.transformer)
    pipe.load_lora(first, 0.7, fuse=False)
    pipe.load_lora(second, -0.5, fuse=False)
    assert all(isinstance(m, LoraLinear) for m in linear_layers(pipe.transformer).values())
    assert all(np.array_equal(np.array(m.base.weight), before[f"{n}.weight"][1])
               for n, m in linear_layers(pipe.transformer).items())
    side = ours(pipe)
    assert np.abs(side - theirs(reference_checkpoint, [(first, 0.7), (second, -0.5)])).max() <= 1
    pipe.unload_loras()
    assert_same_weights(pipe.transformer, before)
    pipe.load_lora(first, 0.7)  # fused, then a side path on the merged layers
    pipe.load_lora(second, -0.5, fuse=False)
    assert np.abs(ours(pipe) - side).max() <= 1
    pipe.unload_loras()
    assert_same_weights(pipe.transformer, before)


def test_bfloat16_weights_stay_bfloat16(reference_checkpoint, dims, tmp_path):
    p = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="bfloat16")
    before = snapshot(p.transformer)
    p.load_lora(fmt_diffusers(tmp_path, dims)[0])
    assert all(m.weight.dtype == mx.bfloat16 for m in linear_layers(p.transformer).values())
    p.unload_loras()
    assert_same_weights(p.transformer, before)


# ----------------------------------------------------------------------------------------------
# Quantized layers: the LoRA runs beside them, never merged


def quantize(p, bits):
    """As the DiT's quantization policy does: every Linear but the timestep MLP and caption projection."""
    nn.quantize(p.transformer, group_size=32, bits=bits,
                class_predicate=lambda path, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 32 == 0
                and not path.startswith(("t_embedder.", "cap_embedder.")))
    return p


def dequantize(p):
    """The same model with every quantized layer turned back into a float Linear holding its exact values."""
    for name, m in list(linear_layers(p.transformer).items()):
        if isinstance(m, nn.QuantizedLinear):
            out_dim, in_dim = layer_dims(m)
            linear = nn.Linear(in_dim, out_dim, bias="bias" in m)
            linear.weight = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
            if "bias" in m:
                linear.bias = m.bias
            lora_mod._set_module(p.transformer, name, linear)
    return p


def test_quantized_layers_get_the_lora_beside_them(reference_checkpoint, dims, tmp_path):
    q = quantize(ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32"), bits=4)
    d = dequantize(quantize(ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32"), bits=4))
    n_quantized = sum(isinstance(m, nn.QuantizedLinear) for m in linear_layers(q.transformer).values())
    assert n_quantized == len(dims) - 3
    before, q_base = snapshot(q.transformer), ours(q)
    first, second = fmt_diffusers(tmp_path, dims)[0], fmt_kohya_fused(tmp_path, dims)[0]
    for p in (q, d):
        p.load_lora(first, 0.8)
        p.load_lora(second, -0.6)
    assert sum(isinstance(m, LoraLinear) for m in linear_layers(q.transformer).values()) == n_quantized
    got = ours(q)
    # Beside the quantized layer or merged into its exact float copy: the same sums in another order.
    assert np.abs(got - ours(d)).max() <= 1
    assert np.abs(got - q_base).mean() > 5
    q.unload_loras()
    assert_same_weights(q.transformer, before)
    assert all(not isinstance(m, LoraLinear) for m in linear_layers(q.transformer).values())
    assert np.array_equal(ours(q), q_base)


def test_from_pretrained_quantize_mixes_merged_and_side_path_layers(reference_checkpoint, dims, tmp_path):
    """With the pipeline's own quantization policy some layers stay float (merged), others get a side path."""
    q = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32", quantize=4)
    quantized = {n for n, m in linear_layers(q.transformer).items() if isinstance(m, nn.QuantizedLinear)}
    assert 0 < len(quantized) < len(dims)
    before, q_base = snapshot(q.transformer), ours(q)
    q.load_lora(fmt_ai_toolkit(tmp_path, dims)[0])
    layers = linear_layers(q.transformer)
    assert {n for n, m in layers.items() if isinstance(m, LoraLinear)} == quantized
    assert np.abs(ours(q) - q_base).mean() > 5
    q.unload_loras()
    assert_same_weights(q.transformer, before)
    assert np.array_equal(ours(q), q_base)


# ----------------------------------------------------------------------------------------------
# Refusals and warnings


def lora_file(tmp_path, keys: dict[str, tuple[int, ...]], name="x.safetensors") -> Path:
    g = np.random.default_rng(0)
    return write(tmp_path / name, {k: g.standard_normal(s).astype(np.float32) for k, s in keys.items()})


@pytest.mark.parametrize("keys,match", [
    ({"transformer.double_blocks.0.img_attn.qkv.lora_A.weight": (4, 96),
      "transformer.double_blocks.0.img_attn.qkv.lora_B.weight": (288, 4)}, r"FLUX .*double_blocks"),
    ({"lora_unet_single_blocks_0_linear1.lora_down.weight": (4, 96),
      "lora_unet_single_blocks_0_linear1.lora_up.weight": (96, 4)}, "FLUX"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 96),
      "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (96, 4)}, "MMDiT"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 96),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (96, 4),
      "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 96)}, "Stable Diffusion / SDXL"),
    ({"foo.bar.lora_A.weight": (4, 96), "foo.bar.lora_B.weight": (96, 4), "baz": (3,)},
     r"none of its 3 keys names a layer of the Z-Image DiT \(e\.g\. baz, foo\.bar\.lora_A\.weight"),
    ({"lora_te_model_layers_0_self_attn_q_proj.lora_down.weight": (4, 48),
      "lora_te_model_layers_0_self_attn_q_proj.lora_up.weight": (48, 4),
      "lora_unet_layers_0_attention_to_q.lora_down.weight": (4, 96),
      "lora_unet_layers_0_attention_to_q.lora_up.weight": (96, 4)}, r"changes the text encoder \(2 keys.*DiT only"),
    ({"text_encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 48),
      "text_encoder.layers.0.self_attn.q_proj.lora_B.weight": (48, 4)}, "text encoder"),
    ({"lora_unet_layers_0_attention_to_q.lora_down.weight": (4, 96),
      "lora_unet_layers_0_attention_to_q.lora_up.weight": (96, 4),
      "lora_unet_layers_0_attention_to_q.dora_scale": (1, 95)}, r"dora_scale \(1, 95\) does not fit its layer"),
    ({"transformer.layers.0.attention.to_q.lora_A.weight": (4, 96),
      "transformer.layers.0.attention.to_q.lora_B.weight": (96, 4),
      "transformer.layers.0.attention.to_q.lora_magnitude_vector.weight": (96,)}, "PEFT DoRA"),
    ({"diffusion_model.layers.0.attention.to_q.lokr_w1": (4, 4),
      "diffusion_model.layers.0.attention.to_q.lokr_w2": (24, 20)}, r"lokr_w1 does not fit the DiT layer .* 80 -> 96"),
    ({"diffusion_model.layers.0.attention.to_q.hada_w1_a": (96, 4),
      "diffusion_model.layers.0.attention.to_q.hada_w1_b": (4, 96),
      "diffusion_model.layers.0.attention.to_q.hada_w2_a": (96, 4)}, "LoHa factors of its layer lack hada_w2_a or hada_w2_b"),
    ({"diffusion_model.layers.0.attention.to_q.lokr_w1": (4, 4),
      "diffusion_model.layers.0.attention.to_q.lora_A.weight": (4, 96)}, "mixes LoKr and LoRA factors"),
    ({"base_model.model.layers.0.attention.to_q.lokr_w1": (4, 4),
      "base_model.model.layers.0.attention.to_q.lokr_w2": (24, 24)}, "PEFT LoKr/LoHa adapter: it needs its adapter_config"),
    ({"transformer.layers.0.attention.to_q.lora_A.weight": (4, 96),
      "transformer.layers.0.attention.to_q.lora_B.weight": (96, 3)}, "not a pair of LoRA matrices"),
])
def test_refused_files(pipe, tmp_path, keys, match):
    path = lora_file(tmp_path, keys)
    before = snapshot(pipe.transformer)
    with pytest.raises(LoraError, match=match):
        pipe.load_lora(path)
    assert pipe.loras == []
    assert_same_weights(pipe.transformer, before)


def test_no_layer_of_this_model(pipe, tmp_path):
    path = lora_file(tmp_path, {"transformer.layers.29.attention.to_q.lora_A.weight": (4, 3840),
                                "transformer.layers.29.attention.to_q.lora_B.weight": (3840, 4)})
    with pytest.raises(LoraError, match=r"none of its 2 keys names a layer of this Z-Image DiT \(e\.g\. transformer\.layers\.29"):
        pipe.load_lora(path)


def test_shape_mismatch_names_the_key_and_changes_nothing(pipe, dims, tmp_path):
    keys = {f"transformer.{n}.lora_{ab}.weight": s for n in ("layers.0.attention.to_q", "layers.1.feed_forward.w1")
            for ab, s in (("A", (4, dims[n][1])), ("B", (dims[n][0], 4)))}
    keys["transformer.layers.1.attention.to_k.lora_A.weight"] = (4, 128)  # a LoRA for a wider model
    keys["transformer.layers.1.attention.to_k.lora_B.weight"] = (128, 4)
    before = snapshot(pipe.transformer)
    with pytest.raises(LoraError, match=r"transformer\.layers\.1\.attention\.to_k\.lora_A\.weight does not fit the DiT "
                                        r"layer layers\.1\.attention\.to_k: the LoRA maps 128 -> 128 features, the layer 96 -> 96"):
        pipe.load_lora(lora_file(tmp_path, keys))
    assert_same_weights(pipe.transformer, before)


def test_partial_match_warns_with_count_and_examples(pipe, dims, tmp_path):
    t = {}
    for n, (a, b) in factors(dims, 1, ["layers.0.attention.to_q", "layers.0.feed_forward.w2"]).items():
        t[f"transformer.{n}.lora_A.weight"], t[f"transformer.{n}.lora_B.weight"] = a, b
    t["transformer.layers.7.attention.to_q.lora_A.weight"] = np.zeros((4, 96), np.float32)
    t["transformer.layers.7.attention.to_q.lora_B.weight"] = np.zeros((96, 4), np.float32)
    t["transformer.layers.0.attention.to_q.lora_B.bias"] = np.zeros(96, np.float32)
    with pytest.warns(LoraWarning, match=r"3 of its 7 keys name no layer of the Z-Image DiT and are not applied, e\.g\. "
                                         r"transformer\.layers\.0\.attention\.to_q\.lora_B\.bias, transformer\.layers\.7"):
        lora = pipe.load_lora(write(tmp_path / "partial.safetensors", t))
    assert len(lora.layers) == 3 and len(pipe._lora_originals) == 2


def test_bad_scale_and_bad_files(pipe, dims, tmp_path):
    good = fmt_diffusers(tmp_path, dims)[0]
    for scale in (float("nan"), float("inf"), "1", True):
        with pytest.raises(LoraError, match="scale"):
            pipe.load_lora(good, scale)
    assert pipe.loras == []
    with pytest.raises(LoraError, match="does not exist"):
        pipe.load_lora(tmp_path / "missing.safetensors")
    with pytest.raises(LoraError, match="not a .safetensors file"):
        pipe.load_lora(write(tmp_path / "x.safetensors", {"a": np.zeros(2, np.float32)}).rename(tmp_path / "x.pt"))
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoraError, match="cannot read LoRA"):
        pipe.load_lora(tmp_path / "broken.safetensors")


def test_key_mapping_rules():
    name = lora_mod.layer_name
    assert name("lora_unet_noise_refiner_1_feed_forward_w2") == "noise_refiner.1.feed_forward.w2"
    assert name("lora_unet_layers_12_attention_to_out_0") == "layers.12.attention.to_out.0"
    assert name("lora_unet_context_refiner_0_attention_to_v") == "context_refiner.0.attention.to_v"
    assert name("lora_unet_all_final_layer_2-1_adaLN_modulation_1") == "all_final_layer.2-1.adaLN_modulation.1"
    assert name("lora_unet_t_embedder_mlp_0") == "t_embedder.mlp.0"
    assert name("lora_unet_cap_embedder_1") == "cap_embedder.1"
    assert name("lora_unet_x_embedder") == "all_x_embedder.2-1"
    assert name("lora_unet_final_layer_linear") == "all_final_layer.2-1.linear"
    assert name("lora_unet_layers_3_attention_qkv") == "layers.3.attention.qkv"
    assert name("model.diffusion_model.layers.3.attention.out") == "layers.3.attention.to_out.0"
    assert name("diffusion_model.layers.3.attention.to.k") == "layers.3.attention.to_k"
    assert name("base_model.model.layers.3.adaLN_modulation.0") == "layers.3.adaLN_modulation.0"


# ----------------------------------------------------------------------------------------------
# Hub ids


def test_hub_ids(monkeypatch, pipe, dims, tmp_path):
    import huggingface_hub

    local = fmt_diffusers(tmp_path, dims)[0]
    repos = {"someone/style": ["README.md", "style.safetensors"],
             "someone/epochs": ["a/e1.safetensors", "a/e2.safetensors"]}
    fetched = []

    def download(repo, filename, **kw):
        assert filename in repos[repo]
        fetched.append((repo, filename))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, **kw: repos[repo])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert read_lora("someone/style").path == local and fetched[-1] == ("someone/style", "style.safetensors")
    assert read_lora("someone/epochs/a/e2.safetensors").path == local and fetched[-1] == ("someone/epochs", "a/e2.safetensors")
    with pytest.raises(LoraError, match=r"someone/epochs has 2 \.safetensors files; name one as someone/epochs/FILE"):
        read_lora("someone/epochs")
    with pytest.raises(LoraError, match="name a .safetensors file"):
        read_lora("someone/style/README.md")


# ----------------------------------------------------------------------------------------------
# CLI


def generate(*args):
    return CliRunner().invoke(cli.main, ["generate", *map(str, args)])


def test_cli_lora_flag(reference_checkpoint, pipe, dims, tmp_path):
    first, second = fmt_diffusers(tmp_path, dims)[0], fmt_kohya(tmp_path, dims)[0]
    out = tmp_path / "out.png"
    r = generate(PROMPT, "-m", reference_checkpoint, "--size", 32, "--steps", 2, "--seed", 3,
                 "--lora", f"{first}:0.7", "--lora", second, "-o", out)
    assert r.exit_code == 0, r.output
    assert f"Applied LoRA {first} at scale 0.7" in r.stderr and f"Applied LoRA {second} at scale 1" in r.stderr
    pipe.load_lora(first, 0.7, fuse=False)
    pipe.load_lora(second, fuse=False)
    expected = pipe.generate(PROMPT, steps=2, seed=3, **SIZE)[0]
    with Image.open(out) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(expected))
        meta = dict(im.text)
    assert json.loads(meta["loras"]) == [{"name": first.name, "scale": 0.7},  # file names only: no local path
                                         {"name": second.name, "scale": 1.0}]
    assert f'LoRA: "{first.name}:0.7, {second.name}:1"' in meta["parameters"]

    again = tmp_path / "again.png"  # --from-image asks for local LoRA files again, and takes them
    r = generate("--from-image", out, "-m", reference_checkpoint, "-o", again)
    assert r.exit_code == 2 and f"the local LoRA {first.name}; give it again with --lora FILE" in r.stderr
    r = generate("--from-image", out, "-m", reference_checkpoint, "--lora", f"{first}:0.7", "--lora", second,
                 "-o", again)
    assert r.exit_code == 0, r.output
    with Image.open(out) as a, Image.open(again) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_partial_match_warns(reference_checkpoint, dims, tmp_path):
    t = {}
    for n, (a, b) in factors(dims, 1, ["layers.0.attention.to_q"]).items():
        t[f"transformer.{n}.lora_A.weight"], t[f"transformer.{n}.lora_B.weight"] = a, b
    t["transformer.layers.9.attention.to_q.lora_A.weight"] = np.zeros((4, 96), np.float32)
    t["transformer.layers.9.attention.to_q.lora_B.weight"] = np.zeros((96, 4), np.float32)
    path = write(tmp_path / "partial.safetensors", t)
    r = generate(PROMPT, "-m", reference_checkpoint, "--size", 32, "--steps", 1, "--lora", path, "-o", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    assert "Warning: " in r.stderr and "2 of its 4 keys name no layer" in r.stderr


@pytest.mark.parametrize("spec,fragment", [
    ("{tmp}/missing.safetensors", "missing.safetensors does not exist"),
    ("{tmp}/missing.safetensors:0.5", "missing.safetensors does not exist"),
    ("{good}:strong", "the scale 'strong' after the last ':' is not a number"),
    ("{good}:nan", "finite number"),
    (":0.5", "PATH[:SCALE]"),
    ("{flux}", "looks like one for FLUX"),
])
def test_cli_lora_errors_before_loading(spec, fragment, monkeypatch, dims, tmp_path, reference_checkpoint):
    def must_not_load(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ZImagePipeline, "from_pretrained", classmethod(must_not_load))
    good = fmt_diffusers(tmp_path, dims)[0]
    flux = lora_file(tmp_path, {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 96),
                                "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (288, 4)}, "flux.safetensors")
    r = generate(PROMPT, "-m", reference_checkpoint, "--size", 32, "--lora", spec.format(tmp=tmp_path, good=good, flux=flux),
                 "-o", tmp_path / "x.png")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], r.stderr
    assert not (tmp_path / "x.png").exists()
