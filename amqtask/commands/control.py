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


@command.command("rate_limit")
@click.argument("task_name")
@click.argument("rate")
@remote_options
def rate_limit(
    app_spec: str | None, destination: str | None, timeout: float, as_json: bool, task_name: str, rate: str
) -> None:
    """Limit how often each worker process starts TASK_NAME: RATE is N/s, N/m or N/h (0: no limit).

    The limit lasts until the workers restart; set ``rate_limit`` on the task to keep it.
    """

    def query(app: App, nodes: list[str] | None, timeout: float) -> dict[str, Any]:
        return flatten(app.control.rate_limit(task_name, rate, destination=nodes, reply=True, timeout=timeout))

    run_query(app_spec, destination, timeout, as_json, query)


@command.command("add_consumer")
@click.argument("queue")
@remote_options
def add_consumer(app_spec: str | None, destination: str | None, timeout: float, as_json: bool, queue: str) -> None:
    """Make the workers consume QUEUE too, until they restart."""

    def query(app: App, nodes: list[str] | None, timeout: float) -> dict[str, Any]:
        return flatten(app.control.add_consumer(queue, destination=nodes, reply=True, timeout=timeout))

    run_query(app_spec, destination, timeout, as_json, query)


@command.command("cancel_consumer")
@click.argument("queue")
@remote_options
def cancel_consumer(app_spec: str | None, destination: str | None, timeout: float, as_json: bool, queue: str) -> None:
    """Make the workers stop consuming QUEUE, until they restart."""

    def query(app: App, nodes: list[str] | None, timeout: float) -> dict[str, Any]:
        return flatten(app.control.cancel_consumer(queue, destination=nodes, reply=True, timeout=timeout))

    run_query(app_spec, destination, timeout, as_json, query)


@command.command()
@remote_options
def shutdown(app_spec: str | None, destination: str | None, timeout: float, as_json: bool) -> None:
    """Stop the workers as SIGTERM does: running tasks finish, the rest go back to their queues."""

    def query(app: App, nodes: list[str] | None, timeout: float) -> dict[str, Any]:
        return flatten(app.control.shutdown(destination=nodes, reply=True, timeout=timeout))

    run_query(app_spec, destination, timeout, as_json, query)
