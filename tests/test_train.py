"""LoRA training: gradients against diffusers + PEFT under torch autograd, checkpointed blocks, the sigma
density against diffusers' training utilities and scheduler, learning on solid colours, the written file in
diffusers and in our loader, resume after a stop, QLoRA and training adapters, the CLI and bad input."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlx.utils import tree_flatten
from PIL import Image
from safetensors import safe_open

import reference
from zimage_mlx import cli
from zimage_mlx import train as T
from zimage_mlx.lora import read_lora
from zimage_mlx.noise import noise
from zimage_mlx.pipeline import ZImagePipeline
from zimage_mlx.recipe import Recipe
from zimage_mlx.transformer import ZImageTransformer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SIZE = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Four 32x32 solid-colour images with captions."""
    folder = tmp_path_factory.mktemp("colours")
    for name, rgb in COLOURS.items():
        Image.new("RGB", (SIZE, SIZE), rgb).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} square")
    return folder


def load_pipe(checkpoint) -> ZImagePipeline:
    return ZImagePipeline.from_pretrained(checkpoint, dtype="float32", low_memory=True)


@pytest.fixture(scope="module")
def cached(reference_checkpoint, data_dir):
    """A pipeline (its DiT is replaced per test), the dataset and its cached latents and features."""
    pipe = load_pipe(reference_checkpoint)
    dataset = T.Dataset.from_folder(data_dir, SIZE)
    return pipe, dataset, T.cache_dataset(pipe, dataset, seed=0)


def fresh_dit(checkpoint) -> ZImageTransformer:
    return ZImageTransformer.from_pretrained(checkpoint / "transformer")


def config(tmp_path, data_dir, checkpoint, **kw) -> T.TrainConfig:
    values = dict(data=str(data_dir), output=str(tmp_path / "lora.safetensors"), model=str(checkpoint), rank=4,
                  steps=4, lr=1e-3, resolution=SIZE, seed=3)
    values.update(kw)
    return T.TrainConfig(**values)


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------------------------
# The math against the reference


def test_gradients_match_diffusers_peft_and_checkpointing(reference_checkpoint):
    """Loss and every LoRA gradient for one batch (ragged captions, two sigmas) equal those of diffusers'
    ZImageTransformer2DModel with the same LoRA attached through PEFT, differentiated by torch autograd."""
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig

    rank, alpha = 4, 8.0
    ours = fresh_dit(reference_checkpoint)
    names = T.add_lora(ours, ["all"], rank, alpha, seed=0)
    assert len(names) == 2 * 8 + 2 * 8 + 2 * 7  # main layers and noise refiners with adaLN, context refiners without
    rng = np.random.default_rng(0)
    for m in T.lora_layers(ours).values():  # B is zero at init, which would leave A's gradient zero
        m.lora_B = mx.array(0.1 * rng.standard_normal(m.lora_B.shape).astype(np.float32))
    B, h, w = 2, 4, 6
    x0, eps = (rng.standard_normal((B, h, w, 16)).astype(np.float32) for _ in range(2))
    sig = np.array([0.3, 0.8], np.float32)
    caps = [rng.standard_normal((n, 48)).astype(np.float32) for n in (5, 37)]  # padded to 32 and 64: masked keys

    grads = {}
    for on in (False, True):
        T.set_checkpointing(ours, on)
        vg = nn.value_and_grad(ours, lambda *a: T.flow_loss(ours, *a))
        loss, g = T.loss_and_grads(vg, mx.array(x0), mx.array(eps), mx.array(sig), [mx.array(c) for c in caps])
        grads[on] = (float(loss), {k: np.array(v) for k, v in tree_flatten(g)})
    assert type(ours.layers[0]).__name__ == "CheckpointedTransformerBlock"
    # Recomputing a block in the backward pass runs the same float32 ops again: equal up to summation order.
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    for k in grads[False][1]:
        assert rel_err(grads[True][1][k], grads[False][1][k]) <= 1e-5, k

    ref = ZImageTransformer2DModel.from_pretrained(reference_checkpoint / "transformer", dtype=torch.float32)
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, init_lora_weights=False))
    with torch.no_grad():
        for n, m in T.lora_layers(ours).items():
            mod = ref.get_submodule(n)
            mod.lora_A["default"].weight.copy_(torch.from_numpy(np.array(m.lora_A)))
            mod.lora_B["default"].weight.copy_(torch.from_numpy(np.array(m.lora_B)))
    tx0, teps = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (x0, eps))  # (B, C, h, w)
    s = torch.from_numpy(sig)[:, None, None, None]
    xt = (1 - s) * tx0 + s * teps
    out = ref([x[:, None] for x in xt], 1 - torch.from_numpy(sig), [torch.from_numpy(c) for c in caps],
              return_dict=False)[0]
    pred = torch.stack([o[:, 0] for o in out])
    ref_loss = torch.mean((-pred - (teps - tx0)) ** 2)
    ref_loss.backward()

    for on, (loss, g) in grads.items():
        # float32 on both sides through ~20 blocks; the bound.
        assert loss == pytest.approx(ref_loss.item(), rel=1e-4)
        assert len(g) == 2 * len(names)
        for n in names:
            mod = ref.get_submodule(n)
            assert rel_err(g[f"{n}.lora_A"], mod.lora_A["default"].weight.grad.numpy()) <= 1e-4, (n, on)
            assert rel_err(g[f"{n}.lora_B"], mod.lora_B["default"].weight.grad.numpy()) <= 1e-4, (n, on)


def test_sigma_density_and_shift_follow_the_reference():
    """The shift is the scheduler's (diffusers' shifted sigmas of the pipeline's 8-step grid), and the logit-normal and uniform draws have diffusers' training-utils distribution."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from zimage_mlx.sampler import FlowMatchScheduler

    grid = np.linspace(1, 1 / 8, 8, dtype=np.float32)  # the Z-Image pipeline's unshifted sigmas
    ref = FlowMatchEulerDiscreteScheduler(**reference.SCHEDULER_CONFIG)
    ref.set_timesteps(sigmas=list(grid))
    ours = FlowMatchScheduler(**reference.SCHEDULER_CONFIG)
    np.testing.assert_allclose(np.array(T.shift_sigmas(mx.array(grid), ours, 256)), ref.sigmas[:-1].numpy(), rtol=1e-6)

    n = 200_000
    quantiles = np.linspace(0.02, 0.98, 25)
    for weighting in ("logit_normal", "uniform"):
        cfg = T.TrainConfig(weighting=weighting, logit_mean=0.3, logit_std=1.2)
        unshifted = FlowMatchScheduler(shift=1.0)
        u = np.array(T.sample_sigmas(mx.random.key(0), n, cfg, unshifted, 256))
        r = compute_density_for_timestep_sampling(weighting, n, logit_mean=0.3, logit_std=1.2,
                                                  generator=torch.Generator().manual_seed(0)).numpy()
        # Two independent samples of 200k: quantiles agree to ~3 standard errors (< 0.006).
        np.testing.assert_allclose(np.quantile(u, quantiles), np.quantile(r, quantiles), atol=0.006)
        shifted = np.array(T.sample_sigmas(mx.random.key(0), n, cfg, ours, 256))
        np.testing.assert_allclose(shifted, 3 * u / (1 + 2 * u), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Learning, and the written file in diffusers and in our loader


def eval_loss(model, dataset, cache) -> float:
    """The loss over every example at four fixed sigmas with fixed noise: a deterministic measure."""
    rng = np.random.default_rng(5)
    total = []
    for i, ex in enumerate(dataset.examples):
        z = cache.latents[i]
        for s in (0.2, 0.4, 0.6, 0.8):
            eps = mx.array(rng.standard_normal(z.shape).astype(np.float32))
            total.append(float(T.flow_loss(model, z, eps, mx.array([s], mx.float32), [cache.features[ex.caption]])))
    return float(np.mean(total))


def colour_distance(pipe, dataset, cache) -> float:
    """Mean distance (0..255 levels) between the mean colour of each caption's 4-step image and the mean colour
    of its training image as the VAE reproduces it (the best this VAE can draw)."""
    dists = []
    for i, ex in enumerate(dataset.examples):
        x = noise(7, SIZE // 8, SIZE // 8)
        for step in pipe.denoise([cache.features[ex.caption]], x, pipe.sigmas(4, width=SIZE, height=SIZE)):
            x = step.latents
        made = np.asarray(pipe.decode(x)[0], np.float32).mean((0, 1))
        target = np.asarray(pipe.decode(cache.latents[i])[0], np.float32).mean((0, 1))
        dists.append(np.linalg.norm(made - target))
    return float(np.mean(dists))


@pytest.fixture(scope="module")
def trained(cached, reference_checkpoint, tmp_path_factory):
    """30 steps on the four colours (all block layers, rank 8, lr 1e-2), with the measures before and after."""
    pipe, dataset, cache = cached
    pipe.transformer = fresh_dit(reference_checkpoint)
    before = eval_loss(pipe.transformer, dataset, cache), colour_distance(pipe, dataset, cache)
    out = tmp_path_factory.mktemp("trained") / "colours.safetensors"
    cfg = T.TrainConfig(data="", output=str(out), model=str(reference_checkpoint), rank=8, targets=["all"], steps=30,
                        lr=1e-2, resolution=SIZE, seed=0, checkpointing=False)
    trainer = T.Trainer(pipe.transformer, dataset, cache, cfg, pipe.scheduler)
    trainer.run()
    after = eval_loss(pipe.transformer, dataset, cache), colour_distance(pipe, dataset, cache)
    trainer.save_lora(out)
    return trainer, out, before, after


def test_training_learns_the_colours(trained):
    trainer, _, (loss0, dist0), (loss1, dist1) = trained
    assert trainer.step == 30 and len(trainer.losses) == 30
    # Measured 2.32 -> 1.30 (-44%) and 30.7 -> 22.0 levels (-28%); the margins leave room for BLAS differences.
    assert loss1 < 0.7 * loss0, (loss0, loss1)
    assert dist1 < 0.85 * dist0, (dist0, dist1)


def test_written_lora_loads_in_diffusers_and_ours(trained, reference_checkpoint):
    trainer, path, _, _ = trained
    with safe_open(str(path), "np") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["zimage_mlx.rank"] == "8" and meta["zimage_mlx.steps"] == "30"
    # the base model by name and config hash, never by its local path
    assert meta["zimage_mlx.base_model"].startswith(reference_checkpoint.name + "#")
    assert str(reference_checkpoint.parent) not in meta["zimage_mlx.base_model"] and meta["zimage_mlx.trainer"] == T.TRAINER
    assert sorted(eval_json(meta["zimage_mlx.targets"])) == sorted(trainer.targets)
    assert len(keys) == 3 * len(trainer.targets) and all(k.startswith("diffusion_model.") for k in keys)

    prompt, latents = "a blue square", np.random.default_rng(1).standard_normal((1, 16, 4, 4)).astype(np.float32)
    ref = reference.load_reference_pipeline(reference_checkpoint)
    ref.load_lora_weights(str(path))
    theirs = np.asarray(ref(prompt=prompt, latents=torch.from_numpy(latents), num_inference_steps=2, guidance_scale=0.0,
                            width=SIZE, height=SIZE).images[0], np.int16)
    pipe = ZImagePipeline.from_pretrained(reference_checkpoint, dtype="float32")
    base = np.asarray(pipe.generate(prompt, steps=2, latents=mx.array(latents.transpose(0, 2, 3, 1)), width=SIZE,
                                    height=SIZE)[0], np.int16)
    lora = read_lora(path)
    assert not lora.unmatched and sorted(lora.layers) == sorted(trainer.targets)
    pipe.load_lora(lora)
    ours = np.asarray(pipe.generate(prompt, steps=2, latents=mx.array(latents.transpose(0, 2, 3, 1)), width=SIZE,
                                    height=SIZE)[0], np.int16)
    assert np.abs(ours - theirs).max() <= 1  # same float32 math; rounding to levels may differ by one
    assert np.abs(ours - base).mean() > 3  # the LoRA changes the image, so the comparison means something


def eval_json(text):
    import json

    return json.loads(text)


# ----------------------------------------------------------------------------------------------
# Resume, QLoRA, training adapters


def test_resume_after_a_stop_reproduces_the_run(reference_checkpoint, data_dir, tmp_path, monkeypatch):
    """Run A: 4 steps. Run B: stopped by its cancel token after step 2 (a checkpoint is written). Run C:
    resumed from it. C's losses and LoRA equal A's (every step's randomness derives from (seed, step)).
    A loads its models itself, one at a time: the text encoder is freed before the DiT is loaded."""
    from zimage_mlx.text_encoder import TextEncoder

    order = []
    release, load_dit = TextEncoder.release, ZImageTransformer.from_pretrained.__func__
    monkeypatch.setattr(TextEncoder, "release", lambda self: (order.append("free text encoder"), release(self)))
    monkeypatch.setattr(ZImageTransformer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: (order.append("load DiT"), load_dit(cls, *a, **k))[1]))
    kw = dict(steps=4, batch_size=2, checkpointing=True)
    a = T.train(config(tmp_path / "a", data_dir, reference_checkpoint, **kw))
    assert order == ["free text encoder", "load DiT"]
    monkeypatch.undo()

    cancel, events = threading.Event(), []

    def stop_at_2(e):
        events.append(e)
        if e.kind == "step" and e.step == 2:
            cancel.set()

    cfg_b = config(tmp_path / "b", data_dir, reference_checkpoint, **kw)
    with pytest.raises(T.Cancelled):
        T.train(cfg_b, on_event=stop_at_2, cancel=cancel, pipe=load_pipe(reference_checkpoint))
    ckpt = events[-1].paths[0]
    assert events[-1].kind == "checkpoint" and ckpt == T.checkpoint_path(cfg_b.output, 2) and ckpt.is_file()
    assert not Path(cfg_b.output).exists()

    cfg_c = config(tmp_path / "b", data_dir, reference_checkpoint, resume=str(ckpt), **kw)
    c = T.train(cfg_c, pipe=load_pipe(reference_checkpoint))
    assert c.losses == a.losses  # the same float32 ops in the same order
    with safe_open(str(a.config.output), "np") as fa, safe_open(str(cfg_c.output), "np") as fc:
        assert set(fa.keys()) == set(fc.keys())
        for k in fa.keys():
            np.testing.assert_array_equal(fa.get_tensor(k), fc.get_tensor(k))

    with pytest.raises(T.TrainError, match="other settings: rank=4"):
        T.train(config(tmp_path / "d", data_dir, reference_checkpoint, rank=8, resume=str(ckpt), **kw),
                pipe=load_pipe(reference_checkpoint))


def test_qlora_step_trains_only_the_lora(cached, reference_checkpoint, tmp_path, data_dir):
    """A 4-bit base (the FFN layers whose width allows 64-wide groups): a step changes the LoRA factors only."""
    pipe, dataset, cache = cached
    dit = ZImageTransformer.from_pretrained(reference_checkpoint / "transformer", quantize=4)
    base = {k: np.array(v) for k, v in tree_flatten(dit.parameters())}
    cfg = config(tmp_path, data_dir, reference_checkpoint, quantize=4, targets=["ffn"], lr=1e-2)
    trainer = T.Trainer(dit, dataset, cache, cfg, pipe.scheduler)
    assert isinstance(T.lora_layers(dit)["layers.0.feed_forward.w2"].base, nn.QuantizedLinear)
    trainer.train_step()
    trainer.train_step()  # B moves in step 1, A once B is not zero
    params, wrapped = dict(tree_flatten(dit.parameters())), set(T.lora_layers(dit))
    for k, v in base.items():  # a wrapped layer's weights moved to <layer>.base
        layer, _, leaf = k.rpartition(".")
        np.testing.assert_array_equal(np.array(params[f"{layer}.base.{leaf}" if layer in wrapped else k]), v)
    trainable = dict(tree_flatten(dit.trainable_parameters()))
    assert len(trainable) == 2 * 6 and all(np.abs(np.array(v)).max() > 0 for v in trainable.values())
    assert all(np.isfinite(trainer.losses))


def test_training_adapter_is_active_in_training_only(cached, reference_checkpoint, tmp_path, data_dir):
    """An adapter LoRA runs during training (the loss is the loss of the base with the adapter merged), is off
    for samples, and is not written to the output."""
    from safetensors.torch import save_file

    from zimage_mlx.lora import apply_lora

    pipe, dataset, cache = cached
    rng = np.random.default_rng(4)
    tensors = {}
    for n in ("layers.0.attention.to_q", "layers.1.feed_forward.w1", "noise_refiner.0.attention.to_v"):
        o, i = (96, 96) if "attention" in n else (256, 96)
        tensors[f"diffusion_model.{n}.lora_A.weight"] = torch.from_numpy(rng.standard_normal((4, i)).astype(np.float32) / 10)
        tensors[f"diffusion_model.{n}.lora_B.weight"] = torch.from_numpy(rng.standard_normal((o, 4)).astype(np.float32))
    adapter = tmp_path / "adapter.safetensors"
    save_file(tensors, str(adapter))

    batch = (cache.latents[0], mx.ones_like(cache.latents[0]), mx.array([0.5]), [cache.features["a red square"]])
    plain = fresh_dit(reference_checkpoint)
    merged = fresh_dit(reference_checkpoint)
    apply_lora(merged, read_lora(adapter), 0.7, {}, fuse=True)
    expected_on, expected_off = float(T.flow_loss(merged, *batch)), float(T.flow_loss(plain, *batch))
    assert abs(expected_on - expected_off) > 1e-3

    dit = fresh_dit(reference_checkpoint)
    assert T.add_adapters(dit, [(str(adapter), 0.7)]) == 3
    trainer = T.Trainer(dit, dataset, cache, config(tmp_path, data_dir, reference_checkpoint), pipe.scheduler)
    assert float(trainer.loss_and_grads(*batch)[0]) == pytest.approx(expected_on, rel=1e-5)
    trainer.set_adapters(False)
    assert float(T.flow_loss(dit, *batch)) == pytest.approx(expected_off, rel=1e-5)
    trainer.set_adapters(True)
    assert len(dict(tree_flatten(dit.trainable_parameters()))) == 2 * len(trainer.targets)  # adapter frozen
    out = trainer.save_lora(tmp_path / "out.safetensors")
    with safe_open(str(out), "np") as f:
        assert len(f.keys()) == 3 * len(trainer.targets)
        np.testing.assert_array_equal(f.get_tensor("diffusion_model.layers.0.attention.to_q.lora_B.weight"), 0)


def test_samples_are_recipes_with_their_metadata(cached, reference_checkpoint, tmp_path, data_dir, monkeypatch):
    """Samples are Recipes run by the pipeline: prompt k at seed + k, the same pixels as denoising the cached
    features by hand, written with their recipe (and the LoRA being trained); no text encoder is loaded for them."""
    pipe, dataset, cache = cached
    pipe.transformer = fresh_dit(reference_checkpoint)
    prompts = ["a green square", "a blue square"]
    cfg = config(tmp_path, data_dir, reference_checkpoint, steps=2, sample_prompts=prompts, sample_every=2,
                 sample_steps=2)
    events = []
    trainer = T.train(cfg, on_event=events.append, pipe=pipe)
    [paths] = [e.paths for e in events if e.kind == "sample"]
    assert [p.name for p in paths] == ["step000002-0.png", "step000002-1.png"]
    for k, (prompt, path) in enumerate(zip(prompts, paths)):
        x = noise(cfg.seed + k, SIZE // 8, SIZE // 8)
        for step in pipe.denoise([cache.features[prompt]], x, pipe.sigmas(2, width=SIZE, height=SIZE)):
            x = step.latents
        np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(pipe.decode(x)[0]))
        r = Recipe.from_png(path)
        assert (r.prompt, r.seed, r.steps, r.width, r.height, r.guidance) == (prompt, cfg.seed + k, 2, SIZE, SIZE, 0)
        assert [(x.name, x.scale) for x in r.loras] == [("lora.safetensors", 1.0)]
    # A pipeline without the prompts cached (load_for_training's) takes them from the features given.
    pipe._prompt_cache.clear()
    monkeypatch.setattr(pipe, "_load_text_encoder", lambda: pytest.fail("the text encoder was loaded for samples"))
    again = T.sample_images(pipe, trainer, prompts, cache.features, SIZE, 2, cfg.seed)
    for path, image in zip(paths, again):
        np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image))
        assert image.info["recipe"].prompt in prompts


# ----------------------------------------------------------------------------------------------
# Dataset, CLI and bad input


def test_buckets_and_captions(tmp_path):
    for name, size in (("wide", (64, 32)), ("tall", (20, 40)), ("square", (50, 50))):
        Image.new("RGB", size, (1, 2, 3)).save(tmp_path / f"{name}.jpg")
        (tmp_path / f"{name}.txt").write_text(f" {name} \n")
    Image.new("RGB", (30, 30)).save(tmp_path / "nocaption.png")
    (tmp_path / "._wide.jpg").write_bytes(b"\0\5\26\7")  # a macOS resource fork: hidden, skipped
    with pytest.warns(T.TrainWarning, match="1 of 4 images have no caption .* skipped"):
        ds = T.Dataset.from_folder(tmp_path, 32)
    assert [ex.caption for ex in ds.examples] == ["square", "tall", "wide"]
    assert {ex.image.stem: ex.size for ex in ds.examples} == {"wide": (48, 16), "tall": (16, 48), "square": (32, 32)}
    for ex in ds.examples:
        assert np.array(T.load_image(ex)).shape == (1, ex.size[1], ex.size[0], 3)
    with pytest.warns(T.TrainWarning, match="trained with an empty caption"):
        ds = T.Dataset.from_folder(tmp_path, 32, allow_empty_captions=True)
    assert "" in ds.captions and len(ds) == 4


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "holds no images"),
    (lambda p: p.rmdir(), "does not exist"),
    (lambda p: ((p / "a.png").write_bytes(b"not a png"), (p / "a.txt").write_text("x")), "cannot read the image"),
    (lambda p: Image.new("RGB", (16, 16)).save(p / "a.png"), "none of the 1 images .* has a caption"),
    (lambda p: (Image.new("RGB", (16, 16)).save(p / "a.png"), (p / "a.txt").write_bytes(b"\xff\xfe\xfa")),
     "cannot read the caption"),
])
def test_bad_datasets(tmp_path, setup, message):
    folder = tmp_path / "data"
    folder.mkdir()
    setup(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", T.TrainWarning)
        with pytest.raises(T.TrainError, match=message):
            T.Dataset.from_folder(folder, 32)


def test_bad_options(reference_checkpoint):
    for kw, message in ((dict(resolution=500), "multiple of 16"), (dict(rank=0), "rank must be"),
                        (dict(output="x.pt"), ".safetensors"), (dict(weighting="cosine"), "weighting"),
                        (dict(lr=0), "lr must be")):
        with pytest.raises(T.TrainError, match=message):
            T.TrainConfig(**dict(dict(output="x.safetensors"), **kw)).check()
    with pytest.raises(T.TrainError, match="match no layer"):
        T.select_targets(fresh_dit(reference_checkpoint), ["to_qq"])
    with pytest.raises(T.TrainError, match="unknown training options: colour"):
        T.TrainConfig.from_dict({"colour": 1})


def test_cli_trains_with_a_config_file(reference_checkpoint, data_dir, tmp_path):
    out = tmp_path / "my-lora.safetensors"
    toml = tmp_path / "train.toml"
    toml.write_text(f'model = "{reference_checkpoint}"\nrank = 2\nsteps = 3\nresolution = {SIZE}\nlr = 1e-3\n'
                    'targets = ["attention", "w2"]\nsample = ["a green square"]\nsample-every = 3\nsample-steps = 1\n')
    runner = CliRunner()
    args = ["train", str(data_dir), "--output", str(out), "--config", str(toml), "--save-every", "2", "--rank", "4"]
    result = runner.invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert "step 3/3  loss" in result.output and f"Saved {out}" in result.output
    lora = read_lora(out)  # the flag overrides the file's rank; the file's targets are used
    assert {layer.down.shape[0] for layer in lora.layers.values()} == {4}
    # The preset holds the main layers' attention; "w2" matches every name ending in .w2, as PEFT would.
    assert sorted(lora.layers) == sorted([f"layers.{i}.attention.{p}" for i in range(2)
                                          for p in ("to_q", "to_k", "to_v", "to_out.0")] +
                                         [f"{b}.{i}.feed_forward.w2" for b in ("layers", "noise_refiner", "context_refiner")
                                          for i in range(2)])
    assert (tmp_path / "my-lora-samples" / "step000003-0.png").is_file()
    assert T.checkpoint_path(out, 2).is_file()

    for extra, message in ((["--resolution", "30"], "resolution must be a positive multiple of 16 (the VAE"),
                           ([], "exists; choose another output or allow overwriting (--force)")):
        result = runner.invoke(cli.main, args + extra)
        assert result.exit_code == 2 and message in result.output
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
    result = runner.invoke(cli.main, ["train", "--output", str(out)])
    assert result.exit_code == 2 and "give the dataset folder" in result.output


def test_bfloat16_base_trains_float32_factors(cached, reference_checkpoint, tmp_path, data_dir):
    """A bf16 base (the Apple-GPU default) computes in bf16 while the LoRA factors, their gradients and AdamW
    state stay float32; its gradients follow the float32 model's within bf16 precision."""
    pipe, dataset, cache = cached
    grads = {}
    for dtype in ("float32", "bfloat16"):
        dit = ZImageTransformer.from_pretrained(reference_checkpoint / "transformer", dtype=dtype)
        trainer = T.Trainer(dit, dataset, cache, config(tmp_path, data_dir, reference_checkpoint, targets=["attention"]),
                            pipe.scheduler)
        for m in T.lora_layers(dit).values():
            m.lora_B = mx.ones_like(m.lora_B) * 0.05
        loss, g = trainer.loss_and_grads(*trainer.batch(0))
        grads[dtype] = (float(loss), {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(g)})
        assert all(v.dtype == mx.float32 for _, v in tree_flatten(g))
        trainer.optimizer.update(dit, g)
        assert all(v.dtype == mx.float32 for _, v in tree_flatten(trainer.optimizer.state) if v.ndim)
    assert grads["bfloat16"][0] == pytest.approx(grads["float32"][0], rel=2e-2)
    for k, ref in grads["float32"][1].items():
        # bf16 keeps 8 bits of mantissa through 6 blocks: single entries move by ~10% of the largest, the
        # direction of each gradient stays.
        ours = grads["bfloat16"][1][k]
        assert float(np.sum(ours * ref) / np.linalg.norm(ours) / np.linalg.norm(ref)) > 0.99, k


def test_checkpointing_lowers_the_peak():
    """Checkpointed blocks keep only their inputs for the backward pass: with 12 main layers the step's peak
    falls to well under half (measured 10.8 vs 49.6 MB here; 80 vs 412 MB at 16 layers and 1056 tokens)."""
    from zimage_mlx.transformer import TransformerArgs

    args = TransformerArgs(dim=96, n_layers=12, n_refiner_layers=1, n_heads=3, cap_feat_dim=48, axes_dims=[8, 12, 12])
    model = ZImageTransformer(args)
    T.add_lora(model, ["default"], 4, 4.0)
    shape = (1, 32, 32, 16)  # 256 image tokens
    x, eps = mx.random.normal(shape, key=mx.random.key(0)), mx.random.normal(shape, key=mx.random.key(1))
    batch = (x, eps, mx.array([0.5]), [mx.random.normal((20, 48), key=mx.random.key(2))])
    mx.eval(model.parameters(), batch)
    vg = nn.value_and_grad(model, lambda *a: T.flow_loss(model, *a))
    peaks = {}
    for on in (False, True):
        T.set_checkpointing(model, on)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        loss, grads = T.loss_and_grads(vg, *batch)
        mx.eval(loss, grads)
        peaks[on] = mx.get_peak_memory() - base
        del loss, grads
    assert peaks[True] < 0.5 * peaks[False], peaks
