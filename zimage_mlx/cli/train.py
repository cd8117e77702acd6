"""`zimage-mlx train`: the command line of zimage_mlx.train."""

from __future__ import annotations

import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from ..recipe import DEFAULT_MODEL
from .common import Command, UserError, expected_errors
from .options import parse_lora

# Options whose TOML value is a list.
_LISTS = ("targets", "adapter", "sample")


@click.command(cls=Command)
@click.argument("data", required=False)
@click.option("-o", "--output", metavar="FILE.safetensors", help="Where to write the trained LoRA.")
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help="Hub id or local folder of the base model (Turbo, or Z-Image Base).")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, help="LoRA alpha (the update is scaled by alpha / rank).  [default: the rank]")
@click.option("--targets", default="default", show_default=True, metavar="PRESETS/PATTERNS",
              help="Comma-separated presets (default, attention, ffn, all) or layer patterns: 'to_q' matches "
                   "names ending in .to_q, '^layers\\.1\\d\\..*' a whole name.")
@click.option("--steps", type=int, default=1000, show_default=True, help="Optimizer steps.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="AdamW learning rate.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Images per step (from one bucket).")
@click.option("--resolution", type=int, default=512, show_default=True,
              help="Training side length (multiple of 16); images go to aspect-ratio buckets of about its area.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the LoRA init, batches, noise and sigmas.")
@click.option("--quantize", type=click.Choice(["4", "8"]), help="Quantize the frozen base to 4 or 8 bits (QLoRA).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True,
              help="Compute dtype of the frozen base (auto: bfloat16 on an Apple GPU, float32 on CPU).")
@click.option("--adapter", "adapters", metavar="LORA[:SCALE]", multiple=True,
              help="A training adapter (e.g. ostris/zimage_turbo_training_adapter) active only while training.")
@click.option("--weighting", type=click.Choice(["logit_normal", "uniform"]), default="logit_normal", show_default=True,
              help="Density of the training sigmas (then shifted like the model's schedule).")
@click.option("--sample", "samples", metavar="PROMPT", multiple=True, help="Prompt of preview images made while training.")
@click.option("--sample-every", type=int, default=0, help="Write the --sample images every N steps.")
@click.option("--sample-steps", type=int, default=8, show_default=True, help="Denoising steps of the sample images.")
@click.option("--save-every", type=int, default=0, help="Write a resumable checkpoint every N steps.")
@click.option("--resume", metavar="CHECKPOINT", help="Continue from a checkpoint written by --save-every or a stop.")
@click.option("--checkpointing/--no-checkpointing", default=True, show_default=True,
              help="Recompute each block's activations in the backward pass: one block's activations in memory instead of all, for one more forward per step.")
@click.option("--allow-empty-captions", is_flag=True, help="Train images without a .txt caption with an empty caption.")
@click.option("--config", "config_file", metavar="FILE.toml", help="Read options from a TOML file (flags override it).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.pass_context
def train_command(ctx, data, output, model, rank, alpha, targets, steps, lr, batch_size, resolution, seed, quantize,
                  dtype, adapters, weighting, samples, sample_every, sample_steps, save_every, resume, checkpointing,
                  allow_empty_captions, config_file, force):
    """Train a LoRA on DATA, a folder of images with same-name .txt captions."""
    from ..train import TrainConfig, read_config

    values = {}
    with expected_errors():
        if config_file:
            values = {k.replace("-", "_"): v for k, v in read_config(config_file).items()}
    for name, value in ctx.params.items():
        if name == "config_file":
            continue
        key = {"adapters": "adapter", "samples": "sample"}.get(name, name)
        given = ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
        if given or key not in values:
            values[key] = value
    if not values.get("data"):
        raise UserError("give the dataset folder: zimage-mlx train DATA --output my-lora.safetensors")
    if not values.get("output"):
        raise UserError("give the output file: --output my-lora.safetensors")
    for key in _LISTS:
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    targets = values.pop("targets")
    if isinstance(targets, (list, tuple)):
        targets = ",".join(targets)
    adapter_specs = list(values.pop("adapter") or ())
    sample_prompts = list(values.pop("sample") or ())
    config = dict(values, targets=[t.strip() for t in str(targets).split(",") if t.strip()],
                  adapters=[parse_lora(a) for a in adapter_specs], sample_prompts=sample_prompts,
                  quantize=int(values["quantize"]) if values.get("quantize") else None,
                  model=str(values["model"]))
    with expected_errors():
        config = TrainConfig.from_dict(config)
        config.check()
    if config.sample_every and not config.sample_prompts:
        raise UserError("--sample-every needs a --sample PROMPT")
    run(config)


class TrainProgress:
    """A one-line bar with the loss and ETA on a terminal; a line every tenth of the run elsewhere."""

    def __init__(self):
        self.live = sys.stderr.isatty()
        self.t0 = None
        self.first = 0
        self.smooth = None

    def say(self, line: str) -> None:
        if self.live:
            click.echo("\r\033[K", nl=False, err=True)
        click.echo(line, err=True)

    def step(self, step: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.first = now, step - 1
        self.smooth = loss if self.smooth is None else 0.9 * self.smooth + 0.1 * loss
        per_step = (now - self.t0) / max(step - self.first, 1)
        eta = per_step * (total - step)
        line = (f"step {step}/{total}  loss {loss:.4f} (avg {self.smooth:.4f})  {per_step:.2f} s/step  "
                f"eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
        if self.live:
            width = 24
            done = round(width * step / total)
            click.echo(f"\r[{'#' * done}{'.' * (width - done)}] {line}\033[K", nl=False, err=True)
        elif step == total or step % max(total // 10, 1) == 0:
            click.echo(line, err=True)


def run(config) -> None:
    import mlx.core as mx

    from ..train import Cancelled, TrainWarning, train

    progress = TrainProgress()
    cancel = threading.Event()
    caught: list = []
    saved: list = []

    def show_warnings():
        while caught:
            click.echo(f"Warning: {caught.pop(0).message}", err=True)

    def on_event(e):
        if e.kind == "cached":
            show_warnings()  # the dataset's (images without captions) before the first step, not after the last
            progress.say(f"Cached the captions and latents; training {config.steps} steps")
        elif e.kind == "step":
            progress.step(e.step, e.total, e.loss)
        elif e.kind == "sample":
            progress.say(f"Samples at step {e.step}: {', '.join(str(p) for p in e.paths)}")
        elif e.kind == "checkpoint":
            saved.append(e.paths[0])
            progress.say(f"Checkpoint at step {e.step}: {e.paths[0]}")

    def on_interrupt(signum, frame):  # the first Ctrl-C stops between steps and writes a checkpoint
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        progress.say("Stopping after this step (Ctrl-C again to quit at once) ...")

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    with expected_errors(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrainWarning)
        try:
            previous = signal.signal(signal.SIGINT, on_interrupt)
        except ValueError:  # not the main thread: Ctrl-C keeps its default
            previous = None
        try:
            trainer = train(config, on_event=on_event, cancel=cancel)
        except KeyboardInterrupt:
            last = f": resume with --resume {saved[-1]}" if saved else ""
            raise UserError(f"interrupted{last}") from None
        except Cancelled as e:
            raise UserError(f"{e}; resume with --resume {saved[-1]}") from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            show_warnings()
    seconds = time.perf_counter() - t0
    losses = trainer.losses[-max(len(trainer.losses) // 10, 1):]
    click.echo(f"Saved {Path(config.output)} ({trainer.step} steps, rank {config.rank}, {len(trainer.targets)} layers, "
               f"final loss {sum(losses) / len(losses):.4f}) in {seconds:.0f} s, "
               f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB")
