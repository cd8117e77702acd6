"""Shared fixtures: reference checkpoints built once per test session with torch + diffusers + transformers."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import reference  # noqa: E402


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory) -> Path:
    """A full Z-Image checkpoint in the Hugging Face layout; the DiT is float32 in several shards."""
    return reference.build_checkpoint(tmp_path_factory.mktemp("zimage") / "Z-Image-Tiny")


@pytest.fixture(scope="session")
def reference_transformer_bf16(reference_checkpoint, tmp_path_factory) -> Path:
    """The same DiT weights stored in bfloat16 as one file (no index), in a transformer/ folder."""
    import torch
    from diffusers import ZImageTransformer2DModel

    out = tmp_path_factory.mktemp("dit_bf16") / "transformer"
    model = ZImageTransformer2DModel.from_pretrained(reference_checkpoint / "transformer")
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="10GB", safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def reference_pipeline(reference_checkpoint):
    """diffusers' ZImagePipeline in float32 on the reference checkpoint."""
    return reference.load_reference_pipeline(reference_checkpoint)


@pytest.fixture()
def checkpoint_copy(reference_checkpoint, tmp_path) -> Path:
    """A private copy of the reference checkpoint that a test may damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(reference_checkpoint, dst)
    return dst


@pytest.fixture()
def dit_forwards(monkeypatch):
    """Call it to start counting DiT forwards; returns the list of their batch sizes, filled as they run."""
    from zimage_mlx.transformer import ZImageTransformer

    def start() -> list[int]:
        calls: list[int] = []
        orig = ZImageTransformer.__call__

        def counting(self, x, t, caps):
            calls.append(x.shape[0])
            return orig(self, x, t, caps)

        monkeypatch.setattr(ZImageTransformer, "__call__", counting)
        return calls

    return start


# MLX 0.32 on Linux aborts now and then at interpreter exit ("terminate called without an active exception",
# exit code 134) once a thread other than the main one has used it, as the server's worker thread and the
# owner-thread tests do: measured 2-4 times in 10 runs of a 6-line script. The results are final when pytest
# unconfigures, so the session ends there with its own exit status, before the static destructors run.
_EXIT_STATUS = [0]


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS[0] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[0])

