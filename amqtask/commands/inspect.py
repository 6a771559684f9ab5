"""``amqtask inspect``: ask the workers on the broker what they know (Celery's workers answer too)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from .replies import Query, remote_options, run_query

if TYPE_CHECKING:
    from ..app import App


@click.group("inspect")
def command() -> None:
    """Ask the workers (amqtask's and Celery's on the same vhost) what they are doing."""


def _inspect(method: str) -> Query:
    def query(app: App, nodes: list[str] | None, timeout: float) -> dict[str, Any]:
        result: dict[str, Any] = getattr(app.control.inspect(timeout, nodes), method)()
        return result

    return query


@command.command()
@remote_options
def ping(app_spec: str | None, destination: str | None, timeout: float, as_json: bool) -> None:
    """Check which workers are alive."""
    run_query(app_spec, destination, timeout, as_json, _inspect("ping"))


@command.command()
@remote_options
def registered(app_spec: str | None, destination: str | None, timeout: float, as_json: bool) -> None:
    """List the tasks each worker knows."""
    run_query(app_spec, destination, timeout, as_json, _inspect("registered"))


@command.command()
@remote_options
def active(app_spec: str | None, destination: str | None, timeout: float, as_json: bool) -> None:
    """List the tasks running now."""
    run_query(app_spec, destination, timeout, as_json, _inspect("active"))


@command.command()
@remote_options
def stats(app_spec: str | None, destination: str | None, timeout: float, as_json: bool) -> None:
    """Show each worker's statistics (pid, counters, pool, broker, resource usage)."""
    run_query(app_spec, destination, timeout, as_json, _inspect("stats"))


@command.command()
@remote_options
def revoked(app_spec: str | None, destination: str | None, timeout: float, as_json: bool) -> None:
    """List the task ids each worker was told not to run."""
    run_query(app_spec, destination, timeout, as_json, _inspect("revoked"))


@command.command("active_queues")
@remote_options
def active_queues(app_spec: str, destination: str | None, timeout: float, as_json: bool) -> None:
    """List the queues each worker consumes."""
    run_query(app_spec, destination, timeout, as_json, _inspect("active_queues"))


@command.command()
@remote_options
def conf(app_spec: str, destination: str | None, timeout: float, as_json: bool) -> None:
    """Show each worker's settings (secrets left out, broker URLs masked)."""
    run_query(app_spec, destination, timeout, as_json, _inspect("conf"))
