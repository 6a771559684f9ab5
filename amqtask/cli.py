"""The ``amqtask`` command line. Each command parses, calls one library function, and maps the outcome
to an exit code: 0 ok, 1 task failed or timed out, 2 usage or configuration error, 3 broker problem.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from . import loops
from .app import App
from .errors import AmqtaskError, BrokerConnectionError, ConfigurationError, PublishError, TopologyError
from .urls import mask_text

EXIT_FAILED, EXIT_USAGE, EXIT_BROKER = 1, 2, 3


def load_app(spec: str) -> App:
    """Import ``pkg.module`` or ``pkg.module:attr`` and return the :class:`App` found there."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}", param_hint="-A/--app") from None
    if attr:
        found = getattr(module, attr, None)
    else:
        found = getattr(module, "app", None)
        if not isinstance(found, App):
            found = next((v for v in vars(module).values() if isinstance(v, App)), None)
    if not isinstance(found, App):
        raise click.BadParameter(f"no amqtask App in {spec!r}", param_hint="-A/--app")
    return found


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="[%(asctime)s %(levelname)s %(name)s] %(message)s")


def _run(app: App, action: Callable[[], Any]) -> Any:
    """Run ``action`` and turn amqtask errors into a clean message and exit code (credentials masked)."""
    try:
        return action()
    except AmqtaskError as exc:
        message = mask_text(f"{type(exc).__name__}: {exc}", app.conf.broker_url)
        click.echo(f"error: {message}", err=True)
        code = EXIT_USAGE if isinstance(exc, ConfigurationError | TopologyError) else EXIT_FAILED
        if isinstance(exc, BrokerConnectionError | PublishError):
            code = EXIT_BROKER
        sys.exit(code)


app_option = click.option("-A", "--app", "app_spec", required=True, help="module[:attribute] holding the App")


def loglevel_option(default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``-l/--loglevel`` option, defaulting to ``default``."""
    choices = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)
    return click.option("-l", "--loglevel", default=default, show_default=True, type=choices)


@click.group()
@click.version_option(package_name="amqtask")
def main() -> None:
    """amqtask: a task runner for RabbitMQ that speaks Celery's protocol."""


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@main.command()
@app_option
@click.option("-Q", "--queues", help="comma-separated queues to consume (default: all configured)")
@click.option("-X", "--exclude-queues", help="comma-separated queues not to consume")
@click.option("-c", "--concurrency", type=click.IntRange(1), help="tasks run at once per process")
@click.option("--prefetch-multiplier", type=click.IntRange(1), help="prefetch = concurrency x this")
@click.option("-n", "--hostname", help="worker node name")
@click.option("-P", "--processes", type=click.IntRange(1), default=1, show_default=True, help="worker processes")
@click.option("--process-index", type=int, hidden=True)
@click.option("--burst", is_flag=True, help="exit once the queues are empty")
@loglevel_option("info")
def worker(
    app_spec: str, queues: str | None, exclude_queues: str | None, concurrency: int | None,
    prefetch_multiplier: int | None, hostname: str | None, processes: int, process_index: int | None,
    burst: bool, loglevel: str,
) -> None:  # fmt: skip
    """Consume queues and run tasks."""
    from .worker.supervisor import serve, supervise

    _setup_logging(loglevel)
    app = load_app(app_spec)
    if processes > 1:

        def child(index: int) -> list[str]:
            argv = [
                sys.executable,
                "-m",
                "amqtask",
                "worker",
                "-A",
                app_spec,
                "-l",
                loglevel,
                "--process-index",
                str(index),
            ]
            for flag, value in (("-Q", queues), ("-X", exclude_queues), ("-c", concurrency),
                                ("--prefetch-multiplier", prefetch_multiplier)):  # fmt: skip
                if value is not None:
                    argv += [flag, str(value)]
            if hostname:
                argv += ["-n", f"{hostname}-{index}"]
            return argv

        sys.exit(supervise(child, processes))
    if hostname is None and process_index is not None:
        hostname = f"{app.conf.worker_hostname or 'amqtask@' + os.uname().nodename}-{process_index}"
    options = {"queues": _split(queues), "exclude_queues": _split(exclude_queues), "concurrency": concurrency,
               "prefetch_multiplier": prefetch_multiplier, "hostname": hostname, "burst": burst}  # fmt: skip
    sys.exit(_run(app, lambda: loops.run(serve(app, **options), app.conf.event_loop)))


@main.command()
@click.option(
    "-A", "--app", "app_spec", help="module[:attribute] holding the App (default: settings from AMQTASK_* only)"
)
@click.argument("name")
@click.option("--args", "args_json", default="[]", help="JSON array of positional arguments")
@click.option("--kwargs", "kwargs_json", default="{}", help="JSON object of keyword arguments")
@click.option("--queue", help="queue to send to")
@click.option("--countdown", type=float, help="seconds to wait before running")
@click.option("--priority", type=click.IntRange(0, 255))
@click.option("--wait/--no-wait", default=False, help="wait for the result and print it")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="seconds to wait with --wait")
@loglevel_option("warning")
def call(
    app_spec: str | None, name: str, args_json: str, kwargs_json: str, queue: str | None, countdown: float | None,
    priority: int | None, wait: bool, timeout: float, loglevel: str,
) -> None:  # fmt: skip
    """Send task NAME (by name) and print its id, or with --wait its result as JSON."""
    _setup_logging(loglevel)
    app = load_app(app_spec) if app_spec else App("amqtask-cli")
    try:
        args, kwargs = json.loads(args_json), json.loads(kwargs_json)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise click.BadParameter("--args must be a JSON array and --kwargs a JSON object")
    options = {k: v for k, v in (("queue", queue), ("countdown", countdown), ("priority", priority)) if v is not None}

    def send() -> None:
        result = app.send_task(name, args, kwargs, **options)
        if not wait:
            click.echo(result.id)
            return
        click.echo(json.dumps(result.get(timeout=timeout)))

    _run(app, send)


@main.group()
def topology() -> None:
    """Declare or check the broker objects the app defines."""


@topology.command("apply")
@app_option
def topology_apply(app_spec: str) -> None:
    """Declare every queue, exchange, binding and delay level the app defines, without starting a worker."""
    from .worker.worker import Worker

    app = load_app(app_spec)

    async def apply() -> list[str]:
        worker_ = Worker(app)
        worker_._runtime = app.runtime()
        try:
            await worker_.declare()
        finally:
            await app.aclose()
        return [q.name for q in worker_.queues]

    for name in _run(app, lambda: asyncio.run(apply())):
        click.echo(f"declared queue {name} (+ {name}.dlq)")


@topology.command("verify")
@app_option
@click.option("-v", "--verbose", is_flag=True, help="list the objects that are fine too")
def topology_verify(app_spec: str, verbose: bool) -> None:
    """Check, changing nothing, that every queue, exchange and delay level the app defines exists as wanted.

    Prints what is missing or exists with other arguments, and exits 1 if anything is. Bindings are
    not checked: AMQP cannot list them (`topology apply` re-adds them, which is harmless).
    """
    from . import topology as broker_topology

    app = load_app(app_spec)

    async def verify() -> list[broker_topology.Check]:
        runtime = app.runtime()
        try:
            return await broker_topology.verify(
                runtime.broker, app.router.all_queues(), runtime.publisher.delay_topology
            )
        finally:
            await app.aclose()

    checks: list[broker_topology.Check] = _run(app, lambda: asyncio.run(verify()))
    for check in checks:
        if verbose or not check.ok:
            detail = f": {check.detail}" if check.detail else ""
            click.echo(f"{check.problem or 'ok':<9}{check.kind:<9}{check.name}{detail}")
    problems = sum(not check.ok for check in checks)
    click.echo(f"{len(checks)} exchanges and queues checked, {problems} problem(s)")
    if problems:
        sys.exit(EXIT_FAILED)


@main.command()
@app_option
@click.option("-t", "--timeout", type=float, default=5.0, show_default=True, help="seconds to wait for the broker")
def check(app_spec: str, timeout: float) -> None:
    """Health probe for containers: the broker answers and the app's queues exist (exit 0), else exit 3."""
    from . import topology as topology_module

    app = load_app(app_spec)

    async def probe() -> list[str]:
        runtime = app.runtime()
        try:
            await runtime.broker.connection(timeout)
            return [
                q.name
                for q in app.router.all_queues()
                if not await topology_module.queue_exists(runtime.broker, q.name)
            ]
        finally:
            await app.aclose()

    missing = _run(app, lambda: asyncio.run(probe()))
    if missing:
        click.echo(f"error: missing queue(s): {', '.join(missing)}", err=True)
        sys.exit(EXIT_BROKER)
    click.echo("ok")


def _register_command_groups() -> None:
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(f"amqtask.commands.{module_name}")
        main.add_command(module.command)


#: Modules under ``amqtask/commands`` that each define one click ``command`` (a command or a group).
COMMAND_MODULES: tuple[str, ...] = ("inspect", "control", "dlq", "beat")
_register_command_groups()
