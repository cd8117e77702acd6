"""GGUF DiTs: the tiny reference DiT written with gguf-py in ComfyUI's single-file names, per tensor type, loaded
with `from_pretrained(base, transformer=FILE.gguf)` and converted with `convert --transformer FILE.gguf`,
against diffusers with the weights gguf-py dequantizes; damaged and foreign files.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file

import mlx.core as mx
import mlx.nn as nn

import reference
from test_lora import LATENTS, PROMPT, SIZE, ours
from zimage_mlx import ZImagePipeline, cli
from zimage_mlx.errors import CheckpointError
from zimage_mlx.gguf_dit import read_gguf


def comfy_names(folder) -> dict[str, np.ndarray]:
    """The reference DiT (diffusers names) in ComfyUI's single-file names: fused qkv, out, q_norm, x_embedder."""
    state = {}
    for f in sorted((folder / "transformer").glob("*.safetensors")):
        state.update(load_file(str(f)))
    out = {}
    for k, v in state.items():
        k = k.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        k = k.replace(".attention.to_out.0.", ".attention.out.").replace(".norm_q.", ".q_norm.").replace(".norm_k.", ".k_norm.")
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:
            parts = [state[k.replace("to_q", p)] for p in ("to_q", "to_k", "to_v")]
            k, v = k.replace(".to_q.", ".qkv."), np.concatenate(parts)
        out[k] = v.astype(np.float32)
    return out


def quantizable(name: str, a: np.ndarray) -> bool:
    """As city96's convert: 1-D and <= 1024-element tensors stay F32; the rest is quantized."""
    return a.ndim == 2 and name.endswith(".weight") and a.shape[1] % 32 == 0 and a.size > 1024


def write_gguf(path, state: dict[str, np.ndarray], qtype, prefix: str = "") -> dict[str, np.ndarray]:
    """Write a GGUF; returns the values its tensors hold (dequantized with gguf-py), in ComfyUI names."""
    w = GGUFWriter(str(path), "lumina2")
    held = {}
    for name, a in state.items():
        if quantizable(name, a) and qtype != T.F32:
            q = quantize(a, qtype)
            w.add_tensor(prefix + name, q, raw_dtype=qtype)
            held[name] = dequantize(q, qtype).reshape(a.shape)
        else:
            w.add_tensor(prefix + name, a)
            held[name] = a
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def theirs(checkpoint, held: dict[str, np.ndarray]) -> np.ndarray:
    """diffusers' image with its DiT's weights replaced by `held` (qkv split back into q, k, v)."""
    ref = reference.load_reference_pipeline(checkpoint)
    params = dict(ref.transformer.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            comfy = name.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
            comfy = comfy.replace(".attention.to_out.0.", ".attention.out.").replace(".norm_q.", ".q_norm.")
            comfy = comfy.replace(".norm_k.", ".k_norm.")
            if any(f".attention.to_{x}." in comfy for x in "qkv"):
                i = "qkv".index(comfy.split(".attention.to_")[1][0])
                fused = held[comfy.replace(f".to_{'qkv'[i]}.", ".qkv.")]
                value = np.split(fused, 3)[i]
            else:
                value = held[comfy]
            p.copy_(torch.from_numpy(np.ascontiguousarray(value)).reshape(p.shape))
    image = ref(prompt=PROMPT, latents=torch.from_numpy(LATENTS), num_inference_steps=2, guidance_scale=0.0,
                **SIZE).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def state(reference_checkpoint):
    return comfy_names(reference_checkpoint)


KEPT = {T.Q8_0: 8, T.Q4_0: 4, T.Q4_1: 4}


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.F16], ids=lambda q: q.name)
def test_gguf_matches_diffusers_with_dequantized_weights(qtype, state, reference_checkpoint, tmp_path):
    prefix = "model.diffusion_model." if qtype == T.Q4_1 else ""  # sd.cpp's prefix, once
    held = write_gguf(tmp_path / "dit.gguf", state, qtype, prefix)
    pipe = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32", transformer=tmp_path / "dit.gguf")
    layers = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}
    quantized = {n: m for n, m in layers.items() if isinstance(m, nn.QuantizedLinear)}
    if qtype in KEPT:  # kept quantized, group 32, at the block's bits
        assert quantized and all(m.bits == KEPT[qtype] and m.group_size == 32 for m in quantized.values())
        assert pipe.quantization["transformer"] == KEPT[qtype]
    else:
        assert not quantized and pipe.quantization["transformer"] is None
    # float32 on both sides from the same dequantized values (MLX's affine dequantization of a Q block is exact):
    # rounding only.
    assert np.abs(ours(pipe) - theirs(reference_checkpoint, held)).max() <= 1


def test_quantized_blocks_stay_small(state, reference_checkpoint, tmp_path):
    """Bytes of the quantized layers as loaded: packed weights plus float32 scales and biases per 32 values."""
    sizes = {}
    for qtype in (T.F32, T.Q8_0, T.Q4_0):
        write_gguf(tmp_path / f"{qtype.name}.gguf", state, qtype)
        dit = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32",
                                             transformer=tmp_path / f"{qtype.name}.gguf").transformer
        sizes[qtype] = sum(v.nbytes for k, v in _params(dit) if "layers." in k and ".attention." in k)
    # per value: float32 4 bytes; Q8_0 1 + 8/32; Q4_0 0.5 + 8/32
    assert sizes[T.Q8_0] == pytest.approx(sizes[T.F32] * 1.25 / 4, rel=0.02)
    assert sizes[T.Q4_0] == pytest.approx(sizes[T.F32] * 0.75 / 4, rel=0.02)


def _params(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_read_gguf_maps_blocks_exactly(state, tmp_path):
    """Each kept block type dequantizes in MLX to exactly what gguf-py dequantizes."""
    name = "layers.0.feed_forward.w1.weight"
    for qtype in KEPT:
        held = write_gguf(tmp_path / "one.gguf", {name: state[name]}, qtype)
        g = read_gguf(tmp_path / "one.gguf")
        base = name.removesuffix(".weight")
        w = mx.dequantize(g.tensors[name], g.tensors[f"{base}.scales"], g.tensors[f"{base}.biases"], group_size=32,
                          bits=KEPT[qtype])
        np.testing.assert_array_equal(np.array(w), held[name])


def convert(*args):
    return CliRunner().invoke(cli.main, ["convert", *map(str, args)])


def test_convert_gguf(state, reference_checkpoint, tmp_path):
    """convert --transformer FILE.gguf: Q4_0 stays 4-bit group 32, recorded in config.json; the folder gives the
    image the file gives."""
    write_gguf(tmp_path / "dit.gguf", state, T.Q4_0)
    r = convert(reference_checkpoint, tmp_path / "out", "--transformer", tmp_path / "dit.gguf", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    import json

    q = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 32
    folder = ZImagePipeline.from_pretrained(tmp_path / "out", dtype="float32")
    direct = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32", transformer=tmp_path / "dit.gguf")
    assert folder.quantization["transformer"] == 4
    np.testing.assert_array_equal(ours(folder), ours(direct))


def test_convert_gguf_requantize(state, reference_checkpoint, tmp_path):
    """Q5_0 is dequantized; --quantize 8 re-quantizes it with our policy (group 64)."""
    write_gguf(tmp_path / "dit.gguf", state, T.Q5_0)
    r = convert(reference_checkpoint, tmp_path / "out", "--transformer", tmp_path / "dit.gguf", "--dtype", "float32",
                "--quantize", "8")
    assert r.exit_code == 0, r.output
    assert ZImagePipeline.from_pretrained(tmp_path / "out", dtype="float32").quantization["transformer"] == 8


def test_truncated_and_foreign_gguf(state, reference_checkpoint, tmp_path):
    write_gguf(tmp_path / "dit.gguf", state, T.Q8_0)
    data = (tmp_path / "dit.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    llm = GGUFWriter(str(tmp_path / "llm.gguf"), "llama")
    llm.add_tensor("token_embd.weight", np.zeros((32, 64), np.float32))
    llm.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), np.float32))
    llm.write_header_to_file(), llm.write_kv_data_to_file(), llm.write_tensors_to_file(), llm.close()
    for bad, match in (("cut.gguf", "cannot read .*cut.gguf as a GGUF file"),
                       ("llm.gguf", "should hold Z-Image's DiT but holds no model zimage-mlx knows")):
        with pytest.raises(CheckpointError, match=match):
            ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32", transformer=tmp_path / bad)
        r = convert(reference_checkpoint, tmp_path / "out", "--transformer", tmp_path / bad)
        assert r.exit_code != 0 and not (tmp_path / "out").exists()
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr


def test_generate_transformer_flag(state, reference_checkpoint, tmp_path):
    """generate --transformer FILE.gguf: the Loaded line and the PNG say what the DiT holds."""
    import json

    from PIL import Image

    write_gguf(tmp_path / "dit.gguf", state, T.Q8_0)
    out = tmp_path / "x.png"
    r = CliRunner().invoke(cli.main, ["generate", PROMPT, "-m", str(reference_checkpoint), "--transformer",
                                      str(tmp_path / "dit.gguf"), "--size", "32", "--steps", "2", "--seed", "3",
                                      "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "8-bit; DiT from dit.gguf (GGUF " in r.stderr and "Q8_0 kept quantized (group 32)" in r.stderr, r.stderr
    pipe = ZImagePipeline.from_pretrained(reference_checkpoint, transformer=tmp_path / "dit.gguf")
    with Image.open(out) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")),
                                      np.asarray(pipe.generate(PROMPT, steps=2, seed=3, **SIZE)[0]))
        assert "8" in json.dumps(dict(im.text)).split("quantiz", 1)[1][:40]
        assert im.text["transformer"] == "dit.gguf"  # the DiT file decides the pixels: the recipe names it
    # A replay needs the DiT file again (a file is named by its name only), and then gives the same pixels.
    again = tmp_path / "again.png"
    r = CliRunner().invoke(cli.main, ["generate", "--from-image", str(out), "-m", str(reference_checkpoint),
                                      "-o", str(again)])
    assert r.exit_code == 2 and "was made with the DiT file dit.gguf; give it again with --transformer" in r.stderr
    r = CliRunner().invoke(cli.main, ["generate", "--from-image", str(out), "-m", str(reference_checkpoint),
                                      "--transformer", str(tmp_path / "dit.gguf"), "-o", str(again)])
    assert r.exit_code == 0, r.output
    with Image.open(out) as a, Image.open(again) as b:
        np.testing.assert_array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# ------------------------------------------------------------------------------------------------
# K-quants: gguf-py dequantizes them but cannot quantize them, so blocks are written here by hand from the layout
# its dequantizers (and llama.cpp's ggml-common.h block_q4_K / block_q6_K) read, with simple scale choices.

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q6_k(a: np.ndarray) -> np.ndarray:
    """Q6_K blocks (uint8, rows x (width / 256 * 210)): ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16]
    (one per 16 values), f16 d; value = d * scale * (q - 32), q in 0..63."""
    rows = a.shape[0]
    x = a.astype(np.float32).reshape(-1, 16, 16)  # (blocks, groups of 16, 16)
    n = x.shape[0]
    group = np.abs(x).max(-1) / 31  # each group's step
    d = _f16(group.max(-1) / 127)  # (blocks,)
    df = d.astype(np.float32)
    sc = np.clip(np.round(np.divide(group, df[:, None], out=np.zeros_like(group), where=df[:, None] > 0)), -128, 127)
    step = df[:, None] * sc
    q = np.round(np.divide(x, step[..., None], out=np.zeros_like(x), where=step[..., None] != 0))
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, QK_K)
    p = np.arange(QK_K)
    h, r = p // 128, p % 128
    ql = np.zeros((n, 128), np.uint8)
    qh = np.zeros((n, 64), np.uint8)
    for i in range(QK_K):  # position i: ql byte h*64 + r%64 (nibble r//64), qh byte h*32 + r%32 (bits 2*(r//32))
        ql[:, h[i] * 64 + r[i] % 64] |= (q[:, i] & 0x0F) << np.uint8(4 * (r[i] // 64))
        qh[:, h[i] * 32 + r[i] % 32] |= (q[:, i] >> 4) << np.uint8(2 * (r[i] // 32))
    blocks = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=1)
    return blocks.reshape(rows, -1)


def quantize_q4_k(a: np.ndarray) -> np.ndarray:
    """Q4_K blocks (uint8, rows x (width / 256 * 144)): f16 d, f16 dmin, 12 bytes of 6-bit scales and mins (8 of
    each, one per 32 values), qs[128] (4 bits); value = d * scale * q - dmin * min, q in 0..15."""
    rows = a.shape[0]
    x = a.astype(np.float32).reshape(-1, 8, 32)
    n = x.shape[0]
    lo = np.minimum(x.min(-1), 0)  # (blocks, 8)
    step = (x.max(-1) - lo) / 15
    d, dmin = _f16(step.max(-1) / 63), _f16(-lo.min(-1) / 63)
    df, dmf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(step, df, out=np.zeros_like(step), where=df > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(-lo, dmf, out=np.zeros_like(lo), where=dmf > 0)), 0, 63).astype(np.uint8)
    scale, offset = (df * sc)[..., None], (dmf * mn)[..., None]
    q = np.round(np.divide(x + offset, scale, out=np.zeros_like(x), where=scale > 0))
    q = np.clip(q, 0, 15).astype(np.uint8)  # (blocks, 8, 32): sub-block j = 2 * chunk + nibble
    qs = (q[:, 0::2] | (q[:, 1::2] << np.uint8(4))).reshape(n, 128)
    packed = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=1).astype(np.uint8)
    blocks = np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed, qs], axis=1)
    return blocks.reshape(rows, -1)


K_QUANTIZERS = {T.Q6_K: quantize_q6_k, T.Q4_K: quantize_q4_k}


def k_quantizable(name: str, a: np.ndarray) -> bool:
    """The tiny DiT's 2-D weights whose rows are whole 256-value blocks: the FFNs' w2 (96 x 256), the time
    embedder's first layer (1024 x 256)..."""
    return a.ndim == 2 and name.endswith(".weight") and a.shape[1] % QK_K == 0


def write_k_gguf(path, state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """A GGUF with the 256-wide weights as K-quants (Q6_K and Q4_K in turn), the rest Q8_0 / F32 as city96's;
    returns the values gguf-py dequantizes (ComfyUI names) and each K-quant tensor's type."""
    w = GGUFWriter(str(path), "lumina2")
    held, kinds = {}, {}
    for name, a in state.items():
        if k_quantizable(name, a):
            qtype = list(K_QUANTIZERS)[len(kinds) % 2]
            q = K_QUANTIZERS[qtype](a)
            kinds[name] = qtype
        elif quantizable(name, a):
            qtype, q = T.Q8_0, quantize(a, T.Q8_0)
        else:
            w.add_tensor(name, a)
            held[name] = a
            continue
        w.add_tensor(name, q, raw_dtype=qtype)
        held[name] = dequantize(q, qtype).reshape(a.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held, kinds


@pytest.mark.parametrize("qtype", list(K_QUANTIZERS), ids=lambda q: q.name)
def test_hand_written_k_blocks_are_valid(qtype):
    """The blocks are what the layout says: gguf-py reads back the values within the quantization's step."""
    a = np.random.default_rng(0).normal(size=(8, 512)).astype(np.float32) * np.linspace(0.01, 2, 512)
    a[0, :256] = 0  # an all-zero block
    q = K_QUANTIZERS[qtype](a)
    assert q.shape == (8, 2 * {T.Q6_K: 210, T.Q4_K: 144}[qtype])
    back = dequantize(q, qtype).reshape(a.shape)
    groups = a.reshape(-1, {T.Q6_K: 16, T.Q4_K: 32}[qtype])
    levels = {T.Q6_K: 31, T.Q4_K: 15}[qtype]
    step = (groups.max(-1) - np.minimum(groups.min(-1), 0)) / levels
    assert np.all(np.abs(back - a).reshape(groups.shape) <= step[:, None] * 0.75 + 2e-3 * np.abs(a).max())
    np.testing.assert_array_equal(back[0, :256], 0)


def test_k_quant_gguf_matches_gguf_py_and_diffusers(state, reference_checkpoint, tmp_path):
    """Q6_K and Q4_K weights: our loader holds exactly gguf-py's dequantization, and the image is diffusers' with
    those weights within 1 level."""
    held, kinds = write_k_gguf(tmp_path / "k.gguf", state)
    assert len(kinds) >= 6 and set(kinds.values()) == {T.Q6_K, T.Q4_K}, kinds
    g = read_gguf(tmp_path / "k.gguf")
    for name in kinds:
        np.testing.assert_array_equal(np.array(g.tensors[name]), held[name])
    pipe = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32", transformer=tmp_path / "k.gguf")
    assert np.abs(ours(pipe) - theirs(reference_checkpoint, held)).max() <= 1
