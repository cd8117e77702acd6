"""Prompt enhancement with the checkpoint's own Qwen3: the text encoder's weights run whole as a causal LM.

Z-Image's text encoder is a complete Qwen3-4B chat model (Qwen3ForCausalLM, tied embeddings), of which
`text_encoder.Qwen3Encoder` builds the embeddings and layers 0..n-2. This module adds what a language model
needs besides: the last decoder layer, the final RMSNorm, and the LM head, which is the token embedding
(`embed_tokens.as_linear`) when the embeddings are tied, as in Qwen3-4B. Only those tensors are read from the
checkpoint, only when enhancing; the encoder's layers and embeddings are used in place, not copied.

Follows transformers' Qwen3ForCausalLM (models/qwen3/modeling_qwen3.py) with Qwen3's chat template and
thinking disabled (`enable_thinking=False`). Decoding is mlx-lm's `generate_step` with its KV cache
(`make_prompt_cache`): the prompt is read once, then each new token costs one single-token forward.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.qwen3 import TransformerBlock
from mlx_lm.sample_utils import apply_top_k, apply_top_p, greedy_sampler

from .inputs import MAX_SEED, check_int, check_number
from .sources import read_config
from .text_encoder import Qwen3Encoder, TextEncoder, quant_predicate
from .weights import CheckpointError, load_into, load_safetensors, quantize_as_stored

# Written for Z-Image: what its captions look like (long, concrete, one paragraph), in the prompt's language,
# with text to be rendered kept verbatim (Z-Image draws English and Chinese text).
SYSTEM_PROMPT = """You rewrite short prompts for a text-to-image model into one rich, concrete description of the image.
Rules:
- Answer in the language of the user's prompt: a Chinese prompt gets a Chinese description, an English prompt an English one.
- Keep everything the prompt asks for and contradict nothing. Any text that should appear in the image (words in quotation marks, signs, titles, labels) is kept exactly as written, in quotation marks, and you say where and how it appears.
- Add what is missing: the main subject and its details, the setting and background, the light and time of day, the camera and lens (shot type, focal length, depth of field), the composition, and the style or medium.
- Write one paragraph of about 80 to 200 words. Output only the description: no preamble, no title, no list, no explanation.
你为文生图模型改写提示词：用提示词所用的语言回答（中文提示词用中文回答）；引号中要画出的文字一字不改地保留；补充主体、场景、光线、镜头与构图；只输出一段描述，不要任何开场白。"""

# Qwen3's recommended sampling for non-thinking mode (its model card): temperature 0.7, top-p 0.8, top-k 20.
TOP_P = 0.8
TOP_K = 20
_THINK = re.compile(r"^\s*<think>\s*</think>\s*")


class Qwen3Tail(nn.Module):
    """What the text encoder leaves out of Qwen3ForCausalLM: the last decoder layer, the final norm, and the LM
    head when it is not tied to the embeddings."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.layer = TransformerBlock(args)
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def checkpoint_keys(self) -> dict[str, str]:
        """Qwen3ForCausalLM key prefix -> this module's prefix."""
        keys = {f"model.layers.{self.args.num_hidden_layers - 1}.": "layer.", "model.norm.": "norm."}
        if not self.args.tie_word_embeddings:
            keys["lm_head."] = "lm_head."
        return keys

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Keep the tail's tensors (with or without the `model.` prefix) under this module's names."""
        out = {}
        for key, w in weights.items():
            key = key if key.startswith(("model.", "lm_head.")) else "model." + key
            for prefix, ours in self.checkpoint_keys().items():
                if key.startswith(prefix):
                    out[ours + key[len(prefix):]] = w
        return out


class CausalLM(nn.Module):
    """Qwen3ForCausalLM made of a text encoder's embeddings and layers plus a `Qwen3Tail`; the mlx-lm model
    interface (`layers`, `__call__(inputs, cache)`), so mlx-lm's generation and caches drive it."""

    def __init__(self, encoder: Qwen3Encoder, tail: Qwen3Tail):
        super().__init__()
        self.encoder = encoder  # shared: the encoder's own arrays, no copy
        self.tail = tail

    @property
    def layers(self) -> list:
        return [*self.encoder.layers, self.tail.layer]

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.encoder.embed_tokens(inputs)  # (B, L, hidden)
        layers = self.layers
        cache = cache if cache is not None else [None] * len(layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(layers, cache):
            h = layer(h, mask, c)
        h = self.tail.norm(h)
        if self.tail.args.tie_word_embeddings:
            return self.encoder.embed_tokens.as_linear(h)  # (B, L, vocab)
        return self.tail.lm_head(h)


def _quantization(encoder: Qwen3Encoder) -> tuple[int, int] | None:
    """(bits, group_size) of a quantized encoder (read from its first attention projection), else None."""
    q = encoder.layers[0].self_attn.q_proj
    return (q.bits, q.group_size) if isinstance(q, nn.QuantizedLinear) else None


def load_tail(folder, encoder: Qwen3Encoder, dtype: mx.Dtype) -> Qwen3Tail:
    """Read the tail's tensors (and only those) from a text_encoder/ folder, cast to dtype, quantized like the
    encoder when it is quantized. A folder written without them (`zimage-mlx convert` keeps only what
    encoding needs) is refused with a one-line error."""
    folder = Path(folder)
    config = read_config(folder)
    tail = Qwen3Tail(encoder.args)
    weights = load_safetensors(folder, transform=tail.sanitize)  # lazy: the other tensors are never read
    if not any(k.startswith("layer.") for k in weights) or "norm.weight" not in weights:
        raise CheckpointError(
            f"{folder} holds only the layers prompt encoding uses (no last layer {encoder.args.num_hidden_layers - 1} "
            "or final norm), so it cannot run as a language model: enhance prompts with the original checkpoint"
        )
    stored = quantize_as_stored(tail, weights, config, "text encoder (prompt enhancer)")
    load_into(tail, weights, "text encoder (prompt enhancer)", dtype=dtype)
    del weights
    bits = _quantization(encoder)
    if bits is not None and stored is None:
        nn.quantize(tail, class_predicate=quant_predicate(*bits))
    for _, p in tree_flatten(tail.parameters()):
        mx.eval(p)  # one at a time: at most one file array next to the cast ones
    return tail


def _sampler(temperature: float, key: mx.array | None):
    """Greedy at temperature 0; else top-k, top-p and temperature sampling drawing from `key`, split once per
    token (no global random state)."""
    if temperature == 0:
        return greedy_sampler
    state = [key]

    def sample(logprobs: mx.array) -> mx.array:
        state[0], sub = mx.random.split(state[0])
        # transformers' order (what Qwen's recommended values assume): temperature, then top-k, then top-p.
        logits = logprobs * (1.0 / temperature)
        logits = apply_top_p(apply_top_k(logits - mx.logsumexp(logits, axis=-1, keepdims=True), TOP_K), TOP_P)
        return mx.random.categorical(logits, key=sub)

    return sample


class PromptEnhancer:
    """Rewrites prompts with a loaded TextEncoder's Qwen3 plus its tail. `release()` frees the tail only."""

    def __init__(self, encoder: TextEncoder, tail: Qwen3Tail):
        self.encoder = encoder
        self.tail = tail
        tok = encoder.tokenizer
        ids = {tok.eos_token_id, *(tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
                                   if t in tok.get_vocab())}
        self.stop_ids = {i for i in ids if i is not None}

    @classmethod
    def from_text_encoder(cls, encoder: TextEncoder, root) -> "PromptEnhancer":
        """Build the tail for a loaded TextEncoder from the checkpoint folder `root` it was loaded from."""
        encoder._check_loaded()
        return cls(encoder, load_tail(Path(root) / "text_encoder", encoder.model, encoder.dtype))

    @property
    def nbytes(self) -> int:
        """Bytes added to the text encoder's: the tail's weights (the tied head adds none)."""
        return 0 if self.tail is None else sum(p.nbytes for _, p in tree_flatten(self.tail.parameters()))

    def release(self) -> None:
        """Free the tail's weights (the text encoder is the caller's); generating raises afterwards."""
        self.tail = None
        mx.clear_cache()

    def token_ids(self, prompt: str, system_prompt: str | None = None) -> list[int]:
        """The chat-template token ids (system + user message, generation prompt, thinking disabled)."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT if system_prompt is None else system_prompt},
                    {"role": "user", "content": prompt}]
        text = self.encoder.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                          enable_thinking=False)
        return self.encoder.tokenizer(text)["input_ids"]

    def generate_ids(self, ids: list[int], *, max_tokens: int = 512, temperature: float = 0.0,
                     key: mx.array | None = None, min_tokens: int = 0) -> Iterator[int]:
        """New token ids after the prompt `ids`, up to max_tokens, ending before a stop token (EOS, <|im_end|>).
        Stop tokens are masked out for the first `min_tokens` tokens (as transformers' min_new_tokens)."""
        if self.tail is None or self.encoder.model is None:
            raise RuntimeError("this PromptEnhancer was released; build it again")
        model = CausalLM(self.encoder.model, self.tail)
        stops = mx.array(sorted(self.stop_ids), dtype=mx.int32)
        n_prompt = len(ids)

        def suppress_stops(tokens: mx.array, logits: mx.array) -> mx.array:
            if tokens.size - n_prompt >= min_tokens:
                return logits
            return logits.at[:, stops].add(-mx.inf)  # (1, vocab)

        sampler = _sampler(temperature, key)
        steps = generate_step(mx.array(ids, dtype=mx.int32), model, max_tokens=max_tokens,
                              sampler=lambda lp: sampler(lp.astype(mx.float32)),
                              logits_processors=[suppress_stops] if min_tokens > 0 else None,
                              prompt_cache=make_prompt_cache(model))
        for token, _ in steps:
            if token in self.stop_ids:
                break
            yield token

    def enhance(self, prompt: str, *, system_prompt: str | None = None, max_tokens: int = 512,
                temperature: float = 0.7, seed: int | None = None,
                callback: Callable[[str], None] | None = None) -> str:
        """One rewritten prompt; decoded text pieces go to `callback` as they are generated."""
        key = None
        if temperature > 0:
            key = mx.random.key(random.randint(0, 2**32 - 1) if seed is None else seed)
        tokenizer = self.encoder.tokenizer
        tokens, sent = [], ""
        for token in self.generate_ids(self.token_ids(prompt, system_prompt), max_tokens=max_tokens,
                                       temperature=temperature, key=key):
            tokens.append(token)
            if callback is None:
                continue
            text = _clean(tokenizer.decode(tokens, skip_special_tokens=True), partial=True)
            if text is not None and not text.endswith("\ufffd") and text.startswith(sent) and len(text) > len(sent):
                callback(text[len(sent):])  # whole characters only: a byte-level token may end mid-character
                sent = text
        return _clean(tokenizer.decode(tokens, skip_special_tokens=True)).strip()


def _clean(text: str, partial: bool = False) -> str | None:
    """The text without leading whitespace and an empty <think></think> block. partial: None while the text
    so far could still be the start of such a block (so a stream never shows it)."""
    text = _THINK.sub("", text, count=1).lstrip()
    if partial and (("<think>".startswith(text) and text) or (text.startswith("<think>") and "</think>" not in text)):
        return None
    return text


def check_options(max_tokens, temperature, seed, max_seed: int = MAX_SEED) -> None:
    """Raise InputError naming the field for a bad max_tokens, temperature (0 = greedy) or seed."""
    check_int("max_tokens", max_tokens, 1)
    check_number("temperature", temperature, 0, 5)
    if seed is not None:
        check_int("seed", seed, 0, max_seed)
