"""Random-weight Z-Image checkpoints in the exact Hugging Face layout, built with the reference stack.

The folder written by `build_checkpoint` has the same files and key names as Tongyi-MAI/Z-Image-Turbo
(model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/), only with tiny widths.
Every parameter is randomised: several layers are zero-initialised by default (pad tokens, ...) and a
zero layer hides bugs. Our loaders read these folders with the same code that reads the release.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# Tiny but structurally faithful configs. Widths differ between components on purpose, so that a
# mixed-up dimension fails loudly.
TRANSFORMER_CONFIG = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=96,
    n_layers=2,
    n_refiner_layers=2,
    n_heads=3,
    n_kv_heads=3,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=48,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],
    axes_lens=[1536, 512, 512],
)

TEXT_ENCODER_CONFIG = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    hidden_act="silu",
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    attention_bias=False,
    use_sliding_window=False,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 32, 64, 64],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)

MODEL_INDEX = {
    "_class_name": "ZImagePipeline",
    "_diffusers_version": "0.36.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# The Qwen3 chat template's structure (system / user / assistant turns, generation prompt, and the
# enable_thinking switch that only adds an empty think block when thinking is *disabled*). For one user
# message with add_generation_prompt=True and enable_thinking=True it renders
# "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", exactly as Qwen3-4B's does.
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Qwen2's pre-tokenizer split pattern (contractions, letters, single digits, punctuation, newlines).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "A photorealistic portrait of an astronaut riding a horse on the moon, golden hour light.",
    "A red neon sign that says OPEN above a rainy street in Tokyo at night, cinematic.",
    "一只可爱的猫坐在窗台上，阳光明媚，高清摄影。",
    "中国传统水墨画，山水，云雾缭绕。 The quick brown fox jumps over the lazy dog.",
    "Emoji test 🎨🚀✨ and numbers 1234567890, punctuation: !?.,;:'\"()[]{}",
    "the a of and to in is it that with for on as at by this an be from or are",
] * 4

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter a random value of a sensible scale (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and p.ndim == 1:
                value = 1.0 + 0.2 * noise
            elif leaf == "bias":
                value = 0.1 * noise
            elif "pad_token" in name or "embed_tokens" in name:
                value = noise
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                value = noise / math.sqrt(fan_in)
            p.copy_(value.to(p.dtype))


def build_tokenizer(path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    # Declare the class the release declares, so AutoTokenizer loads it as Qwen2Tokenizer.
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return len(fast)


def build_transformer(path: Path, *, dtype=torch.float32, max_shard_size="1MB", seed=0, config=None):
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(**(config or TRANSFORMER_CONFIG))
    randomize_(model, seed)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
    return model


def build_text_encoder(path: Path, vocab_size: int, *, seed=1, config=None):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab_size, **(config or TEXT_ENCODER_CONFIG))
    model = Qwen3ForCausalLM(cfg)
    randomize_(model, seed)
    # Saved as Qwen3ForCausalLM in bfloat16 and sharded, like the release: keys carry "model.".
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB", safe_serialization=True)
    return model


def build_vae(path: Path, *, seed=2, config=None):
    from diffusers import AutoencoderKL

    model = AutoencoderKL(**(config or VAE_CONFIG))
    randomize_(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


def build_scheduler(path: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(path)


def build_checkpoint(root: Path) -> Path:
    """Write a complete random-weight Z-Image checkpoint (float32 DiT in several shards) under root."""
    root.mkdir(parents=True, exist_ok=True)
    n_tokens = build_tokenizer(root / "tokenizer")
    # Like Qwen's 151936 embeddings for 151669 tokens: the embedding table is larger than the vocabulary.
    vocab_size = 64 * math.ceil((n_tokens + 10) / 64)
    build_text_encoder(root / "text_encoder", vocab_size)
    build_transformer(root / "transformer")
    build_vae(root / "vae")
    build_scheduler(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return root


def load_reference_pipeline(root: Path, dtype=torch.float32):
    """diffusers' ZImagePipeline on a checkpoint folder, in float32 by default."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(root), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------
# float16 stress checkpoints (shared/docs/fp16.md 5.1): random weights whose activations exceed float16's
# 65,504 where the release's do (the SwiGLU product, the FFN output, the attention value path), made by
# inflating the pre-norm weights of every modulated block, uniformly and more so in a few "massive" channels.

# Full width (dim 3840, 30 heads of 128, FFN 10240) with few blocks: the shapes of the release's GEMMs.
WIDE_TRANSFORMER_CONFIG = dict(TRANSFORMER_CONFIG, dim=3840, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48],
                               n_layers=1, n_refiner_layers=1)
MASSIVE_CHANNELS = (7, 42, 77)


def stress_(model: torch.nn.Module, ffn: float, attention: float, massive: float = 4.0,
            channels=MASSIVE_CHANNELS) -> None:
    """Inflate a randomized ZImageTransformer2DModel in place: every modulated block's ffn_norm1 weight times
    `ffn` and attention_norm1 weight times `attention`, and `channels` of both a further `massive` times.
    The SwiGLU product grows as ffn^2 (both GEMM inputs scale), the attention output as `attention`."""
    with torch.no_grad():
        for blocks in (model.noise_refiner, model.layers):
            for block in blocks:
                for norm, k in ((block.ffn_norm1, ffn), (block.attention_norm1, attention)):
                    norm.weight.mul_(k)
                    norm.weight[list(channels)] *= massive


def build_stress_transformer(path: Path, ffn: float, attention: float, *, config=None, seed=0,
                             dtype=torch.bfloat16) -> Path:
    """A stressed random DiT (see stress_) saved in the diffusers layout, by default in bfloat16 like the
    release (whose float32 shards hold bfloat16 values): its float16 cast is then exact for normal values."""
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(**(config or TRANSFORMER_CONFIG))
    randomize_(model, seed)
    stress_(model, ffn, attention)
    model.to(dtype).save_pretrained(path, max_shard_size="10GB", safe_serialization=True)
    return path
