"""Attention and SiLU, with a fast path for MLX's CPU backend; and `cut`, which evaluates deep models block
by block (on every device) so that a step holds one block's activations, not the whole graph's.

On Apple GPUs these are MLX's fused Metal kernels (`mx.fast.scaled_dot_product_attention`, `nn.silu`) and
nothing here changes that. MLX's CPU backend evaluates `exp` and `sigmoid` one element at a time in
generic code (about 20 ns per float32 on an x86 core, versus 0.5 ns for a multiply), and its
`scaled_dot_product_attention` falls back to a matmul, a softmax and a matmul. In a full-width DiT block
at 1056 tokens the softmax (30 x 1056 x 1056 exponentials) and the FFN's SiLU took over a third of the
block's GEMM time that way. For float32 on the CPU we therefore compute exp with a range reduction and a
polynomial that `mx.compile` fuses into a few loops (max relative error 1e-7, tested against float64), and:

- attention as scores = (q * scale) @ k^T, e = exp(scores - rowmax), out = (e @ v) / rowsum(e): the
  division runs on (L, head_dim) instead of (L, L); one head at a time (and, where one head's scores
  would exceed `ATTENTION_CHUNK_BYTES`, a block of query rows at a time), chained with `mx.depends` so the
  chunks run in order and few chunks' scores are alive at once (0.28 GiB at 4160 tokens; 0.51 GiB
  unchained). Measured at 30 heads x 4160
  tokens (benchmarks/cpu_kernels.py): 0.29 GiB above the inputs and 3x faster than MLX's attention,
  which holds all (30, L, L) scores (2.05 GiB);
- the max, exp and sum of large score blocks in row blocks on one CPU stream per core (MLX runs each
  stream's element-wise work on one thread);
- SiLU as x / (1 + exp(-x)), and the FFN's silu(a) * b as one fused loop.

`FAST_CPU_PATH = False` turns the fast path off (tests use it to check both paths against the reference).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

import mlx.core as mx
import mlx.nn as nn

FAST_CPU_PATH = True
# Evaluate deep models block by block (see cut()).
CUT_GRAPHS = True
# The float32 scores of one attention chunk (one head, all query rows up to this size) on the CPU path.
ATTENTION_CHUNK_BYTES = 16 * 1024 * 1024
# Score blocks of at least this many elements split their softmax over the CPU cores (smaller ones would
# spend more on synchronising streams than they save).
SPLIT_MIN_ELEMENTS = 1 << 18

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln 2 split so n * _LN2_HI is exact for |n| <= 128
_LN2_LO = 1.4286068203094172e-06
_ROUND = 12582912.0  # 1.5 * 2**23: y + _ROUND rounds y to an integer held in the low mantissa bits
_ROUND_BITS = 0x4B400000


def _exp_f32(x: mx.array) -> mx.array:
    """exp(x) for float32 x: 2**n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, degree-7 Taylor for
    exp(r) (truncation error < 6e-9 relative), 2**n built in the exponent bits. Inputs are clipped to
    [-87.3, 88.3] (exp stays a normal float: below it returns ~1e-38 instead of a denormal or 0)."""
    x = mx.clip(x, -87.3, 88.3)
    t = x * _LOG2E + _ROUND
    n = t - _ROUND
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = r * (1 / 5040) + 1 / 720
    for c in (1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0):
        p = p * r + c
    two_n = mx.view(mx.left_shift(mx.view(t, mx.int32) - (_ROUND_BITS - 127), 23), mx.float32)
    return p * two_n


_exp = mx.compile(_exp_f32)
_shifted_exp = mx.compile(lambda s, m: _exp_f32(s - m))
_silu = mx.compile(lambda x: x / (1.0 + _exp_f32(-x)))
_silu_mul = mx.compile(lambda a, b: a * b / (1.0 + _exp_f32(-a)))


def _fast(*arrays: mx.array) -> bool:
    return (FAST_CPU_PATH and mx.default_device().type == mx.DeviceType.cpu
            and all(a.dtype == mx.float32 for a in arrays))


def exp(x: mx.array) -> mx.array:
    return _exp(x) if _fast(x) else mx.exp(x)


def silu(x: mx.array) -> mx.array:
    return _silu(x) if _fast(x) else nn.silu(x)


def silu_mul(a: mx.array, b: mx.array) -> mx.array:
    """silu(a) * b (the gated FFN)."""
    return _silu_mul(a, b) if _fast(a, b) else nn.silu(a) * b


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """softmax(q k^T * scale [masked]) v for (B, H, L, D) inputs; mask is boolean (True = attend),
    broadcastable to (B, H, Lq, Lk)."""
    if not _fast(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if mask is not None and mask.ndim < 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    B, H, Lq, _ = q.shape
    rows = max(1, min(Lq, ATTENTION_CHUNK_BYTES // (B * k.shape[2] * 4)))
    heads, done = [], None
    for h in range(H):
        hs = slice(h, h + 1)
        m = mask if mask is None or mask.shape[1] == 1 else mask[:, hs]
        parts = []
        for r0 in range(0, Lq, rows):
            qc = q[:, hs, r0 : r0 + rows]
            if done is not None:  # one chunk at a time: its scores are freed before the next chunk's exist
                qc = mx.depends(qc, done)
            mc = m if m is None or m.shape[2] == 1 else m[:, :, r0 : r0 + rows]
            done = _attention_f32(qc, k[:, hs], v[:, hs], scale, mc)
            parts.append(done)
        heads.append(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2))
    return heads[0] if H == 1 else mx.concatenate(heads, axis=1)


def _attention_f32(q, k, v, scale, mask):
    s = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        s = mx.where(mask, s, -mx.inf)
    Lq, Lk = s.shape[-2:]
    streams = _streams() if Lq * Lk >= SPLIT_MIN_ELEMENTS else []
    if len(streams) < 2 or Lq < len(streams):
        e = _shifted_exp(s, mx.max(s, axis=-1, keepdims=True))
        return (e @ v) / mx.sum(e, axis=-1, keepdims=True)
    # MLX's CPU element-wise ops and reductions run on one thread per stream: give each core a block of
    # rows for the max, exp and sum (the GEMMs already use every core).
    bounds = [round(i * Lq / len(streams)) for i in range(len(streams) + 1)]
    outs = []
    for stream, r0, r1 in zip(streams, bounds, bounds[1:]):
        with mx.stream(stream):
            sr = s[..., r0:r1, :]
            e = _shifted_exp(sr, mx.max(sr, axis=-1, keepdims=True))
            total = mx.sum(e, axis=-1, keepdims=True)
        outs.append((e @ v) / total)
    return mx.concatenate(outs, axis=-2)


_STREAMS = threading.local()


def _streams() -> list:
    """CPU streams for row blocks of the softmax, one per core up to 4, made once per thread: MLX streams
    belong to the thread that made them, so a pipeline on a worker thread (a server's) needs its own."""
    if not hasattr(_STREAMS, "cpu"):
        _STREAMS.cpu = [mx.new_stream(mx.cpu) for _ in range(max(1, min(4, os.cpu_count() or 1)))]
    return _STREAMS.cpu


def cut(x: mx.array) -> mx.array:
    """Evaluate x now and return it: a boundary in the lazy graph between the blocks of a deep model.

    Measured on an H200 with MLX's CUDA backend (benchmarks/dit_peak_probe.py, full-size DiT, bfloat16,
    1024x1024): a step evaluated as one graph peaked 11.6 GB above its weights, with `mx.async_eval` after
    every block (which lets Python encode ahead) 16.7 GB, with `mx.eval` after every block 0.97 GB, one
    block's worth. So this waits. Our reading: MLX allocates an op's output when it encodes the op and
    frees what the op consumed once the GPU has run it, so a graph encoded far ahead of the GPU holds its
    intermediates.
    Inside `mx.compile` or another transformation nothing can be evaluated: x is returned as is and the
    compiled graph stays whole. `CUT_GRAPHS = False` turns the cuts off."""
    if not CUT_GRAPHS:
        return x
    try:
        mx.eval(x)
    except ValueError as e:  # "[eval] Attempting to eval an array during function transformations ..."
        if "transformation" not in str(e):
            raise
    return x


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS. Returns whether
    it applied (Linux with glibc only).

    MLX's CPU backend has no buffer cache: every op output is a fresh allocation, and glibc serves large
    ones (over 32 MiB at most) with mmap and unmaps them on free, so each op pays a page fault per 4 KiB
    of its output on first touch (about 30 ms for a 40 MiB array: several times the op's arithmetic).
    With mmap off and a high trim threshold, freed blocks are reused. Memory freed in the process (a
    released text encoder) is reused by later allocations but not handed back to the OS. Process-wide,
    so it is called for CPU runs only (by `ZImagePipeline.from_pretrained` and the benchmarks)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    # One arena: the trim and mmap settings hold in every arena, but a thread that allocates in its own
    # (a server's worker thread) would otherwise grow a separate arena of its own next to the main one.
    mallopt(m_arena_max, 1)
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def release_freed_memory() -> bool:
    """Hand the memory malloc holds free back to the OS (glibc's `malloc_trim(0)`), e.g. after the models are
    dropped: `keep_freed_memory` keeps freed blocks for reuse, so without this the resident set would not
    fall when a server unloads its models. Returns whether memory was released (Linux with glibc only; a
    no-op elsewhere: on macOS MLX's Metal buffers go back with `mx.clear_cache()`)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    return bool(malloc_trim(0))
