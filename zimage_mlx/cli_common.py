"""What every zimage-mlx command shares: the one-line error for what a user can fix, the click classes that
report bad options that way, and the progress line. cli.py and convert.py import it (neither imports the
other's module for these); it imports only click and the package's errors.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import click

from . import __version__


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
    from .errors import ZImageError

    try:
        yield
    except ZImageError as e:
        raise UserError(str(e) or type(e).__name__) from None
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

    def finish(self) -> None:
        self.total_seconds = time.perf_counter() - self.t0
        self.status("")
