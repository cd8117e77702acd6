"""Z-Image's prompt encoder: Qwen3-4B, with mlx-lm's layers, up to its second-to-last decoder layer.

Follows diffusers' `ZImagePipeline._encode_prompt` (diffusers/pipelines/z_image/pipeline_z_image.py):
the checkpoint's chat template around one user message, truncation at `max_sequence_length` tokens
(template included), then `hidden_states[-2]` of the valid tokens. In transformers that is the raw
output of decoder layer `num_hidden_layers - 2`, before the final norm, so the last decoder layer,
`model.norm` and the LM head are never built and their weights are never read.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.qwen3 import ModelArgs, TransformerBlock
from transformers import AutoTokenizer

from .errors import InputError

from . import kernels
from .sources import read_config
from .weights import (CheckpointError, check_quantization, load_into, load_safetensors, quant_policy,
                      quantize_as_stored, to_dtype)


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than max_sequence_length tokens (chat template included) and was cut."""


def model_args(config: dict) -> ModelArgs:
    """ModelArgs from a Qwen3 config.json in either style: the release's top-level `rope_theta` or
    transformers v5's `rope_parameters` (mlx-lm's ModelArgs reads both)."""
    if config.get("model_type") != "qwen3":
        raise CheckpointError(f"the text encoder must be a Qwen3 model, its config says model_type={config.get('model_type')!r}")
    if config.get("use_sliding_window"):
        raise CheckpointError("the text encoder config enables sliding-window attention, which Z-Image's Qwen3 does not use")
    if config.get("num_hidden_layers", 0) < 2:
        raise CheckpointError(f"the text encoder needs at least 2 layers, its config has {config.get('num_hidden_layers')}")
    try:
        return ModelArgs.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"text encoder config.json is incomplete: {e}") from None


class Qwen3Encoder(nn.Module):
    """Qwen3's token embeddings and its first num_hidden_layers - 1 decoder layers: no final norm, no head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers - 1)]

    def __call__(self, tokens: mx.array) -> mx.array:
        # tokens (B, L) without padding: the plain causal mask is the reference's causal + key-padding mask.
        h = self.embed_tokens(tokens)
        mask = create_attention_mask(h)
        for layer in self.layers:
            h = kernels.cut(layer(h, mask))  # one graph per layer: see kernels.cut
        return h  # (B, L, hidden)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Strip the Qwen3ForCausalLM `model.` prefix and drop the weights this truncated model never uses."""
        unused = {"lm_head.weight", "norm.weight"}
        last = f"layers.{self.args.num_hidden_layers - 1}."
        out = {}
        for key, w in weights.items():
            key = key.removeprefix("model.")
            if key not in unused and not key.startswith(last):
                out[key] = w
        return out


# Quantization policy, measured with benchmarks/quantization_error.py (random weights, so indicative): every
# Linear and the token embedding. With group size 64 the features move by 1.7% at 8 bits and 28% at 4
# bits, so the text encoder, which runs once per prompt, gets 8 bits unless 4 are asked for it explicitly.
# Quantizing the embedding adds a fifth to that error and saves 0.37 GB at Qwen3-4B size: it is quantized.
QUANT_KEEP: tuple[str, ...] = ()
MIN_DEFAULT_BITS = 8
DEFAULT_GROUP_SIZE = 64


def default_bits(bits: int | None) -> int | None:
    """The text encoder's bits when the whole model is quantized to `bits` (e.g. 4 -> 8)."""
    return None if bits is None else max(bits, MIN_DEFAULT_BITS)


def quant_predicate(bits: int, group_size: int = DEFAULT_GROUP_SIZE, keep: tuple[str, ...] = QUANT_KEEP):
    """The text encoder's quantization policy (weights.quant_policy): its Linear layers and the token
    embedding, except those under a `keep` prefix."""
    return quant_policy(bits, group_size, keep, types=(nn.Linear, nn.Embedding))


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise InputError("prompts is an empty list: pass at least one prompt (use \"\" for an empty prompt)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    return list(prompts)


def _check_max_length(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"max_sequence_length must be a positive integer, got {n!r}")
    return n


def _warn_truncated(prompt: str, n: int, kept: int) -> None:
    # stacklevel 3: the caller of encode() / tokenize().
    start = prompt if len(prompt) <= 40 else prompt[:40] + "..."
    warnings.warn(
        PromptTruncatedWarning(
            f"prompt {start!r} is {n} tokens long with the chat template, more than max_sequence_length={kept}: "
            f"the last {n - kept} tokens were dropped"
        ),
        stacklevel=3,
    )


class TextEncoder:
    """Turns prompts into the caption features Z-Image's DiT expects: one (L_i, hidden) array per prompt."""

    def __init__(self, model: Qwen3Encoder, tokenizer, dtype: mx.Dtype):
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.hidden_size = model.args.hidden_size

    @classmethod
    def from_pretrained(cls, root, dtype="float32", cap_feat_dim: int | None = None, quantize: int | None = None,
                        group_size: int = DEFAULT_GROUP_SIZE, prepare=None) -> "TextEncoder":
        """Load text_encoder/ and tokenizer/ from a Z-Image checkpoint folder.

        dtype is the compute dtype ("float32" or "bfloat16"); weights are cast to it. cap_feat_dim is the
        DiT's caption width: a text encoder of another hidden size is refused before any weight is read.
        quantize: bits to quantize a float text encoder to with this model's policy (`quant_predicate`); one
        stored quantized (by `zimage-mlx convert`) loads as stored and refuses other bits.
        prepare: called with the loaded (and quantized) Qwen3Encoder before its weights are read (tensor
        parallelism shards it there, so that only the slices are kept).
        """
        root = Path(root)
        dtype = to_dtype(dtype)
        if dtype not in (mx.float32, mx.bfloat16):
            raise ValueError(f"the text encoder runs in float32 or bfloat16, not {dtype}")
        for name in ("text_encoder", "tokenizer"):
            if not (root / name).is_dir():
                raise CheckpointError(f"{root / name} is missing: point to a full Z-Image checkpoint folder (with text_encoder/ and tokenizer/) or download one")
        config = read_config(root / "text_encoder")
        args = model_args(config)
        if cap_feat_dim is not None and args.hidden_size != cap_feat_dim:
            raise CheckpointError(
                f"the text encoder's hidden size is {args.hidden_size} but the transformer expects caption features of "
                f"{cap_feat_dim} (cap_feat_dim): text_encoder/ and transformer/ come from different models"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        except Exception as e:  # transformers raises OSError/ValueError/... on a damaged folder
            raise CheckpointError(f"cannot load the tokenizer from {root / 'tokenizer'}: {e}") from None
        if not tokenizer.chat_template:
            raise CheckpointError(f"{root / 'tokenizer'} has no chat template: it is not the checkpoint's Qwen3 tokenizer")

        if quantize is not None:
            check_quantization(quantize, group_size)
        model = Qwen3Encoder(args)
        weights = model.sanitize(load_safetensors(root / "text_encoder"))
        stored = quantize_as_stored(model, weights, config, "text encoder", quantize)
        # Once loaded, no name holds the file arrays, so each one is freed as soon as it is cast.
        load_into(model, weights, "text encoder", dtype=dtype)
        del weights
        if quantize is not None and stored is None:
            nn.quantize(model, class_predicate=quant_predicate(quantize, group_size))
        if prepare is not None:
            prepare(model)
        # Read and cast the kept weights now, one at a time so that at most one file array is alive next to
        # the cast ones (evaluated together, all of them were); the dropped ones are never read.
        for _, p in tree_flatten(model.parameters()):
            mx.eval(p)
        return cls(model, tokenizer, dtype)

    def tokenize(self, prompt: str, max_sequence_length: int = 512) -> list[int]:
        """Token ids of one prompt in the chat template, truncated to max_sequence_length like the reference."""
        self._check_loaded()
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        ids, n = self._token_ids(prompt, _check_max_length(max_sequence_length))
        if n > len(ids):
            _warn_truncated(prompt, n, len(ids))
        return ids

    def encode(self, prompts: str | list[str], max_sequence_length: int = 512) -> list[mx.array]:
        """Caption features: one (L_i, hidden_size) array per prompt, valid tokens only, in self.dtype, already
        evaluated (layer by layer, see kernels.cut).

        Each prompt runs alone at its own length (no padding), so a prompt's features do not depend on
        the other prompts of the call. A prompt longer than max_sequence_length tokens (chat template
        included) is truncated like the reference, with a PromptTruncatedWarning.
        """
        self._check_loaded()
        prompts = _check_prompts(prompts)
        max_sequence_length = _check_max_length(max_sequence_length)
        out = []
        for prompt in prompts:
            ids, n = self._token_ids(prompt, max_sequence_length)
            if n > len(ids):
                _warn_truncated(prompt, n, len(ids))
            out.append(self.model(mx.array(ids, dtype=mx.int32)[None])[0])  # (L, hidden)
        return out

    def _token_ids(self, prompt: str, max_sequence_length: int) -> tuple[list[int], int]:
        """(ids kept, untruncated token count) for one prompt."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        ids = self.tokenizer(text)["input_ids"]
        if len(ids) <= max_sequence_length:
            return ids, len(ids)
        # Re-tokenize with the reference's own truncation so that the kept ids are exactly its ids.
        return self.tokenizer(text, max_length=max_sequence_length, truncation=True)["input_ids"], len(ids)

    def _check_loaded(self) -> None:
        if self.model is None:
            raise RuntimeError("this TextEncoder was released; load it again with TextEncoder.from_pretrained()")

    @property
    def nbytes(self) -> int:
        """Bytes held by the weights (0 once released)."""
        if self.model is None:
            return 0
        return sum(p.nbytes for _, p in tree_flatten(self.model.parameters()))

    def release(self) -> None:
        """Free the weights and the tokenizer; encode() raises afterwards.

        encode() returns evaluated arrays, which hold no reference to the weights.
        """
        self.model = None
        self.tokenizer = None
        mx.clear_cache()
