"""README.md and docs/*.md run, on the test checkpoint, so that they cannot rot.

Every `zimage-mlx ...` command in a ```bash/```sh block and every ```python block runs, page by page and in
order, unless the line above its block is a marker `<!-- needs: WHAT -->` (real weights, a Mac, several
Macs, a running server): those blocks are listed as skipped tests with their reason. Other shell lines
(pip, git, curl, mlx.launch) are not run: this environment is installed already. What the test changes
is the few rules below (`shell_command`, `python_code`); the files the examples name are made by `inputs`.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
HUB_ID = "Tongyi-MAI/Z-Image-Turbo"
BLOCK = re.compile(r"(?:<!-- needs: (?P<needs>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
SHELL = {"bash", "sh"}


def blocks(page: Path, langs: set[str]) -> list[tuple[int, str, str | None]]:
    """(line number, code, needs) of the page's blocks in these languages, in order."""
    text = page.read_text()
    return [(text[:m.start("code")].count("\n"), m["code"], m["needs"])
            for m in BLOCK.finditer(text) if m["lang"] in langs]


# ---------------------------------------------------------------------------------------------------
# The rules: the test checkpoint for the Hub id, sizes / 16, 2 steps, port 0.

SIZE_OPTIONS = {"--width", "--height", "--resolution"}


def shell_command(args: list[str], checkpoint: Path) -> list[str]:
    """A documented `zimage-mlx` command line (after the program name), as the test runs it."""
    args = [str(checkpoint) if a == HUB_ID else a for a in args]
    out, it = [], iter(args)
    for a in it:
        out.append(a)
        if a == "--size":
            out.append("x".join(str(int(n) // 16) for n in next(it).split("x")))
        elif a in SIZE_OPTIONS:
            out.append(str(int(next(it)) // 16))
        elif a == "--steps":
            next(it)
            out.append("2")
        elif a == "--port":
            next(it)
            out.append("0")
    command = out[0]
    if command in {"generate", "serve", "enhance", "train", "upscale"} and not {"-m", "--model"} & set(out):
        out += ["--model", str(checkpoint)]
    sized = {"--size", "--image", "--from-image", "--control"} | SIZE_OPTIONS
    if command == "generate" and not sized & set(out):
        out += ["--size", "64"]
    if command == "serve" and "--port" not in out:
        out += ["--port", "0"]
    return out


def python_code(code: str, checkpoint: Path) -> str:
    return (code.replace(repr(HUB_ID).replace("'", '"'), repr(str(checkpoint)))
                .replace("width=1024, height=1024", "width=64, height=64"))


def commands(code: str) -> list[tuple[dict, list[str]]]:
    """The `zimage-mlx` commands of a shell block: (environment assignments, arguments after the program)."""
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        if "zimage-mlx" not in line:
            continue
        words = shlex.split(line, comments=True)
        part: list[str] = []
        for w in [*words, "&&"]:
            if w not in {"&&", "||", ";", "|"}:
                part.append(w)
                continue
            env = {}
            while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", part[0]):
                k, v = part.pop(0).split("=", 1)
                env[k] = v
            if part and part[0] == "zimage-mlx":
                found.append((env, part[1:]))
            part = []
    return found


# ---------------------------------------------------------------------------------------------------
# The files the examples name


def inputs(folder: Path, checkpoint: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name in ("photo.png", "photo.jpg", "street.png", "street.jpg"):
        Image.fromarray(photo).save(folder / name)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    for name in ("door-mask.png", "car-mask.png", "mask.png"):
        Image.fromarray(mask).save(folder / name)
    (folder / "prompts.txt").write_text("a red fox in the snow\na lighthouse at dusk\n")
    from safetensors.numpy import save_file

    dim = 96  # the test DiT's width (tests/reference.py)
    save_file({"transformer.layers.0.attention.to_q.lora_A.weight": rng.normal(0, 0.5, (4, dim)).astype(np.float32),
               "transformer.layers.0.attention.to_q.lora_B.weight": rng.normal(0, 0.5, (dim, 4)).astype(np.float32)},
              str(folder / "style.safetensors"))
    dog = folder / "my-dog"
    dog.mkdir(exist_ok=True)
    Image.fromarray(photo).save(dog / "01.jpg")
    Image.fromarray(photo[::-1]).save(dog / "02.png")
    (dog / "01.txt").write_text("a photo of sks dog on a sofa")
    (dog / "02.txt").write_text("a photo of sks dog in the snow")
    if not (folder / "my-zimage-folder").exists():
        (folder / "my-zimage-folder").symlink_to(checkpoint, target_is_directory=True)
    return folder


# ---------------------------------------------------------------------------------------------------
# The tests

SHELL_PAGES = [p for p in PAGES if any(not n and commands(c) for _, c, n in blocks(p, SHELL))]
PYTHON_PAGES = [p for p in PAGES if any(not n for _, _, n in blocks(p, {"python"}))]
MARKED = [(p, line, n) for p in PAGES for line, _, n in blocks(p, SHELL | {"python"}) if n]


def serve(env: dict, args: list[str], cwd: Path) -> None:
    """Start the server, wait for its listening line, stop it with SIGTERM: it must exit 0."""
    full_env = {**os.environ, **env, "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", "from zimage_mlx.cli import main; main()", *args], cwd=cwd,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(300, proc.kill)  # a server that never listens must not hang the suite
    timer.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://"), (args, line, proc.stderr.read() if proc.poll() else "")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (args, proc.stderr.read())
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("page", SHELL_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shell_commands(page, reference_checkpoint, tmp_path, monkeypatch):
    """Each unmarked `zimage-mlx` command exits 0, in the page's order, in one folder per page."""
    from zimage_mlx import cli

    folder = inputs(tmp_path / page.stem, reference_checkpoint)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ran = []
    for line, code, needs in blocks(page, SHELL):
        if needs:
            continue
        for env, args in commands(code):
            args = shell_command(args, reference_checkpoint)
            where = f"{page.name} line {line}: zimage-mlx {shlex.join(args)}"
            if args[0] == "serve":
                serve(env, args, folder)
            else:
                with monkeypatch.context() as m:
                    for k, v in env.items():
                        m.setenv(k, v)
                    r = CliRunner().invoke(cli.main, args)
                assert r.exit_code == 0, f"{where}\n{r.output}" + (f"\n{r.exception!r}" if r.exception else "")
            ran.append(where)
    assert ran
    if page == README:  # the first image, where the front page says it goes
        assert (folder / "zimage-42.png").is_file()
        assert {"lighthouse-1.png", "lighthouse-10.png", "cat-0.png", "cat-3.png"} <= {
            p.name for p in (folder / "out").iterdir()}


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks(page, reference_checkpoint, tmp_path, monkeypatch):
    """Every unmarked ```python block, in order and in one scope per page (later ones use the first's `pipe`)."""
    todo = [(line, code) for line, code, needs in blocks(page, {"python"}) if not needs]
    if page == README:
        assert '"Tongyi-MAI/Z-Image-Turbo"' in todo[0][1] and "width=1024, height=1024" in todo[0][1]
    inputs(tmp_path, reference_checkpoint)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for i, (line, code) in enumerate(todo):
        exec(compile(python_code(code, reference_checkpoint), f"{page.name} line {line}", "exec"), scope)
        if i == 0 and page in (README, ROOT / "docs" / "python.md"):
            assert (tmp_path / "fox.png").is_file()
            assert scope["image"].size == (64, 64) and scope["image"].info["seed"] == 42
        if "fast_preview" in code:  # the preview example wrote its step previews
            assert (tmp_path / "forming.png").is_file()


@pytest.mark.parametrize("page,line,needs", MARKED, ids=lambda v: v.relative_to(ROOT).as_posix()
                         if isinstance(v, Path) else str(v))
def test_marked_blocks(page, line, needs):
    """Blocks that need what the tests do not have: listed, with what they need."""
    pytest.skip(f"{page.relative_to(ROOT)} line {line} needs: {needs}")


def test_rules():
    ckpt = Path("/ckpt")
    assert shell_command(["generate", "a cat", "--seed", "5"], ckpt) == [
        "generate", "a cat", "--seed", "5", "--model", "/ckpt", "--size", "64"]
    assert shell_command(["generate", "x", "--size", "1024x768", "--steps", "12"], ckpt)[2:6] == [
        "--size", "64x48", "--steps", "2"]
    assert shell_command(["convert", HUB_ID, "q4", "--quantize", "4"], ckpt) == ["convert", "/ckpt", "q4", "--quantize", "4"]
    assert shell_command(["serve", "--port", "8001"], ckpt) == ["serve", "--port", "0", "--model", "/ckpt"]
    assert commands('pip install -e . && zimage-mlx generate "a b" --seed 42  # note\n') == [
        ({}, ["generate", "a b", "--seed", "42"])]
    assert commands("A_KEY=x zimage-mlx serve \\\n  --port 1\n") == [({"A_KEY": "x"}, ["serve", "--port", "1"])]


def test_every_command_runs_or_is_marked():
    """No `zimage-mlx` line hides in a block the shell test would not parse (other languages, a `$` prompt)."""
    for page in PAGES:
        for m in BLOCK.finditer(page.read_text()):
            if m["lang"] in SHELL or m["needs"]:
                continue
            for line in m["code"].splitlines():
                assert not line.lstrip().startswith(("zimage-mlx", "$ zimage-mlx")), (page.name, line)


def test_readme_names_the_test_command():
    text = README.read_text()
    assert 'pip install -e ".[test]" && python3 -m pytest -q' in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in ci and "torch==2.13.0" in ci


def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"
    assert (ROOT / "LICENSE").is_file() and "Apache License" in (ROOT / "LICENSE").read_text()
