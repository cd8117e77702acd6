"""`zimage-mlx convert`: diffusers folders and ComfyUI single files into MLX folders, float and quantized,
checked against loading the source directly; and the refusals (existing DST, missing parts, other models)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from zimage_mlx import cli
from zimage_mlx.cli.common import describe_pipeline
from zimage_mlx.recipe import Recipe
from zimage_mlx.convert import convert, identify
from zimage_mlx.pipeline import ZImagePipeline
from zimage_mlx.text_encoder import TextEncoder
from zimage_mlx.transformer import ZImageTransformer
from zimage_mlx.weights import CheckpointError

# The tiny widths (DiT 96, FFN 256, Qwen3 hidden 48): group size 32 divides the DiT's 96/256-wide inputs and
# the text encoder's 64/96-wide o_proj/down_proj, so both models get quantized layers (48-wide inputs stay float).
GROUP = 32
GEN = dict(prompt="a red fox in the snow", width=32, height=32, steps=2, seed=7)


@pytest.fixture(scope="module")
def converted(reference_checkpoint, tmp_path_factory):
    """convert once per (dtype, quantize): the MLX folder's path."""
    cache = {}
    base = tmp_path_factory.mktemp("converted")

    def get(dtype="float32", quantize=None, **kw):
        key = (dtype, quantize, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = base / f"{dtype}-{quantize}-{len(cache)}"
            convert(reference_checkpoint, cache[key], dtype=dtype, quantize=quantize, group_size=GROUP, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def source_image(reference_checkpoint):
    return image(ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32"))


def image(pipe) -> np.ndarray:
    return np.asarray(pipe.generate(**GEN)[0], dtype=np.float64)


def psnr(a, b) -> float:
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in mx.load(str(f)).items()})
    return out


def params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in tree_flatten(model.parameters())}


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------
# Round trips


def test_float32_gives_the_same_image(reference_checkpoint, converted, source_image):
    dst = converted("float32")
    assert sorted(p.name for p in dst.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                      "transformer", "vae"]
    for name in ("transformer", "text_encoder"):
        config = json.loads((dst / name / "config.json").read_text())
        assert config["dtype"] == "float32" and "quantization" not in config
    # float32 end to end: the same weights, the same arithmetic, the same pixels.
    assert np.array_equal(image(ZImagePipeline.from_pretrained(dst, dtype="float32")), source_image)
    # The VAE keeps diffusers' names, torch layout and dtype: byte for byte the source's tensors.
    assert_same(tensors(dst / "vae"), tensors(reference_checkpoint / "vae"))
    # The text encoder keeps every tensor of the source (the last layer and final norm too: encoding skips
    # them, prompt enhancement runs them) but the tied LM head, which is the embedding.
    source = {k.removeprefix("model."): v for k, v in tensors(reference_checkpoint / "text_encoder").items()
              if k != "lm_head.weight"}
    te = json.loads((dst / "text_encoder" / "config.json").read_text())
    assert f"layers.{te['num_hidden_layers'] - 1}.mlp.down_proj.weight" in source and "norm.weight" in source
    assert_same(tensors(dst / "text_encoder"), source)


def test_bfloat16_equals_loading_in_bfloat16(reference_checkpoint, converted, source_image):
    dst = converted("bfloat16")
    assert json.loads((dst / "transformer" / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(iter(mx.load(str(dst / "transformer" / "model.safetensors")).values())).dtype == mx.bfloat16
    # Stored bfloat16 is exactly the float32 source cast at load time.
    ours = image(ZImagePipeline.from_pretrained(dst, dtype="bfloat16"))
    assert np.array_equal(ours, image(ZImagePipeline.from_pretrained(reference_checkpoint, dtype="bfloat16")))
    # bfloat16 against float32 on these random weights: measured 53.5 dB PSNR (at most 2 levels of 255). 40 dB
    # leaves room; another seed's image, i.e. an unrelated one, is 9.7 dB away.
    assert psnr(ours, source_image) > 40


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_equals_quantizing_on_the_fly(reference_checkpoint, converted, source_image, bits):
    dst = converted("float32", bits)
    dit_config = json.loads((dst / "transformer" / "config.json").read_text())
    te_config = json.loads((dst / "text_encoder" / "config.json").read_text())
    assert dit_config["quantization"]["bits"] == bits and dit_config["quantization"]["group_size"] == GROUP
    assert te_config["quantization"]["bits"] == 8  # --quantize 4 gives the text encoder 8 bits

    pipe = ZImagePipeline.from_pretrained(dst, dtype="float32")
    dit, te = pipe.transformer, pipe.text_encoder.model
    quantized = {p: m.bits for p, m in dit.named_modules() if isinstance(m, nn.QuantizedLinear)}
    # The policy: the embedders and the final layer stay float; adaLN gets at least 8 bits; the rest `bits`.
    assert quantized["layers.0.attention.to_q"] == bits and quantized["layers.0.feed_forward.w2"] == bits
    assert quantized["layers.0.adaLN_modulation.0"] == 8 and quantized["noise_refiner.1.adaLN_modulation.0"] == 8
    for kept in ("t_embedder.mlp.0", "cap_embedder.1", "all_x_embedder.2-1", "all_final_layer.2-1.linear",
                 "all_final_layer.2-1.adaLN_modulation.1"):
        assert kept not in quantized
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in te.named_modules())

    # The same arrays as quantizing the source on the fly with the same policy.
    assert_same(params(dit), params(ZImageTransformer.from_pretrained(reference_checkpoint / "transformer",
                                                                     quantize=bits, group_size=GROUP)))
    assert_same(params(te), params(TextEncoder.from_pretrained(reference_checkpoint, quantize=8, group_size=GROUP).model))
    # Image against float32 (random weights, 2 steps). Measured: 8 bits 54.1 dB (at most 2 levels of 255),
    # 4 bits 33.5 dB (at most 21 levels); an unrelated image is 9.7 dB away.
    assert psnr(image(pipe), source_image) > {8: 45, 4: 28}[bits]


def test_on_the_fly_quantize_of_a_quantized_folder(converted):
    dst = converted("float32", 4)
    ZImagePipeline.from_pretrained(dst, dtype="float32", quantize=4)  # as stored: nothing to do
    with pytest.raises(CheckpointError, match="stored quantized to 4 bits"):
        ZImagePipeline.from_pretrained(dst, dtype="float32", quantize=8)


def test_shards_and_index(reference_checkpoint, converted):
    dst = converted("float32", 4, shard_size=100_000)
    files = sorted(p.name for p in (dst / "transformer").glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((dst / "transformer" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors(dst / "transformer").values())
    assert_same(tensors(dst / "transformer"), tensors(converted("float32", 4) / "transformer"))


# ----------------------------------------------------------------------------------------------
# ComfyUI single files


def write_comfy_files(ckpt: Path, out: Path) -> Path:
    """The reference checkpoint as ComfyUI's split files: the DiT with fused qkv and original names under
    model.diffusion_model. (plus the unused norm_final), the text encoder in one file, the VAE in LDM names."""
    dit = {}
    for f in sorted((ckpt / "transformer").glob("*.safetensors")):
        dit.update(mx.load(str(f)))
    comfy = {"model.diffusion_model.norm_final.weight": mx.ones((96,))}
    for key, w in dit.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [dit[key.replace("to_q", n)] for n in ("to_q", "to_k", "to_v")]
            key, w = key.replace("to_q", "qkv"), mx.concatenate(parts)
        key = (key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
               .replace(".to_out.0.", ".out.").replace(".norm_q.", ".q_norm.").replace(".norm_k.", ".k_norm."))
        if key.endswith("pad_token"):
            w = w[0]  # stored as (dim,), like GGUF and some single files
        comfy["model.diffusion_model." + key] = w
    te = {}
    for f in sorted((ckpt / "text_encoder").glob("*.safetensors")):
        te.update(mx.load(str(f)))
    vae = {}
    for key, w in mx.load(str(ckpt / "vae" / "diffusion_pytorch_model.safetensors")).items():
        key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
        key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
        key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{3 - int(m[1])}.block.", key)
        key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{3 - int(m[1])}.upsample.", key)
        key = key.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        key = key.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
        key = key.replace("conv_norm_out", "norm_out").replace("attn_1.group_norm", "attn_1.norm")
        key = re.sub(r"attn_1\.to_([qkv])\.", r"attn_1.\1.", key).replace("attn_1.to_out.0.", "attn_1.proj_out.")
        if "attn_1." in key and w.ndim == 2:
            w = w[:, :, None, None]  # LDM attention projections are 1x1 convs
        vae[key] = w
    for sub, name, weights in (("diffusion_models", "z_image_turbo.safetensors", comfy),
                               ("text_encoders", "qwen_3_4b.safetensors", te), ("vae", "ae.safetensors", vae)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(out / sub / name), weights)
    return out


@pytest.fixture(scope="module")
def comfy(reference_checkpoint, tmp_path_factory) -> Path:
    return write_comfy_files(reference_checkpoint, tmp_path_factory.mktemp("ComfyUI") / "split_files")


def test_comfy_files_convert_to_identical_weights(reference_checkpoint, converted, comfy, tmp_path):
    dst = tmp_path / "from-comfy"
    result = convert(comfy, dst, dtype="float32", quantize=4, group_size=GROUP, base=reference_checkpoint)
    assert result["transformer"][1].endswith("z_image_turbo.safetensors")
    ref = converted("float32", 4)
    for name in ("transformer", "text_encoder", "vae"):
        assert_same(tensors(dst / name), tensors(ref / name))
    # The configs read from the tensors' shapes are base's.
    for name in ("transformer", "text_encoder"):
        assert json.loads((dst / name / "config.json").read_text()) == json.loads((ref / name / "config.json").read_text())
    # One file can also replace a component of a diffusers checkpoint.
    dst2 = tmp_path / "swapped"
    convert(reference_checkpoint, dst2, dtype="float32", transformer=comfy / "diffusion_models" / "z_image_turbo.safetensors")
    assert_same(tensors(dst2 / "transformer"), tensors(converted("float32") / "transformer"))


def test_identify():
    assert identify(["model.diffusion_model.cap_embedder.1.weight", "model.diffusion_model.x_pad_token"]) == "transformer"
    assert identify(["cap_embedder.1.weight", "pad_token"]) == "a Lumina-2 (NextDiT) transformer"
    assert identify(["double_blocks.0.img_attn.qkv.weight"]) == "a FLUX transformer"
    assert identify(["model.diffusion_model.input_blocks.0.0.weight"]) == "a Stable Diffusion UNet"
    assert identify(["model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight"]) == "text_encoder"
    assert identify(["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias"]).startswith("a language model")
    assert identify(["first_stage_model.decoder.conv_in.weight"]) == "vae"


# ----------------------------------------------------------------------------------------------
# Refusals: checked before any work, nothing left behind


def assert_nothing_written(dst: Path):
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.converting-*"))


def test_existing_dst_needs_force(reference_checkpoint, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=r"already exists; allow replacing it \(force\)"):  # library words
        convert(reference_checkpoint, dst)
    assert (dst / "keep.txt").exists()
    convert(reference_checkpoint, dst, force=True)
    assert not (dst / "keep.txt").exists() and (dst / "model_index.json").exists()
    with pytest.raises(ValueError, match="outside the source"):
        convert(reference_checkpoint, reference_checkpoint / "mlx", force=True)


def test_missing_component(checkpoint_copy, tmp_path, comfy):
    shutil.rmtree(checkpoint_copy / "vae")
    with pytest.raises(CheckpointError, match="missing folder.*vae"):
        convert(checkpoint_copy, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
    single = tmp_path / "single"
    shutil.copytree(comfy, single)
    shutil.rmtree(single / "vae")
    with pytest.raises(CheckpointError, match="no Z-Image VAE in .*--vae FILE"):
        convert(single, tmp_path / "out", base=checkpoint_copy)
    assert_nothing_written(tmp_path / "out")


def test_other_models_are_refused(reference_checkpoint, checkpoint_copy, tmp_path):
    flux = tmp_path / "flux1-dev.safetensors"
    mx.save_safetensors(str(flux), {"double_blocks.0.img_attn.qkv.weight": mx.zeros((6, 2)),
                                    "single_blocks.0.linear1.weight": mx.zeros((2, 2))})
    with pytest.raises(CheckpointError, match="should hold Z-Image's DiT but holds a FLUX transformer"):
        convert(reference_checkpoint, tmp_path / "out", transformer=flux)
    sd_vae = tmp_path / "sd-vae.safetensors"
    mx.save_safetensors(str(sd_vae), {"decoder.conv_in.weight": mx.zeros((64, 4, 3, 3))})
    with pytest.raises(CheckpointError, match="4-channel VAE"):
        convert(reference_checkpoint, tmp_path / "out", vae=sd_vae)
    index = json.loads((checkpoint_copy / "model_index.json").read_text())
    (checkpoint_copy / "model_index.json").write_text(json.dumps(dict(index, _class_name="FluxPipeline")))
    with pytest.raises(CheckpointError, match="FluxPipeline checkpoint, not a Z-Image one"):
        convert(checkpoint_copy, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_shapes_that_do_not_fit(checkpoint_copy, tmp_path):
    config = json.loads((checkpoint_copy / "transformer" / "config.json").read_text())
    (checkpoint_copy / "transformer" / "config.json").write_text(json.dumps(dict(config, n_layers=3)))
    with pytest.raises(CheckpointError, match=r"does not fit its config: missing \d+ tensor\(s\), e.g. layers.2"):
        convert(checkpoint_copy, tmp_path / "out")
    (checkpoint_copy / "transformer" / "config.json").write_text(json.dumps(dict(config, cap_feat_dim=64)))
    with pytest.raises(CheckpointError, match="of another shape, e.g. cap_embedder"):
        convert(checkpoint_copy, tmp_path / "out")
    (checkpoint_copy / "transformer" / "config.json").write_text(json.dumps(config))
    config = json.loads((checkpoint_copy / "text_encoder" / "config.json").read_text())
    (checkpoint_copy / "text_encoder" / "config.json").write_text(json.dumps(dict(config, hidden_size=64)))
    with pytest.raises(CheckpointError, match=r"text_encoder \(text encoder\) does not fit its config"):
        convert(checkpoint_copy, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_text_encoder_of_another_width(reference_checkpoint, comfy, tmp_path):
    # A single-file DiT taking 64-wide captions: it fits the config read from its shapes, not the text encoder.
    dit = mx.load(str(comfy / "diffusion_models" / "z_image_turbo.safetensors"))
    dit["model.diffusion_model.cap_embedder.0.weight"] = mx.ones((64,))
    dit["model.diffusion_model.cap_embedder.1.weight"] = mx.zeros((96, 64))
    mx.save_safetensors(str(tmp_path / "dit.safetensors"), dit)
    with pytest.raises(CheckpointError, match="hidden size 48 but the DiT .* caption features of 64"):
        convert(reference_checkpoint, tmp_path / "out", transformer=tmp_path / "dit.safetensors")
    assert_nothing_written(tmp_path / "out")


def test_bad_quantization_arguments(reference_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="group size must be one of 32, 64, 128"):
        convert(reference_checkpoint, tmp_path / "out", quantize=4, group_size=16)
    with pytest.raises(ValueError, match="bits must be one of"):
        convert(reference_checkpoint, tmp_path / "out", quantize=7)
    # 128 divides none of the tiny text encoder's input widths: nothing to quantize is an error, not a no-op.
    with pytest.raises(ValueError, match="no layer of the text encoder can be quantized with group size 128"):
        convert(reference_checkpoint, tmp_path / "out", quantize=8, group_size=128)
    assert_nothing_written(tmp_path / "out")


# ----------------------------------------------------------------------------------------------
def test_a_converted_folder_reports_its_quantization_and_dtype(converted, tmp_path):
    """The bits and dtype a folder was converted to show in `pipe`, the CLI's Loaded line and the PNG, without
    --quantize (a converted 4-bit folder once said "none")."""
    from PIL import Image

    from zimage_mlx import fp16

    dst = converted("bfloat16", 4)
    pipe = ZImagePipeline.from_pretrained(dst)  # auto, on this CPU: float32 (upcast)
    assert pipe.quantize is None and pipe.quantization == {"transformer": 4, "text_encoder": 8}
    assert (pipe.dtype, pipe.stored_dtype) == ("float32", "bfloat16")
    assert describe_pipeline(pipe) == "float32 (stored bfloat16), DiT 4-bit, text encoder 8-bit"
    out = tmp_path / "q.png"
    r = CliRunner().invoke(cli.main, ["generate", "a fox", "-m", str(dst), "--size", "32", "--steps", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "(float32 (stored bfloat16), DiT 4-bit, text encoder 8-bit)" in r.stderr
    with Image.open(out) as im:
        text = im.text
    assert (text["quantization"], text["text_encoder_quantization"], text["quantize"]) == ("4", "8", "none")
    assert "Quantization: 4-bit" in text["parameters"] and "Text encoder quantization: 8-bit" in text["parameters"]
    assert Recipe.from_png(out).quantize is None  # a replay loads the folder as stored
    # On the fly, every model is reported too.
    on_the_fly = ZImagePipeline.from_pretrained(converted("float32"), quantize=8)
    assert on_the_fly.quantization == {"transformer": 8, "text_encoder": 8} and on_the_fly.stored_dtype == "float32"
    assert describe_pipeline(on_the_fly) == "float32, 8-bit"

    # dtype="auto" honours the folder's dtype on a GPU; the CPU stays float32.
    passing = {"max_abs_weight": 14.0, "max_abs_weight_layer": "x", "ffn_norm1_std": 0.1, "ffn_norm1_std_key": "k"}
    m3, m1 = ("Apple M3 Max", "applegpu_g15s"), ("Apple M1", "applegpu_g13g")
    assert fp16.choose_dtype("auto", passing, gpu=m3, stored="float16").dtype == "float16"
    assert fp16.choose_dtype("auto", passing, gpu=m1, stored="float32").dtype == "float32"
    assert fp16.choose_dtype("auto", passing, gpu=m3, stored="bfloat16").dtype == "bfloat16"
    assert fp16.choose_dtype("auto", passing, gpu=m1, stored="bfloat16").dtype == "float16"  # bfloat16 emulated there
    failing = dict(passing, ffn_norm1_std=0.5)
    assert fp16.choose_dtype("auto", failing, gpu=m3, stored="float16").dtype == "bfloat16"
    assert fp16.choose_dtype("auto", None, gpu=m3, stored="float16").pending
    assert fp16.choose_dtype("auto", passing, gpu=None, stored="float16").dtype == "float32"  # this CPU
    assert fp16.choose_dtype("float16", failing, gpu=None, stored="float32").dtype == "float16"  # asked: honoured


# Command line


def test_cli(reference_checkpoint, tmp_path):
    dst = tmp_path / "q8"
    args = ["convert", str(reference_checkpoint), str(dst), "--quantize", "8", "--group-size", "32", "--dtype", "float32"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("transformer") and "8-bit (group 32)" in lines[0]
    assert lines[-1].startswith(f"Wrote {dst}")
    again = CliRunner().invoke(cli.main, args)
    assert again.exit_code == 2
    assert again.stderr.strip() == f"Error: {dst} already exists; allow replacing it (--force)"
    bad = CliRunner().invoke(cli.main, ["convert", str(reference_checkpoint), str(tmp_path / "x"), "--quantize", "3"])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert (tmp_path / "x").exists() is False


def test_standalone_script(reference_checkpoint, tmp_path):
    script = Path(__file__).resolve().parents[1] / "convert" / "convert.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "SRC" in out.stdout and "--quantize" in out.stdout
    # A real conversion, from another folder (the script finds the package from its own path).
    dst = tmp_path / "q8"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(script), str(reference_checkpoint), str(dst), "--quantize", "8",
                          "--group-size", str(GROUP), "--dtype", "float32"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith(f"Wrote {dst}")
    assert json.loads((dst / "transformer" / "config.json").read_text())["quantization"]["bits"] == 8
    pipe = ZImagePipeline.from_pretrained(dst, dtype="float32")
    assert pipe.quantization == {"transformer": 8, "text_encoder": 8}
    assert_same(params(pipe.transformer), params(ZImageTransformer.from_pretrained(
        reference_checkpoint / "transformer", quantize=8, group_size=GROUP)))


def test_converted_folders_keep_what_prompt_enhancement_runs(reference_checkpoint, converted):
    """The last layer and final norm that encoding skips are written too, so a converted folder enhances
    prompts exactly as the original (float32), and a quantized one loads its tail quantized as stored."""
    from mlx.utils import tree_flatten

    kw = dict(temperature=0, max_tokens=12)
    original = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32", low_memory=True)
    expected = original.enhance_prompt("a red fox in the snow", **kw)
    folder = converted("float32")
    assert ZImagePipeline.from_pretrained(folder, dtype="float32", low_memory=True).enhance_prompt(
        "a red fox in the snow", **kw) == expected
    quantized = ZImagePipeline.from_pretrained(converted("float32", 8), dtype="float32")
    assert isinstance(quantized.enhance_prompt("a red fox", **kw), str)
    tail = quantized._enhancer.tail
    assert any(k.endswith(".scales") for k, _ in tree_flatten(tail.parameters()))  # stored quantized
