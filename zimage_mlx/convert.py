"""Convert a Z-Image checkpoint into an MLX folder that `ZImagePipeline.from_pretrained` loads directly.

Sources:
  - a checkpoint in the diffusers layout (Tongyi-MAI/Z-Image-Turbo): a folder or a Hub id;
  - single files as ComfyUI ships them: the DiT (`z_image_turbo_bf16.safetensors`: fused qkv, renamed keys),
    the text encoder (`qwen_3_4b.safetensors`) and the VAE (`ae.safetensors`, LDM names), either in a folder
    (each file is recognised by its tensor names) or named one by one, which also replaces one component
    of a diffusers checkpoint. Single files hold no tokenizer, scheduler or configs: those come from `base`
    (a folder or a Hub id, of which only these small files are downloaded), with the shapes that differ
    from base's configs read from the tensors.

The output has the diffusers layout: model_index.json; transformer/ and text_encoder/ in `dtype`, quantized
with each model's policy (`quant_predicate` in transformer.py and text_encoder.py) when asked, which their
config.json records; vae/ in diffusers names and torch layout, in its own dtype and never quantized;
tokenizer/ and scheduler/ copied. A Z-Image-Omni checkpoint (model_index.json names siglip and
siglip_processor) also gets siglip/, its SigLIP2 tower, in `dtype` (bfloat16 for float16, as the pipeline runs
it) and at 8 bits when quantized (siglip.quant_predicate), and siglip_processor/ copied. Shards of at most `shard_size` bytes are planned from the lazy shapes, and
tensors are then read, converted and appended one at a time, so the peak memory is one source tensor and its
output whatever the model's or the shard's size (benchmarks/convert_memory.py: ~1.4 GiB for the release at 4
or 8 bits). The folder is written next to dst under a temporary name, loaded once (lazily) as a check, then
renamed.

MLX, transformers and the models are imported inside the functions: the CLI imports this module to
register the command, and `zimage-mlx --help` stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import CheckpointError, InputError

DEFAULT_BASE = "Tongyi-MAI/Z-Image-Turbo"
DEFAULT_SHARD_SIZE = 2 * 2**30
DTYPE_NAMES = ("bfloat16", "float16", "float32")
WEIGHTS = ("transformer", "text_encoder", "vae")
LABELS = {"transformer": "DiT", "text_encoder": "text encoder", "vae": "VAE", "siglip": "SigLIP tower"}
OPTIONS = {"transformer": "--transformer", "text_encoder": "--text-encoder", "vae": "--vae"}


@dataclass
class Component:
    """Where one model's weights come from and the config to build it with."""

    name: str  # transformer | text_encoder | vae | siglip (an Omni checkpoint's vision tower)
    files: list[Path]
    config: dict
    label: str  # the folder or file, for messages
    single_file: bool = False
    bits: int | None = None
    out_bytes: int = 0  # what the conversion writes, known while checking
    stored: dict | None = None  # {layer: {"bits", "group_size"}} of a GGUF's blocks kept quantized


# ----------------------------------------------------------------------------------------------
# What a file holds


def identify(keys) -> str:
    """What a set of tensor names belongs to: "transformer", "text_encoder", "vae", or a description of
    another model ("a FLUX transformer", ...), or "" when nothing is recognised."""
    ks = {k.removeprefix("model.diffusion_model.") for k in keys}

    def starts(*prefixes):
        return any(k.startswith(prefixes) for k in ks)

    def ends(*suffixes):
        return any(k.endswith(suffixes) for k in ks)

    if "cap_embedder.1.weight" in ks:
        return "transformer" if {"x_pad_token", "cap_pad_token"} & ks else "a Lumina-2 (NextDiT) transformer"
    if starts("double_blocks.", "single_blocks.", "single_transformer_blocks."):
        return "a FLUX transformer"
    if starts("joint_blocks.", "transformer_blocks.") and ends("context_embedder.weight"):
        return "an SD3 transformer"
    if starts("input_blocks.", "down_blocks.") and ends("conv_in.weight", "input_blocks.0.0.weight"):
        return "a Stable Diffusion UNet"
    if ends("embed_tokens.weight"):
        return "text_encoder" if ends("self_attn.q_norm.weight") else "a language model other than Qwen3 (no q_norm)"
    if starts("text_model.") or ends("SelfAttention.q.weight"):
        return "a CLIP or T5 text encoder"
    if ends("decoder.conv_in.weight"):
        return "vae"
    return ""


def _open(files: list[Path], label: str) -> dict:
    """The tensors of safetensors files, lazily: only the headers are read."""
    from .weights import load_safetensors

    if len(files) == 1 and files[0].suffix == ".gguf":  # a GGUF DiT (gguf_dit.py)
        from .gguf_dit import read_gguf

        return read_gguf(files[0]).tensors
    for f in files:
        if f.suffix != ".safetensors":
            raise CheckpointError(f"{f} is not a .safetensors file (convert reads safetensors, and GGUF DiTs)")
    return load_safetensors(files, label=label)


def _check_kind(name: str, tensors: dict, label: str) -> None:

    kind = identify(tensors)
    if kind != name:
        what = kind if kind and kind not in WEIGHTS else f"a Z-Image {LABELS[kind]}" if kind else "no model convert knows"
        raise CheckpointError(f"{label} should hold Z-Image's {LABELS[name]} but holds {what}")


# ----------------------------------------------------------------------------------------------
# Finding the sources


def _scan(folder: Path) -> dict[str, list[Path]]:
    """The single files under folder, by what they hold (recognised by their tensor names)."""
    found: dict[str, list[Path]] = {}
    for f in sorted(folder.rglob("*.safetensors")):
        if any(part.startswith(".") for part in f.relative_to(folder).parts):
            continue
        try:
            kind = identify(_open([f], str(f)))
        except Exception:  # a damaged file is reported only if it is the one needed
            kind = ""
        found.setdefault(kind, []).append(f)
    return found


def find_sources(src, *, transformer=None, text_encoder=None, vae=None, base=None) -> tuple[Path, dict[str, Component]]:
    """Where each component comes from: (folder with tokenizer/ scheduler/ model_index.json, components).

    Raises CheckpointError naming what is missing or wrong. Only headers are read.
    """
    from .sources import read_config, resolve_model, safetensors_files

    files = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}
    for name, f in files.items():
        if f is not None:
            f = files[name] = Path(f).expanduser()
            if not f.is_file():
                raise CheckpointError(f"{OPTIONS[name]} {f}: no such file (give the {LABELS[name]} as one .safetensors file)")
    path = Path(src).expanduser()
    # A diffusers checkpoint: a Hub id, or a folder with model_index.json or component configs (a folder of
    # ComfyUI files may well have a vae/ subfolder, but no config.json in it).
    diffusers = not path.exists() or path.is_dir() and (
        (path / "model_index.json").exists() or any((path / c / "config.json").exists() for c in WEIGHTS))
    if diffusers:
        if base is not None:
            raise InputError(f"{{base}} is for single files; {src} is a checkpoint with its own tokenizer and configs",
                             "base", ("base",))
        # a Hub id: the small files plus the weights of the components not given as files only
        root = resolve_model(src, components=tuple(c for c in WEIGHTS if files[c] is None) + ("siglip",))
    else:
        found = _scan(path) if path.is_dir() else {identify(_open([path], str(path))): [path]}
        for name in WEIGHTS:
            if files[name] is not None:
                continue
            hits = found.get(name, [])
            if len(hits) > 1:
                raise CheckpointError(f"{src} holds several {LABELS[name]} files ({', '.join(p.name for p in hits)}): "
                                      f"pick one with {OPTIONS[name]} FILE")
            if not hits:
                others = [f"{p.name} ({kind})" for kind, ps in found.items() if kind not in WEIGHTS for p in ps]
                seen = f"; it has {', '.join(others[:4])}" if others else ""
                raise CheckpointError(f"no Z-Image {LABELS[name]} in {src}{seen}: add it or pass {OPTIONS[name]} FILE")
            files[name] = hits[0]
        root = resolve_model(DEFAULT_BASE if base is None else base, components=())

    components = {}
    for name in WEIGHTS:
        config = read_config(root / name)
        if files[name] is None:
            components[name] = Component(name, safetensors_files(root / name), config, str(root / name))
        else:
            components[name] = Component(name, [files[name]], config, str(files[name]), single_file=True)
    from .omni import is_omni_folder

    if is_omni_folder(root):  # Z-Image-Omni: its SigLIP2 tower too (siglip_processor/ is copied)
        components["siglip"] = Component("siglip", safetensors_files(root / "siglip"), read_config(root / "siglip"),
                                         str(root / "siglip"))
    return root, components


# ----------------------------------------------------------------------------------------------
# Per model: build it (lazily: nothing is allocated), map the tensor names, check that they fit


def _derive_dit_config(tensors: dict, config: dict) -> dict:
    """base's transformer config with the widths and depths this file's tensors have."""
    def count(prefix):
        return len({k.split(".")[1] for k in tensors if k.startswith(prefix + ".")})

    from .gguf_dit import logical_shape

    dim, cap_feat_dim = logical_shape(tensors, "cap_embedder.1.weight")  # a GGUF may store it quantized
    head_dim = tensors["layers.0.attention.norm_q.weight"].shape[-1] if "layers.0.attention.norm_q.weight" in tensors \
        else dim // config.get("n_heads", 30)
    return dict(config, dim=dim, cap_feat_dim=cap_feat_dim, n_heads=dim // head_dim, n_kv_heads=dim // head_dim,
                n_layers=count("layers"), n_refiner_layers=count("noise_refiner"),
                in_channels=logical_shape(tensors, "all_x_embedder.2-1.weight")[1] // 4)


def _derive_qwen_config(tensors: dict, config: dict) -> dict:
    """base's text encoder config with the widths and depth this file's tensors have."""
    t = {k.removeprefix("model."): w for k, w in tensors.items()}
    vocab, hidden = t["embed_tokens.weight"].shape
    head_dim = t["layers.0.self_attn.q_norm.weight"].shape[0]
    return dict(config, vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
                num_attention_heads=t["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
                num_key_value_heads=t["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
                intermediate_size=t["layers.0.mlp.gate_proj.weight"].shape[0],
                num_hidden_layers=len({k.split(".")[1] for k in t if k.startswith("layers.")}))


def _model(c: Component, tensors: dict):
    """(model, sanitize(dict) -> dict) for a component; single files get their config from their shapes."""
    from .text_encoder import Qwen3Encoder, model_args
    from .transformer import TransformerArgs, ZImageTransformer
    from .vae import VAE, VAEArgs

    try:
        if c.name == "siglip":
            from .siglip import SiglipArgs, SiglipVisionModel

            return SiglipVisionModel(SiglipArgs.from_dict(c.config)), SiglipVisionModel.sanitize
        if c.name == "transformer":
            if c.single_file:
                c.config = _derive_dit_config(ZImageTransformer.sanitize(tensors), c.config)
            return ZImageTransformer(TransformerArgs.from_dict(c.config)), ZImageTransformer.sanitize
        if c.name == "text_encoder":
            if c.single_file:
                c.config = _derive_qwen_config(tensors, c.config)
            args = model_args(c.config)
            last = f"layers.{args.num_hidden_layers - 1}.self_attn.q_proj.weight"
            if args.tie_word_embeddings and (last in tensors or f"model.{last}" in tensors):
                # Keep the last layer and the final norm, which encoding skips but prompt enhancement
                # (enhance.py) runs: 193 MB in bfloat16. The tied LM head is the embedding, not stored twice.
                from mlx_lm.models.qwen3 import Qwen3Model

                def keep_all(weights):
                    return {k.removeprefix("model."): w for k, w in weights.items() if k != "lm_head.weight"}

                return Qwen3Model(args), keep_all
            model = Qwen3Encoder(args)  # a source without them: what encoding needs, as before
            return model, model.sanitize
        model = VAE(VAEArgs.from_dict(c.config))
    except KeyError as e:
        raise CheckpointError(f"{c.label} lacks {e.args[0]}: it is not a complete Z-Image {LABELS[c.name]}") from None
    latent = c.config.get("latent_channels", 16)
    conv_in = next((w for k, w in tensors.items() if k.endswith("decoder.conv_in.weight")), None)
    if conv_in is not None and conv_in.ndim == 4:
        channels = conv_in.shape[1] if conv_in.shape[2] == conv_in.shape[3] else conv_in.shape[3]  # torch or MLX layout
        if channels != latent:
            raise CheckpointError(f"{c.label} is a {channels}-channel VAE (Stable Diffusion's?); Z-Image needs the "
                                  f"{latent}-channel FLUX VAE")
    return model, model.sanitize


def _fits(model, sanitized: dict, what: str) -> None:
    """Strict loading into a lazily built model: every key present with its shape (nothing is read)."""
    from mlx.utils import tree_flatten


    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(sanitized))
    unexpected = sorted(set(sanitized) - set(expected))
    wrong = [k for k in set(expected) & set(sanitized) if tuple(expected[k].shape) != tuple(sanitized[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])}")
    if wrong:
        k = sorted(wrong)[0]
        problems.append(f"{len(wrong)} tensor(s) of another shape, e.g. {k} {tuple(sanitized[k].shape)} where "
                        f"the config gives {tuple(expected[k].shape)}")
    if problems:
        raise CheckpointError(f"{what} does not fit its config: {'; '.join(problems)}")


def _converted(tensors: Iterator[tuple[str, object]], modules: dict, predicate, dtype, overrides: dict | None = None):
    """(key, lazy array) out of (key, lazy array) in: floats cast to dtype, the Linear/Embedding weights the
    predicate selects quantized into weight, scales and biases (scales in dtype, as on-the-fly
    quantization makes them). Layers quantized otherwise than overrides["default"] are added to overrides."""
    import mlx.core as mx

    for key, w in tensors:
        path, _, leaf = key.rpartition(".")
        params = predicate(path, modules[path]) if predicate and leaf == "weight" and path in modules else False
        if dtype is not None and mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(dtype)
        if not params:
            yield key, w
            continue
        if overrides is not None and params != overrides["default"]:
            overrides[path] = params
        wq, scales, biases = mx.quantize(w, group_size=params["group_size"], bits=params["bits"])
        yield key, wq
        yield f"{path}.scales", scales
        yield f"{path}.biases", biases


def _stream(c: Component, sanitize) -> Iterator[tuple[str, object]]:
    """The component's tensors one at a time, with their final names: each is read only when used and
    dropped once handed on."""
    if c.name == "vae":  # small, and its conv layout is judged over all its convolutions: map it as a whole
        tensors = sanitize(_open(c.files, c.label))
        for key in list(tensors):
            # The VAE is written in diffusers names and torch layout: undo sanitize's [O, I, kh, kw] ->
            # [O, kh, kw, I] so that the folder reads the same to any loader.
            w = tensors.pop(key)
            yield key, w.transpose(0, 3, 1, 2) if w.ndim == 4 else w
        return
    for f in c.files:
        tensors = _open([f], c.label)
        for key in list(tensors):
            yield from sanitize({key: tensors.pop(key)}).items()


# ----------------------------------------------------------------------------------------------
# Writing


# safetensors dtype names of what the conversion writes.
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32", "int32": "I32",
                      "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "bool": "BOOL"}


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def _write_shards(tensors: Callable[[], Iterator], out: Path, shard_size: int, progress=None) -> int:
    """Write the tensors into safetensors shards of at most shard_size bytes (a bigger tensor gets a shard of
    its own) plus an index; returns the bytes written.

    tensors() gives the same lazy (key, array) sequence each time it is called. A first pass plans the shards
    from the lazy shapes (nothing is read), so each file's header is written first and every tensor is then
    evaluated and appended alone: the peak is one source tensor and its output, whatever the shard size.
    """
    import mlx.core as mx

    entries = [(k, tuple(w.shape), _dtype_name(w.dtype), w.nbytes) for k, w in tensors()]
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e[3] > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e[3]
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    out.mkdir(parents=True, exist_ok=True)
    arrays = tensors()
    done = 0
    for name, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "mlx"}}, 0
        for key, shape, dtype, nbytes in shard:
            header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        with open(out / name, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for key, _, _, nbytes in shard:
                k, w = next(arrays)
                if k != key or w.nbytes != nbytes:
                    raise RuntimeError(f"the tensors changed between two passes ({key} / {k}): a bug in convert")
                w = mx.contiguous(w)  # row-major bytes (a transposed view is not)
                mx.eval(w)
                f.write(memoryview(w))
                del w
                done += 1
                if progress:
                    progress(done, len(entries))
        mx.clear_cache()
    if n > 1:
        weight_map = {e[0]: name for name, shard in zip(names, shards) for e in shard}
        index = {"metadata": {"total_size": sum(e[3] for e in entries)}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(e[3] for e in entries)


def _write_config(path: Path, config: dict, dtype_name: str, quantization: dict | None) -> None:
    config = {k: v for k, v in config.items() if k != "quantization"}
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    if quantization:
        config["quantization"] = quantization
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _check_written(root: Path) -> None:
    """Load the written folder the way the pipeline does, lazily: configs, keys, shapes and quantization
    must all agree (nothing is computed and no weight is read)."""
    from transformers import AutoTokenizer

    from .sampler import FlowMatchScheduler
    from .text_encoder import Qwen3Encoder, model_args
    from .transformer import ZImageTransformer
    from .vae import VAE
    from .sources import check_checkpoint_folder, read_config
    from .weights import load_into, load_safetensors, quantize_as_stored

    try:
        check_checkpoint_folder(root)
        ZImageTransformer.from_pretrained(root / "transformer")
        config = read_config(root / "text_encoder")
        encoder = Qwen3Encoder(model_args(config))
        weights = encoder.sanitize(load_safetensors(root / "text_encoder"))
        quantize_as_stored(encoder, weights, config, "text encoder")
        load_into(encoder, weights, "text encoder")
        if not AutoTokenizer.from_pretrained(str(root / "tokenizer")).chat_template:
            raise CheckpointError("the tokenizer has no chat template")
        VAE.from_pretrained(root / "vae")
        FlowMatchScheduler.from_pretrained(root / "scheduler")
        from .omni import is_omni_folder

        if is_omni_folder(root):
            from .siglip import SiglipProcessor, SiglipVisionModel

            SiglipVisionModel.from_pretrained(root / "siglip", dtype=None)
            SiglipProcessor.from_pretrained(root / "siglip_processor")
    except Exception as e:
        raise RuntimeError(f"the converted folder does not load ({e}); this is a bug in zimage-mlx convert") from e


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------
# The conversion


def convert(src, dst, *, dtype: str = "bfloat16", quantize: int | None = None, group_size: int = 64,
            transformer_bits: int | None = None, text_encoder_bits: int | None = None, force: bool = False,
            transformer=None, text_encoder=None, vae=None, base=None, shard_size: int = DEFAULT_SHARD_SIZE,
            progress: Callable[[str, int, int], None] | None = None) -> dict[str, tuple[int, str]]:
    """Convert a Z-Image checkpoint into an MLX folder at dst; returns {component: (bytes, description)}.

    src: a diffusers checkpoint folder or Hub id, or single files (a .safetensors file or a folder of them).
    transformer, text_encoder, vae: single files that replace src's component (the DiT also as a .gguf).
    base: for single files, the folder or Hub id that gives tokenizer, scheduler and configs (default
    Tongyi-MAI/Z-Image-Turbo). dtype: the DiT and text encoder weights' dtype (the text encoder is stored in
    bfloat16 for float16, as the pipeline runs it: see pipeline._load_text_encoder); the VAE keeps its own.
    quantize: bits for the DiT, and at least 8 for the text encoder (8 for an Omni checkpoint's SigLIP tower) (transformer_bits and text_encoder_bits set
    each alone); group_size for both. The DiT's config.json records its float16 statistics (fp16.statistics),
    which dtype="auto" reads. progress(component, done, total) is called after each tensor written.
    Everything is checked before anything is written; errors raise CheckpointError or InputError.
    """
    import mlx.core as mx

    from . import siglip as siglip_module
    from . import text_encoder as te_module
    from .weights import check_quantization

    if dtype not in DTYPE_NAMES:
        raise InputError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    for b in (quantize, transformer_bits, text_encoder_bits):
        if b is not None:
            check_quantization(b, group_size)
    plan = _Plan(
        bits={"transformer": transformer_bits if transformer_bits is not None else quantize,
              "text_encoder": text_encoder_bits if text_encoder_bits is not None else te_module.default_bits(quantize),
              "vae": None, "siglip": siglip_module.default_bits(quantize)},
        dtypes={"transformer": dtype, "text_encoder": "bfloat16" if dtype == "float16" else dtype, "vae": None,
                "siglip": "bfloat16" if dtype == "float16" else dtype},  # as the pipeline runs them
        group_size=group_size)
    dst = Path(dst).expanduser()
    ancestor = _check_destination(src, dst, force)
    # 1. Check everything: sources, keys, shapes, quantization, disk space (headers only).
    root, components = find_sources(src, transformer=transformer, text_encoder=text_encoder, vae=vae, base=base)
    models = {name: _prepare(name, c, plan) for name, c in components.items()}
    _check_pair(models, components)
    copied = ("tokenizer", "scheduler") + (("siglip_processor",) if "siglip" in components else ())
    needed = sum(c.out_bytes for c in components.values()) + sum(folder_size(root / n) for n in copied) + 2**20
    free = shutil.disk_usage(ancestor).free
    if needed > free:
        raise CheckpointError(f"not enough disk space for {dst}: it needs about {needed / 1e9:.1f} GB, "
                              f"{ancestor} has {free / 1e9:.1f} GB free")
    # 2. Write into a temporary folder next to dst, check it, then rename it into place.
    tmp = dst.parent / f".{dst.name}.converting-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        for name, c in components.items():
            _write_component(tmp / name, name, c, models.pop(name), plan, shard_size, progress)
            mx.clear_cache()  # this component's weights are freed before the next one's are read
        for name in copied:
            shutil.copytree(root / name, tmp / name)
        shutil.copyfile(root / "model_index.json", tmp / "model_index.json")
        _check_written(tmp)
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif dst.exists() or dst.is_symlink():
            dst.unlink()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {name: (folder_size(dst / name), _note(dst, name, components.get(name), plan))
            for name in WEIGHTS + tuple(n for n in ("siglip",) if n in components) + copied}


@dataclass
class _Plan:
    """What convert makes of each component: its bits (None: not quantized) and dtype (None: its own)."""

    bits: dict
    dtypes: dict
    group_size: int


def _check_destination(src, dst: Path, force: bool) -> Path:
    """dst may be written (and replaced only with force), is not inside src nor src inside it; returns the
    existing folder it will be made in (for the disk-space check)."""
    if dst.exists() and not force:
        raise InputError(f"{dst} already exists; allow replacing it ({{force}})", "force", ("force",))
    src_path = Path(src).expanduser()
    if src_path.exists():
        a, b = src_path.resolve(), dst.resolve()
        if a == b or b in a.parents or a in b.parents:
            raise InputError(f"{dst} must be outside the source {src} (and not contain it)")
    ancestor = dst.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {dst}: {ancestor} is not a writable folder")
    return ancestor


def _prepare(name: str, c: "Component", plan: _Plan) -> tuple:
    """One component checked from its headers (kind, keys, shapes, quantization) and its output size counted
    (c.out_bytes); returns (model, sanitize, modules, predicate, out_dtype) for writing it."""
    from . import text_encoder as te_module
    from . import transformer as dit_module
    from .weights import to_dtype

    from . import siglip as siglip_module

    tensors = _open(c.files, c.label)
    if name != "siglip":  # the tower is checked by its keys and shapes alone (_fits)
        _check_kind(name, tensors, c.label)
    model, sanitize = _model(c, tensors)
    sanitized = sanitize(tensors)
    if name == "transformer":
        from .gguf_dit import quantize_like

        c.stored = quantize_like(model, sanitized)  # a GGUF's Q8_0/Q4_0/Q4_1 layers stay as they are
    _fits(model, sanitized, f"{c.label} ({LABELS[name]})")
    c.bits = plan.bits[name]
    policy = {"transformer": dit_module.quant_predicate, "text_encoder": te_module.quant_predicate,
              "siglip": siglip_module.quant_predicate}.get(name)
    predicate = policy(c.bits, plan.group_size) if c.bits else None
    out_dtype = to_dtype(plan.dtypes[name]) if plan.dtypes[name] else None
    modules = dict(model.named_modules())
    c.out_bytes = sum(w.nbytes for _, w in _converted(iter(sanitized.items()), modules, predicate, out_dtype))
    if predicate and not c.stored and not any(predicate(p, m) for p, m in modules.items()):
        raise InputError(f"no layer of the {LABELS[name]} can be quantized with group size {plan.group_size} "
                         f"(its widths are not multiples of it): choose another {{group_size}}", "group_size",
                         ("group_size",))
    return model, sanitize, modules, predicate, out_dtype


def _check_pair(models: dict, components: dict) -> None:
    hidden, cap_feat_dim = models["text_encoder"][0].args.hidden_size, models["transformer"][0].args.cap_feat_dim
    if hidden != cap_feat_dim:
        raise CheckpointError(f"the text encoder ({components['text_encoder'].label}) has hidden size {hidden} but the DiT "
                              f"({components['transformer'].label}) takes caption features of {cap_feat_dim}: they come "
                              f"from different models")
    if "siglip" in models:
        width, feat = models["siglip"][0].args.hidden_size, models["transformer"][0].args.siglip_feat_dim
        if width != feat:
            what = "no SigLIP features (it is not an Omni DiT)" if feat is None else f"SigLIP features of {feat}"
            raise CheckpointError(f"the SigLIP tower ({components['siglip'].label}) has hidden size {width} but the DiT "
                                  f"({components['transformer'].label}) takes {what}: they come from different models")


def _write_component(folder: Path, name: str, c: "Component", prepared: tuple, plan: _Plan, shard_size: int,
                     progress) -> None:
    """A component's shards and config.json (its quantization, dtype and, for the DiT, float16 statistics)."""
    model, sanitize, modules, predicate, out_dtype = prepared
    report = (lambda done, total: progress(name, done, total)) if progress else None
    overrides = {"default": {"bits": c.bits, "group_size": plan.group_size}}
    _write_shards(lambda: _converted(_stream(c, sanitize), modules, predicate, out_dtype, overrides), folder,
                  shard_size, report)
    quantization = None
    if predicate:
        del overrides["default"]
        quantization = {"group_size": plan.group_size, "bits": c.bits, "mode": "affine",
                        **dict(sorted(overrides.items()))}
    if c.stored:
        quantization = _with_stored(quantization, c)
    stored = plan.dtypes[name] or _float_dtype(c)
    config = dict(c.config, fp16_stats=_fp16_statistics(c, sanitize, model)) if name == "transformer" else c.config
    _write_config(folder / "config.json", config, stored, quantization)


def _note(dst: Path, name: str, c, plan: _Plan) -> str:
    """How convert reports a written component: `bfloat16, 4-bit (group 64), from <source>`."""
    if c is None:
        return ""
    note = json.loads((dst / name / "config.json").read_text())["dtype"]
    if c.stored:
        kept = "/".join(map(str, sorted({q["bits"] for q in c.stored.values()})))
        note += ", GGUF blocks kept " + kept + "-bit (group 32)"
        if plan.bits[name]:
            note += f", float layers {plan.bits[name]}-bit (group {plan.group_size})"
    elif c.bits:
        note += f", {c.bits}-bit (group {plan.group_size})"
    return note + f", from {c.label}"


def convert_controlnet(src, dst, *, dtype: str = "bfloat16", quantize: int | None = None, group_size: int = 64,
                       base=None, force: bool = False, progress: Callable[[int, int], None] | None = None) -> tuple[int, str]:
    """Convert a ControlNet Union file (a .safetensors file, folder or Hub id, see sources.resolve_controlnet)
    into a folder (config.json + model.safetensors) that `load_controlnet` reads; returns (bytes, description).

    base: the DiT it is for, a checkpoint folder whose transformer/config.json gives the layer count the
    control blocks spread over (default: Z-Image Turbo's, 30 layers). quantize: bits, with the ControlNet's
    policy (controlnet.quant_predicate); 2.0's untrained control_noise_refiner is dropped.
    """
    import mlx.core as mx

    from .controlnet import ControlNet, quant_predicate, read_controlnet
    from .transformer import TransformerArgs
    from .sources import read_config
    from .weights import check_quantization, to_dtype

    if dtype not in DTYPE_NAMES:
        raise InputError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if quantize is not None:
        check_quantization(quantize, group_size)
    dst = Path(dst).expanduser()
    if dst.exists() and not force:
        raise InputError(f"{dst} already exists; allow replacing it ({{force}})", "force", ("force",))
    dit = TransformerArgs()
    if base is not None:
        folder = Path(base).expanduser()
        if not folder.is_dir():
            raise InputError(f"{{base}} {base} must be a checkpoint folder for a ControlNet (its transformer/config.json)",
                             "base", ("base",))
        dit = TransformerArgs.from_dict(read_config(folder / "transformer"))
    weights, config = read_controlnet(src)
    if config and config.get("quantization"):
        raise InputError(f"{src} is quantized already; convert the original file")
    model, weights = ControlNet.build(weights, dit, f"ControlNet {src}")
    predicate = quant_predicate(quantize, group_size) if quantize else None
    modules = dict(model.named_modules())
    overrides = {"default": {"bits": quantize, "group_size": group_size}} if quantize else None

    def tensors():
        return _converted(iter(sorted(weights.items())), modules, predicate, to_dtype(dtype), overrides)

    tmp = dst.with_name(f".{dst.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    nbytes = _write_shards(tensors, tmp, DEFAULT_SHARD_SIZE, progress)
    args = model.args
    config = {"_class_name": "ZImageControlNetModel", "control_in_dim": args.in_dim,
              "control_layers_places": list(args.places), "control_refiner_layers_places": list(range(dit.n_refiner_layers)),
              "add_control_noise_refiner": {"plain": None}.get(args.refiner, args.refiner), "dim": dit.dim,
              "n_refiner_layers": dit.n_refiner_layers, "n_heads": dit.n_heads, "n_kv_heads": dit.n_heads,
              "norm_eps": dit.norm_eps, "qk_norm": dit.qk_norm, "zimage_mlx": args.to_dict()}
    quantization = None
    if quantize:
        quantization = {"group_size": group_size, "bits": quantize, "mode": "affine",
                        **{k: v for k, v in sorted(overrides.items()) if k != "default"}}
    _write_config(tmp / "config.json", config, dtype, quantization)
    try:
        ControlNet.from_pretrained(tmp, dit)  # loads as stored (lazily: nothing is computed)
    except Exception as e:
        raise RuntimeError(f"the converted ControlNet does not load ({e}); this is a bug in zimage-mlx convert") from e
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    mx.clear_cache()
    return nbytes, f"{args.name}, {dtype}" + (f", {quantize}-bit" if quantize else "")


def _with_stored(quantization: dict | None, c: Component) -> dict:
    """The quantization config.json records, with the layers a GGUF keeps quantized: per-layer entries, over a
    default of the bits most of them hold (group 32) when nothing else is quantized."""
    from collections import Counter

    if quantization is None:
        bits = Counter(q["bits"] for q in c.stored.values()).most_common(1)[0][0]
        quantization = {"group_size": c.stored and next(iter(c.stored.values()))["group_size"], "bits": bits,
                        "mode": "affine"}
        c.bits = bits
    default = {"bits": quantization["bits"], "group_size": quantization["group_size"]}
    layers = {p: q for p, q in c.stored.items() if q != default}
    return dict(quantization, **dict(sorted(layers.items())))


def _fp16_statistics(c: Component, sanitize, model) -> dict:
    """The DiT's float16 statistics (fp16.statistics), from the source weights before any cast or quantization,
    read once more one tensor at a time: the loader then needs not compute them."""
    from .fp16 import statistics
    from .gguf_dit import dense_weight

    tensors = sanitize(_open(c.files, c.label))

    def weight(key):
        once = key.endswith(".weight") and not any(k in key for k in ("norm", "adaLN", "t_embedder"))
        w = dense_weight(tensors, key)  # a GGUF's blocks dequantized
        if once:
            tensors.pop(key)
        return w  # the big ones are asked for once

    return statistics(weight, model.args)


def _float_dtype(c: Component) -> str:
    """The dtype of a component kept as it is (the VAE): its first floating tensor's."""
    import mlx.core as mx

    for w in _open(c.files, c.label).values():
        if mx.issubdtype(w.dtype, mx.floating):
            return _dtype_name(w.dtype)
    return "float32"
