"""Typed settings with defaults, read from keyword arguments, an object or dict, and ``AMQTASK_*`` env vars.

Every setting is declared once in :data:`SPECS` with its type and default; assigning a value of the
wrong type, or a name that is not a setting, raises :class:`ConfigurationError` naming the setting
(and suggesting the nearest known name). Names follow Celery's where amqtask has the same setting, so
a Celery config module mostly reads as is.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError
from .ratelimit import parse_rate
from .urls import mask_text

ENV_PREFIX = "AMQTASK_"
#: Variables under this prefix belong to amqtask's own test suite, not to an app's settings.
ENV_TEST_PREFIX = "AMQTASK_TEST_"
#: Variables of the ``amqtask`` command line, not settings (``AMQTASK_APP`` names the app module).
ENV_CLI_VARIABLES = frozenset({"AMQTASK_APP"})


Check = Callable[[str, Any], Any]
#: What each validator accepts, in words, for the generated settings reference (docs/reference/settings.md).
_KINDS: dict[Check, str] = {}


def _kind(text: str) -> Callable[[Check], Check]:
    def register(check: Check) -> Check:
        _KINDS[check] = text
        return check

    return register


@dataclass(frozen=True)
class Spec:
    """One setting: its default, a validator that returns the normalized value, and a help line."""

    default: Any
    check: Check
    help: str

    @property
    def kind(self) -> str:
        """What the setting accepts, in words (``"integer >= 1"``, ``"true or false"``)."""
        return _KINDS.get(self.check, "any value")


@_kind("string")
def _str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"setting {name!r} must be a non-empty string, got {value!r}")
    return value


@_kind("string, or none")
def _opt_str(name: str, value: Any) -> str | None:
    return None if value is None else _str(name, value)


@_kind("true or false")
def _bool(name: str, value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    if not isinstance(value, bool):
        raise ConfigurationError(f"setting {name!r} must be true or false, got {value!r}")
    return value


def _number(minimum: float, *, integer: bool = False, allow_none: bool = False) -> Check:
    @_kind(f"{'integer' if integer else 'number'} >= {minimum:g}{', or none' if allow_none else ''}")
    def check(name: str, value: Any) -> Any:
        if value is None and allow_none:
            return None
        if isinstance(value, str):
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                raise ConfigurationError(f"setting {name!r} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
            kind = "an integer" if integer else "a number"
            raise ConfigurationError(f"setting {name!r} must be {kind}, got {value!r}")
        if value < minimum:
            raise ConfigurationError(f"setting {name!r} must be >= {minimum}, got {value!r}")
        return value

    return check


@_kind("amqp:// or amqps:// URL, or a list of them (comma-separated in the environment)")
def _broker_urls(name: str, value: Any) -> tuple[str, ...]:
    urls = [u.strip() for u in value.split(",")] if isinstance(value, str) else value
    if not isinstance(urls, list | tuple) or not urls or not all(isinstance(u, str) and u for u in urls):
        known = tuple(u for u in urls if isinstance(u, str)) if isinstance(urls, list | tuple) else ()
        shown = mask_text(repr(value), known)
        raise ConfigurationError(f"setting {name!r} must be a URL or a non-empty list of URLs, got {shown}")
    for url in urls:
        if not url.startswith(("amqp://", "amqps://")):
            raise ConfigurationError(f"setting {name!r}: {url.split('@')[-1]!r} is not an amqp:// or amqps:// URL")
    return tuple(urls)


@_kind("rate: N/s, N/m or N/h (a number alone is per second), or none")
def _rate(name: str, value: Any) -> Any:
    try:
        parse_rate(value)
    except ConfigurationError as exc:
        raise ConfigurationError(f"setting {name!r}: {exc}") from None
    return value or None


@_kind("list of strings (comma-separated in the environment)")
def _str_list(name: str, value: Any) -> tuple[str, ...]:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list | tuple | set | frozenset) or not all(isinstance(v, str) for v in items):
        raise ConfigurationError(f"setting {name!r} must be a list of strings, got {value!r}")
    return tuple(items)


@_kind("'msgpack' or 'json'")
def _serializer(name: str, value: Any) -> str:
    if value not in ("json", "msgpack"):
        raise ConfigurationError(f"setting {name!r} must be 'json' or 'msgpack', got {value!r}")
    return str(value)


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise ConfigurationError(f"setting {name!r} must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return _kind(" or ".join(repr(choice) for choice in choices))(check)


@_kind("'msgpack' or 'json', or none")
def _opt_serializer(name: str, value: Any) -> str | None:
    return None if value is None else _serializer(name, value)


def _json_value(kind: type, what: str) -> Check:
    @_kind(f"{what}, or none (JSON in the environment)")
    def check(name: str, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigurationError(f"setting {name!r} must be {what} (JSON in the environment)") from None
        if value is not None and not isinstance(value, kind):
            raise ConfigurationError(f"setting {name!r} must be {what}, got {type(value).__name__}")
        return value

    return check


@_kind("any value (see the description)")
def _anything(name: str, value: Any) -> Any:
    return value


@_kind("list of strings (comma-separated in the environment), or none")
def _keys(name: str, value: Any) -> tuple[str, ...] | None:
    return None if value is None else _str_list(name, value)


_CPUS = os.cpu_count() or 1
#: ``rpc``: only the sender gets a result (its reply queue). ``amqp``: also a RabbitMQ stream any process reads by id.
RESULT_BACKENDS = ("rpc", "amqp")

SPECS: dict[str, Spec] = {
    "broker_url": Spec(("amqp://guest:guest@localhost:5672//",), _broker_urls,
                       "broker URL, or several (comma-separated) to fail over between cluster nodes"),
    "broker_heartbeat_s": Spec(30, _number(0, integer=True), "AMQP heartbeat; a dead peer is noticed in ~2x this"),
    "broker_connect_timeout_s": Spec(10.0, _number(0.1), "time to wait for one connection attempt"),
    "broker_reconnect_max_s": Spec(10.0, _number(0.1), "longest pause between reconnection attempts"),
    "broker_ssl_options": Spec(None, _json_value(dict, "a dict of ssl options"),
                               "TLS: cafile, certfile, keyfile, check_hostname (amqps:// URLs)"),
    "publish_timeout_s": Spec(30.0, _number(0.1), "how long a send may take, reconnects included, before it fails"),
    "task_default_queue": Spec("default", _str, "queue of tasks with no other route (Celery users: 'celery')"),
    "task_default_exchange": Spec("", _anything, "exchange of the default queue ('' = the default exchange)"),
    "task_default_priority": Spec(None, _number(0, integer=True, allow_none=True), "priority of tasks without one"),
    "task_serializer": Spec("msgpack", _serializer, "body encoding of task messages: msgpack or json"),
    "result_serializer": Spec(None, _opt_serializer, "encoding of results; default: the task message's own"),
    "control_serializer": Spec(
        "json", _serializer, "encoding of remote-control requests: json (all a Celery worker accepts by default)"
    ),
    "accept_content": Spec(("msgpack", "json"), _str_list, "encodings a worker accepts"),
    "result_accept_content": Spec(("msgpack", "json"), _str_list, "encodings a client accepts in results"),
    "task_ignore_result": Spec(False, _bool, "send no results unless a task asks for them"),
    "task_track_started": Spec(False, _bool, "report STARTED when a worker begins a task"),
    "task_create_missing_queues": Spec(True, _bool, "declare a task's queue on first send when it is missing"),
    "task_queues": Spec(None, _anything, "queue definitions (see the routing section)"),
    "imports": Spec((), _str_list, "modules a worker imports to register their tasks (Celery's imports)"),
    "include": Spec((), _str_list, "more modules a worker imports, after imports (Celery's include)"),
    "task_queues_strict": Spec(False, _bool, "refuse a queue that exists with other arguments instead of "
                               "using it as it is (see the migration guide)"),
    "task_routes": Spec(None, _anything, "task name -> route: dict, list of dicts/functions, or a function"),
    "task_time_limit": Spec(None, _number(0, allow_none=True), "hard time limit per task, seconds"),
    "task_default_rate_limit": Spec(None, _rate, "tasks of one name started per worker process at most, "
                                    "e.g. '100/s', '10/m', '500/h' (none: unlimited; a task's rate_limit wins)"),
    "task_soft_time_limit": Spec(None, _number(0, allow_none=True), "soft time limit per task, seconds"),
    "task_default_retry_delay": Spec(180.0, _number(0), "default countdown of self.retry(), seconds"),
    "task_max_retries": Spec(3, _number(0, integer=True, allow_none=True), "default max_retries"),
    "task_requeue_limit": Spec(20, _number(0, integer=True), "how often Reject(requeue=True) may send one "
                               "message back to its queue; once more and it is dead-lettered (requeue-limit)"),
    "result_expires_s": Spec(86400, _number(1, integer=True),
                             "results are kept this long; reply queues vanish after being unused this long"),
    "result_backend": Spec("rpc", _choice(*RESULT_BACKENDS),
                           "rpc: results reach the sender only; amqp: readable by id anywhere"),
    "result_stream": Spec("amqtask.results", _str, "the stream amqp results are written to (one per app or vhost)"),
    "result_stream_max_bytes": Spec(2 * 1024**3, _number(1024 * 1024, integer=True),
                                    "disk the result stream may use before its oldest segments go"),
    "result_stream_lookback_s": Spec(60, _number(0), "a process's first read of the result stream starts this "
                                     "far back; older records are read in the background"),
    "result_track_sent": Spec(True, _bool, "a client's send of an amqp task appends a PENDING record, so "
                              "readers tell a queued task from an unknown id (one more publish per send)"),
    "result_legacy_queues": Spec(False, _bool, "amqp results also go to Celery's per-task queues "
                                 "(for celery-node and gocelery clients)"),
    "result_store_max_bytes": Spec(256 * 1024 * 1024, _number(1, integer=True),
                                   "memory a process keeps results in (oldest dropped first)"),
    "result_persistent": Spec(True, _bool, "replies survive a broker restart"),
    "gateway_tokens": Spec((), _str_list, "bearer tokens the HTTP gateway accepts (none: no authentication)"),
    "gateway_tokens_file": Spec(None, _opt_str, "file with one gateway bearer token per line, read at start"),
    "gateway_allow": Spec(None, _keys, "task names the gateway may send (default: the tasks registered in the app)"),
    "gateway_max_body_bytes": Spec(1024 * 1024, _number(2, integer=True), "largest request body the gateway reads"),
    "gateway_max_json_depth": Spec(32, _number(1, integer=True), "deepest JSON nesting the gateway accepts"),
    "gateway_max_wait_s": Spec(60.0, _number(0), "longest GET /tasks/{id}?wait= long poll"),
    "worker_concurrency": Spec(_CPUS, _number(1, integer=True), "tasks run at once per worker process"),
    "worker_prefetch_multiplier": Spec(4, _number(1, integer=True), "prefetch = concurrency x this"),
    "worker_shutdown_grace_s": Spec(30.0, _number(0), "time running tasks get to finish on SIGTERM"),
    "worker_max_tasks_per_child": Spec(None, _number(1, integer=True, allow_none=True), "with -P: a worker process "
                                       "starts at most this many tasks, then finishes them and is replaced"),
    "worker_max_memory_per_child": Spec(None, _number(1, integer=True, allow_none=True), "with -P: a worker process "
                                        "whose peak resident memory (KiB) reaches this after a task is replaced"),
    "event_loop": Spec("asyncio", _choice("asyncio", "uvloop"),
                       "worker and sync-portal event loop: asyncio, or uvloop (pip install 'amqtask[uvloop]')"),
    "worker_hostname": Spec(None, _opt_str, "worker node name (default amqtask@<host>)"),
    "message_max_bytes": Spec(16 * 1024 * 1024, _number(1, integer=True), "largest body a worker decodes"),
    "message_max_depth": Spec(64, _number(1, integer=True), "deepest nesting a worker decodes"),
    "message_max_items": Spec(1024 * 1024, _number(1, integer=True), "most values (containers and scalars) a "
                              "worker decodes from one body: this, not the size, bounds a decode's memory"),
    "delay_levels": Spec(28, _number(1, integer=True), "number of binary delay levels (2^n s max delay)"),
    "timezone": Spec("UTC", _str, "timezone of crontab schedules and naive datetimes in beat"),
    "beat_schedule": Spec(None, _json_value(dict, "a dict of entries"), "periodic tasks"),
    "beat_lock_name": Spec(None, _opt_str, "name of beat's lock queue (default amqtask.beat.<app>.lock)"),
    "beat_state_name": Spec(None, _opt_str, "name of beat's last-run state queue (default amqtask.beat.<app>.state)"),
    "beat_lock_retry_s": Spec(5.0, _number(0.01), "how often a standby beat tries to take the lock: takeover "
                              "after the leader dies takes this, plus ~2x broker_heartbeat_s if its host vanished"),
    "beat_max_loop_s": Spec(5.0, _number(0.01), "longest beat sleeps between checks (schedule file, clock jumps)"),
    "beat_schedule_file": Spec(None, _opt_str, "TOML/JSON schedule file merged over beat_schedule, re-read on change"),
    "beat_scheduler": Spec(None, _opt_str, "also read entries from here, re-read on change: 'django' (django-celery-"
                           "beat's tables; Celery's 'django_celery_beat.schedulers:DatabaseScheduler' too) "
                           "or 'module:factory'"),
    "worker_log_format": Spec("text", _choice("text", "json"), "worker log lines: text, or json (one object a line)"),
    "worker_metrics_port": Spec(None, _number(1, integer=True, allow_none=True),
                                "serve Prometheus metrics on this port (needs amqtask[metrics])"),
    "worker_send_task_events": Spec(False, _bool, "workers publish Celery's task and worker events (-E)"),
    "task_send_sent_event": Spec(False, _bool, "producers publish a task-sent event for every task they send"),
    "signing_keys": Spec(None, _keys, "HMAC keys; the first signs, all verify"),
}  # fmt: skip


class Settings:
    """The settings of one :class:`~amqtask.App`; attribute access, validated on every assignment."""

    #: How many assignments so far: whoever caches something derived from settings compares it.
    _changes: int

    def __init__(self, **values: Any) -> None:
        object.__setattr__(self, "_changes", 0)
        for name, spec in SPECS.items():
            object.__setattr__(self, name, spec.default)
        self.update(values)

    def __setattr__(self, name: str, value: Any) -> None:
        spec = SPECS.get(name)
        if spec is None:
            raise ConfigurationError(_unknown(name))
        object.__setattr__(self, name, spec.check(name, value))
        object.__setattr__(self, "_changes", self._changes + 1)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(_unknown(name))

    def update(self, values: Mapping[str, Any]) -> None:
        """Set several settings at once; every name must be a known setting."""
        for name, value in values.items():
            setattr(self, name, value)

    def from_env(self, environ: Mapping[str, str] | None = None) -> None:
        """Read ``AMQTASK_<NAME>`` variables (``AMQTASK_BROKER_URL`` and so on).

        ``AMQTASK_<NAME>_FILE`` reads the value from a file instead (the Docker/Kubernetes secrets
        convention), so credentials need not sit in the environment.
        """
        environ = os.environ if environ is None else environ
        for key, value in environ.items():
            if key.startswith(ENV_PREFIX) and not key.startswith(ENV_TEST_PREFIX) and key not in ENV_CLI_VARIABLES:
                name = key[len(ENV_PREFIX) :].lower()
                if name.endswith("_file") and name[: -len("_file")] in SPECS:
                    name = name[: -len("_file")]
                    value = _read_secret(key, value)
                if name not in SPECS:
                    raise ConfigurationError(f"environment variable {key}: {_unknown(name)}")
                setattr(self, name, value)

    def from_object(self, source: object | str | Mapping[str, Any], namespace: str | None = None) -> None:
        """Read settings from a module (or its dotted path), an object's attributes, or a mapping.

        A string names a module (``"proj.settings"``) or, like Celery's, an attribute of one
        (``"django.conf:settings"``). With ``namespace="CELERY"``, names like ``CELERY_BROKER_URL`` are
        read (the Django convention); otherwise lowercase attribute names that are settings are read and
        the rest ignored.
        """
        if isinstance(source, str):
            module_name, _, attribute = source.partition(":")
            source = importlib.import_module(module_name)
            if attribute:
                source = getattr(source, attribute)
        items: Iterable[tuple[str, Any]] = (
            source.items() if isinstance(source, Mapping) else ((k, getattr(source, k)) for k in dir(source))
        )
        prefix = f"{namespace}_" if namespace else ""
        for key, value in items:
            if prefix:
                if not key.startswith(prefix):
                    continue
                key = key[len(prefix) :].lower()
                if key not in SPECS:
                    raise ConfigurationError(f"{prefix}{key.upper()}: {_unknown(key)}")
            elif key not in SPECS:
                if isinstance(source, Mapping):
                    raise ConfigurationError(_unknown(key))
                continue
            try:
                setattr(self, key, value)
            except ConfigurationError as exc:
                if not prefix:
                    raise
                # Name the setting as the user wrote it (CELERY_RESULT_BACKEND), not as amqtask calls it.
                raise ConfigurationError(f"{prefix}{key.upper()}: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        """Every setting and its current value."""
        return {name: getattr(self, name) for name in SPECS}


def _read_secret(variable: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as secret:
            return secret.read().strip()
    except OSError as exc:
        raise ConfigurationError(f"environment variable {variable}: cannot read {path!r}: {exc.strerror}") from None


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, SPECS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown setting {name!r}{hint}"
