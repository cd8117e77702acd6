"""sources.py: the one Hub-id test, single-file resolution, and the cache-only policy for names read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zimage_mlx.errors import CheckpointError, LoraError, NotCachedError
from zimage_mlx.sources import cached, is_hub_id, resolve_controlnet, resolve_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("name, hub", [
    ("Tongyi-MAI/Z-Image-Turbo", True),
    ("someone/lora/style.safetensors", True),
    ("someone/epochs/a/e2.safetensors", True),
    ("./x", False), ("./x/y", False), ("../x/y", False),
    ("/abs", False), ("/abs/x/y.safetensors", False),
    ("~/x", False), ("~/x/y", False),
    ("a\\b", False), ("a\\b/c", False),
    ("word", False), ("word.safetensors", False),
    ("loras/style.safetensors", False),  # a file's relative path, not a repo
    ("owner//file", False), ("owner/", False), (".hidden/x", False), ("my models/x", False),
    ("my-folder#1a2b3c4d", False),  # a local folder's label in image metadata
])
def test_is_hub_id(name, hub):
    assert is_hub_id(name) is hub


def test_resolve_file_in_a_folder(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "a.safetensors").write_bytes(b"")
    (one / "notes.txt").write_text("x")
    assert resolve_file(one, "LoRA", error=LoraError) == one / "a.safetensors"
    assert resolve_file(one / "a.safetensors") == one / "a.safetensors"
    for f in ("a.safetensors", "b.safetensors"):
        (two / f).write_bytes(b"")
    with pytest.raises(LoraError, match=r"LoRA folder .*two holds 2 \.safetensors files; name one of them "
                                        r"\(a\.safetensors, b\.safetensors\)"):
        resolve_file(two, "LoRA", error=LoraError)
    with pytest.raises(CheckpointError, match="ControlNet folder .* holds 2"):
        resolve_controlnet(two)
    with pytest.raises(CheckpointError, match="ControlNet file .*missing.safetensors does not exist"):
        resolve_controlnet(tmp_path / "missing.safetensors")
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(LoraError, match="LoRA .*x.pt is not a .safetensors file"):
        resolve_file(tmp_path / "x.pt", error=LoraError)


def test_cached_refuses_local_names():
    with pytest.raises(NotCachedError, match=r"the model my-folder#1a2b3c4d was a local folder; give its path again: "
                                             r"model=PATH") as e:
        cached("my-folder#1a2b3c4d", "model")
    assert (e.value.param, e.value.local) == ("model", True)
    with pytest.raises(NotCachedError, match="the LoRA style.safetensors was a local file; .* lora=PATH"):
        cached("style.safetensors", "LoRA")


def test_cached_finds_a_file_in_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--lora" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    (snapshot / "style.safetensors").write_bytes(b"")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cached("someone/lora/style.safetensors", "LoRA") == snapshot / "style.safetensors"
    assert cached("someone/lora", "LoRA") == snapshot / "style.safetensors"  # the one file of the repo
    (snapshot / "other.safetensors").write_bytes(b"")
    with pytest.raises(NotCachedError, match=r"someone/lora has 2 \.safetensors files; name one as someone/lora/FILE"):
        cached("someone/lora", "LoRA")


def test_cache_only_policy_offline_with_an_empty_cache(tmp_path):
    """HF_HUB_OFFLINE is read when huggingface_hub is imported: set in a fresh process, before that."""
    code = ("from zimage_mlx.errors import NotCachedError\n"
            "from zimage_mlx.sources import cached\n"
            "for name, what in [('Tongyi-MAI/Z-Image-Turbo', 'model'), ('someone/lora/style.safetensors', 'LoRA'),\n"
            "                   ('someone/cn', 'ControlNet')]:\n"
            "    try:\n        cached(name, what)\n"
            "    except NotCachedError as e:\n        print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "the model Tongyi-MAI/Z-Image-Turbo is not in the local Hugging Face cache; name it to download it: "
        "model='Tongyi-MAI/Z-Image-Turbo'",
        "the LoRA someone/lora/style.safetensors is not in the local Hugging Face cache; name it to download it: "
        "lora='someone/lora/style.safetensors'",
        "the ControlNet someone/cn is not in the local Hugging Face cache; name it to download it: "
        "controlnet='someone/cn'",
    ]
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))
