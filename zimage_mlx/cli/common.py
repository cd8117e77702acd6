"""What every zimage-mlx command shares: the one-line error for what a user can fix (a library error names
its parameter as a flag here), the click classes that report bad options that way, the progress line, and
the lines that describe a loaded pipeline. It imports only click and light library modules.
"""

from __future__ import annotations

import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import click

from .._version import __version__
from ..errors import ZImageError

# A Recipe field -> the flag that sets it (the library names fields; the CLI names flags).
FLAGS = {"prompt": "the prompt", "hires_scale": "--hires", "loras": "--lora", "controls": "--control", "num_images": "--num-images",
         "image_latents": "--image", "latents": "latents", "reference_images": "--reference"}


def flag(field: str) -> str:
    """How the CLI names a Recipe field: `guidance` -> `--guidance`."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def user_error(e: ZImageError) -> "UserError":
    """A library error as the CLI's one-line error, its parameters named as flags."""
    return UserError(e.render(flag) or type(e).__name__)


class UserError(click.ClickException):
    """A mistake the user can fix: click prints `Error: <message>` on one line and exits with code 2."""

    exit_code = 2

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


class Command(click.Command):
    """Reports bad options (a bad --steps, an unknown flag) as one line too, without the usage block."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise UserError(e.format_message()) from None


class Group(click.Group):
    command_class = Command


@contextmanager
def expected_errors():
    """Turn what a user can fix (zimage_mlx.errors: a bad value, a bad checkpoint or LoRA; an unreadable or
    unwritable file; a size too big for the machine) into a one-line error. Anything else is a bug of ours:
    it keeps its traceback, followed by a line that says so."""
    try:
        yield
    except ZImageError as e:
        raise user_error(e) from None
    except OSError as e:
        raise UserError(describe_os_error(e)) from None
    except RuntimeError as e:  # MLX reports failed allocations as RuntimeError
        if "malloc" not in str(e) and "memory" not in str(e).lower():
            report_bug()
            raise
        raise UserError(f"out of memory ({e}); try --low-memory, a smaller size or --quantize 8") from None
    except (click.ClickException, KeyboardInterrupt):
        raise
    except Exception:
        report_bug()
        raise


def report_bug() -> None:
    click.echo(f"zimage-mlx {__version__} failed on an internal error, not on a mistake in your command: please "
               "report it to the zimage-mlx issue tracker with the traceback below and the command you ran.",
               err=True)


def describe_os_error(e: OSError) -> str:
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


class Progress:
    """The pipeline callback: a one-line bar with time per step on a terminal's stderr, nothing elsewhere.

    After `finish()`, `step_seconds` is the time spent in denoising steps and `total_seconds` the image's
    whole time (decoding included).
    """

    width = 24

    def __init__(self, enabled: bool = True):
        self.live = enabled and sys.stderr.isatty()
        self.label = ""

    def status(self, line: str) -> None:
        """Show a transient line on a terminal; an empty one clears it."""
        if self.live:
            click.echo(f"\r{line}\033[K", nl=False, err=True)

    def start(self, label: str) -> None:
        self.label = label
        self.t0 = time.perf_counter()
        self.step_seconds = self.total_seconds = 0.0
        self.status(f"{label}  starting ...")

    def __call__(self, step: int, total: int, latents=None) -> None:
        self.step_seconds = time.perf_counter() - self.t0
        done = round(self.width * step / total)
        per_step = self.step_seconds / step
        self.status(f"{self.label}  [{'#' * done}{'.' * (self.width - done)}] {step}/{total}  "
                    f"{per_step:.2f} s/step  eta {per_step * (total - step):.0f} s")

    def on_step(self, step) -> None:
        """The pipeline's on_step hook (a `Step`)."""
        self(step.index + 1, step.total)

    def finish(self) -> None:
        self.total_seconds = time.perf_counter() - self.t0
        self.status("")


# ------------------------------------------------------------------------------------------------
# What a loaded pipeline is, and what the machine says


def describe_pipeline(pipe) -> str:
    """`float32, 4-bit`, `float32 (stored bfloat16), DiT 4-bit, text encoder 8-bit`, ...: what really runs."""
    stored = getattr(pipe, "stored_dtype", None)
    parts = [pipe.dtype + (f" (stored {stored})" if stored and stored != pipe.dtype else "")]
    parts += describe_quantization(getattr(pipe, "quantization", None) or {"transformer": pipe.quantize})
    if getattr(pipe, "parallel", None) is not None:
        parts.append(f"{pipe.parallel.mode}-parallel over {pipe.parallel.size} ranks")
    if pipe.low_memory:
        parts.append("low memory")
    return ", ".join(parts)


def describe_quantization(q: dict) -> list[str]:
    dit, te = q.get("transformer"), q.get("text_encoder")
    if dit and te and dit != te:
        return [f"DiT {dit}-bit", f"text encoder {te}-bit"]
    if dit:
        return [f"{dit}-bit" if te == dit or "text_encoder" not in q else f"DiT {dit}-bit"]
    return [f"text encoder {te}-bit"] if te else []


BLAS_HINT = ("Note: MLX's CPU backend runs on its bundled reference BLAS, which is slow; for several times the "
             "speed: apt-get install libopenblas0-pthread, then run with "
             "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
_blas_hint_shown = False


def reference_blas(maps: str) -> bool:
    """Whether a process's memory map (/proc/self/maps) holds a BLAS but no optimized one (OpenBLAS, MKL, BLIS)."""
    libs = {line.split()[-1].lower() for line in maps.splitlines() if "/" in line}
    fast = any(k in p for p in libs for k in ("openblas", "mkl", "blis"))
    return not fast and any("libblas" in p.rsplit("/", 1)[-1] for p in libs)


def slow_blas_hint() -> None:
    """Once per process, on stderr: how to get a fast BLAS when MLX runs on the CPU with the reference one
    (Linux: MLX's CPU wheel bundles netlib's libblas). The library stays silent; only the CLI says this."""
    global _blas_hint_shown
    if _blas_hint_shown or not sys.platform.startswith("linux"):
        return
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    _blas_hint_shown = True
    if reference_blas(maps):
        click.echo(BLAS_HINT, err=True)


def show_warnings(caught: list, shown: set, quiet: bool) -> None:
    """Prompt truncation and float16 overflow as one `Warning:` line (once per message); other warnings as
    Python shows them."""
    from ..fp16 import Float16OverflowWarning
    from ..text_encoder import PromptTruncatedWarning

    while caught:
        w = caught.pop(0)
        if not issubclass(w.category, (PromptTruncatedWarning, Float16OverflowWarning)):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        elif str(w.message) not in shown and not quiet:
            shown.add(str(w.message))
            click.echo(f"Warning: {w.message}", err=True)
