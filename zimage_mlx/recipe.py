"""Recipe: everything that decides an image's pixels, and nothing that does not.

Every face translates to one: `generate()`'s keywords, the CLI's flags and `--from-image`, the server's
OpenAI, A1111 and native dialects, the worker, the distributed runner and training samples. The rules live
here, once: `validate` (an `InputError` naming the field), the seed rule (`images`: which prompt and seed
each image gets), and what an image records of how it was made (`to_png`/`from_png`, A1111's infotext both
ways, `to_dict`/`from_dict`). The module imports no MLX, so a face can check a request before loading.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .inputs import MAX_SEED, MAX_SIDE, check_int as _check_int, check_number as _check_number, check_side as _check_side

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
DEFAULT_SIZE = 1024
SAMPLER_NAME = "Euler (flow match)"
DTYPES = ("bfloat16", "float16", "float32")
CONTROL_TYPES = ("none", "canny", "lines")
GRAPHS = ("authors", "diffusers")
UPSCALERS = ("lanczos", "latent")
MAX_VARIETY = 4.0  # 1 is already noise as large as the embeddings' own spread
MAX_HIRES_SCALE = 4.0
MIN_TILE = 128
DEFAULT_TILE = 1024  # the hires pass's tiles when `tile` is None: one tile up to 1024x1024


@dataclass
class LoraRef:
    """A LoRA of a recipe: its path-free name (a file name or a Hub id) and scale; `source` is what to load
    (a path, a Hub id or a `lora.Lora`) when it differs from the name."""

    name: str
    scale: float = 1.0
    source: object = field(default=None, compare=False, repr=False)

    @property
    def load(self):
        return self.name if self.source is None else self.source


@dataclass
class ControlRef:
    """A control image: its file name (None when given only as pixels), its scale (None: the ControlNet's
    recommended one), and the opened image or control map (`pixels`)."""

    image: str | None
    scale: float | None = None
    pixels: object = field(default=None, compare=False, repr=False)


@dataclass
class Recipe:
    """How an image (or a set of them) is made. Fields left None are decided by `settle` (the size) or by
    the pipeline that runs it (LoRAs and ControlNet as loaded; model, quantization and dtype as loaded).

    Seeds: image k of seed s is made from seed s + k; `seed` may be a list, each starting `num_images`
    images; None draws one (`with_seed`). Images are prompt-major: every seed of prompt 0 first.
    Input images are named by file (`image`, `mask`, `controls[i].image`: names only, never a local path)
    and carried opened (`init_image`, `init_mask`, `controls[i].pixels`).
    """

    prompt: str | list[str] = ""
    negative_prompt: str | list[str] | None = None  # a list: one per prompt
    width: int | None = None
    height: int | None = None
    steps: int = 8
    guidance: float = 0.0
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    seed: int | list[int] | None = None
    num_images: int = 1
    image: str | None = None
    mask: str | None = None
    strength: float | None = None
    loras: list[LoraRef] | None = None
    controlnet: str | None = None
    controls: list[ControlRef] = field(default_factory=list)
    control_type: str = "none"
    control_start: float = 0.0
    control_end: float = 1.0
    controlnet_graph: str | None = None
    enhance: bool = False
    original_prompt: str | None = None  # what was typed, when `prompt` is its enhanced rewrite
    max_sequence_length: int = 512
    variety: float = 0.0  # seeded noise on the prompt embeddings (x their std) in the early steps
    variety_until: float = 0.5  # ... the steps i/N below this fraction: the composition is decided there
    hires_scale: float | None = None  # a second pass at this scale (hires fix: see hires.py)
    hires_strength: float = 0.35
    hires_steps: int | None = None  # None: the first pass's steps
    hires_upscaler: str = "lanczos"
    hires_control: str | bool | None = None  # the hires pass under the loaded ControlNet (Tile): its name (True: as loaded)
    hires_control_scale: float | None = None  # ... at this scale (None: the ControlNet's recommended one)
    tile: int | None = None  # MultiDiffusion tiles (pixels a side) for a pass from an image; hires: default 1024
    model: str | None = None
    transformer: str | None = None  # the DiT file (.safetensors or .gguf) that replaced the model's, by name
    quantization: int | None = None  # the bits the DiT runs at (stored or on the fly)
    text_encoder_quantization: int | None = None
    quantize: int | None = None  # the on-the-fly bits asked for: what a replay asks for again
    dtype: str | None = None
    init_image: object = field(default=None, compare=False, repr=False)  # PIL image
    init_mask: object = field(default=None, compare=False, repr=False)  # PIL image, white = repaint
    init_latents: object = field(default=None, compare=False, repr=False)  # the image encoded (1 or B, h, w, 16)
    reference_images: list = field(default_factory=list)  # Omni: the reference images' file names
    reference_pixels: list = field(default_factory=list, compare=False, repr=False)  # ... opened (PIL images)

    # ------------------------------------------------------------------------------------------
    # Views

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def has_image(self) -> bool:
        return self.init_image is not None or self.init_latents is not None or self.image is not None

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def seed_list(self) -> list[int]:
        """The seeds of one prompt's images, in order (the seed rule); the seed must be decided."""
        if self.seed is None:
            raise InputError("{seed} is not decided yet: call with_seed() first", "seed", ("seed",))
        starts = self.seed if isinstance(self.seed, (list, tuple)) else [self.seed]
        return [(s + k) % (MAX_SEED + 1) for s in starts for k in range(self.num_images)]

    def with_seed(self, bound: int = MAX_SEED + 1) -> "Recipe":
        """This recipe with a drawn seed (in [0, bound)) when it has none."""
        return self if self.seed is not None else self.replace(seed=random.randrange(bound))

    def images(self) -> list["Recipe"]:
        """One recipe per image, prompt-major: the prompt and seed each image gets."""
        seeds = self.seed_list()
        negatives = self.negative_prompt if isinstance(self.negative_prompt, list) else None
        return [self.replace(prompt=p, seed=s, num_images=1,
                             negative_prompt=negatives[i % len(negatives)] if negatives else self.negative_prompt)
                for i, p in enumerate(self.prompts) for s in seeds]

    @property
    def denoising_steps(self) -> int:
        """The steps that run: all of them, or about strength x steps from an image; plus the hires pass's."""
        from .sampler import strength_start

        first = self.steps - strength_start(self.steps, self.default_strength()) if self.has_image else self.steps
        if self.hires_scale is None:
            return first
        steps = self.hires_steps or self.steps
        return first + steps - strength_start(steps, self.hires_strength)

    def default_strength(self) -> float:
        if self.strength is not None:
            return float(self.strength)
        return 1.0 if self.init_mask is not None or self.mask is not None else 0.6  # diffusers' defaults

    def replayed(self, **given) -> "Recipe":
        """This recipe (read from an image) made again with the fields in `given` changed, as a replay does:
        a new input image brings its own size (the stored one would resize it); a new prompt is made as
        typed (the stored rewrite is the old prompt's); control images given replace the stored ones, with
        their ControlNet settings; the stored negative prompt applies only with guidance > 0."""
        out = self.replace(**given)
        if "init_image" in given and not ({"width", "height"} & set(given)):
            out = out.replace(width=None, height=None)
        if "prompt" in given:
            out = out.replace(original_prompt=None)
        if "negative_prompt" not in given and not out.guidance > 0:
            out = out.replace(negative_prompt=None)
        return out

    # ------------------------------------------------------------------------------------------
    # Rules

    def validate(self, *, max_side: int = MAX_SIDE, max_images: int | None = None,
                 max_steps: int | None = None) -> "Recipe":
        """Check every field; raise InputError naming the field at fault. Faces pass their own limits."""
        check_prompts(self.prompt, "prompt")
        for name in ("width", "height"):
            _check_side(name, getattr(self, name), max_side)
        _check_int("steps", self.steps, 1, max_steps)
        _check_int("num_images", self.num_images, 1, max_images)
        for name in ("guidance", "cfg_normalization", "cfg_truncation"):
            _check_number(name, getattr(self, name), 0)
        negatives = self.negative_prompt if isinstance(self.negative_prompt, list) else [self.negative_prompt]
        if isinstance(self.negative_prompt, list):
            check_prompts(self.negative_prompt, "negative_prompt")
            if len(negatives) not in (1, len(self.prompts)):
                raise InputError(f"{len(negatives)} negative prompts for {len(self.prompts)} prompts", "negative_prompt")
        if any(negatives) and not self.guidance > 0:
            raise InputError("{negative_prompt} needs {guidance} > 0 (Turbo runs without CFG, so it would have no "
                             "effect)", "negative_prompt", ("negative_prompt", "guidance"))
        self._check_seed(max_images)
        self._check_image()
        for lora in self.loras or []:
            _check_number("loras", lora.scale, -10, 10, what=f"the scale of LoRA {lora.name}")
        self._check_controls()
        if self.reference_pixels or self.reference_images:
            from .omni import check_references

            check_references(self)
        _check_int("max_sequence_length", self.max_sequence_length, 1)
        _check_number("variety", self.variety, 0, MAX_VARIETY)
        _check_number("variety_until", self.variety_until, 0, 1)
        self._check_hires(max_side, max_steps)
        if self.tile is not None:
            _check_side("tile", self.tile, MAX_SIDE)
            if self.tile < MIN_TILE:
                raise InputError(f"{{tile}} must be at least {MIN_TILE} pixels, got {self.tile}", "tile", ("tile",))
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InputError(f"{{dtype}} must be one of {', '.join(DTYPES)}, got {self.dtype!r}", "dtype", ("dtype",))
        return self

    def _check_seed(self, max_images: int | None) -> None:
        seeds = self.seed if isinstance(self.seed, (list, tuple)) else [self.seed]
        if not seeds:
            raise InputError("{seed} is an empty list: give at least one seed, or none for a random one", "seed",
                             ("seed",))
        for s in seeds:
            if s is not None or isinstance(self.seed, (list, tuple)):  # None (draw one) only alone
                _check_int("seed", s, 0, MAX_SEED)
        n = len(seeds) * self.num_images * len(self.prompts)
        if max_images is not None and n > max_images:
            raise InputError(f"{n} images asked for; at most {max_images}", "num_images", ("num_images",))

    def _check_image(self) -> None:
        for name in ("mask", "strength"):
            if getattr(self, name) is not None or (name == "mask" and self.init_mask is not None):
                if not self.has_image:
                    raise InputError(f"{{{name}}} needs an image to start from ({{image}})", name, (name, "image"))
        if self.strength is not None:
            _check_number("strength", self.strength, 0, 1)
        im, mask = self.init_image, self.init_mask
        if im is not None and mask is not None and mask.size != im.size:
            raise InputError(f"the {{mask}} is {mask.width}x{mask.height} but the {{image}} is {im.width}x{im.height}: "
                             "they must have the same size", "mask", ("mask", "image"))

    def _check_hires(self, max_side: int, max_steps: int | None) -> None:
        if self.hires_scale is None:
            for name in ("hires_steps", "hires_control"):
                if getattr(self, name) not in (None, False):
                    raise InputError(f"{{{name}}} needs {{hires_scale}}", name, (name, "hires_scale"))
            return
        self._check_hires_control()
        ok = isinstance(self.hires_scale, (int, float)) and not isinstance(self.hires_scale, bool)
        if not ok or not 1 < self.hires_scale <= MAX_HIRES_SCALE:
            raise InputError(f"{{hires_scale}} must be a number above 1 and at most {MAX_HIRES_SCALE:g}, got "
                             f"{self.hires_scale!r}", "hires_scale", ("hires_scale",))
        _check_number("hires_strength", self.hires_strength, 0, 1)
        if self.hires_steps is not None:
            _check_int("hires_steps", self.hires_steps, 1, max_steps)
        if self.hires_upscaler not in UPSCALERS:
            raise InputError(f"{{hires_upscaler}} must be one of {', '.join(UPSCALERS)}, got {self.hires_upscaler!r}",
                             "hires_upscaler", ("hires_upscaler",))
        if self.width is not None and self.height is not None:
            width, height = self.hires_size
            for side in (width, height):
                if side > min(max_side, MAX_SIDE):
                    raise InputError(f"{{hires_scale}} {self.hires_scale:g} makes {width}x{height} pixels, above the "
                                     f"limit of {min(max_side, MAX_SIDE)} a side", "hires_scale", ("hires_scale",))

    def _check_hires_control(self) -> None:
        """The hires pass's ControlNet: the loaded one (True) or its name; with the lanczos upscaler (its control
        image is the upscaled first image); the first pass's ControlNet when both name one."""
        c = self.hires_control
        if c in (None, False):
            if self.hires_control_scale is not None:
                raise InputError("{hires_control_scale} needs {hires_control}", "hires_control_scale",
                                 ("hires_control_scale", "hires_control"))
            return
        if not (c is True or (isinstance(c, str) and c)):
            raise InputError(f"{{hires_control}} must be a ControlNet's name or True (the loaded one), got {c!r}",
                             "hires_control", ("hires_control",))
        if self.hires_control_scale is not None:
            _check_number("hires_control_scale", self.hires_control_scale, -2, 2,
                          what="a control scale (0.65-1 is the useful range)")
        if self.hires_upscaler != "lanczos":
            raise InputError("{hires_control} needs the lanczos {hires_upscaler}: its control image is the upscaled "
                             "first image", "hires_control", ("hires_control", "hires_upscaler"))
        if isinstance(c, str) and self.controlnet and self.controls and c != self.controlnet:
            raise InputError(f"{{hires_control}} {c} is not the first pass's {{controlnet}} {self.controlnet}: one "
                             "ControlNet serves both passes", "hires_control", ("hires_control", "controlnet"))

    @property
    def hires_size(self) -> tuple[int, int]:
        """The second pass's (width, height): the first's times hires_scale, rounded to multiples of 16."""
        return scaled_size(self.width, self.height, self.hires_scale)

    def _check_controls(self) -> None:
        if self.controlnet and not self.controls:
            raise InputError("{controlnet} needs at least one {controls} image", "controls",
                             ("controlnet", "controls"))
        for c in self.controls:
            if c.scale is not None:
                _check_number("controls", c.scale, -2, 2, what="a control scale (0.65-1 is the useful range)")
        for name in ("control_start", "control_end"):
            _check_number(name, getattr(self, name), 0, 1)
        if self.control_start >= self.control_end:
            raise InputError(f"{{control_start}} ({self.control_start}) must be below {{control_end}} "
                             f"({self.control_end})", "control_start", ("control_start", "control_end"))
        if self.control_type not in CONTROL_TYPES:
            raise InputError(f"{{control_type}} must be one of {', '.join(CONTROL_TYPES)}, got {self.control_type!r}",
                             "control_type", ("control_type",))
        if self.controlnet_graph not in (None, *GRAPHS):
            raise InputError(f"{{controlnet_graph}} must be one of {', '.join(GRAPHS)}, got {self.controlnet_graph!r}",
                             "controlnet_graph", ("controlnet_graph",))

    def settle(self) -> "Recipe":
        """The recipe with its output size and strength decided by the resize policy (`inputs.image_input`):
        an input image (else the first control image) gives the size unless both sides are given; else 1024."""
        from .inputs import image_input, output_size

        width, height, strength = self.width, self.height, self.strength
        if self.init_image is not None or self.init_latents is not None:
            init = image_input(self.init_image, self.init_mask, strength, width, height, self.init_latents)
            width, height, strength = init.width, init.height, init.strength
        elif self.controls and self.controls[0].pixels is not None:
            try:
                width, height = output_size(self.controls[0].pixels.size, width, height)
            except InputError as e:
                raise InputError(str(e), "controls") from None
        elif self.reference_pixels and width is None and height is None:  # Omni: the last reference's size
            from .omni import reference_size

            width, height = reference_size(self.reference_pixels[-1])
        return self.replace(width=width or DEFAULT_SIZE, height=height or DEFAULT_SIZE, strength=strength)

    # ------------------------------------------------------------------------------------------
    # Serialisation

    def to_dict(self) -> dict:
        """The JSON-able fields (no opened images): what `from_dict` reads back."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}
        d["loras"] = None if self.loras is None else [{"name": x.name, "scale": x.scale} for x in self.loras]
        d["controls"] = [{"image": c.image, "scale": c.scale} for c in self.controls]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """A recipe from `to_dict`'s form; unknown keys are an InputError naming them."""
        names = {f.name for f in dataclasses.fields(cls) if f.compare}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown recipe field {unknown[0]!r}", unknown[0])
        data = dict(data)
        if data.get("loras") is not None:
            data["loras"] = [LoraRef(str(x["name"]), float(x.get("scale", 1.0))) for x in data["loras"]]
        data["controls"] = [ControlRef(x.get("image"), x.get("scale")) for x in data.get("controls") or []]
        return cls(**data)

    def to_png_text(self) -> dict[str, str]:
        """The text chunks of one image's PNG: one per setting (read back by `from_png`), `Software`, and
        A1111's `parameters` infotext that image browsers and web UIs read."""
        from .metadata import png_text

        return png_text(self._single("to_png_text"))

    def to_png(self):
        """`to_png_text` as a PIL PngInfo, for `image.save(..., pnginfo=recipe.to_png())`."""
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in self.to_png_text().items():
            info.add_text(key, value)  # Pillow writes iTXt (UTF-8) when the text is not Latin-1
        return info

    def to_infotext(self) -> str:
        """A1111's `parameters` text: `prompt\\nNegative prompt: ...\\nSteps: 8, Sampler: ..., Seed: 1, ...`."""
        from .metadata import infotext

        return infotext(self._single("to_infotext"))

    @classmethod
    def from_infotext(cls, text: str) -> "Recipe":
        """The recipe an A1111 `parameters` text describes: ours completely; another tool's (A1111, Forge)
        as far as it applies to this model (see `metadata.from_infotext`)."""
        from .metadata import from_infotext

        return cls.from_dict(from_infotext(text))

    @classmethod
    def from_png(cls, source) -> "Recipe":
        """The recipe stored in an image (a path, bytes or a PIL image): our text chunks, else an A1111
        `parameters` chunk. InputError (field "image") when it holds none or cannot be read."""
        from .metadata import read_text, from_text

        return cls.from_dict(from_text(read_text(source)))

    def _single(self, what: str) -> dict:
        if not isinstance(self.prompt, str) or not isinstance(self.seed, int) or self.num_images != 1:
            raise ValueError(f"{what} describes one image: use it on one of recipe.images()")
        return self.to_dict()


# ----------------------------------------------------------------------------------------------
# Checks


def check_prompts(prompt, name: str = "prompt") -> list[str]:
    """A prompt or a list of them as a list; TypeError or InputError (naming `name`) otherwise."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise InputError(f"{{{name}}} is an empty list: pass at least one prompt (use \"\" for an empty prompt)",
                         name, (name,))
    return list(prompts)


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) times scale, each rounded to the nearest multiple of 16 (halves up; at least 16)."""
    return (max(16, int(width * scale / 16 + 0.5) * 16), max(16, int(height * scale / 16 + 0.5) * 16))


def file_name(value) -> str | None:
    """The name an input file is recorded under: its file name, never its folder (None for pixels)."""
    if value is None or not isinstance(value, (str, Path)):
        return None
    return Path(value).name
