"""Several Macs as one: data-, tensor- and CFG-parallel generation on `mx.distributed`.

Launch one process per Mac (or per GPU) with `mlx.launch` (ring over TCP, JACCL over Thunderbolt 5 RDMA, MPI)
and load the pipeline with the group in every process:

    group = zimage_mlx.distributed.init()                       # mx.distributed.init(), with a timeout
    pipe = ZImagePipeline.from_pretrained(model, group=group, parallel="tensor")
    images = pipe.generate("a fox", seed=1)                     # every rank calls it with the same arguments

Every rank makes the same calls with the same arguments and gets the same list of images back; rank 0 alone
should write files and print. Three ways to split the work (`parallel=`):

- "data": the images of a call (prompts x num_images) are dealt out to the ranks in rounds (image j on rank
  j % size), each made exactly as a single process makes it with its seed (`generate(prompt, seed=s)`), and
  all_gather'ed as uint8 pixels after each round, in order.
- "tensor": the DiT is sharded Megatron-style: attention heads (q, k, v rows and the output projection's
  columns) and FFN columns (w1, w3 rows, w2 columns) split over the ranks, one all-reduce after the attention
  and one after the FFN of every block (refiners included); the caption embedder's linear and the time MLP's
  second linear are split by input features the same way (one small all-reduce each). The patch embedding,
  final layer and adaLN modulations are replicated (2% of the weights). The text encoder is sharded the
  same way with mlx's `shard_linear` when the degree divides its heads, KV heads and MLP (and, quantized,
  keeps whole groups), else replicated. Each rank keeps only its slices: the weights load lazily and are
  sliced before they are evaluated, one tensor at a time (read whole from the file, then freed).
  The degree must divide the DiT's heads (30 for Z-Image: 1, 2, 3, 5, 6, 10, 15 or 30 ranks).
- "cfg": with guidance > 0, exactly two ranks: rank 0 runs the positive branch, rank 1 the negative one, and
  one all_gather per step hands each the other's prediction.
- "auto" (the API): per call, data when there are at least as many images as ranks, cfg for a CFG call on 2
  ranks, else data with some ranks idle. Tensor changes what is loaded, so it is chosen at load time; the
  CLI, which knows its images before loading, also picks tensor (`choose_mode`).

Failures: a rank that dies drops its connections and the others get MLX's "[ring] connection to a peer was
lost", raised here as `DistributedError` with one line. A rank that stops answering (a frozen host, a pulled
cable) or a host that cannot be reached at start would block the others forever: a watchdog ends the process
with one line on stderr when no progress (a collective at start, a finished denoising step, a gather) came
for `timeout` seconds: ZIMAGE_MLX_TIMEOUT, or `timeout=`, default 300 s. It must exceed the longest time one
rank computes alone (a step in tensor/cfg mode; a whole image in data mode). `mlx.launch` ends the other
ranks once one exits with an error. At start the ranks compare a checksum of their model folders (configs,
tokenizer files, safetensors names, sizes and headers) and of their settings, and refuse to run if they differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import sys
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import InputError, ZImageError
from .inputs import LATENT_CHANNELS, MAX_SEED

MODES = ("auto", "data", "tensor", "cfg")
TIMEOUT_ENV = "ZIMAGE_MLX_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
# Variables that the launchers set in every rank (mlx.launch ring/JACCL: MLX_RANK; MPI: the others).
LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE", "MLX_JACCL_COORDINATOR", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class DistributedError(ZImageError, RuntimeError):
    """The ranks cannot work together: one died, the network dropped, or their models or settings differ."""


def launched() -> bool:
    """Whether this process was started by a distributed launcher (mlx.launch, mpirun)."""
    return any(name in os.environ for name in LAUNCH_ENV)


def default_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        t = float(value)
    except ValueError:
        raise InputError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if not t > 0:
        raise InputError(f"{TIMEOUT_ENV} must be > 0 seconds, got {value}")
    return t


def init(backend: str = "any", timeout: float | None = None) -> mx.distributed.Group:
    """`mx.distributed.init` with a deadline: a rank whose peers do not all connect within `timeout` seconds
    (default ZIMAGE_MLX_TIMEOUT or 300) ends with one line instead of waiting forever. Outside a launcher it
    returns the single-process group."""
    if not launched():
        return mx.distributed.init(backend=backend)
    dog = Watchdog(default_timeout() if timeout is None else timeout, rank=os.environ.get("MLX_RANK", "?"))
    with dog.armed("connecting to the other ranks"):
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as e:
            raise DistributedError(f"cannot start the distributed backend: {e}") from None
        _all_gather_bytes(group, b"\0")  # a first collective: every rank is there
    return group


# ----------------------------------------------------------------------------------------------
# Choosing and checking a mode


def working_degrees(n_heads: int) -> list[int]:
    """The tensor-parallel degrees that split n_heads attention heads evenly."""
    return [d for d in range(1, n_heads + 1) if n_heads % d == 0]


def check_degree(n_heads: int, size: int) -> None:
    """Raise InputError unless `size` ranks can split n_heads heads, naming the degrees that can."""
    if n_heads % size:
        ok = [str(d) for d in working_degrees(n_heads)]
        ok = ok[0] if len(ok) == 1 else f"{', '.join(ok[:-1])} or {ok[-1]}"
        raise InputError(f"tensor parallelism over {size} ranks cannot split the DiT's {n_heads} attention heads "
                         f"evenly: use {ok} ranks, or data parallelism")


def choose_mode(mode: str, size: int, n_images: int, guidance: float) -> str:
    """The mode for a job of n_images: `mode` unless "auto"; auto is data when there are at least as many
    images as ranks, cfg for a CFG job on 2 ranks, else tensor."""
    if mode not in MODES:
        raise InputError(f"parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    if n_images >= size:
        return "data"
    if guidance > 0 and size == 2:
        return "cfg"
    return "tensor"


# ----------------------------------------------------------------------------------------------
# Watchdog


# The watchdog's other process: MLX's collectives (and its backends' connection at init) hold Python's GIL
# while they wait, so no thread of the rank can act; a small process of its own can. It reads lines from
# its stdin: a label arms it (or beats), "-" disarms it; end of input (the rank exited) ends it.
_WATCHER = r"""
import os, select, signal, sys, time
pid, timeout, rank, env = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
deadline, what, buf = None, "", b""
while True:
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    ready, _, _ = select.select([0], [], [], wait)
    if ready:
        data = os.read(0, 65536)
        if not data:
            sys.exit(0)
        *lines, buf = (buf + data).split(b"\n")
        for line in lines:
            if line == b"-":
                deadline = None
            else:
                what, deadline = line.decode(errors="replace"), time.monotonic() + timeout
    elif deadline is not None:
        sys.stderr.write(f"zimage-mlx: rank {rank}: no progress for {timeout:g} s while {what}: another rank "
                         f"stopped or cannot be reached; ending the job (set {env} to wait longer)\n")
        sys.stderr.flush()
        os.kill(pid, signal.SIGTERM)
        time.sleep(5)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sys.exit(0)
"""


class Watchdog:
    """Ends the process (SIGTERM, then SIGKILL) with one line on stderr when, while armed, no `beat()` came
    for `timeout` seconds.

    MLX's collectives have no timeout of their own: a peer that stops answering without closing its
    connection (a frozen host, a pulled cable, a peer that never started) blocks them forever, with the
    GIL held. The deadline is therefore kept by a small watcher process that the rank feeds through a pipe."""

    def __init__(self, timeout: float, rank="?"):
        self.timeout = float(timeout)
        self.rank = rank
        self._depth = 0
        self._what = ""
        self._proc = None

    def _send(self, line: str) -> None:
        if self._proc is None:
            import subprocess

            self._proc = subprocess.Popen(
                [sys.executable, "-c", _WATCHER, str(os.getpid()), repr(self.timeout), str(self.rank), TIMEOUT_ENV],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        try:
            self._proc.stdin.write((line.replace("\n", " ") + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the watcher is gone: nothing to guard with

    @contextmanager
    def armed(self, what: str):
        if self._depth == 0:
            self._what = what
            self.beat()
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._send("-")

    def beat(self) -> None:
        self._send(self._what)


# ----------------------------------------------------------------------------------------------
# Collectives on host data


def _all_gather_bytes(group, data: bytes) -> list[bytes]:
    """Each rank's bytes (all of the same length), in rank order."""
    x = mx.array(np.frombuffer(data, dtype=np.uint8))
    out = mx.distributed.all_gather(x, group=group)
    mx.eval(out)
    arr = np.array(out).reshape(group.size(), len(data))
    return [row.tobytes() for row in arr]


def _lost(e: RuntimeError, rank: int) -> DistributedError:
    return DistributedError(f"rank {rank} lost its connection to another rank (it died or the network dropped): "
                            f"the job ends on every rank ({' '.join(str(e).split())})")


def fingerprint(root: Path) -> bytes:
    """sha256 of what must agree across ranks in a checkpoint folder: its JSON files (configs, tokenizer,
    indexes), and each safetensors file's name, size and header (names, dtypes, shapes, offsets) but not its
    weights, which would take minutes to hash."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel or path.name == "latent_rgb.json":
            continue  # hidden files and the fast preview's cached map (preview.CACHE_NAME) may differ
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                header = f.read(min(n, 100_000_000))
            h.update(f"{rel}:{path.stat().st_size}:".encode() + header)
        elif path.suffix in (".json", ".txt", ".model", ".jinja"):
            h.update(f"{rel}:".encode() + path.read_bytes())
    return h.digest()


def check_same(group, items: dict[str, bytes]) -> None:
    """Refuse to start unless every rank has the same digest for each item (rank 0's is the reference)."""
    names = list(items)
    mine = b"".join(hashlib.sha256(items[k]).digest() for k in names)
    rows = _all_gather_bytes(group, mine)
    for i, name in enumerate(names):
        part = [r[32 * i: 32 * (i + 1)] for r in rows]
        differ = [r for r in range(group.size()) if part[r] != part[0]]
        if differ:
            raise DistributedError(f"rank{'s' * (len(differ) > 1)} {', '.join(map(str, differ))} "
                                   f"{'have' if len(differ) > 1 else 'has'} another {name} than rank 0: "
                                   f"give every rank the same model folder and the same options")


# ----------------------------------------------------------------------------------------------
# Tensor parallelism: slicing Linear and QuantizedLinear layers


def _bounds(n: int, size: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """Rank's [start, stop) of n items split into near-equal parts of whole `unit`s (n % unit == 0)."""
    units = n // unit
    return unit * (units * rank // size), unit * (units * (rank + 1) // size)


def _take_rows(linear: nn.Module, start: int, stop: int) -> None:
    """Keep output features [start, stop) (weight rows; scales, biases, bias follow)."""
    for name in ("weight", "scales", "biases", "bias"):
        if name in linear:
            linear[name] = mx.contiguous(linear[name][start:stop])


def _take_columns(linear: nn.Module, start: int, stop: int) -> None:
    """Keep input features [start, stop); a quantized layer's packed weight and its groups follow."""
    if isinstance(linear, nn.QuantizedLinear):
        g, bits = linear.group_size, linear.bits
        if start % g or stop % g:
            raise InputError(f"cannot cut a layer quantized in groups of {g} at input feature {start}:{stop}")
        linear.weight = mx.contiguous(linear.weight[:, start * bits // 32: stop * bits // 32])
        linear.scales = mx.contiguous(linear.scales[:, start // g: stop // g])
        if "biases" in linear:
            linear.biases = mx.contiguous(linear.biases[:, start // g: stop // g])
    else:
        linear.weight = mx.contiguous(linear.weight[:, start:stop])


class ShardedToAll(nn.Module):
    """A linear layer cut along its input features: this rank multiplies its slice of the input, the partial
    outputs are summed over the group (one all-reduce), and the bias is added once after the sum.

    `input_slice` cuts a full input (the caption embedder's input arrives whole); None takes it as sharded."""

    def __init__(self, linear: nn.Module, start: int, stop: int, group, input_slice: bool = False):
        super().__init__()
        if "bias" in linear:
            self.bias = linear.bias
            del linear["bias"]
        _take_columns(linear, start, stop)
        self.linear = linear
        self.group = group
        self.input_slice = (start, stop) if input_slice else None

    def __call__(self, x: mx.array) -> mx.array:
        if self.input_slice is not None:
            x = x[..., self.input_slice[0]: self.input_slice[1]]
        from .transformer import _linear  # the GEMM in x's dtype, as every DiT layer

        y = mx.distributed.all_sum(_linear(self.linear, x), group=self.group)
        return y + self.bias.astype(y.dtype) if "bias" in self else y


def _unit(linear: nn.Module, n: int) -> int:
    """The granularity to cut n input features at: the quantization group if quantized; else 64 where n allows,
    so that the slices can be quantized on the fly in groups of 64."""
    if isinstance(linear, nn.QuantizedLinear):
        return linear.group_size
    return 64 if n % 64 == 0 else 1


def shard_transformer(model, group) -> None:
    """Shard a ZImageTransformer in place for tensor parallelism over `group` (see the module docstring).

    Call it before the weights are evaluated: then each rank reads only the slices it keeps."""
    size, rank = group.size(), group.rank()
    args = model.args
    check_degree(args.n_heads, size)
    h0, h1 = _bounds(args.n_heads, size, rank)
    hd = args.head_dim
    for block in list(model.noise_refiner) + list(model.context_refiner) + list(model.layers):
        attn, ffn = block.attention, block.feed_forward
        for name in ("to_q", "to_k", "to_v"):
            _take_rows(attn[name], h0 * hd, h1 * hd)
        attn.to_out[0] = ShardedToAll(attn.to_out[0], h0 * hd, h1 * hd, group)
        attn.n_heads = h1 - h0
        hidden = ffn.w1.weight.shape[0]
        c0, c1 = _bounds(hidden, size, rank, _unit(ffn.w2, hidden))
        _take_rows(ffn.w1, c0, c1)
        _take_rows(ffn.w3, c0, c1)
        ffn.w2 = ShardedToAll(ffn.w2, c0, c1, group)
    mlp = model.t_embedder.mlp
    n = mlp[0].weight.shape[0]
    j0, j1 = _bounds(n, size, rank, _unit(mlp[2], n))
    _take_rows(mlp[0], j0, j1)
    mlp[2] = ShardedToAll(mlp[2], j0, j1, group)
    cap = model.cap_embedder[1]
    n = args.cap_feat_dim
    k0, k1 = _bounds(n, size, rank, _unit(cap, n))
    model.cap_embedder[1] = ShardedToAll(cap, k0, k1, group, input_slice=True)


def text_encoder_shardable(args, size: int) -> bool:
    """Whether mlx's shard_linear can split this Qwen3's heads, KV heads and MLP evenly over size ranks."""
    return all(n % size == 0 for n in (args.num_attention_heads, args.num_key_value_heads, args.intermediate_size))


def shard_text_encoder(model, group) -> bool:
    """Shard the Qwen3 encoder's attention and MLP in place with mlx's shard_linear (as mlx-lm's Qwen3 does);
    returns False, leaving it whole, when the degree does not divide its heads (or, quantized, cuts groups)."""
    size = group.size()
    if not text_encoder_shardable(model.args, size):
        return False
    a = model.args
    head_dim = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
    q = model.layers[0].self_attn.o_proj
    if isinstance(q, nn.QuantizedLinear) and any(
            (n // size) % q.group_size for n in (a.num_attention_heads * head_dim, a.intermediate_size)):
        return False  # the row-split layers' slices must hold whole quantization groups
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, nn.layers.distributed.shard_linear(getattr(attn, name), "all-to-sharded", group=group))
        attn.o_proj = nn.layers.distributed.shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads //= size
        attn.n_kv_heads //= size
        mlp.gate_proj = nn.layers.distributed.shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.up_proj = nn.layers.distributed.shard_linear(mlp.up_proj, "all-to-sharded", group=group)
        mlp.down_proj = nn.layers.distributed.shard_linear(mlp.down_proj, "sharded-to-all", group=group)
    return True


def load_sharded_transformer(folder: Path, group, dtype: str, quantize: int | None):
    """The DiT's shard for this rank: loaded lazily, sliced, then evaluated one tensor at a time (each read
    whole from disk, only its slice kept); quantized on the fly after slicing when asked."""
    from .transformer import ZImageTransformer, quant_predicate
    from .sources import read_config
    from .weights import quantize_model

    stored = bool(read_config(folder).get("quantization"))
    model = ZImageTransformer.from_pretrained(folder, dtype=dtype, quantize=quantize if stored else None)
    shard_transformer(model, group)
    if quantize is not None and not stored:
        quantize_model(model, quant_predicate(quantize))  # evaluates, one parameter at a time
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)
    return model


# ----------------------------------------------------------------------------------------------
# The pipeline's partner


class Parallel:
    """How a pipeline loaded with a group shares the work; `pipe.parallel`. Made by `from_pretrained`."""

    def __init__(self, group, mode: str, timeout: float | None = None):
        if mode not in MODES:
            raise InputError(f"parallel must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "cfg" and group.size() != 2:
            raise InputError(f"cfg parallelism runs the two CFG branches on exactly 2 ranks, not {group.size()}: "
                             "use --parallel data or tensor")
        self.group = group
        self.mode = mode
        self.rank, self.size = group.rank(), group.size()
        self.watchdog = Watchdog(default_timeout() if timeout is None else timeout, self.rank)
        self.text_encoder_sharded = False
        self._serial = False

    def __repr__(self) -> str:
        return f"Parallel(mode={self.mode!r}, rank={self.rank}, size={self.size})"

    @contextmanager
    def collective(self, what: str):
        """Arm the watchdog and turn a lost connection into a DistributedError."""
        with self.watchdog.armed(what):
            try:
                yield
            except RuntimeError as e:
                if isinstance(e, DistributedError) or not _is_lost(e):
                    raise
                raise _lost(e, self.rank) from None

    def check_start(self, root: Path, settings: dict) -> None:
        """Refuse to start unless every rank has the same model folder and the same settings."""
        with self.collective("comparing the model folders"):
            check_same(self.group, {"model folder (configs and weight files)": fingerprint(root),
                                    "settings (mode, dtype, quantization)": json.dumps(settings, sort_keys=True).encode()})

    # Loading
    def load_transformer(self, folder: Path, dtype: str, quantize: int | None):
        if self.mode == "tensor":
            return load_sharded_transformer(folder, self.group, dtype, quantize)
        from .transformer import ZImageTransformer

        return ZImageTransformer.from_pretrained(folder, dtype=dtype, quantize=quantize)

    def prepare_text_encoder(self, model) -> None:
        if self.mode == "tensor":
            self.text_encoder_sharded = shard_text_encoder(model, self.group)

    # Generating
    @contextmanager
    def serial(self):
        """Calls to the pipeline inside run on this rank alone (the data mode's own images)."""
        old, self._serial = self._serial, True
        try:
            yield
        finally:
            self._serial = old

    @property
    def active(self) -> bool:
        return not self._serial

    def agree_seed(self, seed: int | None) -> int:
        """Rank 0's seed when none was given, so that every rank draws the same noise."""
        if seed is not None:  # a seed or a list of them
            return seed
        mine = random.randint(0, MAX_SEED).to_bytes(4, "little")
        return int.from_bytes(_all_gather_bytes(self.group, mine)[0], "little")

    def run(self, pipe, recipe, *, latents: mx.array | None = None, on_step=None, cancel=None, release: bool = False,
            on_image=None) -> list:
        """`pipe.run(recipe)` over the group (called by it, with the recipe prepared): every rank calls it with
        the same arguments and gets every image back, in `recipe.images()` order, each carrying its one-image
        recipe (`info["recipe"]`) and, without `latents`, its seed. `on_image(j, image)` is called on rank 0
        alone, in order (rank 0 writes the files). `release`: the process's last use of the pipeline.

        The mode: the pipeline's, or for "auto" cfg when guidance > 0 on 2 ranks with fewer images than ranks,
        else data. cfg and tensor run the whole recipe on every rank together; data deals image j out to rank
        j % size in rounds, each made alone as one process makes it, and gathers each round."""
        if recipe.seed is None:
            recipe = recipe.replace(seed=self.agree_seed(None))
        items = recipe.images()
        n = len(items)
        if latents is not None and (latents.ndim != 4 or latents.shape[0] != n or tuple(latents.shape[1:]) != (
                recipe.height // 8, recipe.width // 8, LATENT_CHANNELS)):
            raise InputError(f"latents must have shape {(n, recipe.height // 8, recipe.width // 8, LATENT_CHANNELS)}, "
                             f"got {tuple(latents.shape)}", "latents")
        mode = self.mode
        if mode == "auto":
            mode = "cfg" if recipe.guidance > 0 and self.size == 2 and n < self.size else "data"

        def beat(step):
            self.watchdog.beat()
            if on_step is not None:
                on_step(step)

        with self.collective("generating"):
            if mode != "data":
                with self.serial(), self._mode(mode):
                    return pipe.run(recipe, latents=latents, on_step=beat, cancel=cancel, release=release,
                                    on_image=on_image if self.rank == 0 else None)
            return self._run_data(pipe, recipe, items, latents, beat, cancel, release, on_image)

    @contextmanager
    def _mode(self, mode: str):
        old, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = old

    def _run_data(self, pipe, recipe, items: list, latents, on_step, cancel, release: bool, on_image) -> list:
        """The data mode: image j (a one-image recipe of `recipe.images()`) on rank j % size, in rounds."""
        n = len(items)
        z = recipe.init_latents  # the image's latents: one for every image, or one per image
        per_image = z is not None and n > 1 and z.shape[0] == n
        enhance = recipe.enhance and recipe.original_prompt is None  # each rank rewrites its own images' prompts
        last = max(range(self.rank, n, self.size), default=None)
        described = [pipe.describe(r) for r in items]  # before a rank's last image frees its ControlNet
        images = []
        for first in range(0, n, self.size):
            j = first + self.rank
            mine = None
            if j < n:
                one = items[j].replace(init_latents=z[j: j + 1]) if per_image else items[j]
                with self.serial():
                    mine = pipe.run(one, latents=None if latents is None else latents[j: j + 1], on_step=on_step,
                                    cancel=cancel, release=release and j == last)[0]
                self.watchdog.beat()
            rewrites = self._gather_text(mine.info["recipe"].prompt if mine is not None else None) if enhance else None
            for k, image in enumerate(self.gather_images(mine)):
                if first + k >= n:
                    continue
                r = described[first + k]
                if rewrites is not None:
                    r = r.replace(prompt=rewrites[k], original_prompt=r.prompt)
                image.info["recipe"] = r
                if latents is None:
                    image.info["seed"] = r.seed
                images.append(image)
                if on_image is not None and self.rank == 0:
                    on_image(first + k, image)
        return images

    def _gather_text(self, text: str | None) -> list:
        """One string (or None) per rank -> every rank's, in rank order."""
        data = b"" if text is None else b"\1" + text.encode()
        with self.collective("gathering the prompts"):
            sizes = [int.from_bytes(b, "little") for b in _all_gather_bytes(self.group, len(data).to_bytes(8, "little"))]
            rows = _all_gather_bytes(self.group, data.ljust(max(sizes), b"\0")) if max(sizes) else [b""] * self.size
        return [row[1: size].decode() if size else None for row, size in zip(rows, sizes)]

    def gather_images(self, image) -> list:
        """One PIL image (or None) per rank -> every rank's image, in rank order (None where a rank had none).
        Images travel as uint8 RGB pixels with their width and height; all must have the same size."""
        from PIL import Image

        shape = np.array(image.size[::-1] + (3,) if image is not None else (0, 0, 0), dtype=np.int64)
        with self.collective("gathering the images"):
            shapes = np.frombuffer(b"".join(_all_gather_bytes(self.group, shape.tobytes())), dtype=np.int64)
            shapes = shapes.reshape(self.size, 3)
            full = shapes[shapes[:, 0] > 0]
            if len(full) and (full != full[0]).any():
                raise InputError("data parallelism needs images of one size in a call")
            h, w, _ = full[0] if len(full) else (0, 0, 0)
            pixels = np.zeros((1, h, w, 3), dtype=np.uint8)
            if image is not None:
                pixels[0] = np.asarray(image.convert("RGB"))
            out = mx.distributed.all_gather(mx.array(pixels), group=self.group)
            mx.eval(out)
            self.watchdog.beat()
        arr = np.array(out)
        return [Image.fromarray(arr[r]) if shapes[r, 0] else None for r in range(self.size)]

    def guided(self, dit, x: mx.array, t: mx.array, positive: list, negative: list, **kw) -> mx.array:
        """The cfg mode's DiT call: this rank's branch, then one all_gather: (2B, ...) positive then negative,
        as the single-process batch of both."""
        mine = dit(x, t, positive if self.rank == 0 else negative, **kw)
        return mx.distributed.all_gather(mine, group=self.group)


def _is_lost(e: RuntimeError) -> bool:
    text = str(e).lower()
    return "[ring]" in text or "[jaccl]" in text or "peer" in text or "[mpi]" in text


def start(group, mode: str, root: Path, *, dtype: str, quantize: int | None, timeout: float | None) -> Parallel:
    """A Parallel for `from_pretrained`: checks the mode against the model and compares the ranks' folders."""
    from .transformer import TransformerArgs
    from .sources import read_config

    par = Parallel(group, mode, timeout)
    if mode == "tensor":
        check_degree(TransformerArgs.from_dict(read_config(Path(root) / "transformer")).n_heads, group.size())
    par.check_start(root, {"parallel": mode, "dtype": dtype, "quantize": quantize})
    return par
