"""The README's Python example runs, on the reference checkpoint, so that it cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example(reference_checkpoint, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no Python example"
    code = blocks[0]
    assert '"Tongyi-MAI/Z-Image-Turbo"' in code and "width=1024, height=1024" in code
    # Same code, on the tiny reference checkpoint and at a size its CPU test budget allows.
    code = code.replace('"Tongyi-MAI/Z-Image-Turbo"', repr(str(reference_checkpoint)))
    code = code.replace("width=1024, height=1024", "width=64, height=64")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "fox.png").is_file()
    assert scope["image"].size == (64, 64) and scope["image"].info["seed"] == 42


def test_readme_names_the_test_command():
    text = README.read_text()
    assert 'pip install -e ".[test]" && python3 -m pytest -q' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in ci and "torch==2.13.0" in ci
