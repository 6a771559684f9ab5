"""The ``amqtask`` command line. Each command parses, calls one library function, and maps the outcome
to an exit code: 0 ok, 1 task failed or timed out, 2 usage or configuration error, 3 broker problem.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from . import __version__, loops
from .commands.shared import (
    EXIT_BROKER,
    EXIT_FAILED,
    app_option,
    app_spec_given,
    load_app,
    loglevel_option,
    run,
    setup_logging,
    split,
    timeout_option,
)

if TYPE_CHECKING:
    from .app import App

#: Pool names a Celery user may give to -P; amqtask's -P is a process count.
CELERY_POOLS = ("prefork", "processes", "solo", "threads", "eventlet", "gevent", "custom")
WORKER_EXAMPLES = """\b
Examples:
  amqtask worker -A proj -Q default,emails -c 8      consume two queues, 8 tasks at once
  amqtask -A proj worker -P 4 -l warning             4 supervised processes (the app before the command)
  AMQTASK_APP=proj amqtask worker -X bulk            every configured queue but 'bulk'
  amqtask worker -A proj --burst                     drain the queues, then exit
"""


class ProcessCount(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """``-P``: a number of worker processes; a Celery pool name gets an explanation, not a bare error."""

    name = "N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        if str(value).lower() in CELERY_POOLS:
            self.fail(
                f"amqtask's -P is a process count, not Celery's pool name ({value!r}): async def tasks run on "
                "the worker's event loop and plain ones in -c threads; -P N runs N supervised worker processes "
                "(Celery's prefork with -c N is roughly -P N -c 1)",
                param,
                ctx,
            )
        try:
            count = int(value)
        except ValueError:
            self.fail(f"{value!r} is not a number of processes", param, ctx)
        if count < 1:
            self.fail(f"{count} is not a number of processes (1 or more)", param, ctx)
        return count


class When(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """A moment: ISO 8601 date-time (naive = UTC), or with ``seconds=True`` also seconds from now."""

    name = "WHEN"

    def __init__(self, *, seconds: bool = False) -> None:
        self.seconds = seconds

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dt.datetime | float:
        if isinstance(value, dt.datetime | float):
            return value
        if self.seconds:
            try:
                return float(value)
            except ValueError:
                pass
        try:
            return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            wanted = "seconds or an ISO 8601 date-time" if self.seconds else "an ISO 8601 date-time"
            self.fail(f"{value!r} is not {wanted} (e.g. 2030-01-31T09:00:00+00:00)", param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-A",
    "--app",
    "app_spec",
    envvar="AMQTASK_APP",
    metavar="MODULE[:ATTR]",
    help="module (and attribute) holding the App, for every command [env: AMQTASK_APP]",
)
@click.version_option(__version__, prog_name="amqtask")
def main(app_spec: str | None) -> None:
    """amqtask: a task runner for RabbitMQ that speaks Celery's protocol.

    Exit codes: 0 ok, 1 task failed or timed out, 2 usage or configuration error, 3 broker problem.
    Commands that need only the broker (call, purge, dlq, inspect, control) run without -A, with the
    settings from AMQTASK_* (AMQTASK_BROKER_URL above all).
    """


def _apply_flags(app: App, **settings: Any) -> None:
    """Command-line flags win over the app's settings; a flag not given (``None``) leaves its setting alone."""
    for name, value in settings.items():
        if value is not None:
            setattr(app.conf, name, value)


@main.command(epilog=WORKER_EXAMPLES)
@app_option
@click.option("-Q", "--queues", help="comma-separated queues to consume (default: all configured)")
@click.option("-X", "--exclude-queues", help="comma-separated queues not to consume")
@click.option("-c", "--concurrency", type=click.IntRange(1), help="tasks run at once per process")
@click.option("--prefetch-multiplier", type=click.IntRange(1), help="prefetch = concurrency x this")
@click.option("-n", "--hostname", help="worker node name")
@click.option(
    "-P", "--processes", type=ProcessCount(), default=1, show_default=True,
    help="worker processes, supervised (a number, not a Celery pool name)",
)  # fmt: skip
@click.option("--process-index", type=int, hidden=True)
@click.option("--max-tasks-per-child", type=click.IntRange(1), help="replace a worker process after this many tasks")
@click.option("--max-memory-per-child", type=click.IntRange(1),
              help="replace a worker process once its peak resident memory reaches this many KiB")  # fmt: skip
@click.option("--burst", is_flag=True, help="exit once the queues are empty")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="serve Prometheus metrics on this port")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="log lines as text or JSON objects")
@click.option("-E", "--task-events", is_flag=True, help="send Celery's task and worker events (Flower, celery events)")
@loglevel_option("info")
def worker(
    app_spec: str | None, queues: str | None, exclude_queues: str | None, concurrency: int | None,
    prefetch_multiplier: int | None, hostname: str | None, processes: int, process_index: int | None,
    max_tasks_per_child: int | None, max_memory_per_child: int | None, burst: bool, metrics_port: int | None,
    log_format: str | None, task_events: bool, loglevel: str,
) -> None:  # fmt: skip
    """Consume queues and run tasks."""
    from .monitoring.logs import configure_logging
    from .worker.supervisor import serve, supervise

    setup_logging(loglevel)
    app = load_app(app_spec)
    log_format = log_format or app.conf.worker_log_format
    configure_logging(loglevel, log_format)
    _apply_flags(app, worker_metrics_port=metrics_port, worker_send_task_events=task_events or None,
                 worker_max_tasks_per_child=max_tasks_per_child,
                 worker_max_memory_per_child=max_memory_per_child)  # fmt: skip
    recycled = app.conf.worker_max_tasks_per_child or app.conf.worker_max_memory_per_child
    if process_index is None and (processes > 1 or recycled):
        spec = app_spec_given(app_spec)
        assert spec is not None  # load_app exits without one

        def child(index: int) -> list[str]:
            argv = [
                sys.executable,
                "-m",
                "amqtask",
                "worker",
                "-A",
                spec,
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
            if task_events:
                argv.append("-E")
            argv += ["--log-format", log_format]
            for flag, value in (("--metrics-port", app.conf.worker_metrics_port),
                                ("--max-tasks-per-child", app.conf.worker_max_tasks_per_child),
                                ("--max-memory-per-child", app.conf.worker_max_memory_per_child)):  # fmt: skip
                argv += [flag, str(value)] if value is not None else []
            return argv

        sys.exit(run(app, lambda: supervise(child, processes, metrics_port=app.conf.worker_metrics_port), quiet=False))
    if hostname is None and process_index is not None:
        hostname = f"{app.conf.worker_hostname or 'amqtask@' + os.uname().nodename}-{process_index}"
    options = {"queues": split(queues), "exclude_queues": split(exclude_queues), "concurrency": concurrency,
               "prefetch_multiplier": prefetch_multiplier, "hostname": hostname, "burst": burst}  # fmt: skip
    if process_index is not None:  # only a supervised child is replaced when it reaches a limit
        options.update(max_tasks=app.conf.worker_max_tasks_per_child,
                       max_memory_kib=app.conf.worker_max_memory_per_child)  # fmt: skip
    sys.exit(run(app, lambda: loops.run(serve(app, **options), app.conf.event_loop), quiet=False))


@main.command()
@app_option
@click.argument("name")
@click.option("--args", "args_json", default="[]", help="JSON array of positional arguments")
@click.option("--kwargs", "kwargs_json", default="{}", help="JSON object of keyword arguments")
@click.option("--queue", help="queue to send to")
@click.option("--exchange", help="exchange to publish to (with --routing-key)")
@click.option("--routing-key", help="routing key to publish with")
@click.option("--countdown", type=float, help="seconds to wait before running")
@click.option("--eta", type=When(), help="run at this ISO 8601 date-time (naive = UTC)")
@click.option(
    "--expires", type=When(seconds=True), help="seconds from now, or an ISO 8601 date-time, after which not to run"
)
@click.option("--priority", type=click.IntRange(0, 255))
@click.option("--serializer", type=click.Choice(["msgpack", "json"]), help="body encoding (default: task_serializer)")
@click.option("--wait/--no-wait", default=False, help="wait for the result and print it")
@timeout_option(30.0, "seconds for the whole: connecting, sending and, with --wait, the result")
@loglevel_option("critical")
def call(
    app_spec: str | None, name: str, args_json: str, kwargs_json: str, queue: str | None, exchange: str | None,
    routing_key: str | None, countdown: float | None, eta: dt.datetime | None, expires: dt.datetime | float | None,
    priority: int | None, serializer: str | None, wait: bool, timeout: float, loglevel: str,
) -> None:  # fmt: skip
    """Send task NAME (by name) and print its id, or with --wait its result as JSON.

    Exits 1 if the task failed or --wait timed out, 2 for a bad option (a queue, exchange or routing key
    the broker cannot take), 3 if the broker is unreachable or returned the message (no queue is bound
    to the routing key).
    """
    setup_logging(loglevel)
    try:
        args, kwargs = json.loads(args_json), json.loads(kwargs_json)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise click.BadParameter("--args must be a JSON array and --kwargs a JSON object")
    app = load_app(app_spec, required=False)
    given = {"queue": queue, "exchange": exchange, "routing_key": routing_key, "countdown": countdown, "eta": eta,
             "expires": expires, "priority": priority, "serializer": serializer}  # fmt: skip
    options = {k: v for k, v in given.items() if v is not None}

    def send() -> None:
        result = app.send_task(name, args, kwargs, **options)
        if not wait:
            click.echo(result.id)
            return
        click.echo(json.dumps(result.get(timeout=timeout)))

    run(app, send)


@main.command()
@app_option
@click.argument("queues", nargs=-1, required=True)
@click.option("-y", "--yes", "-f", "--force", "yes", is_flag=True, help="do not ask for confirmation")
@timeout_option(10.0)
def purge(app_spec: str | None, queues: tuple[str, ...], yes: bool, timeout: float) -> None:
    """Delete every waiting message of QUEUES (messages workers hold unacked are kept)."""
    from . import topology as broker_topology

    if not yes:
        click.confirm(f"delete every waiting message of {', '.join(queues)}?", abort=True)
    app = load_app(app_spec, required=False)

    async def purge_all() -> list[int]:
        try:
            return [await broker_topology.purge_queue(app.runtime().broker, queue) for queue in queues]
        finally:
            await app.aclose()

    for queue, count in zip(queues, run(app, lambda: asyncio.run(purge_all())), strict=True):
        click.echo(f"purged {count} message(s) from {queue}")


@main.group()
def topology() -> None:
    """Declare or check the broker objects the app defines."""


@topology.command("apply")
@app_option
@timeout_option(30.0)
def topology_apply(app_spec: str | None, timeout: float) -> None:
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

    for name in run(app, lambda: asyncio.run(apply())):
        click.echo(f"declared queue {name} (+ {name}.dlq)")


@topology.command("verify")
@app_option
@click.option("-v", "--verbose", is_flag=True, help="list the objects that are fine too")
@timeout_option(30.0)
def topology_verify(app_spec: str | None, verbose: bool, timeout: float) -> None:
    """Check, changing nothing, that every queue, exchange and delay level the app defines exists as wanted.

    Prints what is missing or exists with other arguments, and exits 1 if anything is. A task queue
    held with other arguments is reported as adopted (workers use it as it is; not a problem unless
    task_queues_strict is set). Bindings are not checked: AMQP cannot list them (`topology apply`
    re-adds them, which is harmless).
    """
    from . import adoption, verification

    app = load_app(app_spec)

    async def verify() -> list[verification.Check]:
        runtime = app.runtime()
        try:
            return await adoption.verify(
                runtime.broker, app.router.all_queues(), runtime.publisher.delay_topology,
                strict=app.conf.task_queues_strict,
            )  # fmt: skip
        finally:
            await app.aclose()

    checks: list[verification.Check] = run(app, lambda: asyncio.run(verify()))
    for check in checks:
        if verbose or check.problem:
            detail = f": {check.detail}" if check.detail else ""
            click.echo(f"{check.problem or 'ok':<9}{check.kind:<9}{check.name}{detail}")
    problems = sum(not check.ok for check in checks)
    click.echo(f"{len(checks)} exchanges and queues checked, {problems} problem(s)")
    if problems:
        sys.exit(EXIT_FAILED)


@main.command()
@app_option
@timeout_option(5.0, "seconds to wait for the broker")
def check(app_spec: str | None, timeout: float) -> None:
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

    missing = run(app, lambda: asyncio.run(probe()))
    if missing:
        click.echo(f"error: missing queue(s): {', '.join(missing)}", err=True)
        sys.exit(EXIT_BROKER)
    click.echo("ok")


def _register_command_groups() -> None:
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(f"amqtask.commands.{module_name}")
        main.add_command(module.command)


#: Modules under ``amqtask/commands`` that each define one click ``command`` (a command or a group).
COMMAND_MODULES: tuple[str, ...] = ("inspect", "control", "dlq", "beat", "events", "serve", "queues", "top")
_register_command_groups()
