"""zimage-mlx: Z-Image Turbo text-to-image in MLX.

What an app touches: `ZImagePipeline` (load once, `generate` or `run(recipe)`), `Recipe` (everything that
decides an image), `Worker` (a pipeline on its own thread with a queue), `Step` (what `on_step` gets), the
errors a user can fix and the warnings worth showing. The rest is reachable by module.
"""

from ._version import __version__

__all__ = ["Cancelled", "CheckpointError", "ControlRef", "Float16OverflowWarning", "InputError", "LoraError",
           "LoraRef", "LoraWarning", "PromptTruncatedWarning", "Recipe", "Step", "Worker", "ZImageError",
           "ZImagePipeline", "__version__"]



def __getattr__(name):
    # Lazy, so that `import zimage_mlx.<module>` and the CLI's --help stay light.
    if name in ("ZImagePipeline", "Step"):
        from . import pipeline as home
    elif name in ("Recipe", "LoraRef", "ControlRef"):
        from . import recipe as home
    elif name == "Worker":
        from . import worker as home
    elif name in ("Cancelled", "CheckpointError", "InputError", "LoraError", "ZImageError"):
        from . import errors as home
    elif name == "LoraWarning":
        from . import lora as home
    elif name == "Float16OverflowWarning":
        from . import fp16 as home
    elif name == "PromptTruncatedWarning":
        from . import text_encoder as home
    else:
        raise AttributeError(f"module 'zimage_mlx' has no attribute {name!r}")
    return getattr(home, name)
