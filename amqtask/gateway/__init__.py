"""The HTTP gateway: send tasks, read their results and revoke them over HTTP, from any language.

``amqtask serve -A proj --bind 127.0.0.1:8080`` (extra ``amqtask[http]``: Starlette and uvicorn). See
``docs/gateway.md``. Nothing here is imported by the rest of amqtask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from ..app import App


def _missing(exc: ImportError) -> ConfigurationError:
    needed = "pip install 'amqtask[http]'"
    return ConfigurationError(f"the HTTP gateway needs the http extra: {needed} ({exc.name} is missing)")


def create_gateway(app: App) -> Starlette:
    """The ASGI application of the gateway for ``app`` (serve it with any ASGI server)."""
    try:
        from .api import build
    except ImportError as exc:
        raise _missing(exc) from None
    return build(app)


def serve(app: App, host: str, port: int, *, log_level: str = "info") -> None:
    """Serve the gateway with uvicorn until interrupted (what ``amqtask serve`` runs)."""
    gateway = create_gateway(app)
    try:
        import uvicorn
    except ImportError as exc:
        raise _missing(exc) from None
    uvicorn.run(gateway, host=host, port=port, log_level=log_level, server_header=False)


__all__ = ["create_gateway", "serve"]
