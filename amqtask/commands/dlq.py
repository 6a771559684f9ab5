"""``amqtask dlq list|replay|purge QUEUE``: thin wrappers over :mod:`amqtask.dlq`.

QUEUE is a task queue (its dead-letter queue is ``QUEUE.dlq``) or a dead-letter queue's own name.
Exit codes as elsewhere: 0 ok, 1 some ``--id`` was not found, 2 usage or configuration error (a
missing queue included), 3 broker problem.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .. import dlq
from .shared import app_option, load_app, run, timeout_option

if TYPE_CHECKING:
    from ..app import App

T = TypeVar("T")
#: Widest a table cell gets; the whole value is in the message headers.
CELL_WIDTH = 60


def _call(app_spec: str | None, action: Callable[[App], Coroutine[Any, Any, T]]) -> T:
    """Run ``action(app)`` on a fresh event loop, closing the app's connection afterwards."""
    app = load_app(app_spec, required=False)

    async def main() -> T:
        try:
            return await action(app)
        finally:
            await app.aclose()

    return run(app, lambda: asyncio.run(main()))


@click.group("dlq")
def command() -> None:
    """Inspect, replay and purge dead-letter queues (QUEUE.dlq)."""


@command.command("list")
@app_option
@timeout_option(30.0)
@click.argument("queue")
@click.option("--limit", type=click.IntRange(0), default=50, show_default=True, help="messages to show")
def list_messages(app_spec: str | None, timeout: float, queue: str, limit: int) -> None:
    """Count the dead-lettered messages of QUEUE and show the first ones (leaves them in place)."""
    listing = _call(app_spec, lambda app: dlq.inspect(app, queue, limit))
    shown = f" (showing {len(listing.messages)})" if len(listing.messages) < listing.count else ""
    click.echo(f"{listing.queue}: {listing.count} message(s){shown}")
    if listing.messages:
        rows = [
            (m.id or "-", m.task or "-", m.reason, m.exception or "-", m.failed_at or "-") for m in listing.messages
        ]
        click.echo(_table(("ID", "TASK", "REASON", "EXCEPTION", "FAILED AT"), rows))


@command.command("replay")
@app_option
@timeout_option(30.0)
@click.argument("queue")
@click.option("--id", "ids", multiple=True, help="task id to replay (repeatable)")
@click.option("--all", "replay_all", is_flag=True, help="replay every message")
@click.option("--to", "target", help="queue to send them to (default: QUEUE, whose dead-letter queue they are in)")
def replay_messages(
    app_spec: str | None, timeout: float, queue: str, ids: tuple[str, ...], replay_all: bool, target: str | None
) -> None:
    """Send dead-lettered messages back to QUEUE with retries reset (confirmed, then removed).

    With signing_keys set, each message's signature is checked and the copy signed again; a message
    that does not verify stays in the dead-letter queue.
    """
    if bool(ids) == replay_all:
        raise click.UsageError("give either --id ID (one or more) or --all")
    outcome = _call(app_spec, lambda app: dlq.replay(app, queue, None if replay_all else ids, to=target))
    click.echo(f"replayed {len(outcome.replayed)} message(s)")
    for missing in outcome.missing:
        click.echo(f"not found: {missing}", err=True)
    for refused in outcome.refused:
        click.echo(f"not replayed (its signature does not verify): {refused or '-'}", err=True)
    if outcome.missing or outcome.refused:
        click.get_current_context().exit(1)


@command.command("purge")
@app_option
@timeout_option(30.0)
@click.argument("queue")
@click.option("-y", "--yes", is_flag=True, help="do not ask for confirmation")
def purge_messages(app_spec: str | None, timeout: float, queue: str, yes: bool) -> None:
    """Delete every message of QUEUE's dead-letter queue."""
    if not yes:
        click.confirm(f"delete every dead-lettered message of {queue!r}?", abort=True)
    count = _call(app_spec, lambda app: dlq.purge(app, queue))
    click.echo(f"purged {count} message(s)")


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    lines = [header, *(tuple(_cell(value) for value in row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _cell(value: str) -> str:
    flat = " ".join(value.split())
    return flat if len(flat) <= CELL_WIDTH else flat[: CELL_WIDTH - 1] + "…"
