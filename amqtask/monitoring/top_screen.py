"""The screen of ``amqtask top``: a :class:`~amqtask.monitoring.live_state.Snapshot` drawn with ``rich``.

``rich`` comes with the optional extra ``amqtask[top]``; only this module imports it, and
``amqtask top`` checks for it first (a clear error when it is missing).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import TYPE_CHECKING

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .live_feed import watch
from .live_state import QueueRow, Snapshot, TaskRow, WorkerRow

if TYPE_CHECKING:
    from ..app import App

MISSING = "-"


def _rate(value: float) -> str:
    return f"{value:.1f}"


def _seconds(value: float | None) -> str:
    return MISSING if value is None else f"{value:.3f}s"


def _count(value: int | None) -> str:
    return MISSING if value is None else str(value)


def workers_table(rows: list[WorkerRow]) -> Table:
    table = Table(title="Workers", title_justify="left", expand=True)
    for column in ("worker", "state", "in flight", "done", "failed", "done/s", "failed/s"):
        table.add_column(column, justify="left" if column in ("worker", "state") else "right")
    for row in rows:
        state = Text("up", style="green") if row.up else Text("down", style="bold red")
        table.add_row(row.hostname, state, str(row.in_flight), str(row.done), str(row.failed),
                      _rate(row.done_per_s), _rate(row.failed_per_s))  # fmt: skip
    return table


def queues_table(rows: list[QueueRow]) -> Table:
    table = Table(title="Queues", title_justify="left", expand=True)
    for column in ("queue", "ready", "unacked", "consumers", "in/s", "out/s"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for row in rows:
        table.add_row(row.name, _count(row.ready) if row.ready is not None else Text("missing", style="red"),
                      str(row.unacked), _count(row.consumers), _rate(row.in_per_s), _rate(row.out_per_s))  # fmt: skip
    return table


def slowest_table(rows: list[TaskRow]) -> Table:
    table = Table(title="Slowest tasks", title_justify="left", expand=True)
    for column in ("task", "succeeded", "mean", "max"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for row in rows:
        table.add_row(row.name, str(row.succeeded), _seconds(row.mean_runtime_s), _seconds(row.max_runtime_s))
    return table


def failing_table(rows: list[TaskRow]) -> Table:
    table = Table(title="Failing tasks", title_justify="left", expand=True)
    table.add_column("task")
    table.add_column("failed", justify="right")
    table.add_column("last exception", overflow="ellipsis", no_wrap=True)
    for row in rows:
        table.add_row(row.name, str(row.failed), row.last_exception or MISSING)
    return table


def render(snapshot: Snapshot, heading: str) -> RenderableType:
    """The whole screen for one snapshot, under ``heading``."""
    return Group(
        Text(heading, style="bold"),
        workers_table(snapshot.workers),
        queues_table(snapshot.queues),
        slowest_table(snapshot.slowest),
        failing_table(snapshot.failing),
    )


async def show(app: App, console: Console | None = None) -> None:
    """Run the full-screen view until cancelled (Ctrl-C)."""
    with Live(console=console, screen=True, auto_refresh=False) as live:

        def update(snapshot: Snapshot) -> None:
            now = dt.datetime.now().strftime("%H:%M:%S")
            live.update(render(snapshot, f"amqtask top - {app.main} - {now} - Ctrl-C quits"), refresh=True)

        await watch(app, update)


def run(app: App) -> None:
    """:func:`show` on a loop of its own, the app's connections closed afterwards."""

    async def main() -> None:
        try:
            await show(app)
        finally:
            await app.aclose()

    asyncio.run(main())


__all__ = ["failing_table", "queues_table", "render", "run", "show", "slowest_table", "workers_table"]
