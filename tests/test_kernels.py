"""The CPU fast path of kernels.py against float64 math and torch."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from zimage_mlx import kernels


def test_exp_is_float32_accurate_over_the_whole_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-87.3, 88.3, 400_001), rng.uniform(-20, 20, 100_000), [0.0, -0.0]]).astype(np.float32)
    ours = np.array(kernels.exp(mx.array(x))).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    # float32 itself is 6e-8 relative; numpy's own float32 exp is off by up to ~2e-7 on this grid
    assert np.max(np.abs(ours - ref) / ref) < 2e-7


def test_exp_clips_instead_of_overflowing_into_garbage():
    x = mx.array([-np.inf, -1000.0, -87.3, 88.3, 1000.0], dtype=mx.float32)
    out = np.array(kernels.exp(x)).astype(np.float64)
    assert np.all(np.isfinite(out)) and np.all(out > 0)
    assert out[0] < 2e-38 and out[1] < 2e-38  # exp(-inf) is ~1e-38: a softmax weight of nothing
    np.testing.assert_allclose(out[2:4], np.exp(np.float32([-87.3, 88.3]).astype(np.float64)), rtol=2e-7)
    assert np.isnan(np.array(kernels.exp(mx.array([np.nan], dtype=mx.float32)))[0])


def test_silu_and_gated_silu_match_torch():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.standard_normal(50_000) * 6, [-200.0, -90.0, 0.0, 90.0, 200.0]]).astype(np.float32)
    b = rng.standard_normal(a.shape).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    np.testing.assert_allclose(np.array(kernels.silu(mx.array(a))), torch.nn.functional.silu(ta).numpy(),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.array(kernels.silu_mul(mx.array(a), mx.array(b))),
                               (torch.nn.functional.silu(ta) * tb).numpy(), rtol=1e-6, atol=1e-7)


def _torch_attention(q, k, v, scale, mask=None):
    t = [torch.from_numpy(np.array(a)) for a in (q, k, v)]
    m = None if mask is None else torch.from_numpy(np.array(mask))
    return torch.nn.functional.scaled_dot_product_attention(*t, attn_mask=m, scale=scale).numpy()


@pytest.mark.parametrize("chunk_bytes,split", [(kernels.ATTENTION_CHUNK_BYTES, False),  # whole heads
                                               (3 * 40 * 4, False),  # blocks of 3 query rows
                                               (kernels.ATTENTION_CHUNK_BYTES, True)])  # softmax over streams
def test_attention_matches_torch(chunk_bytes, split, monkeypatch):
    monkeypatch.setattr(kernels, "ATTENTION_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(kernels, "SPLIT_MIN_ELEMENTS", 0 if split else 1 << 40)
    if split:  # at least two streams, whatever this machine's core count
        monkeypatch.setattr(kernels, "_streams", lambda: [mx.new_stream(mx.cpu) for _ in range(3)])
    rng = np.random.default_rng(2)
    q, k, v = (mx.array(rng.standard_normal((2, 3, 40, 16)).astype(np.float32) * 3) for _ in range(3))
    valid = np.arange(40)[None, :] < np.array([40, 23])[:, None]
    mask = mx.array(valid)[:, None, None, :]
    for m in (None, mask):
        ours = kernels.attention(q, k, v, 0.25, m)
        assert ours.shape == (2, 3, 40, 16) and ours.dtype == mx.float32
        np.testing.assert_allclose(np.array(ours), _torch_attention(q, k, v, 0.25, m), rtol=1e-5, atol=1e-5)
    # a per-head, per-query mask (B, H, Lq, Lk) is sliced with the chunks
    full = rng.random((2, 3, 40, 40)) < 0.7
    full[..., 0] = True
    np.testing.assert_allclose(np.array(kernels.attention(q, k, v, 0.25, mx.array(full))),
                               _torch_attention(q, k, v, 0.25, mx.array(full)), rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_the_switch_take_mlx_fast(monkeypatch):
    """bfloat16 (and any non-float32) input, and FAST_CPU_PATH = False, use mx.fast's kernel as on a GPU."""
    calls = []
    real = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = mx.ones((1, 2, 8, 16), dtype=mx.bfloat16)
    assert kernels.attention(q, q, q, 0.25).dtype == mx.bfloat16 and len(calls) == 1
    assert kernels.silu_mul(q, q).dtype == mx.bfloat16
    monkeypatch.setattr(kernels, "FAST_CPU_PATH", False)
    kernels.attention(q.astype(mx.float32), q.astype(mx.float32), q.astype(mx.float32), 0.25)
    assert len(calls) == 2


def test_keep_freed_memory_applies_on_linux():
    import sys

    assert kernels.keep_freed_memory() is sys.platform.startswith("linux")


def test_attention_on_a_worker_thread():
    """A pipeline on a server's worker thread runs the split softmax on streams of its own thread."""
    import threading

    rng = np.random.default_rng(3)
    q = mx.array(rng.standard_normal((1, 2, 300, 16)).astype(np.float32))
    expected = np.array(kernels.attention(q, q, q, 0.25))
    got, errors = [], []

    def work():
        try:
            got.append(np.array(kernels.attention(q * 1, q * 1, q * 1, 0.25)))
        except Exception as e:  # "There is no Stream(cpu, N) in current thread" before streams were per thread
            errors.append(e)

    old = kernels.SPLIT_MIN_ELEMENTS
    kernels.SPLIT_MIN_ELEMENTS = 0
    try:
        kernels.attention(q, q, q, 0.25)  # the main thread's streams exist first
        t = threading.Thread(target=work)
        t.start(), t.join()
    finally:
        kernels.SPLIT_MIN_ELEMENTS = old
    assert not errors, errors
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-6)

