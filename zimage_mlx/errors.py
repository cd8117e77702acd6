"""The errors a user can fix. Anything else raised by zimage-mlx is a bug (the CLI shows its traceback).

Each is a ValueError too, so code written against the earlier `except ValueError` keeps working.
"""


class ZImageError(ValueError):
    """Base class: a mistake in what was asked for or given, with a one-line reason."""


class InputError(ZImageError):
    """A bad argument: a size, a step count, a seed, a prompt list, an image or mask file."""


class CheckpointError(ZImageError):
    """A checkpoint folder or file is missing, incomplete or not what it claims to be."""


class LoraError(ZImageError):
    """A LoRA file that cannot be applied: unreadable, for another model, or not fitting the DiT."""
