"""Where generate's images go: file names from the --output template, checked before anything loads, and
written atomically (never a half-written file, never a replaced one unless asked)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .common import UserError

DEFAULT_OUTPUT = "zimage-{seed}.png"
# Tried in order when --output is not given, until every image gets its own file name.
DEFAULT_OUTPUTS = (DEFAULT_OUTPUT, "zimage-{prompt_index}-{seed}.png", "zimage-{index}-{seed}.png")


def plan_outputs(template: str | None, jobs: list[tuple[int, int]], overwrite: bool) -> list[Path]:
    """One path per image from the --output template; refuse repeats, existing files (unless --overwrite)
    and folders that cannot be created."""
    folder = None
    if template is not None and (template.endswith(("/", os.sep)) or Path(template).expanduser().is_dir()):
        folder, template = template, None
    templates = [template] if template is not None else [str(Path(folder or "") / t) for t in DEFAULT_OUTPUTS]
    for t in templates:
        paths = [render_output(t, index=i, prompt_index=p, seed=s) for i, (p, s) in enumerate(jobs)]
        if len(set(paths)) == len(paths):
            break
    else:
        repeated = next(p for p in paths if paths.count(p) > 1)
        raise UserError(f"--output {template!r} names {repeated} for several images: put {{seed}}, {{index}} or "
                        f"{{prompt_index}} in it, e.g. 'image-{{index}}.png'")
    for path in paths:
        if path.suffix.lower() != ".png":
            raise UserError(f"--output must name .png files (the settings are stored in PNG text chunks), got {path}")
        if path.is_dir():
            raise UserError(f"{path} is a folder; --output must name a .png file")
        if path.exists() and not overwrite:
            more = sum(p.exists() for p in paths) - 1
            also = f" (and {more} more)" if more else ""
            raise UserError(f"{path}{also} already exists; pass --overwrite to replace it or choose another --output")
    for parent in sorted({p.parent for p in paths}):
        ancestor = parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UserError(f"cannot create the folder {parent}: {ancestor} is a file")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to {ancestor}: permission denied")
    return paths


def render_output(template: str, **fields) -> Path:
    try:
        return Path(template.format(**fields)).expanduser()
    except KeyError as e:
        raise UserError(f"--output has an unknown field {{{e.args[0]}}}: use {{seed}}, {{index}} or {{prompt_index}}") from None
    except (ValueError, IndexError) as e:
        raise UserError(f"--output {template!r} is not a valid template ({e}); write {{seed}}, {{index}} or "
                        "{prompt_index}, and double the other braces") from None


def plan_preview(path: str, outputs: list[Path]) -> Path:
    """--preview FILE: an image file (by suffix) in an existing, writable folder, not one of the outputs."""
    preview = Path(path).expanduser()
    if preview.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"--preview must name a .png, .jpg or .webp file, got {path}")
    if preview.is_dir():
        raise UserError(f"--preview {path} is a folder; name an image file")
    if not preview.parent.is_dir() or not os.access(preview.parent, os.W_OK | os.X_OK):
        raise UserError(f"--preview {path}: the folder {preview.parent} does not exist or is not writable")
    if any(preview.resolve() == p.resolve() for p in outputs):
        raise UserError(f"--preview {path} is also an output file; give it another name")
    return preview


def preview_writer(pipe, path: Path):
    """An on_step callback that rewrites `path` with the step's fast preview; through a temporary file and a
    rename, so a viewer never reads a half-written image."""
    def write(step):
        image = pipe.fast_preview(step)[0]
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # same suffix: PIL picks the format from it
        image.convert("RGB").save(tmp)
        os.replace(tmp, path)

    return write


def save_png(image, path: Path, info, overwrite: bool) -> None:
    """Write to a temporary file next to `path`, then move it into place: never a half-written PNG, and
    never a replaced file unless `overwrite` (a hard link fails if the name was taken meanwhile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # "x": honours the umask, unlike mkstemp's 0600
            image.save(f, format="PNG", pnginfo=info)
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise UserError(f"{path} appeared while generating; not overwriting it (pass --overwrite)") from None
        except OSError:  # file systems without hard links (exFAT)
            if path.exists():
                raise UserError(f"{path} appeared while generating; not overwriting it (pass --overwrite)") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
