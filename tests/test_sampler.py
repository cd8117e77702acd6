"""The sampler's sigma grid and CFG against diffusers and against the spec's reference table."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from zimage_mlx.sampler import FlowMatchScheduler, apply_cfg, guidance_for_step, model_time
from zimage_mlx.weights import CheckpointError

# model-spec 8.1, the Turbo reference schedule: 8 steps, static shift 3, sigma' = 3s / (1 + 2s) on
# s = linspace(1, 1/8, 8), then a terminal 0. Values from the spec's table (6 decimals).
TURBO_SIGMAS = [1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0]


def test_turbo_reference_table():
    sig = FlowMatchScheduler(shift=3.0).sigmas(8)
    assert len(sig) == 9 and sig.dtype == np.float32  # 8 steps = 8 DiT forwards, then the terminal 0
    np.testing.assert_allclose(sig, TURBO_SIGMAS, atol=1e-6)
    # model time t = 1 - sigma: the first step sees t = 0 (pure noise), spec table column t_model
    np.testing.assert_allclose([model_time(s) for s in sig[:-1]], 1 - np.array(TURBO_SIGMAS[:-1]), atol=1e-6)


def reference_sigmas(config, steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    s = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    s.set_timesteps(sigmas=get_default_z_image_sigmas(steps), mu=mu)
    return s.sigmas.numpy()


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 9, 28, 50, 100])
@pytest.mark.parametrize("config", [{"shift": 3.0}, {"shift": 6.0}, {"use_dynamic_shifting": True}])
def test_sigmas_equal_diffusers_bit_for_bit(steps, config):
    seq_len = 4096
    ref = reference_sigmas({"use_dynamic_shifting": False, **config}, steps, seq_len)
    ours = FlowMatchScheduler.from_config(config).sigmas(steps, seq_len)
    assert np.array_equal(ours, ref)


def test_unsupported_scheduler_options_are_refused():
    with pytest.raises(CheckpointError, match="use_karras_sigmas"):
        FlowMatchScheduler.from_config({"shift": 3.0, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="at least 1"):
        FlowMatchScheduler().sigmas(0)


def test_cfg_truncation_rule():
    # diffusers: guidance is dropped at a step once t = 1 - sigma exceeds cfg_truncation
    assert guidance_for_step(4.0, 1.0, 1.0) == 4.0
    assert guidance_for_step(4.0, 0.3, 0.5) == 0.0  # t = 0.7 > 0.5
    assert guidance_for_step(4.0, 0.6, 0.5) == 4.0  # t = 0.4
    assert guidance_for_step(4.0, 0.3, 2.0) == 4.0  # > 1 disables truncation


@pytest.mark.parametrize("normalization", [False, True, 0.8, 1.5])
def test_cfg_formula_and_normalization(normalization):
    rng = np.random.default_rng(0)
    pos, neg = rng.standard_normal((2, 3, 4, 4, 16)).astype(np.float32)
    ours = np.array(apply_cfg(mx.array(pos), mx.array(neg), 2.5, normalization))
    for j in range(3):  # diffusers' per-sample loop, written out
        p, n = torch.from_numpy(pos[j]), torch.from_numpy(neg[j])
        pred = p + 2.5 * (p - n)
        if normalization and float(normalization) > 0:
            max_norm = torch.linalg.vector_norm(p) * float(normalization)
            if torch.linalg.vector_norm(pred) > max_norm:
                pred = pred * (max_norm / torch.linalg.vector_norm(pred))
        np.testing.assert_allclose(ours[j], pred.numpy(), rtol=1e-5, atol=1e-5)
