"""``amqtask beat``: run the periodic-task scheduler, and ``amqtask beat list`` to show its entries.

Thin wrappers over :mod:`amqtask.beat`: ``beat`` runs :func:`amqtask.beat.scheduler.serve` until SIGTERM
or SIGINT (a second signal aborts); ``beat list`` prints each entry's schedule, next run (in the app's
timezone) and last run (from the state kept in RabbitMQ, when the broker is reachable). ``--scheduler``
(``-S``) adds entries kept elsewhere, e.g. ``django`` for django-celery-beat's tables
(:mod:`amqtask.beat.sources`). Exit codes as elsewhere: 0 ok, 2 usage or configuration error (an
invalid schedule or an unusable scheduler included), 3 broker problem.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING

import click

from ..beat.scheduler import serve
from ..beat.schedules import resolve_tz
from ..beat.sources import ScheduleSource, resolve_source
from ..beat.state import Status, status
from .shared import app_option, load_app, loglevel_option, run, setup_logging

if TYPE_CHECKING:
    from ..app import App

_SCHEDULER_HELP = (
    "also read entries from here, re-read on change: 'django' (django-celery-beat's tables; Celery's "
    "'django_celery_beat.schedulers:DatabaseScheduler' works too) or 'module:factory' [setting beat_scheduler]"
)


@click.group("beat", invoke_without_command=True)
@app_option
@click.option(
    "--schedule-file",
    type=click.Path(dir_okay=False),
    help="TOML or JSON schedule merged over beat_schedule (its entries win on a name clash); re-read on change",
)
@click.option("-S", "--scheduler", help=_SCHEDULER_HELP)
@loglevel_option("info")
@click.pass_context
def command(
    ctx: click.Context, app_spec: str | None, schedule_file: str | None, scheduler: str | None, loglevel: str
) -> None:
    """Send periodic tasks on schedule. Run several for fail-over: exactly one sends at a time."""
    ctx.obj = {"app_spec": app_spec, "schedule_file": schedule_file, "scheduler": scheduler}
    if ctx.invoked_subcommand is not None:
        return
    setup_logging(loglevel)
    app = load_app(app_spec)
    source = _source(app, scheduler)
    run(app, lambda: asyncio.run(serve(app, schedule_file=schedule_file, source=source)), quiet=False)


@command.command("list")
@app_option
@click.option("--schedule-file", type=click.Path(dir_okay=False), help="as for `amqtask beat`")
@click.option("-S", "--scheduler", help="as for `amqtask beat`")
@click.pass_context
def list_entries(ctx: click.Context, app_spec: str | None, schedule_file: str | None, scheduler: str | None) -> None:
    """Show the entries, their schedules, next run times and last runs."""
    app = load_app(app_spec or ctx.obj["app_spec"])
    schedule_file = schedule_file or ctx.obj["schedule_file"]
    source = _source(app, scheduler or ctx.obj["scheduler"])

    async def read() -> Status:
        try:
            return await status(app, schedule_file=schedule_file, source=source)
        finally:
            await app.aclose()

    found: Status = run(app, lambda: asyncio.run(read()))
    tz = resolve_tz(app.conf.timezone)
    assert tz is not None
    if found.error is not None:
        click.echo(f"state unavailable ({found.error}); last runs unknown")
    elif found.leader:
        click.echo(f"a beat is leading (it holds {found.lock_name!r})")
    else:
        click.echo(f"no beat is leading ({found.lock_name!r} is free)")
    rows = [
        (
            row.entry.name,
            row.entry.task,
            row.entry.schedule.describe(),
            _when(row.next_run, tz),
            "?" if found.error else _when(row.state.sent_at if row.state else None, tz),
        )
        for row in found.entries
    ]
    click.echo(_table(("NAME", "TASK", "SCHEDULE", f"NEXT RUN ({app.conf.timezone})", "LAST RUN"), rows))


def _source(app: App, spec: str | None) -> ScheduleSource | None:
    """The source ``--scheduler`` (else the ``beat_scheduler`` setting) names; a bad one exits 2."""
    spec = spec or app.conf.beat_scheduler
    return None if not spec else run(app, lambda: resolve_source(app, spec))


def _when(moment: datetime | None, tz: tzinfo) -> str:
    return "-" if moment is None else moment.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z")


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in (header, *rows)
    )
