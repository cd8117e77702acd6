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


class NotCachedError(ZImageError):
    """A model, LoRA or ControlNet named by a saved image that is not on this machine: a Hub id not in the
    local Hugging Face cache (nothing is downloaded for a name read back), or a local path, named by label only.

    name: the name as read; what: "model", "LoRA" or "ControlNet"; param: the keyword to pass it as ("model",
    "lora", "controlnet"); local: True for a local folder or file (give its path again), False for a Hub id.
    """

    def __init__(self, message: str, *, name: str = "", what: str = "", param: str = "", local: bool = False):
        super().__init__(message)
        self.name, self.what, self.param, self.local = name, what, param, local
