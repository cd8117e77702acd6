"""The README's Python example runs, on the reference checkpoint, so that it cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples(reference_checkpoint, tmp_path, monkeypatch):
    """Every ```python block, in order and in one scope (later ones use the first one's `pipe`)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no Python example"
    assert '"Tongyi-MAI/Z-Image-Turbo"' in blocks[0] and "width=1024, height=1024" in blocks[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for i, code in enumerate(blocks):
        # Same code, on the tiny reference checkpoint and at a size its CPU test budget allows.
        code = code.replace('"Tongyi-MAI/Z-Image-Turbo"', repr(str(reference_checkpoint)))
        code = code.replace("width=1024, height=1024", "width=64, height=64")
        exec(compile(code, f"README.md python block {i + 1}", "exec"), scope)
        if i == 0:
            assert (tmp_path / "fox.png").is_file()
            assert scope["image"].size == (64, 64) and scope["image"].info["seed"] == 42
        if "fast_preview" in code:  # the preview example wrote its step previews
            assert (tmp_path / "forming.png").is_file()


def test_readme_names_the_test_command():
    text = README.read_text()
    assert 'pip install -e ".[test]" && python3 -m pytest -q' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in ci and "torch==2.13.0" in ci
