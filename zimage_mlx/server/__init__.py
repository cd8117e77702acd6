"""`zimage-mlx serve`: one resident model behind the OpenAI images API, an A1111 subset and a native job API.

app.py wires the routes, guards them and serves; core.py holds the config, the error envelope and the shared
state; fields.py reads requests; openai.py, a1111.py and jobs.py are the dialects (each parses a request into
a `Recipe` and presents the job `zimage_mlx.worker.Worker` ran); page.py serves the page and the documents.
How to point each client (Open WebUI, SillyTavern, ComfyUI, the OpenAI SDK) at it: docs/server.md.
"""

from .app import Guard, allowed_hosts, bind_socket, create_app, host_name, is_loopback, serve
from .core import ApiError, Server, ServerConfig
from .openai import partial_steps

__all__ = ["ApiError", "Guard", "Server", "ServerConfig", "allowed_hosts", "bind_socket", "create_app", "host_name",
           "is_loopback", "partial_steps", "serve"]
