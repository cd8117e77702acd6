"""The Recipe alone: its rules (checks naming the field, the seed rule, a replay), and what an image records
of it, both ways: our PNG chunks, A1111's infotext (also as written by A1111 and Forge themselves), dicts.
No model is loaded here; the faces' use of these is tested with the model in test_one_rule, test_cli and
test_server."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from zimage_mlx.errors import InputError
from zimage_mlx.metadata import parse_infotext
from zimage_mlx.recipe import ControlRef, LoraRef, Recipe

ONE = Recipe("a red fox, 一只狐狸", negative_prompt="blur", width=1024, height=768, steps=9, guidance=3.5,
             cfg_normalization=1.5, cfg_truncation=0.9, seed=7, model="Tongyi-MAI/Z-Image-Turbo", quantization=8,
             text_encoder_quantization=8, quantize=8, dtype="bfloat16",
             loras=[LoraRef("style.safetensors", 0.8), LoraRef("owner/repo", -0.5)])


def png_with(recipe: Recipe) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=recipe.to_png())
    return buf.getvalue()


def test_the_seed_rule():
    # image k of seed s is seed s + k; several seeds each start num_images images; prompt-major
    r = Recipe(["a", "b"], seed=[10, 20], num_images=2)
    assert [(x.prompt, x.seed) for x in r.images()] == [("a", 10), ("a", 11), ("a", 20), ("a", 21),
                                                        ("b", 10), ("b", 11), ("b", 20), ("b", 21)]
    assert [x.num_images for x in r.images()] == [1] * 8
    assert Recipe("a", seed=2**32 - 1, num_images=2).seed_list() == [2**32 - 1, 0]  # wraps in the seed range
    drawn = Recipe("a").with_seed(bound=2**31)
    assert 0 <= drawn.seed < 2**31 and drawn.with_seed() is drawn
    with pytest.raises(InputError, match="not decided"):
        Recipe("a").images()


@pytest.mark.parametrize("recipe, field, message", [
    (Recipe("a", width=1000), "width", "width must be a positive multiple of 16, got 1000"),
    (Recipe("a", height=9008), "height", "height 9008 is above the model's limit of 8192 pixels"),
    (Recipe("a", steps=0), "steps", "steps must be an integer >= 1, got 0"),
    (Recipe("a", guidance=float("nan")), "guidance", "guidance must be a number >= 0, got nan"),
    (Recipe("a", negative_prompt="blur"), "negative_prompt", "negative_prompt needs guidance > 0"),
    (Recipe("a", seed=-1), "seed", "seed must be an integer in [0, 4294967295], got -1"),
    (Recipe("a", seed=[]), "seed", "seed is an empty list"),
    (Recipe("a", seed=[1, None]), "seed", "got None"),
    (Recipe("a", strength=0.5), "strength", "strength needs an image to start from (image)"),
    (Recipe("a", image="x.png", strength=1.5), "strength", "strength must be a number in [0, 1], got 1.5"),
    (Recipe("a", controlnet="union.safetensors"), "controls", "controlnet needs at least one controls image"),
    (Recipe("a", control_start=0.6, control_end=0.5, controls=[ControlRef("c.png")]), "control_start",
     "control_start (0.6) must be below control_end (0.5)"),
    (Recipe("a", loras=[LoraRef("x", float("inf"))]), "loras", "the scale of LoRA x must be a number in [-10, 10]"),
    (Recipe([]), "prompt", "prompt is an empty list"),
])
def test_each_check_names_its_field(recipe, field, message):
    with pytest.raises(InputError) as e:
        recipe.validate()
    assert e.value.field == field and message in str(e.value)
    # a face names the fields its own way: the same reason with its names
    rendered = e.value.render(lambda f: f"⟨{f}⟩")
    assert f"⟨{field}⟩" in rendered or field not in e.value.fields
    assert rendered.replace("⟨", "").replace("⟩", "") == str(e.value)


def test_a_face_passes_its_own_limits():
    with pytest.raises(InputError, match="width 4096 is above the limit of 2048 pixels"):
        Recipe("a", width=4096).validate(max_side=2048)
    with pytest.raises(InputError, match="6 images asked for; at most 4") as e:
        Recipe(["a", "b"], seed=[1, 2, 3]).validate(max_images=4)
    assert e.value.field == "num_images"
    with pytest.raises(InputError, match="steps must be an integer in"):
        Recipe("a", steps=80).validate(max_steps=50)


def test_settle_follows_the_resize_policy():
    image = Image.new("RGB", (100, 70))
    assert (Recipe("a").settle().width, Recipe("a").settle().height) == (1024, 1024)
    got = Recipe("a", init_image=image, image="in.png").settle()
    assert (got.width, got.height, got.strength) == (96, 64, 0.6)  # rounded down to 16; diffusers' strength
    got = Recipe("a", init_image=image, init_mask=Image.new("L", (100, 70)), width=160).settle()
    assert (got.width, got.height, got.strength) == (160, 112, 1.0)  # the aspect ratio; inpainting's strength
    with pytest.raises(InputError) as e:
        Recipe("a", init_image=image, init_mask=Image.new("L", (50, 70))).settle()
    assert e.value.field == "mask" and "the mask is 50x70 but the image is 100x70" in str(e.value)


def test_png_chunks_round_trip():
    back = Recipe.from_png(png_with(ONE))
    assert back == ONE
    assert Recipe.from_png(Image.open(io.BytesIO(png_with(ONE)))) == ONE  # from a PIL image too
    assert Recipe.from_dict(ONE.to_dict()) == ONE
    with pytest.raises(ValueError, match="describes one image"):
        Recipe(["a", "b"], seed=1).to_png()


def test_our_infotext_round_trips_and_reads_like_a1111():
    text = ONE.to_infotext()
    fields = parse_infotext(text)
    assert fields["prompt"] == ONE.prompt and fields["negative_prompt"] == "blur"
    assert (fields["Steps"], fields["CFG scale"], fields["Seed"], fields["Size"]) == ("9", "3.5", "7", "1024x768")
    assert fields["Sampler"] == "Euler (flow match)" and fields["LoRA"] == "style.safetensors:0.8, owner/repo:-0.5"
    # the on-the-fly bits and the text encoder's are not in the infotext; everything else is
    assert Recipe.from_infotext(text) == ONE.replace(quantize=None, text_encoder_quantization=None)
    # the PNG's parameters chunk alone is enough
    only = io.BytesIO()
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(only, format="PNG", pnginfo=info)
    assert Recipe.from_png(only.getvalue()).seed == 7


# Written as A1111 1.10 and Forge write them (modules/processing.py create_infotext: "Key: value" pairs,
# values with a comma or colon quoted).
A1111 = ("a castle on a hill, matte painting\nNegative prompt: blurry, lowres\nSteps: 20, Sampler: DPM++ 2M, "
         "Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
         "Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent, "
         "Version: v1.10.1")
FORGE = ("a red fox in the snow, \"golden hour\"\nNegative prompt: cartoon\nSteps: 9, Sampler: Euler, "
         "Schedule type: Simple, CFG scale: 2.5, Shift: 3, Seed: 42, Size: 1024x1536, Model hash: 0a1b2c3d4e, "
         "Model: z_image_turbo_bf16, Version: f2.0.1v1.10.1-previous-669-gdfdcbab6")


def test_an_a1111_infotext_gives_what_applies_to_this_model():
    r = Recipe.from_infotext(A1111)
    # an SD 1.5 image: its prompt, seed, size and hires fix mean the same here; its steps and CFG were for
    # another model (issue #25: its Denoising strength is the hires pass's in a txt2img infotext)
    assert r == Recipe("a castle on a hill, matte painting", width=512, height=768, seed=1234, hires_scale=2,
                       hires_strength=0.7, hires_upscaler="latent")


def test_a_forge_z_image_infotext_gives_its_steps_and_guidance():
    r = Recipe.from_infotext(FORGE)
    # Forge ran Z-Image: its steps and CFG apply (classic CFG scale 2.5 = guidance 1.5), and so does the
    # negative prompt that came with them; its model name is a file of Forge's, not one to load here
    assert r == Recipe("a red fox in the snow, \"golden hour\"", negative_prompt="cartoon", width=1024, height=1536,
                       steps=9, guidance=1.5, seed=42)
    assert r.validate() is r


def test_a_replay_is_the_stored_recipe_with_the_fields_given():
    stored = ONE.replace(guidance=0.0, negative_prompt=None, original_prompt="a fox", image="in.png", strength=0.5)
    again = stored.replayed(steps=12)
    assert again == stored.replace(steps=12)
    assert stored.replayed(prompt="a wolf").original_prompt is None  # a new prompt is made as typed
    new_image = stored.replayed(init_image=Image.new("RGB", (64, 48)), image="other.png")
    assert (new_image.width, new_image.height) == (None, None)  # it brings its own size
    cfg = ONE.replayed()
    assert cfg.negative_prompt == "blur"  # kept with guidance
    assert ONE.replayed(guidance=0.0).negative_prompt is None  # and dropped without it
