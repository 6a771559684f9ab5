"""``amqtask queues``: the app's known queues with their ready and consumer counts, once (passive declares)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict

import click

from .shared import app_option, load_app, run, timeout_option

HEADINGS = ("queue", "ready", "consumers")


@click.command("queues")
@app_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object: {queue: {ready, consumers}}")
@timeout_option(10.0)
def command(app_spec: str | None, as_json: bool, timeout: float) -> None:
    """Show the ready and consumer counts of the app's queues (no management plugin needed)."""
    from ..monitoring.queue_probe import QueueCounts, known_queues, probe_all

    app = load_app(app_spec)

    async def counts() -> list[QueueCounts]:
        try:
            await app.runtime().broker.connection(timeout)
            return await probe_all(app.runtime().broker, known_queues(app))
        finally:
            await app.aclose()

    found = run(app, lambda: asyncio.run(counts()))
    if as_json:
        click.echo(json.dumps({c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in found}))
        return
    rows = [HEADINGS] + [(c.name, str(c.ready), str(c.consumers)) if c.exists else (c.name, "missing", "-")
                         for c in found]  # fmt: skip
    width = max(len(row[0]) for row in rows)
    for name, ready, consumers in rows:
        click.echo(f"{name:<{width}}  {ready:>9}  {consumers:>9}")
