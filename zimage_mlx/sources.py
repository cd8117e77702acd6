"""Where a named model, adapter or file is on disk: a local path as given, or a Hugging Face Hub id found in
(or downloaded into) the local HF cache.

The one Hub-id test (`is_hub_id`), the one way to the Hub (`hub_fetch`: download, or the cache only), and
the resolvers built on them: `resolve_model` (a checkpoint folder), `resolve_file` (one .safetensors file:
a LoRA, a ControlNet), `resolve_controlnet` (a file or a folder), `safetensors_files` (the weight files of a
folder, sharded or not) and `cached` (a name read back from a saved image: used only if it is here already).

Imports only errors.py (and huggingface_hub, inside functions); no MLX.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import CheckpointError, NotCachedError

# A Hub repo id's owner and name: letters, digits, "_", "-", ".", neither starting nor ending with "-" or ".".
_REPO_PART = re.compile(r"(?![.-])[\w.-]+(?<![.-])")

COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
WEIGHT_COMPONENTS = ("transformer", "text_encoder", "vae")
# What any use of a Z-Image checkpoint needs from the Hub: configs and tokenizer files (a few MB) ...
HUB_SMALL_FILES = ["model_index.json", "scheduler/*.json", "tokenizer/*", "*/config.json",
                   "siglip_processor/*.json"]  # (Z-Image-Omni: its SigLIP2 processor)
# ... and the safetensors weights (no .bin/.pth).
HUB_PATTERNS = HUB_SMALL_FILES + ["*/*.safetensors", "*/*.safetensors.index.json"]
# The keyword each kind of source is passed as (ZImagePipeline.from_pretrained(model), load_lora(lora), ...).
PARAMS = {"model": "model", "LoRA": "lora", "ControlNet": "controlnet"}


# ----------------------------------------------------------------------------------------------
# Hub ids and the Hub


def is_hub_id(name) -> bool:
    """The one test: `owner/repo` or `owner/repo/path/file`, a name the Hub could resolve, not a local-looking
    path (./x, /abs, ~/x, a\\b, a single word, or `folder/file.safetensors`, a file's relative path)."""
    name = str(name)
    parts = name.split("/")
    return (len(parts) >= 2 and all(parts) and "\\" not in name
            and all(_REPO_PART.fullmatch(p) for p in parts[:2])
            and not (len(parts) == 2 and name.endswith(".safetensors")))


def hub_parts(name) -> tuple[str, str | None]:
    """(repo, path of a file in it or None) of a Hub id."""
    parts = str(name).split("/")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def hub_fetch(name: str, *, patterns: list[str] | None = None, filename: str | None = None,
              local_only: bool = False, fail=None) -> Path:
    """The one way to the Hugging Face Hub (models, converter sources, LoRAs, ControlNets): the snapshot
    folder of repo `name` holding the files that match `patterns`, or the path of one `filename` in it; from
    the local HF cache, downloaded into it first unless local_only. Any failure (offline, unknown or gated
    repo, not in the cache) raises fail(reason) (default: a CheckpointError naming the repo)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename is not None:
            return Path(hf_hub_download(name, filename, local_files_only=local_only))
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=local_only))
    except Exception as e:  # offline, unknown repo, gated, network: all end the same way for the user
        reason = type(e).__name__
    raise (fail or (lambda r: CheckpointError(f"cannot get {name} from the Hugging Face Hub ({r})")))(reason) from None


def hub_cached(name, patterns=HUB_PATTERNS) -> Path | None:
    """Where the local Hugging Face cache already holds Hub id `name`, without any network access: a repo's
    snapshot folder (`owner/repo`, the files of `patterns`), or a file (`owner/repo/path/file`); None if it is
    not there. (`cached` is the policy for names read back from an image.)"""
    repo, filename = hub_parts(name)
    try:
        return hub_fetch(repo, patterns=patterns, filename=filename, local_only=True)
    except CheckpointError:
        return None


# ----------------------------------------------------------------------------------------------
# Checkpoint folders


def read_config(folder: Path, name: str = "config.json") -> dict:
    """A JSON config of a checkpoint folder (config.json, model_index.json, ...)."""
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: is {folder} a component folder of a Z-Image checkpoint?")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def check_checkpoint_folder(folder: Path) -> None:
    """Fail early, naming what is missing, if folder is not a Z-Image checkpoint in the diffusers layout."""
    index = read_config(folder, "model_index.json")
    cls = index.get("_class_name", "")
    if "ZImage" not in cls:
        raise CheckpointError(f"{folder} holds a {cls or 'unknown'} checkpoint, not a Z-Image one (model_index.json)")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise CheckpointError(f"{folder} is incomplete: missing folder(s) {', '.join(missing)}")


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: the shards named by an *.index.json, else every *.safetensors."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {indexes[0]}: {e}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder} is incomplete: shard(s) {', '.join(missing)} named by {indexes[0].name} are missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder}")
    return files


def resolve_model(name, *, components=WEIGHT_COMPONENTS, local_only: bool = False) -> Path:
    """A local checkpoint folder, or a Hub repo id (`owner/repo`) fetched into the HF cache: its configs and
    tokenizer, and the weights of `components` only (default: all; `()` for the small files alone).
    local_only: the cache only, no network."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; point at a checkpoint folder (the one with model_index.json)")
        check_checkpoint_folder(path)
        return path
    name = str(name)
    if not is_hub_id(name) or hub_parts(name)[1] is not None:
        raise CheckpointError(f"model folder {name} does not exist (and it is not a Hub repo id like Tongyi-MAI/Z-Image-Turbo)")
    folder = hub_fetch(name, patterns=_model_patterns(components), local_only=local_only, fail=lambda reason: CheckpointError(
        f"cannot get {name} from the Hugging Face Hub ({reason}); if you are offline or the repo is private, "
        f"download it once (hf download {name}) or give a local folder as {{model}}", "model", ("model",)))
    check_checkpoint_folder(folder)
    return folder


def _model_patterns(components) -> list[str]:
    if set(components) >= set(WEIGHT_COMPONENTS):
        return HUB_PATTERNS
    return HUB_SMALL_FILES + [p for c in components for p in (f"{c}/*.safetensors", f"{c}/*.safetensors.index.json")]


# ----------------------------------------------------------------------------------------------
# Single files: LoRAs, ControlNets


def resolve_file(name, what: str = "LoRA", *, error: type[Exception] = CheckpointError, local_only: bool = False) -> Path:
    """One .safetensors file: a local file, a folder holding exactly one, a Hub repo id holding exactly one
    (at any depth), or `owner/repo/path/file.safetensors`; fetched into the HF cache (the cache only if
    local_only). Errors are `error`s whose message names the file as `what` ("LoRA", "ControlNet")."""
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise error(f"{what} folder {path} holds {len(files)} .safetensors files; name one of them" +
                        (f" ({', '.join(f.name for f in files[:4])})" if files else ""))
        return files[0]
    if path.is_file():
        if path.suffix != ".safetensors":
            raise error(f"{what} {path} is not a .safetensors file (pickled .pt/.pth/.ckpt files are not loaded)")
        return path
    if not is_hub_id(name):
        raise error(f"{what} file {name} does not exist")

    def fail(reason):
        if local_only:
            return error(f"{what} {name} is not in the local Hugging Face cache ({reason})")
        return error(f"{what} {name} is not a local file and cannot be fetched from the Hugging Face Hub ({reason})")

    return _hub_file(name, what, error, local_only, fail)


def _hub_file(name, what: str, error, local_only: bool, fail) -> Path:
    """The .safetensors file Hub id `name` stands for (see resolve_file)."""
    repo, filename = hub_parts(name)
    if filename is not None and not filename.endswith(".safetensors"):
        raise error(f"{what} {name}: name a .safetensors file in the repo {repo}, or the repo alone")
    if filename is None:
        files = None
        if not local_only:
            from huggingface_hub import list_repo_files

            try:
                files = [f for f in list_repo_files(repo) if f.endswith(".safetensors")]
            except Exception:  # offline: whatever of the repo is in the local cache
                pass
        if files is None:
            folder = hub_fetch(repo, patterns=["*.safetensors"], local_only=True, fail=fail)
            files = [f.relative_to(folder).as_posix() for f in folder.rglob("*.safetensors")]
        if len(files) != 1:
            raise error(f"the Hub repo {repo} has {len(files)} .safetensors files; name one as "
                        f"{repo}/FILE.safetensors" + (f" (e.g. {', '.join(sorted(files)[:3])})" if files else ""))
        filename = files[0]
    return hub_fetch(repo, filename=filename, local_only=local_only, fail=fail)


def resolve_controlnet(source, *, local_only: bool = False) -> tuple[list[Path], dict | None]:
    """The weight files (and config.json, if any) of a ControlNet: a .safetensors file, a folder (one file,
    or shards named by an index, with a config.json), or a Hub id as for `resolve_file`."""
    path = Path(source).expanduser()
    if path.is_dir():
        config = read_config(path) if (path / "config.json").is_file() else None
        if any(path.glob("*.safetensors.index.json")):
            return safetensors_files(path), config
        return [resolve_file(path, "ControlNet", error=CheckpointError)], config
    return [resolve_file(source, "ControlNet", error=CheckpointError, local_only=local_only)], None


# ----------------------------------------------------------------------------------------------
# Names read back from a saved image


def cached(name, what: str = "model") -> Path:
    """A model, LoRA or ControlNet named by a saved image's metadata (`what`: "model", "LoRA", "ControlNet"),
    used only if it is on this machine already: a Hub id found in the local HF cache (nothing is
    downloaded); the local path to load: a model's snapshot folder, or the one .safetensors file of a LoRA or
    ControlNet. Raises NotCachedError (with .name, .what, .param) for a Hub id not in the cache, for a repo
    holding several files, and for a local folder or file (it was named by label only: give its path again)."""
    param = PARAMS.get(what, what.lower())
    name = str(name)
    hub = is_hub_id(name) and (what != "model" or hub_parts(name)[1] is None)
    if not hub:
        raise NotCachedError(f"the {what} {name} was a local {'folder' if '#' in name else 'file'}; give its path "
                             f"again: {param}=PATH", name=name, what=what, param=param, local=True)

    def fail(reason):
        return NotCachedError(f"the {what} {name} is not in the local Hugging Face cache; name it to download it: "
                              f"{param}={name!r}", name=name, what=what, param=param, local=False)

    def error(message):
        return NotCachedError(message, name=name, what=what, param=param, local=False)

    if what == "model":
        folder = hub_fetch(name, patterns=HUB_PATTERNS, local_only=True, fail=fail)
        check_checkpoint_folder(folder)
        return folder
    return _hub_file(name, what, error, True, fail)
