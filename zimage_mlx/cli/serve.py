"""`zimage-mlx serve`: the model behind HTTP (the OpenAI images API, an A1111 subset, a job API, a page)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .common import Command, UserError, expected_errors, slow_blas_hint
from .options import DEFAULT_MODEL, bits, dtype_option, low_memory_option, quantize_option


@click.command("serve", cls=Command)
@click.option("-m", "--model", "models", multiple=True, metavar="[NAME=]MODEL",
              help=f"A Hugging Face repo id or a checkpoint folder (default {DEFAULT_MODEL}), loaded at start. Repeat "
                   "to serve several: requests choose one by name (NAME, else the folder's or repo's last part); the "
                   "first is the default and loaded at start, and one is resident at a time (swapped between jobs).")
@quantize_option()
@low_memory_option()
@dtype_option()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback needs --api-key (or --insecure-no-auth).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port; 0 picks a free one.")
@click.option("--api-key", envvar="ZIMAGE_MLX_API_KEY", metavar="KEY",
              help="Require this key (Authorization: Bearer KEY or X-API-Key: KEY) on every route but /health and "
                   "the page. "
                   "Also read from ZIMAGE_MLX_API_KEY, which keeps it out of `ps`.")
@click.option("--queue-size", type=click.IntRange(1, 1000), default=8, show_default=True,
              help="Jobs that may wait behind the running one; more get 503 with Retry-After.")
@click.option("--lora-dir", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Folder of .safetensors LoRAs that requests may name (by file name, without the extension).")
@click.option("--controlnet", metavar="FILE",
              help="A ControlNet Union file (or folder, or Hub id) loaded beside the model: jobs may then send a "
                   "control image (`control`, with control_type and control_scale); requests never name a file.")
@click.option("--max-side", type=click.IntRange(16, 8192), default=2048, show_default=True,
              help="Largest width or height a request may ask for (a multiple of 16).")
@click.option("--max-n", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Most images per request (ComfyUI's OpenAI nodes allow 8); they are denoised as many at a time as "
                   "fit in memory.")
@click.option("--max-steps", type=click.IntRange(1, 1000), default=50, show_default=True, help="Most steps per request.")
@click.option("--max-body", type=click.FloatRange(0.001, 4096), default=64, show_default=True, metavar="MB",
              help="Largest request body, in MB (uploads included); larger ones get 413.")
@click.option("--allowed-host", "allowed_host", multiple=True, metavar="NAME",
              help="Also accept this Host header (besides localhost, 127.0.0.1, [::1], host.docker.internal); repeat.")
@click.option("--output-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write every finished image here (PNG with its recipe, as `generate` writes it), indexed for "
                   "GET /v1/history and the page's gallery; kept across restarts. Without it the last 200 are "
                   "kept in memory.")
@click.option("--idle-unload", type=click.FloatRange(min=1), metavar="SECONDS",
              help="Free the models after this long without a job; the next job loads them again.")
@click.option("--insecure-no-auth", is_flag=True, help="Allow a non-loopback --host without --api-key.")
def serve(models, quantize, low_memory, dtype, host, port, api_key, queue_size, lora_dir, controlnet, max_side, max_n, max_steps,
          max_body, allowed_host, output_dir, idle_unload, insecure_no_auth):
    """Serve the model over HTTP: the OpenAI images API, an A1111 subset, a job API with live previews, and a
    web page at /. Prints `listening on http://HOST:PORT` at once, then loads the model: /health says
    `loading` until it is ready, and requests sent meanwhile wait in the queue.

    \b
      zimage-mlx serve --port 8000
      curl http://127.0.0.1:8000/v1/images/generations -H 'Content-Type: application/json' \\
           -d '{"prompt": "a red fox in the snow", "size": "1024x1024", "seed": 42}'
    """
    import ipaddress

    if max_side % 16:
        raise UserError(f"--max-side must be a multiple of 16, got {max_side}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name
        loopback = False
    if not loopback and not api_key and not insecure_no_auth:
        raise UserError(f"--host {host} is reachable from other machines: give --api-key KEY (or set "
                        "ZIMAGE_MLX_API_KEY), or pass --insecure-no-auth if you really mean it")
    try:
        from ..server import ServerConfig, allowed_hosts, serve as run_server
        from ..worker import Worker
    except ImportError as e:
        raise UserError(f"the server needs its extra dependencies: pip install 'zimage-mlx[serve]' ({e})") from None
    try:
        from ..server import bind_socket

        sock = bind_socket(host, port)  # a taken port or a bad address fails here, before anything loads
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    quantize = bits(quantize)
    served = model_names(models or (DEFAULT_MODEL,))
    controlnet_label = None
    if controlnet:
        from ..weights import model_label

        controlnet_label = model_label(controlnet)  # its name, never its path
    (name, model), others = served[0], served[1:]
    cfg = ServerConfig(model_id=name, model_aliases=(model,), models={n: (m,) for n, m in others},
                       api_key=api_key or None,
                       allowed_hosts=allowed_hosts(host, allowed_host), max_side=max_side, max_n=max_n,
                       max_steps=max_steps, max_body=int(max_body * 2**20),
                       lora_dir=Path(lora_dir) if lora_dir else None, controlnet=controlnet_label,
                       output_dir=Path(output_dir).expanduser() if output_dir else None,
                       default_width=min(1024, max_side), default_height=min(1024, max_side))
    loaders = {n: (lambda m=m: load_model(runner, m, dtype, quantize, low_memory, controlnet, controlnet_label))
               for n, m in served}
    runner = Worker(loaders if len(loaders) > 1 else loaders[name], queue_size=queue_size, idle_unload=idle_unload)
    with expected_errors():  # a load failure: one line, exit 1
        run_server(runner, cfg, host, port, sock=sock, announce=lambda line: click.echo(line) or sys.stdout.flush())
    # Shut down cleanly (jobs answered, worker stopped). MLX 0.32 on Linux aborts now and then in its static
    # destructors once a worker thread has used it (exit code 134), so the process ends here with code 0.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def model_names(specs) -> list[tuple[str, str]]:
    """--model values ([NAME=]MODEL) -> [(name, model)]: NAME, else the folder's or repo's last part, lower case."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, eq, model = spec.partition("=")
        if not eq or "/" in name or not name.strip() or not model or Path(spec).exists():
            name, model = Path(spec.rstrip("/")).name.lower() or "z-image", spec
        name = name.strip()
        if any(name.lower() == n.lower() for n, _ in out):
            raise UserError(f"two models are named {name!r}: give one a name with --model NAME={model}")
        out.append((name, model))
    return out


def load_model(runner, model: str, dtype, quantize, low_memory, controlnet=None, controlnet_label=None):
    """On the worker thread: find (or download) the checkpoint, then load it (and the ControlNet beside it),
    saying each phase on stderr and to the worker (for /health)."""
    import time

    from ..pipeline import ZImagePipeline
    from ..sources import resolve_model
    from ..weights import model_label

    t0 = time.perf_counter()
    runner.report_load("download")
    click.echo(f"loading {model}: finding the checkpoint (downloading it if needed) ...", err=True)
    path = resolve_model(model)
    runner.report_load("load")
    pipe = ZImagePipeline.from_pretrained(path, dtype=dtype, quantize=quantize, low_memory=low_memory,
                                          label=model_label(model))  # the Hub id, not the cache folder
    if controlnet:
        runner.report_load("controlnet")
        net = pipe.load_controlnet(controlnet, label=controlnet_label)
        click.echo(f"ControlNet {controlnet_label}: {net.args.name}, graph {net.graph}", err=True)
    click.echo(f"model ready in {time.perf_counter() - t0:.1f} s", err=True)
    slow_blas_hint()
    return pipe
