"""One rule, one message: the same bad requests through every face (the Python API, the CLI, each server
dialect) are refused for the same reason, each face naming the field its own way.

The expected reason is the library's own: the InputError that `Recipe.validate` (or the pipeline) raises,
rendered with the face's names (`InputError.render`). A face that checked by hand would word it otherwise.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from PIL import Image

from zimage_mlx import cli
from zimage_mlx.cli.common import flag
from zimage_mlx.errors import InputError, LoraError
from zimage_mlx.recipe import LoraRef, Recipe


def photo(w, h):
    return Image.new("RGB", (w, h), (120, 80, 40))


def library_error(recipe: Recipe) -> InputError:
    with pytest.raises(InputError) as e:
        recipe.validate().settle().validate()
    return e.value


# (case, the recipe it describes, the CLI's flags for it); every case but the LoRA one fails in validate().
CASES = {
    "negative prompt without guidance": (Recipe("a fox", negative_prompt="blurry"), ["--negative-prompt", "blurry"]),
    "size not a multiple of 16": (Recipe("a fox", width=1000, height=1024), ["--size", "1000x1024"]),
    "steps 0": (Recipe("a fox", steps=0), ["--steps", "0"]),
    "strength 1.5": (Recipe("a fox", strength=1.5, init_image=photo(32, 32), image="in.png"),
                     ["--image", "{in}", "--strength", "1.5"]),
    "mask of another size": (Recipe("a fox", init_image=photo(32, 32), init_mask=Image.new("L", (48, 32)),
                                    image="in.png", mask="mask.png"), ["--image", "{in}", "--mask", "{mask}"]),
}
FIELDS = {"negative prompt without guidance": "negative_prompt", "size not a multiple of 16": "width",
          "steps 0": "steps", "strength 1.5": "strength", "mask of another size": "mask"}


@pytest.fixture(scope="module")
def pipe(reference_checkpoint):
    from zimage_mlx import ZImagePipeline

    return ZImagePipeline.from_pretrained(reference_checkpoint)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_library_names_the_field(case):
    e = library_error(CASES[case][0])
    assert e.field == FIELDS[case]
    assert FIELDS[case] in str(e)  # the library names the parameter
    assert "--" not in str(e)  # and never a flag


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_api_gives_the_library_reason(pipe, case):
    recipe = CASES[case][0]
    expected = library_error(recipe)
    with pytest.raises(InputError) as got:
        pipe.generate(recipe)
    assert (got.value.field, str(got.value)) == (expected.field, str(expected))


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_cli_gives_the_library_reason_with_flags(reference_checkpoint, tmp_path, case):
    recipe, flags = CASES[case]
    photo(32, 32).save(tmp_path / "in.png")
    Image.new("L", (48, 32)).save(tmp_path / "mask.png")
    args = [a.format(**{"in": tmp_path / "in.png", "mask": tmp_path / "mask.png"}) for a in flags]
    r = CliRunner().invoke(cli.main, ["generate", "a fox", "-m", str(reference_checkpoint), *args,
                                      "-o", str(tmp_path / "out.png")])
    expected = library_error(recipe).render(flag)
    assert r.exit_code == 2 and r.stderr.strip() == f"Error: {expected}", r.output
    assert flag(FIELDS[case]) in expected
    assert not (tmp_path / "out.png").exists()


def test_an_unknown_lora_gives_one_reason_in_the_api_and_the_cli(pipe, reference_checkpoint, tmp_path):
    missing = str(tmp_path / "nowhere.safetensors")
    with pytest.raises(LoraError) as api:
        pipe.generate(Recipe("a fox", width=32, height=32, steps=1, seed=1, loras=[LoraRef("nowhere", 1.0, missing)]))
    r = CliRunner().invoke(cli.main, ["generate", "a fox", "-m", str(reference_checkpoint), "--lora", missing,
                                      "-o", str(tmp_path / "out.png")])
    assert r.exit_code == 2 and r.stderr.strip() == f"Error: {api.value}"
    assert pipe.loras == []  # nothing half-applied
