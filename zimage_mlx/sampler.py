"""Flow-match Euler sampling as diffusers' FlowMatchEulerDiscreteScheduler + ZImagePipeline do it.

x_sigma = (1 - sigma) * x0 + sigma * noise. The input sigmas are linspace(1, 1/N, N), shifted
(statically, sigma' = s*sigma / (1 + (s-1)*sigma), or dynamically by image size when the scheduler
config asks for it), then a terminal 0 is appended: N steps are N DiT forwards. The DiT predicts
x0 - noise, so the Euler velocity is its negation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import InputError
from .errors import CheckpointError
from .sources import read_config

# Scheduler options that change the sigma grid and that this sampler does not implement.
_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "stochastic_sampling")


@dataclass
class FlowMatchScheduler:
    shift: float = 3.0
    num_train_timesteps: int = 1000
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    @classmethod
    def from_config(cls, config: dict) -> "FlowMatchScheduler":
        bad = [k for k in _UNSUPPORTED if config.get(k)]
        if bad:
            raise CheckpointError(f"scheduler options {', '.join(bad)} are not supported by zimage-mlx's sampler")
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.items() if k in names})

    @classmethod
    def from_pretrained(cls, folder) -> "FlowMatchScheduler":
        return cls.from_config(read_config(Path(folder), "scheduler_config.json"))

    def sigmas(self, steps: int, image_seq_len: int | None = None) -> np.ndarray:
        """The steps + 1 sigmas (float32, the last one 0) for `steps` DiT forwards."""
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        s = linspace_f32(1.0, 1.0 / steps, steps)
        if self.use_dynamic_shifting:
            if image_seq_len is None:
                raise ValueError("this scheduler shifts by image size: pass image_seq_len")
            mu = calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                                 self.max_shift)
            s = (math.exp(mu) / (math.exp(mu) + (1 / s - 1))).astype(np.float32)
        else:
            s = (self.shift * s / (1 + (self.shift - 1) * s)).astype(np.float32)
        return np.concatenate([s, np.zeros(1, np.float32)])


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace in float32, bit for bit: a float32 step, each value start + i*step (first half) or
    end - (n-1-i)*step (second half) rounded once (torch's kernel fuses the multiply-add)."""
    a, b = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([a], np.float32)
    step = np.float64((b - a) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    return np.where(i < n // 2, np.float64(a) + i * step, np.float64(b) - (n - 1 - i) * step).astype(np.float32)


def calculate_shift(seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + base_shift - m * base_seq_len


def model_time(sigma: float) -> float:
    """The DiT's time input for a sigma: (1000 - 1000*sigma) / 1000 in float32, as diffusers computes it."""
    timestep = np.float32(sigma) * np.float32(1000)
    return float((np.float32(1000) - timestep) / np.float32(1000))


def euler_step(x: mx.array, prediction: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """One Euler step in float32: x + (sigma_next - sigma) * v with v = -prediction."""
    dt = mx.array(np.float32(sigma_next) - np.float32(sigma))
    return x + dt * (-prediction.astype(mx.float32))


def strength_start(steps: int, strength: float) -> int:
    """The index of the first sigma an image-to-image run keeps: the first int(steps - steps * strength) of
    the `steps` sigmas are skipped (diffusers' SD3-style rule, in Python floats like it).
    About ceil(strength * steps) steps run: strength 1 runs all of them, strength 0 none."""
    kept = min(steps * strength, steps)
    return int(max(steps - kept, 0))


def scale_noise(x0: mx.array, noise: mx.array, sigma: float) -> mx.array:
    """The flow-match forward process at one sigma, in float32: sigma * noise + (1 - sigma) * x0."""
    s = np.float32(sigma)
    return mx.array(s) * noise.astype(mx.float32) + mx.array(np.float32(1) - s) * x0.astype(mx.float32)


def guidance_for_step(guidance: float, sigma: float, cfg_truncation: float) -> float:
    """The guidance scale at a step: 0 once t = 1 - sigma has passed cfg_truncation (diffusers' rule)."""
    if cfg_truncation is not None and cfg_truncation <= 1 and model_time(sigma) > cfg_truncation:
        return 0.0
    return guidance


def apply_cfg(pos: mx.array, neg: mx.array, guidance: float, normalization: float | bool = False) -> mx.array:
    """diffusers' Z-Image CFG, per sample: pos + g * (pos - neg), then optionally cap the norm.

    With `normalization` > 0 the result's L2 norm (over the whole sample) is capped at
    normalization * |pos| (True means 1.0).
    """
    pos, neg = pos.astype(mx.float32), neg.astype(mx.float32)
    pred = pos + guidance * (pos - neg)
    factor = float(normalization) if normalization else 0.0
    if factor > 0:
        axes = tuple(range(1, pred.ndim))
        pos_norm = mx.sqrt(mx.sum(pos * pos, axis=axes, keepdims=True))
        pred_norm = mx.sqrt(mx.sum(pred * pred, axis=axes, keepdims=True))
        max_norm = pos_norm * factor
        pred = mx.where(pred_norm > max_norm, pred * (max_norm / pred_norm), pred)
    return pred


@dataclass
class Step:
    """The state after one denoising step; `denoised` (the x0 estimate) is lazy and free unless used."""

    index: int  # 0-based index of the step just taken
    total: int
    sigma: float  # the sigma this step started from
    latents: mx.array  # (B, h, w, 16) float32, after the step
    denoised: mx.array  # (B, h, w, 16) x + sigma * prediction at the step's start
