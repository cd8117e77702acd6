"""One DiT forward of mflux's Z-Image transformer on given weights and inputs; run by the mflux venv's python.

benchmarks/dit_speed.py calls this in a subprocess so that mflux (which pins its own mlx) never enters our
environment. The venv:

    python3 -m venv /work/venvs/mflux && /work/venvs/mflux/bin/pip install mflux==0.24.0
    # Linux: mflux pulls mlx[cuda13]; without a GPU swap in the CPU build of the same mlx:
    /work/venvs/mflux/bin/pip uninstall -y mlx-cuda-13 && /work/venvs/mflux/bin/pip install "mlx[cpu]==0.32.2"

Input: a safetensors file with the state_dict of diffusers' ZImageTransformer2DModel (the key names of
transformer/diffusion_pytorch_model*.safetensors in Tongyi-MAI/Z-Image-Turbo) and its diffusers config as
JSON. Optional inputs (.npz with x (16, h, w) or (1, 16, h, w), t (scalar, model time 1 - sigma) and cap
(L, cap_feat_dim)); random ones otherwise. Prints one JSON line.

How mflux is driven (mflux 0.24.0, read from site-packages/mflux/models/z_image/):
- Model: mflux.models.z_image.model.z_image_transformer.transformer.ZImageTransformer. Its constructor takes
  the diffusers config values as keyword arguments (patch_size, f_patch_size, in_channels, dim, n_layers,
  n_refiner_layers, n_heads, norm_eps, qk_norm, cap_feat_dim, rope_theta, t_scale, axes_dims, axes_lens);
  only mflux's loader (ZImageInitializer) builds it with the full-size defaults, so no patching is needed.
  Not configurable there, and checked against the config instead: n_kv_heads (no GQA; must equal n_heads),
  the FFN width (int(dim / 3 * 8), as in diffusers), the timestep MLP width (1024) and one patch size.
- Weights: mflux's own declarative mapping, ZImageWeightMapping.get_transformer_mapping(), applied with
  mflux's WeightMapper (the same two calls WeightLoader makes). Its {layer} placeholder is expanded for
  noise_refiner, context_refiner and layers alike, with num_layers fixed at 30 in ZImageWeightDefinition, so
  it is passed here as max(n_layers, n_refiner_layers). Weights stay float32 (mflux's loader would cast to
  ModelConfig.precision, bfloat16); every mflux parameter must be assigned, and no source key may be left.
- Forward: transformer(x=(16, 1, h, w), timestep=(1,) array of 1 - sigma, sigmas=unused, cap_feats=(L, D)).
  It returns (16, 1, h, w) and NEGATES the prediction (`return -output`, for mflux's own scheduler step), so
  its output is -1 times diffusers' (and zimage-mlx's); the .npy written is mflux's raw output.
- float32: set_float32(True) is mflux's --float32 option (keeps the timestep embedding and RoPE output in
  float32; otherwise the stream is cast to ModelConfig.precision, bfloat16). Other dtypes cast the
  parameters and set ModelConfig.precision, as mflux's bfloat16 default does.
- mflux's pipeline wraps the forward in mx.compile (ZImage._predict, on every machine but M1/M2); --compile
  also times that, in rounds with MLX's GEMM rate measured between them (rounds_compiled, gemm_gflops). "seconds" is the plain module call, the way dit_speed.py times zimage-mlx.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib.metadata import version

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mflux.models.common.config.model_config import ModelConfig
from mflux.models.common.weights.mapping.weight_mapper import WeightMapper
from mflux.models.z_image.model.z_image_transformer.transformer import ZImageTransformer
from mflux.models.z_image.weights.z_image_weight_mapping import ZImageWeightMapping

from dit_speed import gemm_meter, interleaved, timeit  # this folder; needs only mlx and numpy to import


def build(cfg: dict) -> ZImageTransformer:
    (patch,), (f_patch,) = cfg["all_patch_size"], cfg["all_f_patch_size"]
    if cfg.get("n_kv_heads", cfg["n_heads"]) != cfg["n_heads"]:
        raise ValueError("mflux's Z-Image attention has no grouped KV heads: n_kv_heads must equal n_heads")
    return ZImageTransformer(
        patch_size=patch, f_patch_size=f_patch, in_channels=cfg["in_channels"], dim=cfg["dim"],
        n_layers=cfg["n_layers"], n_refiner_layers=cfg["n_refiner_layers"], n_heads=cfg["n_heads"],
        norm_eps=cfg["norm_eps"], qk_norm=cfg["qk_norm"], cap_feat_dim=cfg["cap_feat_dim"],
        rope_theta=cfg["rope_theta"], t_scale=cfg["t_scale"], axes_dims=list(cfg["axes_dims"]),
        axes_lens=list(cfg["axes_lens"]),
    )


def load(model: ZImageTransformer, path: str, cfg: dict) -> int:
    raw = mx.load(path)
    mapping = ZImageWeightMapping.get_transformer_mapping()
    n = max(cfg["n_layers"], cfg["n_refiner_layers"])
    missing = WeightMapper.missing_required_names(raw, mapping, num_layers=n)
    unmapped = WeightMapper.unmapped_names(raw, mapping, num_layers=n)
    if missing or unmapped:
        raise ValueError(f"weights do not fit mflux's mapping: missing {missing[:5]}, unmapped {unmapped[:5]}")
    mapped = dict(tree_flatten(WeightMapper.apply_mapping(raw, mapping, num_layers=n)))
    ours = dict(tree_flatten(model.parameters()))
    bad = sorted(set(ours) ^ set(mapped)) + [k for k in ours if k in mapped and ours[k].shape != mapped[k].shape]
    if bad:
        raise ValueError(f"mapped weights do not match mflux's parameters: {bad[:5]}")
    model.load_weights(list(mapped.items()), strict=True)
    return sum(v.size for v in mapped.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True, help="safetensors with diffusers' ZImageTransformer2DModel keys")
    ap.add_argument("--config", required=True, help="the diffusers transformer config (JSON)")
    ap.add_argument("--inputs", help=".npz with x, t, cap (as written by dit_speed.py); random if absent")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (random inputs only)")
    ap.add_argument("--caption", type=int, default=32, help="caption tokens (random inputs only)")
    ap.add_argument("--t", type=float, default=0.3, help="model time 1 - sigma (random inputs only)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true", help="also time mx.compile'd forward, as mflux runs it")
    ap.add_argument("--out", help="write mflux's raw output (16, 1, h, w), float32, to this .npy")
    args = ap.parse_args()

    with open(args.config) as f:
        cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    if args.inputs:
        data = np.load(args.inputs)
        x, t, cap = data["x"].reshape(cfg["in_channels"], *data["x"].shape[-2:]), float(data["t"]), data["cap"]
    else:
        rng = np.random.default_rng(0)
        h = w = args.size // 8
        x = rng.standard_normal((cfg["in_channels"], h, w)).astype(np.float32)
        cap = rng.standard_normal((args.caption, cfg["cap_feat_dim"])).astype(np.float32)
        t = args.t

    t0 = time.perf_counter()
    model = build(cfg)
    n_params = load(model, args.weights, cfg)
    dtype = getattr(mx, args.dtype)
    if dtype == mx.float32:
        model.set_float32(True)
    else:
        ModelConfig.precision = dtype
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t0

    xm = mx.array(x[:, None]).astype(dtype)  # (C, F=1, h, w), mflux's latent layout
    tm = mx.array([t], dtype=mx.float32)
    cm = mx.array(cap).astype(dtype)
    sigmas = mx.array([1.0 - t])  # read only when timestep is an int index

    def forward(x, t, c):
        return model(x=x, timestep=t, sigmas=sigmas, cap_feats=c)

    out = forward(xm, tm, cm)
    mx.eval(out)
    result = dict(
        seconds=timeit(lambda: mx.eval(forward(xm, tm, cm)), args.repeat),
        output_abs_mean=float(mx.abs(out.astype(mx.float32)).mean()),
        output_shape=list(out.shape),
        output_sign=-1,  # mflux returns -(diffusers' prediction)
        n_params=int(n_params),
        load_seconds=round(load_s, 2),
        dtype=args.dtype,
        image_tokens=(x.shape[-2] // 2) * (x.shape[-1] // 2),
        caption_tokens=int(cap.shape[0]),
        mflux_version=version("mflux"),
        mlx_version=mx.__version__,
    )
    if args.compile:
        compiled = mx.compile(forward)
        # Rounds with the GEMM measured between them, as dit_speed.py times zimage-mlx.
        n_tokens = result["image_tokens"] + result["caption_tokens"]
        gemm = gemm_meter(n_tokens, cfg["dim"], int(cfg["dim"] / 3 * 8))
        rounds, rates = interleaved({"compiled": lambda: mx.eval(compiled(xm, tm, cm))}, gemm, args.repeat)
        result["rounds_compiled"], result["gemm_gflops"] = rounds["compiled"], rates
        result["seconds_compiled"] = statistics.median(rounds["compiled"])
        result["compiled_max_abs_diff"] = float(mx.abs(compiled(xm, tm, cm) - out).max())
    if args.out:
        np.save(args.out, np.array(out.astype(mx.float32)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
