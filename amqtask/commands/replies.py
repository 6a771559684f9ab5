"""What ``amqtask inspect`` and ``amqtask control`` share: their options, and how replies are printed.

Neither needs an app: without ``-A`` the broker comes from ``AMQTASK_BROKER_URL``. ``--timeout`` bounds
the connection as well as the wait for replies.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .shared import EXIT_FAILED, app_option, load_app, run, split, timeout_option

if TYPE_CHECKING:
    from ..app import App

F = TypeVar("F", bound=Callable[..., Any])
#: A question to the workers: ``(app, destination or None, timeout) -> {node: reply}``.
Query = Callable[["App", "list[str] | None", float], dict[str, Any]]


def remote_options(fn: F) -> F:
    """The options every remote-control command takes: app, destination, timeout, output format."""
    options = [
        app_option,
        click.option("-d", "--destination", help="comma-separated worker names (default: all workers)"),
        timeout_option(1.0, "seconds to wait for replies (and for the broker)"),
        click.option("--json", "as_json", is_flag=True, help="print the replies as one JSON object"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_query(app_spec: str | None, destination: str | None, timeout: float, as_json: bool, query: Query) -> None:
    """Run ``query`` against the workers and print ``{node: reply}``; exit 1 when nobody replied."""
    app = load_app(app_spec, required=False)
    nodes = split(destination)

    def ask() -> dict[str, Any]:
        try:
            return query(app, nodes, timeout)
        finally:
            app.close()

    replies = run(app, ask)
    if not replies:
        asked = f" (asked {', '.join(nodes)})" if nodes else ""
        click.echo(f"error: no worker replied within {timeout:g}s{asked}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(replies, default=str))
        return
    for node in sorted(replies):
        click.echo(format_reply(node, replies[node]))
    click.echo(f"\n{len(replies)} node{'' if len(replies) == 1 else 's'} online.")


def format_reply(node: str, reply: Any) -> str:
    """One worker's reply as text: ``-> node: OK pong``, or ``-> node: OK`` followed by indented lines."""
    if isinstance(reply, dict) and len(reply) == 1 and ("ok" in reply or "error" in reply):
        status = "OK" if "ok" in reply else "ERROR"
        return f"-> {node}: {status} {next(iter(reply.values()))}"
    if isinstance(reply, list):
        lines = [_item(item) for item in reply] or ["- empty -"]
    else:
        lines = json.dumps(reply, indent=4, sort_keys=True, default=str).splitlines()
    return "\n".join([f"-> {node}: OK", *(f"    {line}" for line in lines)])


def _item(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and "id" in item and "name" in item:
        return f"* {item['name']}[{item['id']}] args={item.get('args')!r} kwargs={item.get('kwargs')!r}"
    return json.dumps(item, default=str)


__all__ = ["Query", "format_reply", "remote_options", "run_query"]
