"""``amqtask serve``: the HTTP gateway (extra ``amqtask[http]``) for clients without an AMQP library."""

from __future__ import annotations

import click

from .shared import app_option, load_app, loglevel_option, run, setup_logging


def parse_bind(bind: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8080`` for IPv6)."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {bind!r}", param_hint="--bind")
    return host.strip("[]") or "127.0.0.1", int(port)


@click.command("serve")
@app_option
@click.option("--bind", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to listen on")
@loglevel_option("info")
def command(app_spec: str | None, bind: str, loglevel: str) -> None:
    """Serve the HTTP gateway: POST /tasks/{name}, GET and DELETE /tasks/{id}, /health, /openapi.json."""
    setup_logging(loglevel)
    host, port = parse_bind(bind)
    app = load_app(app_spec)
    from ..gateway import serve

    run(app, lambda: serve(app, host, port, log_level=loglevel.lower()), quiet=False)
