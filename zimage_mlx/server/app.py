"""The app: configuration, the error envelope, the guard (Host, API key, body cap), routes, and serving.

Layers: `zimage_mlx.worker.Worker` owns the model on one thread and runs one `Recipe` at a time; each
dialect (openai.py, a1111.py, jobs.py) parses a request into a Recipe, which checks itself, submits it, and
presents the job. Errors always use OpenAI's envelope {"error": {"message", "type", "param", "code"}},
produced in one place (`ApiError`).

Policy (docs/server.md describes it for users):
- A parameter that would change the image and cannot be honoured is refused with a 400 naming it;
  fields that change nothing visible (user, quality, style, moderation) are accepted and ignored.
- Sizes are refused, never snapped. A request never names a file or URL: LoRAs are names in --lora-dir.
- A synchronous request (OpenAI, A1111) whose client disconnects cancels its job, queued or running.
- Security: loopback bind by default, optional key (Bearer, X-API-Key, or Basic auth whose password is the
  key; 401, or 403 under /proxy/openai where ComfyUI rewrites 401) on every route but /health and the static
  page at /, Host header allow-list against DNS rebinding (loopback names, the bound address, --allowed-host;
  on any bind), body cap, pixel cap.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..worker import Worker
from .a1111 import routes as a1111_routes
from .jobs import routes as job_routes
from .openai import routes as openai_routes
from .page import routes as page_routes
from .studio import routes as studio_routes
from .core import LOOPBACK_NAMES, ApiError, Server, ServerConfig, bad

log = logging.getLogger("zimage_mlx.server")


# ---------------------------------------------------------------------------------------------------
# Middleware: Host check, key, body cap, and the last-resort 500


class Guard:
    def __init__(self, app, cfg: ServerConfig):
        self.app = app
        self.cfg = cfg
        self.key = cfg.api_key.encode() if cfg.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.check(scope, headers)
        except ApiError as e:
            return await e.response()(scope, receive, send)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.cfg.max_body:
                    raise too_large(self.cfg)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except ClientDisconnect:  # the client left while sending its body: nobody to answer
            return
        except Exception:  # noqa: BLE001 - the one place an unexpected error becomes a 500
            log.exception("unhandled error on %s %s", scope.get("method"), scope["path"])
            if not started:
                await ApiError(500, "internal server error; see the server log", None, "internal_error") \
                    .response()(scope, receive, send)

    def check(self, scope, headers: dict) -> None:
        path = scope["path"]
        proxy = path.startswith("/proxy/")
        if self.cfg.allowed_hosts is not None and host_name(headers.get("host", "")) not in self.cfg.allowed_hosts:
            raise ApiError(400, f"the Host header {headers.get('host', '')!r} is not allowed (DNS rebinding "
                           "protection); start the server with --allowed-host NAME to allow it", None, "invalid_host")
        # /health, and the page itself (a static file with no data; every call it makes needs the key)
        public = path == "/health" or (path == "/" and scope["method"] in ("GET", "HEAD"))
        if self.key is not None and not public and not self.authorized(headers):
            raise ApiError(403 if proxy else 401, "a valid API key is required (Authorization: Bearer KEY, "
                           "X-API-Key: KEY, or Basic auth with KEY as the password)", None, "invalid_api_key",
                           headers={} if proxy else {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            raise bad(None, "invalid Content-Length")
        if length is not None and int(length) > self.cfg.max_body:
            raise too_large(self.cfg)

    def authorized(self, headers: dict) -> bool:
        """Bearer KEY, X-API-Key: KEY, or HTTP Basic (A1111's --api-auth, as SillyTavern sends it) whose
        password, or whole user:password, is KEY; compared in constant time."""
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        candidates = [headers.get("x-api-key")]
        if scheme.lower() == "bearer":
            candidates.append(value.strip())
        elif scheme.lower() == "basic":
            try:
                credential = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                credential = ""
            candidates += [credential, credential.partition(":")[2]]
        ok = False
        for given in candidates:  # every candidate compared: the time does not tell which one matched
            if given:
                ok |= hmac.compare_digest(given.encode("utf-8", "replace"), self.key)
        return ok


def too_large(cfg: ServerConfig) -> ApiError:
    return ApiError(413, f"the request body is over this server's limit of {cfg.max_body / 2**20:g} MB (--max-body)",
                    None, "request_too_large")


def host_name(host: str) -> str:
    """'Host' header -> the name without the port, lower case: 'localhost', '127.0.0.1', '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, extra: tuple = ()) -> frozenset:
    """The Host names accepted (any port): the loopback names, the bound address, and --allowed-host; on a
    wildcard bind (0.0.0.0, ::) also this machine's name and addresses, as far as it knows them."""
    names = set(LOOPBACK_NAMES) | {bracketed(bind)} | {host_name(h) for h in extra}
    if bind.strip("[]") in ("0.0.0.0", "::", ""):
        names |= machine_names()
    return frozenset(n for n in names if n)


def bracketed(host: str) -> str:
    """An address as a Host header writes it: IPv6 in brackets, lower case."""
    host = host.strip().lower()
    return f"[{host.strip('[]')}]" if ":" in host else host


def machine_names() -> set[str]:
    """This machine's host name (and NAME.local) and the addresses it resolves to (best effort, no network)."""
    import socket

    hostname = socket.gethostname().lower()
    names = {hostname, f"{hostname.split('.')[0]}.local"}
    try:
        names |= {bracketed(info[4][0].split("%")[0]) for info in socket.getaddrinfo(hostname, None)}
    except OSError:
        pass
    return names


# ---------------------------------------------------------------------------------------------------
# The app and running it


def create_app(worker: Worker, cfg: ServerConfig | None = None) -> Starlette:
    """The ASGI app around a started worker."""
    server = Server(worker, cfg or ServerConfig())
    routes = page_routes(server) + openai_routes(server) + job_routes(server) + a1111_routes(server) + studio_routes(server)

    async def api_error(request, exc: ApiError):
        return exc.response()

    async def http_error(request, exc: HTTPException):
        status = exc.status_code
        if status == 404:
            msg = f"no route {request.method} {request.url.path}"
        elif status == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        else:
            msg = exc.detail if isinstance(exc.detail, str) else "invalid request"
        return ApiError(status, msg, None, None).response()

    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error})
    app.add_middleware(Guard, cfg=server.cfg)
    app.state.server = server
    return app


def bind_socket(host: str, port: int):
    """A listening socket on (host, port); port 0 picks a free one."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(worker: Worker, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000, *,
          announce=print, log_level: str = "warning", sock=None) -> None:
    """Serve until SIGINT/SIGTERM. Binds (or takes `sock`), prints `listening on http://HOST:PORT` once
    connections are accepted, then starts the worker if it is not started: /health says `loading` until the
    model is ready, and requests sent meanwhile wait in the queue. A load failure is on /health (`failed`),
    ends the server and is raised here. On a signal: the queued jobs are answered 503, the running one is
    cancelled at its next step, new requests get 503, and the function returns."""
    import threading

    import uvicorn

    show_logs()
    sock = sock or bind_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    failure: list[BaseException] = []

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                announce(f"listening on {url}")
                if worker.state == "idle":
                    worker.start(wait=False)
                threading.Thread(target=self.watch_load, name="zimage-load-watch", daemon=True).start()

        def watch_load(self):
            try:
                worker.wait_loaded()
            except BaseException as e:  # noqa: BLE001 - raised by serve() once the server has stopped
                failure.append(e)
                self.should_exit = True

        def handle_exit(self, sig, frame):
            # On its own thread: a signal handler must not wait for a lock the interrupted main thread may hold.
            threading.Thread(target=worker.shutdown, name="zimage-shutdown").start()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # uvicorn would re-raise the signal after shutting down: exit 0 instead

    config = uvicorn.Config(create_app(worker, cfg), log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=30, lifespan="off")
    try:
        _Server(config).run(sockets=[sock])
    finally:
        worker.shutdown(wait=30)
        sock.close()
    if failure:
        raise failure[0]


def show_logs() -> None:
    """One line per job (and the load's progress) on stderr; stdout has the URL alone."""
    import sys

    for name in ("zimage_mlx.server", "zimage_mlx.worker"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
