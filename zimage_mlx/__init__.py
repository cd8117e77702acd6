"""zimage-mlx: Z-Image Turbo text-to-image in MLX."""

__version__ = "0.1.0"
__all__ = ["Cancelled", "ZImagePipeline", "__version__"]


def __getattr__(name):
    # Lazy, so that `import zimage_mlx.<module>` and the CLI's --help stay light.
    if name in ("ZImagePipeline", "Cancelled"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'zimage_mlx' has no attribute {name!r}")
