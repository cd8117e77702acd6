"""The `zimage-mlx` command line and the examples/ scripts, on the tiny reference checkpoint.

In-process tests drive the real click command with CliRunner and share loaded pipelines through a cached
`from_pretrained`; the console script and the examples run as real subprocesses (no cache, the full load
path), all started together by the first test so that they overlap with the in-process tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from zimage_mlx import __version__, cli
from zimage_mlx.cli import common
from zimage_mlx.metadata import parse_infotext
from zimage_mlx.pipeline import ZImagePipeline
from zimage_mlx.recipe import DEFAULT_MODEL, Recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REAL_LOAD = ZImagePipeline.from_pretrained  # before the `loads` fixture caches it
SUBPROCESS_TIMEOUT = 300


@pytest.fixture(scope="module")
def loads():
    """Serve from_pretrained from a cache keyed by its arguments; the list records every call."""
    real = ZImagePipeline.from_pretrained
    cache, calls = {}, []

    def cached(cls, model, dtype="auto", quantize=None, low_memory=False, label=None):
        key = (str(model), dtype, quantize, low_memory)
        calls.append(key)
        if key not in cache or cache[key].transformer is None:  # a run frees the DiT before its last decode
            cache[key] = real(model, dtype=dtype, quantize=quantize, low_memory=low_memory)
        cache[key].label = label or cache[key].label
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(ZImagePipeline, "from_pretrained", classmethod(cached))
    yield calls
    mp.undo()


@pytest.fixture(scope="module")
def ckpt(reference_checkpoint) -> str:
    return str(reference_checkpoint)


def generate(*args, input=None):
    """Run `zimage-mlx generate ARGS` in process; return click's Result (stdout and stderr apart)."""
    return CliRunner().invoke(cli.main, ["generate", *map(str, args)], input=input)


def ok(*args, **kw):
    result = generate(*args, **kw)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def text(path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


# ------------------------------------------------------------------------------------------------
# Subprocesses: the console script and the examples, started first and collected by the last tests


@pytest.fixture(scope="module")
def subprocesses(reference_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("subprocesses")
    script = Path(sys.executable).with_name("zimage-mlx")
    script = str(script) if script.exists() else shutil.which("zimage-mlx")
    assert script, "the zimage-mlx console script is not installed (pip install -e .)"
    model = str(reference_checkpoint)
    small = ["--model", model, "--width", "32", "--height", "32"]
    commands = {
        "console script": [script, "generate", "a red fox", "-m", model, "--size", "32x32", "--steps", "2",
                           "--seed", "5", "-o", "cli/fox-{seed}.png"],
        "minimal.py": [sys.executable, EXAMPLES / "minimal.py", *small, "--steps", "1", "--output", "minimal.png"],
        "batch_prompts.py": [sys.executable, EXAMPLES / "batch_prompts.py", *small, "--steps", "1",
                             "--num-images", "2", "--out-dir", "batch"],
        "step_preview.py": [sys.executable, EXAMPLES / "step_preview.py", *small, "--steps", "2",
                            "--out-dir", "preview"],
        "low_memory.py": [sys.executable, EXAMPLES / "low_memory.py", *small, "--steps", "1",
                          "--output", "low.png"],
        "img2img.py": [sys.executable, EXAMPLES / "img2img.py", "photo.png", "a fox", "--model", model, "--steps", "2",
                       "--strength", "0.5", "--output", "img2img.png"],
        "inpainting.py": [sys.executable, EXAMPLES / "inpainting.py", "photo.png", "mask.png", "a fox", "--model", model,
                          "--steps", "1", "--output", "inpainting.png"],
        "lora.py": [sys.executable, EXAMPLES / "lora.py", "style.safetensors:0.8", *small, "--steps", "1",
                    "--output", "lora.png", "--without", "plain.png"],
    }
    # Their inputs: a 32x32 photo, a mask (right half white), a LoRA on the tiny DiT's first query projection.
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out / "photo.png")
    Image.fromarray(np.repeat(np.array([0, 255], np.uint8), 16)[None].repeat(32, 0)).save(out / "mask.png")
    from safetensors.numpy import save_file

    save_file({"transformer.layers.0.attention.to_q.lora_A.weight": rng.normal(0, 0.5, (4, 96)).astype(np.float32),
               "transformer.layers.0.attention.to_q.lora_B.weight": rng.normal(0, 0.5, (96, 4)).astype(np.float32)},
              str(out / "style.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = {name: subprocess.Popen([str(c) for c in cmd], cwd=out, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, cmd in commands.items()}

    def wait(name):
        stdout, stderr = procs[name].communicate(timeout=SUBPROCESS_TIMEOUT)
        assert procs[name].returncode == 0, f"{name} failed:\n{stderr}"
        return stdout, stderr

    yield out, wait
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_start_subprocesses(subprocesses):
    """Only starts them: the rest of the file runs while they do."""


# ------------------------------------------------------------------------------------------------
# Generation


def test_writes_png_with_settings_and_pixels_of_the_pipeline(ckpt, loads, tmp_path):
    out = tmp_path / "new" / "folder"
    r = ok("a red fox in the snow, 一只狐狸", "-m", ckpt, "--size", "48x32", "--steps", 2, "--seed", 7,
           "-o", out / "fox-{seed}.png")
    path = out / "fox-7.png"
    assert r.stdout.startswith(f"Saved {path} (seed 7, 2 steps at ") and "s/step, decode " in r.stdout
    assert "peak memory" in r.stderr and "s/step" in r.stderr.splitlines()[-1]

    meta = text(path)
    assert {k: meta[k] for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height",
                                 "model", "quantization", "dtype", "version", "Software")} == dict(
        prompt="a red fox in the snow, 一只狐狸", negative_prompt="", seed="7", steps="2", guidance="0", width="48",
        height="32", model=folder_label(ckpt), quantization="none", dtype="float32", version=__version__,
        Software=f"zimage-mlx {__version__}")
    assert meta["parameters"] == (
        "a red fox in the snow, 一只狐狸\n"
        f"Steps: 2, Sampler: Euler (flow match), CFG scale: 0, Seed: 7, Size: 48x32, Model: {folder_label(ckpt)}, "
        f"Dtype: float32, Version: zimage-mlx {__version__}")
    assert not any(str(Path(ckpt).parent) in v or str(tmp_path) in v for v in meta.values())  # no local path

    # The CLI adds nothing to the pipeline's image.
    pipe = ZImagePipeline.from_pretrained(ckpt, dtype="auto")
    expected = pipe.generate("a red fox in the snow, 一只狐狸", width=48, height=32, steps=2, seed=7)[0]
    np.testing.assert_array_equal(pixels(path), np.asarray(expected))
    assert pixels(path).shape == (32, 48, 3)
    assert [p for p in out.iterdir()] == [path]  # no temporary file left behind


def test_seeds_num_images_and_same_seed_same_pixels(ckpt, loads, tmp_path):
    r = ok("a lighthouse", "-m", ckpt, "--size", 32, "--steps", 1, "--seed", 3, "--seed", 10, "--num-images", 2,
           "-o", tmp_path / "s-{seed}.png")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["s-10.png", "s-11.png", "s-3.png", "s-4.png"]  # image k of a seed uses seed + k
    assert r.stdout.count("Saved ") == 4
    assert not np.array_equal(pixels(tmp_path / "s-3.png"), pixels(tmp_path / "s-10.png"))

    ok("a lighthouse", "-m", ckpt, "--width", 32, "--height", 32, "--steps", 1, "--seed", 4,
       "-o", tmp_path / "again.png")
    np.testing.assert_array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "s-4.png"))
    assert text(tmp_path / "again.png")["seed"] == "4"

    ok("a lighthouse", "-m", ckpt, "--size", 32, "--steps", 1, "--seed", 4, "--low-memory",
       "-o", tmp_path / "low.png")
    np.testing.assert_array_equal(pixels(tmp_path / "low.png"), pixels(tmp_path / "s-4.png"))


def test_random_seed_is_recorded(ckpt, loads, tmp_path):
    r = ok("a lighthouse", "-m", ckpt, "--size", 32, "--steps", 1, "-o", tmp_path / "r-{seed}.png")
    (path,) = tmp_path.iterdir()
    assert path.name == f"r-{text(path)['seed']}.png" and str(path) in r.stdout


def test_prompt_file_gives_one_image_per_line(ckpt, loads, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red barn\n\n   \n  a blue boat  \n", encoding="utf-8")
    out = tmp_path / "out"
    r = ok("--prompt-file", prompts, "-m", ckpt, "--size", 32, "--steps", 1, "--seed", 1, "-o", f"{out}/")
    # One prompt per non-empty line; with the default names, several prompts add {prompt_index}.
    assert sorted(p.name for p in out.iterdir()) == ["zimage-0-1.png", "zimage-1-1.png"]
    assert text(out / "zimage-0-1.png")["prompt"] == "a red barn"
    assert text(out / "zimage-1-1.png")["prompt"] == "a blue boat"
    assert r.stdout.count("Saved") == 2

    r = ok("--prompt-file", "-", "-m", ckpt, "--size", 32, "--steps", 1, "--seed", 1, "--seed", 9, "--quiet",
           "-o", tmp_path / "stdin-{index}-{prompt_index}-{seed}.png", input="x\ny\n")
    assert r.stdout.split() == [str(tmp_path / n) for n in
                                ("stdin-0-0-1.png", "stdin-1-0-9.png", "stdin-2-1-1.png", "stdin-3-1-9.png")]
    assert r.stderr == ""  # --quiet: nothing but the paths


def test_guidance_settings_and_from_image_regenerates_the_same_image(ckpt, loads, tmp_path):
    first = tmp_path / "first.png"
    ok("a castle", "-m", ckpt, "--size", "48x32", "--steps", 2, "--seed", 11, "--guidance", 2.5,
       "--negative-prompt", "blurry, dark", "--cfg-normalization", "--cfg-truncation", 0.6, "-o", first)
    meta = text(first)
    assert (meta["guidance"], meta["negative_prompt"], meta["cfg_normalization"], meta["cfg_truncation"]) == (
        "2.5", "blurry, dark", "1", "0.6")
    assert meta["parameters"].startswith("a castle\nNegative prompt: blurry, dark\nSteps: 2, ")
    assert "CFG scale: 2.5, " in meta["parameters"] and "CFG truncation: 0.6" in meta["parameters"]

    again = tmp_path / "again.png"
    n_loads = len(loads)
    # A local folder is found only through --model: the PNG holds its name and configs' hash, no path.
    assert_one_line_error(generate("--from-image", first, "-o", again), "give it again with --model FOLDER")
    assert len(loads) == n_loads and not again.exists()
    r = ok("--from-image", first, "-m", ckpt, "-o", again)  # prompt, negative, seed, steps, CFG, size from the PNG
    assert r.stderr.startswith(f"From first.png: model {ckpt}\n")  # what it loads, said before loading
    np.testing.assert_array_equal(pixels(again), pixels(first))
    assert text(again) == meta

    # Explicit flags override the stored settings.
    changed = tmp_path / "changed.png"
    ok("--from-image", first, "-m", ckpt, "--seed", 12, "--steps", 1, "--guidance", 0, "--negative-prompt", "", "-o", changed)
    new = text(changed)
    assert (new["seed"], new["steps"], new["guidance"], new["prompt"], new["width"]) == ("12", "1", "0", "a castle", "48")
    assert not np.array_equal(pixels(changed), pixels(first))


def test_from_image_reads_an_a1111_parameters_chunk(ckpt, loads, tmp_path):
    other = tmp_path / "other-tool.png"
    info = PngInfo()
    info.add_text("parameters", "a quiet harbor, boats\nNegative prompt: fog\n"
                                "Steps: 30, Sampler: DPM++ 2M, CFG scale: 7, Seed: 99, Size: 32x48, Model: sd_xl_base")
    Image.new("RGB", (8, 8)).save(other, pnginfo=info)
    ok("--from-image", other, "-m", ckpt, "-o", tmp_path / "ours.png")
    meta = text(tmp_path / "ours.png")
    # Prompt, seed and size come over; another tool's steps, CFG scale and model do not apply to Z-Image.
    assert (meta["prompt"], meta["seed"], meta["width"], meta["height"]) == ("a quiet harbor, boats", "99", "32", "48")
    assert (meta["steps"], meta["guidance"], meta["negative_prompt"]) == ("8", "0", "")


def folder_label(folder) -> str:
    """`name#hash`: the folder's name and 8 hex digits of SHA-256 over its JSON configs (computed here)."""
    import hashlib

    folder = Path(folder).resolve()
    files = sorted(folder.glob("*.json")) + sorted(folder.glob("*/*config*.json"))
    h = hashlib.sha256(b"".join(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes() + b"\0"
                                for f in files))
    assert files and (folder / "transformer" / "config.json") in files
    return f"{folder.name}#{h.hexdigest()[:8]}"


def fake_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/...) holding a copy of `folder`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(folder, root / "snapshots" / commit)


def test_from_image_never_fetches_what_the_command_line_did_not_name(ckpt, loads, tmp_path, monkeypatch):
    """A PNG naming a Hub model is replayed only from the local HF cache; nothing is downloaded."""
    from huggingface_hub import constants

    import huggingface_hub

    fetched = []
    real = huggingface_hub.snapshot_download

    def no_network(*a, local_files_only=False, **kw):
        fetched.append((a, local_files_only))
        if not local_files_only:
            raise AssertionError("a download was attempted")
        return real(*a, local_files_only=True, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    info = PngInfo()
    for k, v in dict(prompt="a boat", seed="3", steps="1", width="32", height="32", model="someone/z-image-x").items():
        info.add_text(k, v)
    Image.new("RGB", (8, 8)).save(tmp_path / "web.png", pnginfo=info)
    n_loads = len(loads)
    assert_one_line_error(generate("--from-image", tmp_path / "web.png", "-o", tmp_path / "a.png"),
                          "someone/z-image-x, which is not in the local Hugging Face cache; name it to download "
                          "it: --model someone/z-image-x")
    assert len(loads) == n_loads and all(local for _, local in fetched)
    info.add_text("loras", '[{"name": "someone/lora/style.safetensors", "scale": 0.5}]')
    Image.new("RGB", (8, 8)).save(tmp_path / "web-lora.png", pnginfo=info)
    fake_hub_cache(tmp_path / "hub", "someone/z-image-x", Path(ckpt))  # now in the cache: used, but not the LoRA
    assert_one_line_error(generate("--from-image", tmp_path / "web-lora.png", "-o", tmp_path / "a.png"),
                          "LoRA someone/lora/style.safetensors, which is not in the local Hugging Face cache")
    r = ok("--from-image", tmp_path / "web.png", "-o", tmp_path / "a.png")
    assert "From web.png: model someone/z-image-x (from the Hugging Face cache)" in r.stderr
    assert text(tmp_path / "a.png")["model"] == "someone/z-image-x" and all(local for _, local in fetched)


def test_slow_blas_hint_once_per_process(ckpt, loads, tmp_path, monkeypatch):
    bundled = "7f00-7f01 r-xp 0 08:01 1 /venv/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0\n"
    openblas = "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so\n"
    assert common.reference_blas(bundled) and not common.reference_blas(bundled + openblas)
    assert not common.reference_blas("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libmkl_rt.so.2\n")
    # this process: MLX's bundled BLAS unless a fast one was preloaded
    expected = common.reference_blas(Path("/proc/self/maps").read_text())
    monkeypatch.setattr(common, "_blas_hint_shown", False)
    runs = [ok("a cat", "-m", ckpt, "--size", 32, "--steps", 1, "-o", tmp_path / f"{i}.png").stderr for i in range(2)]
    assert [common.BLAS_HINT in e for e in runs] == [expected, False]
    if expected:
        assert runs[0].splitlines()[1] == common.BLAS_HINT  # right after the Loaded line


def test_never_overwrites_and_overwrite_replaces(ckpt, loads, tmp_path):
    path = tmp_path / "taken.png"
    path.write_bytes(b"keep me")
    assert_one_line_error(generate("a cat", "-m", ckpt, "--size", 32, "--steps", 1, "-o", path), "already exists")
    assert path.read_bytes() == b"keep me"

    ok("a cat", "-m", ckpt, "--size", 32, "--steps", 1, "--seed", 2, "-o", path, "--overwrite")
    assert text(path)["seed"] == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["taken.png"]  # the temporary file was renamed into place


def test_no_metadata(ckpt, loads, tmp_path):
    ok("a cat", "-m", ckpt, "--size", 32, "--steps", 1, "--seed", 2, "--no-metadata", "-o", tmp_path / "bare.png")
    assert text(tmp_path / "bare.png") == {}


def test_truncated_prompt_is_one_warning_line(ckpt, loads, tmp_path):
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 80)  # > 512 tokens
    r = ok(long_prompt, "-m", ckpt, "--size", 32, "--steps", 1, "--num-images", 2, "-o", tmp_path / "{index}.png")
    warning_lines = [line for line in r.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warning_lines) == 1 and "max_sequence_length=512" in warning_lines[0]
    assert "PromptTruncatedWarning" not in r.stderr and "warnings.warn" not in r.stderr
    assert text(tmp_path / "0.png")["prompt"] == long_prompt  # the metadata keeps what the user asked for


def test_quantize_is_passed_on(ckpt, loads, tmp_path):
    import mlx.nn as nn

    r = ok("a cat", "-m", ckpt, "--size", 32, "--steps", 1, "--quantize", 8, "-o", tmp_path / "q.png")
    assert loads[-1] == (ckpt, "auto", 8, False)
    assert "Loaded " in r.stderr and "(float32, 8-bit)" in r.stderr
    meta = text(tmp_path / "q.png")
    assert (meta["quantization"], meta["text_encoder_quantization"], meta["quantize"]) == ("8", "8", "8")
    pipe = ZImagePipeline.from_pretrained(ckpt, dtype="auto", quantize=8)  # the cached one the CLI ran
    assert sum(isinstance(m, nn.QuantizedLinear) for _, m in pipe.transformer.named_modules()) > 0
    assert Recipe.from_png(tmp_path / "q.png").quantize == 8  # a replay quantizes the same way


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, checked before the model loads


# TMP stands for the test's tmp_path; without -o, the output is TMP/out-{seed}.png; without -m, the checkpoint.
BAD_INPUTS = {
    "bad size": (["a", "--size", "30x30"], "multiple of 16"),
    "unparsable size": (["a", "--size", "large"], "--size must look like"),
    "size and width": (["a", "--size", "32", "--width", "32"], "not both"),
    "zero steps": (["a", "--steps", "0"], "steps"),
    "steps not a number": (["a", "--steps", "many"], "--steps"),
    "bad quantize": (["a", "--quantize", "3"], "--quantize"),
    "bad seed": (["a", "--seed", "-1"], "seed"),
    "unknown model folder": (["a", "-m", "TMP/no-such-folder"], "does not exist"),
    "not a checkpoint": (["a", "-m", "TMP/not-a-checkpoint"], "model_index.json"),
    "offline hub": (["a", "-m", "nobody/no-such-zimage-repo"], "Hugging Face Hub"),
    "missing prompt file": (["--prompt-file", "TMP/missing.txt"], "cannot read prompt file"),
    "empty prompt file": (["--prompt-file", "TMP/empty.txt"], "has no prompts"),
    "no prompt": ([], "no prompt"),
    "two prompts": (["a", "--prompt", "b"], "give the prompt once"),
    "negative without guidance": (["a", "--negative-prompt", "blur"], "--guidance"),
    "existing output": (["a", "--seed", "1", "-o", "TMP/taken.png"], "already exists"),
    "unknown output field": (["a", "-o", "TMP/{name}.png"], "unknown field {name}"),
    "not a png": (["a", "-o", "TMP/x-{seed}.jpg"], ".png"),
    "same file twice": (["a", "--seed", "1", "--seed", "2", "-o", "TMP/one.png"], "for several images"),
    "output under a file": (["a", "-o", "TMP/taken.png/x-{seed}.png"], "is a file"),
    "missing from-image": (["--from-image", "TMP/missing.png"], "no such file"),
    "from-image not an image": (["--from-image", "TMP/not-an-image.png"], "not an image"),
    "from-image without settings": (["--from-image", "TMP/plain.png"], "no generation settings"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2_before_loading(case, ckpt, loads, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "not-an-image.png").write_text("hello")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "taken.png").write_bytes(b"x")
    (tmp_path / "not-a-checkpoint").mkdir()
    args, fragment = BAD_INPUTS[case]
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    if "-o" not in args:
        args += ["-o", f"{tmp_path}/out-{{seed}}.png"]
    if "-m" not in args and "--from-image" not in args:
        args += ["-m", ckpt]
    before = len(loads)
    assert_one_line_error(generate(*args), fragment)
    assert len(loads) == before  # refused before the model was loaded
    assert (tmp_path / "taken.png").read_bytes() == b"x"
    assert not list(tmp_path.glob("out-*")) and not list(tmp_path.glob(".*.tmp"))


def test_a1111_parameters_round_trip():
    recipe = Recipe(prompt="a sign: \"OPEN, 24/7\"\nsecond line", negative_prompt="blur, noise", seed=5, steps=8,
                    guidance=3.5, cfg_normalization=1.5, cfg_truncation=0.9, width=1024, height=768,
                    model="/models/z, image: v1", quantization=8, dtype="bfloat16")
    fields = parse_infotext(recipe.to_infotext())
    assert (fields["prompt"], fields["negative_prompt"]) == (recipe.prompt, "blur, noise")
    assert fields["Model"] == "/models/z, image: v1" and fields["Size"] == "1024x768"
    assert (fields["Steps"], fields["CFG scale"], fields["Seed"], fields["Quantization"]) == ("8", "3.5", "5", "8-bit")
    assert (fields["CFG normalization"], fields["CFG truncation"]) == ("1.5", "0.9")
    # Our own infotext reads back into the recipe it was written from (the on-the-fly bits are not in it).
    assert Recipe.from_infotext(recipe.to_infotext()) == recipe.replace(quantize=None)


def test_help_and_defaults():
    r = CliRunner().invoke(cli.main, ["--help"])
    assert r.exit_code == 0 and "generate" in r.output
    r = CliRunner().invoke(cli.main, ["generate", "--help"])
    assert r.exit_code == 0 and "--from-image" in r.output and "{prompt_index}" in r.output
    assert DEFAULT_MODEL in r.output
    # --help stays light: the command line imports no MLX until a command runs.
    code = "import sys, zimage_mlx.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# The subprocesses started at the top


def test_console_script(subprocesses, reference_checkpoint):
    out, wait = subprocesses
    stdout, stderr = wait("console script")
    path = out / "cli" / "fox-5.png"
    assert stdout.startswith("Saved cli/fox-5.png (seed 5, 2 steps at ")
    assert stderr.startswith("Loaded ") and "peak memory" in stderr
    meta = text(path)
    assert (meta["prompt"], meta["seed"], meta["model"]) == ("a red fox", "5", folder_label(reference_checkpoint))


@pytest.mark.parametrize("name,files", [
    ("minimal.py", ["minimal.png"]),
    ("batch_prompts.py", [f"batch/prompt{p}-seed{s}.png" for p in range(3) for s in (0, 1)]),
    ("step_preview.py", ["preview/step-01-of-02.png", "preview/step-02-of-02.png", "preview/final.png"]),
    ("low_memory.py", ["low.png"]),
    ("img2img.py", ["img2img.png"]),
    ("inpainting.py", ["inpainting.png"]),
    ("lora.py", ["lora.png", "plain.png"]),
])
def test_example(subprocesses, name, files):
    out, wait = subprocesses
    stdout, _ = wait(name)
    for f in files:
        with Image.open(out / f) as im:
            assert im.size == (32, 32), f
    assert stdout.strip()
    if name == "lora.py":
        assert "LoRA style.safetensors at scale 0.8" in stdout
        assert not np.array_equal(np.asarray(Image.open(out / "lora.png")), np.asarray(Image.open(out / "plain.png")))


def test_text_encoder_is_freed_before_denoising(ckpt, tmp_path, monkeypatch):
    """A single-shot run frees the text encoder once every prompt it needs is encoded, before any DiT forward,
    and the DiT before its last decode."""
    from zimage_mlx.transformer import ZImageTransformer

    events = []
    release, forward = ZImagePipeline.release_text_encoder, ZImageTransformer.__call__
    monkeypatch.setattr(ZImagePipeline, "release_text_encoder",
                        lambda self: events.append(("release", self.text_encoder is not None)) or release(self))
    monkeypatch.setattr(ZImageTransformer, "__call__", lambda self, *a: events.append(("dit", None)) or forward(self, *a))
    # a pipeline of its own (not the `loads` cache's, whose encoder an earlier run may have freed)
    pipes = []
    monkeypatch.setattr(ZImagePipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: pipes.append(REAL_LOAD(*a, **k)) or pipes[-1]))
    ok("a lighthouse", "-m", ckpt, "--size", 32, "--steps", 2, "--seed", 1, "--num-images", 2,
       "-o", tmp_path / "{seed}.png")
    assert events[0] == ("release", True) and events.count(("dit", None)) == 4
    assert len(list(tmp_path.iterdir())) == 2
    assert pipes[0].transformer is None  # freed before the last image was decoded
