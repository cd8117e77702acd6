"""The errors a user can fix, and the warnings a user should see. Anything else raised by zimage-mlx is a bug
(the CLI shows its traceback).

Each error is a ValueError too, so code written against the earlier `except ValueError` keeps working.

An error knows which parameter it is about (`field`, a `Recipe` field name such as "guidance") and
can name the parameters it mentions the way a face names them: the library says `guidance`, the CLI
`--guidance`, the A1111 route `cfg_scale` (`render`).
"""

from __future__ import annotations

import re
from typing import Callable


class ZImageError(ValueError):
    """Base class: a mistake in what was asked for or given, with a one-line reason.

    `field` is the parameter at fault (None when it is not one parameter). A message written with
    placeholders ("{negative_prompt} needs {guidance} > 0") names its `fields` through `render`; str() names
    them as the library does.
    """

    def __init__(self, message: str = "", field: str | None = None, fields: tuple[str, ...] = ()):
        self.template = message
        self.field = field
        self.fields = tuple(fields)
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] | None = None) -> str:
        """The message with each parameter named by `name(field)` (default: the field itself)."""
        if not self.fields:
            return self.template
        names = {f: (name or str)(f) for f in self.fields}
        # Only the named placeholders: a value quoted in the message may hold braces of its own ({}, "{0}").
        return re.sub(r"\{(\w+)\}", lambda m: names.get(m[1], m[0]), self.template)


class InputError(ZImageError):
    """A bad argument: a size, a step count, a seed, a prompt list, an image or mask file."""


class CheckpointError(ZImageError):
    """A checkpoint folder or file is missing, incomplete or not what it claims to be."""


class LoraError(ZImageError):
    """A LoRA file that cannot be applied: unreadable, for another model, or not fitting the DiT."""


class Cancelled(Exception):
    """Raised by a run whose `cancel` token is set: it stopped between steps and the pipeline is ready for
    the next call."""


class NotCachedError(ZImageError):
    """A model, LoRA or ControlNet named by a saved image that is not on this machine: a Hub id not in the
    local Hugging Face cache (nothing is downloaded for a name read back), or a local path, named by label only.

    name: the name as read; what: "model", "LoRA" or "ControlNet"; param: the keyword to pass it as ("model",
    "lora", "controlnet"); local: True for a local folder or file (give its path again), False for a Hub id.
    """

    def __init__(self, message: str, *, name: str = "", what: str = "", param: str = "", local: bool = False):
        super().__init__(message)
        self.name, self.what, self.param, self.local = name, what, param, local
