"""How much memory the process holds: MLX's active and peak bytes and the resident set (for /v1/status)."""

from __future__ import annotations


def memory_info() -> dict:
    """MLX's active and peak memory and the process's resident set, in bytes (None where unknown)."""
    out = {"mlx_active_bytes": None, "mlx_peak_bytes": None, "rss_bytes": rss_bytes()}
    try:
        import mlx.core as mx

        out.update(mlx_active_bytes=int(mx.get_active_memory()), mlx_peak_bytes=int(mx.get_peak_memory()))
    except Exception:  # noqa: BLE001 - no MLX (a fake engine) or an older one
        pass
    return out


def rss_bytes() -> int | None:
    """The process's resident set size now: psutil if installed, else /proc (Linux), else `ps` (macOS)."""
    import os

    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import subprocess

        out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip()) * 1024
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
