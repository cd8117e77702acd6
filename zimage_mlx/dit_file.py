"""A DiT swapped in at load time from one file: ComfyUI's single-file safetensors or a GGUF (gguf_dit.py), with
the base checkpoint's config and the widths and depths read from the file's tensors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import mlx.core as mx

from . import fp16
from .errors import CheckpointError
from .transformer import DEFAULT_GROUP_SIZE, TransformerArgs, ZImageTransformer, quant_predicate
from .weights import check_quantization, load_into, load_safetensors, quantize_model, to_dtype


def read_dit_file(file, dtype: mx.Dtype | None = None) -> tuple[dict[str, mx.array], str]:
    """(the file's tensors, sanitized to diffusers names, and what it holds in words). Refuses files that are
    not a Z-Image DiT, naming what they are."""
    from .convert import identify
    from .gguf_dit import read_gguf

    file = Path(file).expanduser()
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file (give the DiT as one .safetensors or .gguf file)")
    if file.suffix == ".gguf":
        g = read_gguf(file, dtype)
        tensors, note = g.tensors, g.describe()
    elif file.suffix == ".safetensors":
        tensors, note = load_safetensors([file], label="DiT"), "safetensors"
    else:
        raise CheckpointError(f"{file} is neither a .safetensors nor a .gguf file")
    kind = identify(tensors)
    if kind != "transformer":
        raise CheckpointError(f"{file} should hold Z-Image's DiT but holds "
                              f"{kind if kind and kind not in ('text_encoder', 'vae') else 'no model zimage-mlx knows'}")
    return ZImageTransformer.sanitize(tensors), note


def load_dit_file(file, config: dict, dtype="float32", quantize: int | None = None,
                  group_size: int = DEFAULT_GROUP_SIZE) -> ZImageTransformer:
    """Load a DiT file with `config` (the base folder's transformer/config.json). Blocks a GGUF stores as MLX
    can hold them (Q8_0, Q4_0, Q4_1) stay quantized; quantize: bits for the float Linear layers (our policy).
    The model's `stored_bits` is the bits most quantized layers hold, or None; `source` describes the file."""
    from .convert import _derive_dit_config
    from .gguf_dit import quantize_like

    if quantize is not None:
        check_quantization(quantize, group_size)
    weights, note = read_dit_file(file, to_dtype(dtype))
    what = f"DiT {file}"
    try:
        config = _derive_dit_config(weights, config)
    except KeyError as e:
        raise CheckpointError(f"{file} lacks {e.args[0]}: it is not a complete Z-Image DiT") from None
    model = ZImageTransformer(TransformerArgs.from_dict(config))
    stored = quantize_like(model, weights)
    load_into(model, weights, what, to_dtype(dtype))
    del weights
    if quantize is not None:
        quantize_model(model, quant_predicate(quantize, group_size))  # the float layers only
    bits = Counter(q["bits"] for q in stored.values())
    model.stored_bits = bits.most_common(1)[0][0] if bits else None
    model.source = f"{Path(file).name} ({note})"
    if to_dtype(dtype) == mx.float16:
        model.fp16_stats = fp16.statistics(fp16.model_weights(model), model.args)
    return model
