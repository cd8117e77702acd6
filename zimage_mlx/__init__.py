"""zimage-mlx: Z-Image Turbo text-to-image in MLX.

What an app touches: `ZImagePipeline` (load once, `generate` or `run(recipe)`), `Recipe` (everything that
decides an image), `Worker` (a pipeline on its own thread with a queue), `Step` (what `on_step` gets), the
errors a user can fix and the warnings worth showing. The rest is reachable by module.
"""

from ._version import __version__

__all__ = ["Cancelled", "CheckpointError", "ControlRef", "Float16OverflowWarning", "InputError", "LoraError",
           "LoraRef", "LoraWarning", "PromptTruncatedWarning", "Recipe", "Step", "Worker", "ZImageError",
           "ZImagePipeline", "__version__"]

_HOMES = {"ZImagePipeline": "pipeline", "Step": "pipeline", "Recipe": "recipe", "LoraRef": "recipe",
          "ControlRef": "recipe", "Worker": "worker", "Cancelled": "errors", "CheckpointError": "errors",
          "InputError": "errors", "LoraError": "errors", "ZImageError": "errors", "LoraWarning": "lora",
          "Float16OverflowWarning": "fp16", "PromptTruncatedWarning": "text_encoder"}


def __getattr__(name):
    # Lazy, so that `import zimage_mlx.<module>` and the CLI's --help stay light.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'zimage_mlx' has no attribute {name!r}")
