"""Text encoder parity with diffusers' ZImagePipeline.encode_prompt (transformers' Qwen3) on the reference checkpoint."""

from __future__ import annotations

import gc
import json
import shutil
import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import reference
from zimage_mlx.text_encoder import PromptTruncatedWarning, TextEncoder
from zimage_mlx.weights import CheckpointError

LONG = "A photorealistic portrait of an astronaut riding a horse on the moon, golden hour light. 一只可爱的猫 🎨 " * 12

PROMPTS = {
    "english": "A red neon sign that says OPEN above a rainy street in Tokyo at night, cinematic.",
    "chinese": "一只可爱的猫坐在窗台上，阳光明媚，高清摄影。",
    "mixed": "中国传统水墨画，山水，云雾缭绕。 The quick brown fox jumps over the lazy dog.",
    "emoji": "Emoji test 🎨🚀✨ and 👩‍👩‍👧 family, flags 🇨🇳🇫🇷",
    "empty": "",
    "whitespace": "line one\n\nline two   with    runs of spaces\t\ttabs \n  \n",
    "long": LONG,  # > 512 tokens with this tokenizer: truncated
}

# float32: both sides run the same float32 math in a different order (matmul / softmax accumulation over 3
# layers). Measured on these prompts: max abs error 3.4e-6 (mean 5e-7) on values up to 7.6, ~4e-7 relative.
# 2e-5 leaves 6x headroom and is still 1e4 times below the distance to any wrong hidden state (>= 3.0, see
# test_second_to_last_hidden_state).
F32_ATOL = 2e-5
# bfloat16 vs transformers in bfloat16: both round every op to bf16, in different places (transformers rounds
# the RMSNorm output before the weight multiply, its RoPE tables, ...). Measured: max abs error 0.094 (512-token
# prompt; 0.0625-0.078 on the others) on values up to 7.56, i.e. <= 1.24% of max |ref| and 3 bf16 ulps at that
# magnitude; mean abs error <= 0.0118 (0.16% of max |ref|). transformers' own bf16 run is 0.055 from its float32
# run. Bounds: max 2%, mean 0.4% of max |ref|.
BF16_RTOL_OF_MAX = 0.02
BF16_MEAN_RTOL_OF_MAX = 0.004


def ref_embeds(pipe, prompts, max_sequence_length=512):
    """diffusers' encode_prompt (batched, padded to max_sequence_length, masked), as float32 numpy."""
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            list(prompts), device="cpu", do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
        )
    return [e.float().numpy() for e in embeds]


def ref_hidden_states(pipe, ids):
    """transformers' hidden_states for one unpadded sequence, plus each decoder layer's raw output (hooks)."""
    raw = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: raw.append(o[0] if isinstance(o, tuple) else o))
        for layer in pipe.text_encoder.layers
    ]
    try:
        with torch.no_grad():
            out = pipe.text_encoder(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return [h[0].float().numpy() for h in out.hidden_states], [r[0].float().numpy() for r in raw]


def encode_np(encoder, prompts, **kw):
    out = encoder.encode(prompts, **kw)
    mx.eval(out)
    return [np.array(o.astype(mx.float32)) for o in out]


@pytest.fixture(scope="module")
def encoder(reference_checkpoint):
    return TextEncoder.from_pretrained(reference_checkpoint)


@pytest.fixture(scope="module")
def encoder_bf16(reference_checkpoint):
    return TextEncoder.from_pretrained(reference_checkpoint, dtype="bfloat16")


@pytest.fixture(scope="module")
def reference_pipeline_bf16(reference_checkpoint):
    pipe = reference.load_reference_pipeline(reference_checkpoint, dtype=torch.bfloat16)
    assert pipe.text_encoder.dtype == torch.bfloat16
    return pipe


def test_prompt_format_and_token_ids_match_reference(encoder, reference_pipeline):
    tok = reference_pipeline.tokenizer
    for name, prompt in PROMPTS.items():
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        # Trap 11: no <think> block, no system prompt.
        assert text == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", name
        # diffusers' call: padded to 512 and truncated, then the mask selects the valid tokens.
        ref = tok(text, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        expected = ref.input_ids[0][ref.attention_mask[0].bool()].tolist()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            assert encoder.tokenize(prompt) == expected, name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_diffusers_encode_prompt(dtype, encoder, encoder_bf16, reference_pipeline, reference_pipeline_bf16):
    ours_encoder, pipe = (encoder, reference_pipeline) if dtype == "float32" else (encoder_bf16, reference_pipeline_bf16)
    ref = ref_embeds(pipe, PROMPTS.values())
    with pytest.warns(PromptTruncatedWarning):
        raw = ours_encoder.encode(list(PROMPTS.values()))
    assert all(o.dtype == ours_encoder.dtype for o in raw)
    mx.eval(raw)
    ours = [np.array(o.astype(mx.float32)) for o in raw]
    for name, r, o in zip(PROMPTS, ref, ours):
        assert o.shape == r.shape == (o.shape[0], encoder.hidden_size), name
        err = np.abs(o - r).max()
        if dtype == "float32":
            assert err <= F32_ATOL, f"{name}: max abs error {err:.3g}"
        else:
            scale = np.abs(r).max()
            assert err <= BF16_RTOL_OF_MAX * scale, f"{name}: max abs error {err:.3g} (max |ref| {scale:.3g})"
            assert np.abs(o - r).mean() <= BF16_MEAN_RTOL_OF_MAX * scale, name
    assert ours[-1].shape[0] == 512


def test_truncation_warns_and_matches_reference(encoder, reference_pipeline):
    n = len(encoder.tokenize(LONG, max_sequence_length=10_000))
    assert n > 512
    with pytest.warns(PromptTruncatedWarning, match=rf"is {n} tokens long.*max_sequence_length=512.*last {n - 512} tokens were dropped"):
        (ours,) = encode_np(encoder, LONG)
    assert ours.shape[0] == 512
    # A custom max_sequence_length truncates a short prompt the same way as the reference.
    short = PROMPTS["english"]
    with pytest.warns(PromptTruncatedWarning):
        (ours,) = encode_np(encoder, short, max_sequence_length=8)
    (ref,) = ref_embeds(reference_pipeline, [short], max_sequence_length=8)
    assert ours.shape == ref.shape == (8, encoder.hidden_size)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=F32_ATOL)
    # Prompts that fit are not reported.
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        encoder.encode([p for k, p in PROMPTS.items() if k != "long"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_equals_one_by_one_exactly(dtype, encoder, encoder_bf16):
    enc = encoder if dtype == "float32" else encoder_bf16
    prompts = [PROMPTS["english"], "", PROMPTS["chinese"], PROMPTS["emoji"]]  # positive + negative "" etc.
    batch = enc.encode(prompts)
    single = [enc.encode(p)[0] for p in prompts]
    mx.eval(batch, single)
    for b, s in zip(batch, single):
        assert mx.array_equal(b, s).item()
    # Order does not matter either.
    rev = enc.encode(prompts[::-1])
    assert all(mx.array_equal(a, b).item() for a, b in zip(batch, rev[::-1]))


def test_second_to_last_hidden_state(encoder, reference_pipeline):
    """hidden_states[-2] is the raw output of layer n-2; our output matches it and no neighbouring state."""
    te = reference_pipeline.text_encoder
    n_layers = te.config.num_hidden_layers
    ids = encoder.tokenize(PROMPTS["english"])
    hs, raw = ref_hidden_states(reference_pipeline, ids)
    # transformers v5: (embeddings, layer 0 .. layer n-2 outputs, final-normed layer n-1 output).
    assert len(hs) == n_layers + 1 and len(raw) == n_layers
    np.testing.assert_array_equal(hs[-2], raw[n_layers - 2])
    with torch.no_grad():
        normed_last = te.norm(torch.tensor(raw[-1])[None])[0].numpy()
        normed_second = te.norm(torch.tensor(hs[-2])[None])[0].numpy()
    np.testing.assert_array_equal(hs[-1], normed_last)

    (ours,) = encode_np(encoder, PROMPTS["english"])
    assert np.abs(ours - hs[-2]).max() <= F32_ATOL
    wrong = {
        "hidden_states[-1] (last layer + final norm)": hs[-1],
        "raw output of the last layer": raw[-1],
        "final norm applied to hidden_states[-2]": normed_second,
        "hidden_states[-3]": hs[-3],
    }
    for what, other in wrong.items():
        # Measured: each wrong choice is >= 3.0 away. Required: > 0.2, 1e4 x the float32 tolerance and above the
        # bf16 bound (2% of 7.6 = 0.15), so neither parity test could pass with a wrong hidden state.
        assert np.abs(ours - other).max() > 1e4 * F32_ATOL, what


def test_unused_layers_are_not_built(encoder, reference_checkpoint):
    config = json.loads((reference_checkpoint / "text_encoder" / "config.json").read_text())
    n = config["num_hidden_layers"]
    assert len(encoder.model.layers) == n - 1
    keys = {k for k, _ in tree_flatten(encoder.model.parameters())}
    assert "norm.weight" not in keys and not any(k.startswith(f"layers.{n - 1}.") for k in keys)
    assert all(p.dtype == mx.float32 for p in encoder.model.parameters()["layers"][0]["mlp"]["up_proj"].values())


def test_release_style_config(encoder, checkpoint_copy):
    """The release writes top-level rope_theta / torch_dtype; transformers v5 writes rope_parameters / dtype."""
    path = checkpoint_copy / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    theta = config.pop("rope_parameters")["rope_theta"]
    config.pop("dtype")
    config.update(rope_theta=theta, torch_dtype="bfloat16", rope_scaling=None)
    path.write_text(json.dumps(config))
    other = TextEncoder.from_pretrained(checkpoint_copy)
    assert other.model.args.rope_theta == encoder.model.args.rope_theta == 1e6
    a, b = other.encode(PROMPTS["mixed"]) + encoder.encode(PROMPTS["mixed"])
    assert mx.array_equal(a, b).item()


def test_bad_prompts(encoder):
    for bad in (None, 3, b"bytes", {"prompt": "x"}):
        with pytest.raises(TypeError, match="prompts must be a string or a list of strings"):
            encoder.encode(bad)
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a string, got int"):
        encoder.encode(["ok", 3])
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a string, got NoneType"):
        encoder.encode([None])
    with pytest.raises(ValueError, match="empty list"):
        encoder.encode([])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_sequence_length must be a positive integer"):
            encoder.encode("x", max_sequence_length=bad)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_checkpoint_errors(reference_checkpoint, checkpoint_copy):
    with pytest.raises(CheckpointError) as e:
        TextEncoder.from_pretrained(reference_checkpoint, cap_feat_dim=2560)
    assert "hidden size is 48" in one_line(e) and "2560" in one_line(e)
    cap = reference.TRANSFORMER_CONFIG["cap_feat_dim"]
    assert TextEncoder.from_pretrained(reference_checkpoint, cap_feat_dim=cap).hidden_size == cap

    with pytest.raises(ValueError, match="float32 or bfloat16"):
        TextEncoder.from_pretrained(reference_checkpoint, dtype="float16")

    shutil.rmtree(checkpoint_copy / "tokenizer")
    with pytest.raises(CheckpointError) as e:
        TextEncoder.from_pretrained(checkpoint_copy)
    assert f"{checkpoint_copy / 'tokenizer'} is missing" in one_line(e) and "full Z-Image checkpoint" in one_line(e)

    with pytest.raises(CheckpointError) as e:
        TextEncoder.from_pretrained(checkpoint_copy / "text_encoder")
    assert "text_encoder is missing" in one_line(e)


def test_release_frees_weights(reference_checkpoint):
    te = TextEncoder.from_pretrained(reference_checkpoint)
    (expected,) = encode_np(te, PROMPTS["english"])
    nbytes = te.nbytes
    gc.collect()
    before = mx.get_active_memory()
    te.release()
    gc.collect()
    freed = before - mx.get_active_memory()
    # Fixture: 364,032 bytes of float32 weights, all of them returned.
    assert freed >= nbytes, (freed, nbytes)
    assert te.nbytes == 0
    with pytest.raises(RuntimeError, match="released"):
        te.encode("x")

    # Features not evaluated before release() keep the weights they need and stay computable.
    te = TextEncoder.from_pretrained(reference_checkpoint)
    lazy = te.encode(PROMPTS["english"])
    te.release()
    np.testing.assert_array_equal(np.array(lazy[0]), expected)


def test_encode_evaluates_layer_by_layer(encoder, monkeypatch):
    """kernels.cut after every decoder layer: encoding holds one layer's activations at a time."""
    calls = []
    real_eval = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a: (calls.append(len(a)), real_eval(*a))[1])
    encoder.encode("a cat")
    assert len(calls) == len(encoder.model.layers)
