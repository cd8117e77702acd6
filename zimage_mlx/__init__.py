"""zimage-mlx: Z-Image Turbo text-to-image in MLX."""

__version__ = "0.1.0"
