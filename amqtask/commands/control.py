"""``amqtask control``: tell the workers to do something (Celery's workers obey too)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ..remote import flatten
from .replies import remote_options, run_query

if TYPE_CHECKING:
    from ..app import App


@click.group("control")
def command() -> None:
    """Send commands to the workers."""


@command.command()
@click.argument("task_ids", nargs=-1, required=True)
@remote_options
def revoke(
    app_spec: str | None, destination: str | None, timeout: float, as_json: bool, task_ids: tuple[str, ...]
) -> None:
    """Tell the running workers not to run TASK_IDS (tasks already running finish).

    Only workers running now hear it; a worker started later will run these tasks.
    """

    def query(app: App, nodes: list[str] | None, timeout: float) -> dict[str, Any]:
        return flatten(app.control.revoke(list(task_ids), destination=nodes, reply=True, timeout=timeout))

    run_query(app_spec, destination, timeout, as_json, query)
