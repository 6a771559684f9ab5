"""What every ``amqtask`` command shares: finding the app, the common options, and exit codes.

The app comes from ``-A/--app`` given after the command (``amqtask worker -A proj``), before it
(``amqtask -A proj worker``, Celery 5's habit) or from ``AMQTASK_APP``, in that order. Commands that
need only the broker (``call``, ``purge``, ``dlq``, ``inspect``, ``control``) work without one: the
settings then come from ``AMQTASK_*`` alone.

Exit codes: 0 ok, 1 task failed or timed out, 2 usage or configuration error (a name the broker cannot
take included), 3 broker problem (unreachable, or it refused or returned a message: a routing key no queue
is bound to). Every failure is one line on stderr, credentials masked. A one-shot command bounds its whole broker work,
connecting included, by its ``--timeout``, and keeps the library's reconnect warnings to itself: its
one line says what went wrong last.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from ..app import App
from ..errors import AmqtaskError, BrokerConnectionError, ConfigurationError, PublishError, TopologyError
from ..urls import mask_text

EXIT_FAILED, EXIT_USAGE, EXIT_BROKER = 1, 2, 3
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
#: Name of the app used when none is given: settings from ``AMQTASK_*`` only.
ENV_ONLY_APP = "amqtask-cli"
BROKER_HINT = "is RabbitMQ running and reachable there? Set the URL with AMQTASK_BROKER_URL or the app's broker_url"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

app_option = click.option(
    "-A",
    "--app",
    "app_spec",
    metavar="MODULE[:ATTR]",
    help="module (and attribute) holding the App; also accepted before the command, or from AMQTASK_APP",
)


def loglevel_option(default: str) -> Callable[[F], F]:
    """``-l/--loglevel``, defaulting to ``default`` (one-shot commands: only what ends them)."""
    choices = click.Choice(LOG_LEVELS, case_sensitive=False)
    return click.option("-l", "--loglevel", default=default, show_default=True, type=choices)


def timeout_option(default: float, what: str = "seconds the broker may take, connecting included") -> Callable[[F], F]:
    """``-t/--timeout``: bounds the command's broker work, the connection included."""
    return click.option(
        "-t",
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        show_default=True,
        help=what,
    )


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: message`` (one line) on stderr and exit with ``code``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def split(value: str | None) -> list[str] | None:
    """A comma-separated option as a list (``None`` when not given)."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def setup_logging(level: str) -> None:
    # One logging set-up for every command: task fields, and aiormq's duplicated connect errors dropped.
    from ..monitoring.logs import configure_logging

    configure_logging(level)


def app_spec_given(spec: str | None) -> str | None:
    """The app named after the command, else before it (``amqtask -A proj ...``), else by ``AMQTASK_APP``."""
    if spec:
        return spec
    ctx = click.get_current_context(silent=True)
    root: str | None = ctx.find_root().params.get("app_spec") if ctx is not None else None
    return root


def load_app(spec: str | None, *, required: bool = True) -> App:
    """The command's :class:`App`: imported from ``module[:attribute]``, or built from ``AMQTASK_*`` alone.

    Any problem doing so (no such module, a syntax error in it, an unknown setting in ``App(...)`` or the
    environment) is one line and exit 2. When the running command has a ``--timeout``, it also bounds
    the connection and every broker operation (see :func:`bound_by`).
    """
    spec = app_spec_given(spec)
    if spec is None and required:
        fail("no app given: use -A/--app MODULE[:ATTR] (before or after the command) or set AMQTASK_APP")
    try:
        app = _import_app(spec) if spec else App(ENV_ONLY_APP)
    except ConfigurationError as exc:
        fail(f"configuration: {exc}")
    ctx = click.get_current_context(silent=True)
    timeout = ctx.params.get("timeout") if ctx is not None else None
    if isinstance(timeout, int | float):
        bound_by(app, float(timeout))
    return app


def _import_app(spec: str) -> App:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as exc:
        fail(f"-A {spec}: syntax error in {exc.filename}, line {exc.lineno}: {exc.msg}")
    except ImportError as exc:
        fail(f"-A {spec}: cannot import {module_name!r}: {exc}")
    if attr:
        found = getattr(module, attr, None)
    else:
        found = getattr(module, "app", None)
        if not isinstance(found, App):
            found = next((v for v in vars(module).values() if isinstance(v, App)), None)
    if not isinstance(found, App):
        fail(f"-A {spec}: no amqtask App in module {module_name!r}" + (f" (attribute {attr!r})" if attr else ""))
    return found


def bound_by(app: App, timeout: float) -> None:
    """Make ``timeout`` bound the app's connection attempts and every broker operation of this process."""
    app.conf.publish_timeout_s = timeout
    app.conf.broker_connect_timeout_s = min(app.conf.broker_connect_timeout_s, timeout)


def run(app: App, action: Callable[[], T], *, quiet: bool = True) -> T:
    """Run ``action`` and turn an amqtask error into one line and an exit code (credentials masked).

    ``quiet`` (one-shot commands) keeps the warnings logged while reconnecting off the terminal: the
    error line carries the last of them.
    """
    if quiet and not logging.getLogger().handlers:
        logging.getLogger().setLevel(logging.CRITICAL)
    try:
        return action()
    except AmqtaskError as exc:
        message = mask_text(f"{type(exc).__name__}: {exc}", app.conf.broker_url)
        if isinstance(exc, BrokerConnectionError):
            fail(f"{message} ({BROKER_HINT})", EXIT_BROKER)
        if isinstance(exc, PublishError):
            fail(message, EXIT_BROKER)
        fail(message, EXIT_USAGE if isinstance(exc, ConfigurationError | TopologyError) else EXIT_FAILED)
