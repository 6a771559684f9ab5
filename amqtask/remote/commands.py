"""What a worker answers to remote control: the commands, and the revoked ids they keep.

Commands: ``ping``, ``registered``, ``active``, ``stats``, ``revoke``, ``revoked``, ``hello`` (Celery
workers send it at startup to share revoked ids), ``active_queues``, ``conf``, ``enable_events`` /
``disable_events``, ``rate_limit``, ``reserved``, ``scheduled``, ``add_consumer``,
``cancel_consumer`` and ``shutdown``. A new command is a method here and a line in :attr:`Commands.table`.

Revoked ids live in the worker's memory, bounded and expiring like Celery's: a worker started after a
revoke does not know it, and a restart forgets it. A delivery whose id was revoked is acked and
answered REVOKED without running (:meth:`Commands.check` raises :class:`~amqtask.errors.Revoked`).
"""

from __future__ import annotations

import asyncio
import logging
import reprlib
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from ..errors import ConfigurationError, Revoked
from ..ratelimit import parse_rate
from ..urls import encode_credentials, mask_url
from .wire import LamportClock, header_text

if TYPE_CHECKING:
    from ..protocol import TaskMessage
    from ..topology import QueueSpec
    from ..worker.worker import Worker

log = logging.getLogger("amqtask.control")

#: Celery's limits for its in-memory revoke set (``REVOKES_MAX``, ``REVOKE_EXPIRES``).
REVOKES_MAX = 50_000
REVOKE_EXPIRES_S = 3 * 3600.0
#: The most characters ``active`` shows of one task's args or kwargs.
ARGUMENT_REPR_MAX = 1024
_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = _repr.maxother = ARGUMENT_REPR_MAX
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 64
#: What ``registered`` shows per task when the request names no options (Celery's default).
DEFAULT_TASK_INFO_ITEMS = ("exchange", "routing_key", "rate_limit")


class RevokedIds:
    """Task ids not to run: at most ``max_size`` (oldest dropped first), each kept ``expires_s`` seconds."""

    def __init__(self, max_size: int = REVOKES_MAX, expires_s: float = REVOKE_EXPIRES_S) -> None:
        self.max_size = max_size
        self.expires_s = expires_s
        self._ids: OrderedDict[str, float] = OrderedDict()

    def add(self, ids: Iterable[str]) -> None:
        """Remember ``ids`` as revoked now."""
        now = time.monotonic()
        for task_id in ids:
            self._ids[task_id] = now
            self._ids.move_to_end(task_id)
        self._purge(now)

    def __contains__(self, task_id: object) -> bool:
        self._purge(time.monotonic())
        return task_id in self._ids

    def ids(self) -> list[str]:
        """The revoked ids, oldest first."""
        self._purge(time.monotonic())
        return list(self._ids)

    def _purge(self, now: float) -> None:
        while self._ids and (len(self._ids) > self.max_size or next(iter(self._ids.values())) < now - self.expires_s):
            self._ids.popitem(last=False)


def broker_info(url: str, others: Iterable[str], heartbeat: float, connect_timeout: float) -> dict[str, Any]:
    """The ``broker`` section of ``stats`` in Celery's shape; credentials masked."""
    parts = urlsplit(encode_credentials(url))  # a raw "/" in the password must not split it
    return {
        "hostname": parts.hostname,
        "port": parts.port or (5671 if parts.scheme == "amqps" else 5672),
        "userid": unquote(parts.username or "guest"),
        "virtual_host": unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
        "ssl": parts.scheme == "amqps",
        "transport": "amqp",
        "heartbeat": heartbeat,
        "connect_timeout": connect_timeout,
        "uri": mask_url(url),
        "alternates": [mask_url(other) for other in others],
    }


def queue_info(queue: QueueSpec) -> dict[str, Any]:
    """One consumed queue in the shape of Celery's ``active_queues`` reply (kombu's ``Queue.as_dict``)."""
    exchange = {"name": queue.exchange, "type": queue.exchange_type, "durable": True, "auto_delete": False,
                "delivery_mode": None, "arguments": None, "passive": False}  # fmt: skip
    return {
        "name": queue.name, "exchange": exchange, "routing_key": queue.publish_routing_key,
        "queue_arguments": queue.queue_arguments() or None, "binding_arguments": dict(queue.binding_arguments) or None,
        "consumer_arguments": None, "durable": True, "exclusive": False, "auto_delete": False, "no_ack": False,
        "alias": None, "bindings": [], "no_declare": None, "expires": None, "message_ttl": None, "max_length": None,
        "max_length_bytes": None, "max_priority": queue.max_priority,
    }  # fmt: skip


#: Settings ``conf`` never shows: secrets (broker URLs are shown masked).
HIDDEN_SETTINGS = frozenset({"signing_keys"})


def visible_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The worker's settings for ``inspect conf``, secrets left out and broker URLs masked."""
    shown = {name: value for name, value in settings.items() if name not in HIDDEN_SETTINGS}
    shown["broker_url"] = [mask_url(url) for url in settings["broker_url"]]
    return {name: list(value) if isinstance(value, tuple) else value for name, value in shown.items()}


def _rusage() -> dict[str, float]:
    try:
        import resource
    except ImportError:  # not on Windows
        return {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    fields = ("utime", "stime", "maxrss", "minflt", "majflt", "inblock", "oublock", "nvcsw", "nivcsw")
    return {name: getattr(usage, f"ru_{name}") for name in fields}


def _size_within(value: Any, budget: int) -> int:
    """What is left of ``budget`` after ``value``'s size (about one unit per character); negative: too big.

    Stops as soon as the budget is spent, so a huge value costs no more than a small one.
    """
    if isinstance(value, str | bytes):
        return budget - len(value)
    if isinstance(value, dict):
        value = [item for pair in value.items() for item in pair]
    if isinstance(value, list | tuple):
        budget -= 2
        for item in value:
            if budget < 0:
                break
            budget = _size_within(item, budget - 1)
        return budget
    return budget - 8


def _shown(value: Any, given_repr: str | None, safe: bool) -> Any:
    """Arguments as ``active`` shows them: the values (or, when ``safe``, their repr), at most about 1 KiB.

    The repr a message carries (``argsrepr``) is the sender's text, of any length; a bigger value or
    repr is cut to :data:`ARGUMENT_REPR_MAX` characters, ending in "...".
    """
    if not safe and _size_within(value, ARGUMENT_REPR_MAX) >= 0:
        return value
    text = given_repr if safe and isinstance(given_repr, str) else _repr.repr(value)
    return text if len(text) <= ARGUMENT_REPR_MAX else text[: ARGUMENT_REPR_MAX - 3] + "..."


class Commands:
    """One worker's commands, and the state they share (revoked ids, start times, the node's clock)."""

    def __init__(self, worker: Worker, clock: LamportClock) -> None:
        self.worker = worker
        self.hostname = worker.hostname
        self.clock = clock
        self.revoked = RevokedIds()
        #: When each recent task started (for ``active``); bounded, since nothing says when to forget.
        self.started: OrderedDict[str, float] = OrderedDict()
        self._max_started = max(1024, 4 * worker.prefetch)
        self._pending: set[asyncio.Task[None]] = set()
        self.table: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ping": lambda _: {"ok": "pong"},
            "registered": self.registered,
            "active": self.active,
            "stats": self.stats,
            "revoke": self.revoke,
            "revoked": lambda _: self.revoked.ids(),
            "hello": self.hello,
            "active_queues": lambda _: [queue_info(q) for q in self.worker.queues],
            "conf": lambda _: visible_settings(self.worker.app.conf.as_dict()),
            "enable_events": lambda _: self.events(on=True),
            "disable_events": lambda _: self.events(on=False),
            "rate_limit": self.rate_limit,
            "reserved": self.reserved,
            # amqtask never holds a task for its eta: the broker's delay levels keep it until it is due.
            "scheduled": lambda _: [],
            "add_consumer": self.add_consumer,
            "cancel_consumer": self.cancel_consumer,
            "shutdown": self.shutdown,
        }

    def dispatch(self, method: str, arguments: Any) -> Any:
        """Run one command; failures become ``{"error": ...}`` replies, as kombu sends them."""
        command = self.table.get(method)
        if command is None:
            log.error("unknown control command %r", method)
            return {"error": f"unknown control command {method!r}"}
        if arguments is not None and not isinstance(arguments, dict):
            return {"error": f"arguments must be an object, got {type(arguments).__name__}"}
        try:
            return command(arguments or {})
        except Exception as exc:
            log.exception("control command %r failed", method)
            return {"error": repr(exc)}

    def registered(self, arguments: dict[str, Any]) -> list[str]:
        """Sorted task names, with ``name [option=value ...]`` for the requested options that are set."""
        items = [
            item
            for item in (arguments.get("taskinfoitems") or DEFAULT_TASK_INFO_ITEMS)
            if isinstance(item, str) and not item.startswith("_")
        ]
        names = []
        for name, task in sorted(self.worker.app.tasks.items()):
            options = task.options
            if name in self.worker.rate_limits.given:  # changed at runtime: show it as Celery does
                options = {**options, "rate_limit": self.worker.rate_limits.given[name]}
            fields = [f"{item}={options[item]}" for item in items if options.get(item) is not None]
            names.append(f"{name} [{' '.join(fields)}]" if fields else name)
        return names

    def active(self, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        """The running tasks, in Celery's ``Request.info()`` shape."""
        safe = bool(arguments.get("safe"))
        return [self._task_info(msg, safe) for msg in list(self.worker.active.values())]

    def _task_info(self, msg: TaskMessage, safe: bool) -> dict[str, Any]:
        return {
            "id": msg.id,
            "name": msg.task,
            "args": _shown(msg.args, msg.argsrepr, safe),
            "kwargs": _shown(msg.kwargs, msg.kwargsrepr, safe),
            "type": msg.task,
            "hostname": self.hostname,
            "time_start": self.started.get(msg.id),
            # amqtask acks a delivery only once its task has finished.
            "acknowledged": False,
            # The worker does not keep where a running task's delivery came from, only its priority.
            "delivery_info": {
                "exchange": None,
                "routing_key": None,
                "priority": msg.priority,
                "redelivered": None,
            },
            "worker_pid": self.worker.pid,
        }

    def stats(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """``Worker.info()`` plus the keys of Celery's ``stats`` (pid, total, pool, broker, clock, rusage)."""
        conf = self.worker.app.conf
        info = self.worker.info()
        urls = list(conf.broker_url)
        info.update(
            {
                "clock": str(self.clock.value),
                "uptime": round(time.time() - self.worker.started_at),
                "prefetch_count": self.worker.prefetch,
                "pool": {
                    "implementation": "amqtask",
                    "max-concurrency": self.worker.concurrency,
                    "processes": [self.worker.pid],
                },
                "broker": broker_info(urls[0], urls[1:], conf.broker_heartbeat_s, conf.broker_connect_timeout_s),
                "rusage": _rusage(),
            }
        )
        return info

    def revoke(self, arguments: dict[str, Any]) -> dict[str, str]:
        """Remember task ids as revoked; Celery's reply text."""
        task_id = arguments.get("task_id")
        ids = [task_id] if isinstance(task_id, str) else [i for i in task_id or () if isinstance(i, str)]
        self.revoked.add(ids)
        listed = "{" + ", ".join(repr(i) for i in ids) + "}" if ids else "set()"
        log.info("tasks flagged as revoked: %s", ", ".join(ids))
        running = [i for i in ids if i in self.worker.active]
        if arguments.get("terminate") and running:
            return {
                "ok": f"tasks {listed} flagged as revoked; amqtask cannot terminate running tasks, "
                f"{', '.join(running)} will finish"
            }
        return {"ok": f"tasks {listed} flagged as revoked"}

    def hello(self, arguments: dict[str, Any]) -> dict[str, Any] | None:
        """Celery's startup sync ("mingle"): take the peer's revoked ids, give ours and our clock."""
        if arguments.get("from_node") == self.hostname:
            return None
        theirs = arguments.get("revoked")
        # Celery 5.7 sends a list of ids; older versions a dict of id -> time.
        self.revoked.add(i for i in (theirs or ()) if isinstance(i, str))
        return {"revoked": self.revoked.ids(), "clock": self.clock.forward()}

    def reserved(self, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        """Deliveries held but not started, in ``active``'s shape; arguments as the sender's repr, cut to 1 KiB.

        Their bodies are not decoded for this: the headers carry all Celery shows.
        """
        infos = []
        for message in self.worker.reserved():
            headers = message.headers or {}
            name = header_text(headers.get("task"))
            args, kwargs = (header_text(headers.get(key)) or "" for key in ("argsrepr", "kwargsrepr"))
            infos.append({
                "id": header_text(headers.get("id")), "name": name, "type": name,
                "args": _shown(None, args, safe=True), "kwargs": _shown(None, kwargs, safe=True),
                "hostname": self.hostname, "time_start": None, "acknowledged": False, "worker_pid": None,
                "delivery_info": {"exchange": message.exchange, "routing_key": message.routing_key,
                                  "priority": message.priority, "redelivered": message.redelivered},
            })  # fmt: skip
        return infos

    def _soon(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` on the worker's loop after the reply has gone (as Celery's ``call_soon``)."""
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("control command failed after its reply", exc_info=task.exception())

    def add_consumer(self, arguments: dict[str, Any]) -> dict[str, str]:
        """Consume one more queue (its definition from the app's routing, or a plain durable queue)."""
        queue = arguments.get("queue")
        if not isinstance(queue, str) or not queue:
            return {"error": "add_consumer needs a queue name"}
        self._soon(self.worker.add_queue(self.worker.app.router.queue(queue)))
        return {"ok": f"add consumer {queue}"}

    def cancel_consumer(self, arguments: dict[str, Any]) -> dict[str, str]:
        """Stop consuming a queue; deliveries from it already in the worker still run."""
        queue = arguments.get("queue")
        if not isinstance(queue, str) or not queue:
            return {"error": "cancel_consumer needs a queue name"}
        self._soon(self.worker.remove_queue(queue))
        return {"ok": f"no longer consuming from {queue}"}

    def shutdown(self, arguments: dict[str, Any]) -> dict[str, str]:
        """Stop the worker as on SIGTERM (finish running tasks, hand the rest back)."""
        log.warning("Got shutdown from remote")
        self._soon(self.worker.stop())
        return {"ok": "shutting down"}

    def rate_limit(self, arguments: dict[str, Any]) -> dict[str, str]:
        """Change a task's rate limit in this worker process; Celery's replies."""
        name, limit = arguments.get("task_name"), arguments.get("rate_limit")
        try:
            parse_rate(limit)
        except ConfigurationError as exc:
            return {"error": f"Invalid rate limit string: {exc}"}
        if not isinstance(name, str) or name not in self.worker.app.tasks:
            log.error("rate limit attempt for unknown task %r", name)
            return {"error": "unknown task"}
        self.worker.rate_limits.set(name, limit)
        if not parse_rate(limit):
            log.info("rate limits disabled for tasks of type %s", name)
            return {"ok": "rate limit disabled successfully"}
        log.info("new rate limit for tasks of type %s: %s", name, limit)
        return {"ok": "new rate limit set successfully"}

    def events(self, *, on: bool) -> dict[str, str]:
        """Turn task events on or off, as ``celery control enable_events`` (and Flower) ask."""
        from ..monitoring.event_middleware import EventsMiddleware

        for middleware in self.worker.app.middleware:
            if isinstance(middleware, EventsMiddleware):
                return {"ok": middleware.switch(self.worker, on=on)}
        return {"error": "this worker's app has no events middleware"}

    def check(self, msg: TaskMessage) -> None:
        """Before a task runs: note its start time, and raise :class:`Revoked` if it was revoked."""
        if msg.id in self.revoked:
            raise Revoked("revoked")
        self.started[msg.id] = time.time()
        self.started.move_to_end(msg.id)
        while len(self.started) > self._max_started:
            self.started.popitem(last=False)


__all__ = ["DEFAULT_TASK_INFO_ITEMS", "REVOKES_MAX", "REVOKE_EXPIRES_S", "Commands", "RevokedIds", "broker_info"]
