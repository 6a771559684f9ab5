"""``amqtask events``: print the event stream of the workers on the broker (amqtask's and Celery's)."""

from __future__ import annotations

import asyncio
import contextlib
import functools

import click

from .shared import app_option, load_app, run


@click.command("events")
@app_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line, as sent")
@click.option("--count", type=click.IntRange(1), help="exit after this many events")
def command(app_spec: str | None, as_json: bool, count: int | None) -> None:
    """Print task and worker events as they happen (workers send them with -E)."""
    from ..monitoring.receiver import print_events

    app = load_app(app_spec, required=False)
    ready = functools.partial(click.echo, "listening for events on celeryev", err=True)

    async def watch() -> None:
        try:
            await print_events(app.runtime().broker, click.echo, as_json=as_json, count=count, ready=ready)
        finally:
            await app.aclose()

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how one stops watching
        run(app, lambda: asyncio.run(watch()), quiet=False)
