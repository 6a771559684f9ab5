"""The worker's side of remote control: its mailbox queue, the commands it answers, and revokes.

Each running worker gets a :class:`ControlNode` that consumes ``<hostname>.celery.pidbox`` (see
:mod:`amqtask.control` for the wire format) on a channel of its own, so a failing reply never stops
the task consumers, and the other way round. Commands: ``ping``, ``registered``, ``active``, ``stats``,
``revoke``, ``revoked`` and ``hello`` (Celery workers send it at startup to share revoked ids).

Revoked ids live in the worker's memory, bounded and expiring like Celery's: a worker started after a
revoke does not know it, and a restart forgets it. A delivery whose id was revoked is acked and
answered REVOKED without running (:class:`~amqtask.errors.Revoked` from :meth:`before_process`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import aiormq
from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from .. import control, serializers
from ..connection import RECOVERABLE_ERRORS
from ..errors import AmqtaskError, Revoked, SerializationError
from ..producer import to_amqp
from ..urls import mask_url
from . import Middleware

if TYPE_CHECKING:
    from ..protocol import TaskMessage, WireMessage
    from ..worker.worker import Worker

log = logging.getLogger("amqtask.control")

#: Celery's limits for its in-memory revoke set (``REVOKES_MAX``, ``REVOKE_EXPIRES``).
REVOKES_MAX = 50_000
REVOKE_EXPIRES_S = 3 * 3600.0
#: What ``registered`` shows per task when the request names no options (Celery's default).
DEFAULT_TASK_INFO_ITEMS = ("exchange", "routing_key", "rate_limit")
#: Failures that end one attempt to consume or reply, but not remote control.
_TRANSIENT: tuple[type[BaseException], ...] = (*RECOVERABLE_ERRORS, AmqtaskError)


#: How long a starting worker waits for its control consumer before it gets on with the tasks.
CONTROL_READY_WAIT_S = 5.0


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


def _matches(hostname: str, body: dict[str, Any]) -> bool:
    """Whether a request is addressed to ``hostname``: kombu's ``destination`` / ``pattern`` rules."""
    destination = body.get("destination")
    if destination:
        return isinstance(destination, list | tuple) and hostname in destination
    pattern, matcher = body.get("pattern"), body.get("matcher")
    if pattern and matcher:
        if matcher == "glob":
            return fnmatch.fnmatch(hostname, str(pattern))
        if matcher == "pcre":
            try:
                return re.match(str(pattern), hostname) is not None
            except re.error as exc:
                log.error("control request with an invalid pattern %r ignored: %s", pattern, exc)
                return False
        log.error("control request with unknown matcher %r ignored", matcher)
        return False
    return True


def broker_info(url: str, others: Iterable[str], heartbeat: float, connect_timeout: float) -> dict[str, Any]:
    """The ``broker`` section of ``stats`` in Celery's shape; credentials masked."""
    parts = urlsplit(url)
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


def _rusage() -> dict[str, float]:
    try:
        import resource
    except ImportError:  # not on Windows
        return {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    fields = ("utime", "stime", "maxrss", "minflt", "majflt", "inblock", "oublock", "nvcsw", "nivcsw")
    return {name: getattr(usage, f"ru_{name}") for name in fields}


class ControlNode:
    """One worker's mailbox: consumes its request queue, runs commands, publishes replies."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.hostname = worker.hostname
        self.clock = control.LamportClock()
        self.revoked = RevokedIds()
        #: When each recent task started (for ``active``); bounded, since nothing says when to forget.
        self.started: OrderedDict[str, float] = OrderedDict()
        self._max_started = max(1024, 4 * worker.prefetch)
        conf = worker.app.conf
        self._accept = serializers.normalize_accept(conf.accept_content)
        self._limits = serializers.CONTROL_LIMITS
        self._ready = asyncio.Event()
        self._serving: asyncio.Task[None] | None = None
        self._replies: AbstractChannel | None = None
        self._reply_exchanges: set[str] = set()
        self._commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ping": lambda _: {"ok": "pong"},
            "registered": self.registered,
            "active": self.active,
            "stats": self.stats,
            "revoke": self.revoke,
            "revoked": lambda _: self.revoked.ids(),
            "hello": self.hello,
        }

    # ------------------------------------------------------------------------------------------ consuming
    async def start(self, timeout: float) -> None:
        """Start consuming; wait (up to ``timeout``) until requests arrive, or it is clear they cannot."""
        self._serving = asyncio.create_task(self._serve(), name=f"amqtask-control-{self.hostname}")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("remote control for %s is not ready after %.1fs; still trying", self.hostname, timeout)

    async def stop(self) -> None:
        """Stop consuming and close the node's channels (the exclusive queue goes with them)."""
        if self._serving is not None:
            self._serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serving
        if self._replies is not None and not self._replies.is_closed:
            with contextlib.suppress(*RECOVERABLE_ERRORS):
                await self._replies.close()

    async def _serve(self) -> None:
        """Consume until stopped, starting over after the channel or connection is lost."""
        failures = 0
        while True:
            interrupted = asyncio.Event()
            try:
                channel = await self._consume(interrupted)
            except aiormq.exceptions.ChannelLockedResource:
                log.error(
                    "another worker named %r already consumes %s; remote control is off for this worker "
                    "(give each worker its own hostname with -n)",
                    self.hostname,
                    control.worker_queue_name(self.hostname),
                )
                self._ready.set()
                return
            except _TRANSIENT as exc:
                failures += 1
                log.warning("remote control for %s interrupted (%s); consuming again", self.hostname, exc)
                await asyncio.sleep(min(5.0, 0.05 * 2**failures))
                continue
            failures = 0
            self._ready.set()
            try:
                await interrupted.wait()
            finally:
                if not channel.is_closed:
                    with contextlib.suppress(*RECOVERABLE_ERRORS):
                        await channel.close()

    async def _consume(self, interrupted: asyncio.Event) -> AbstractChannel:
        channel = await self.worker.runtime.broker.channel(confirms=False)
        try:
            channel.close_callbacks.add(lambda *_: interrupted.set())
            # aiormq drops a broker-sent basic.cancel (e.g. the queue was deleted) without a word.
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(lambda *_: interrupted.set())
            await control.declare_exchange(channel, control.EXCHANGE, ExchangeType.FANOUT)
            queue = await channel.declare_queue(
                control.worker_queue_name(self.hostname),
                exclusive=True,
                auto_delete=True,
                arguments=control.QUEUE_ARGUMENTS,
            )
            await queue.bind(control.EXCHANGE, "")
            await queue.consume(self._on_request, no_ack=True)
        except BaseException:
            if not channel.is_closed:
                with contextlib.suppress(*RECOVERABLE_ERRORS):
                    await channel.close()
            raise
        return channel

    # ------------------------------------------------------------------------------------------ requests
    async def _on_request(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        self.clock.adjust(headers.get("clock"))
        if control.expired(headers):
            log.debug("dropping an expired control request")
            return
        try:
            body = serializers.decode(message.body, message.content_type, self._accept, self._limits)
        except SerializationError as exc:
            log.error("dropping an unreadable control request: %s", exc)
            return
        if not isinstance(body, dict) or not isinstance(body.get("method"), str):
            log.error("dropping a control request without a method: %r", body)
            return
        if not _matches(self.hostname, body):
            return
        reply = self.dispatch(body["method"], body.get("arguments"))
        reply_to = body.get("reply_to")
        if isinstance(reply_to, dict):
            # Answer in the request's encoding: a Celery client may accept nothing else.
            msgpack = message.content_type == serializers.MSGPACK_CONTENT_TYPE
            codec = serializers.MSGPACK if msgpack else serializers.JSON
            await self._reply(reply_to, control.header_text(body.get("ticket")), {self.hostname: reply}, codec)

    def dispatch(self, method: str, arguments: Any) -> Any:
        """Run one command; failures become ``{"error": ...}`` replies, as kombu sends them."""
        command = self._commands.get(method)
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

    async def _reply(
        self, reply_to: dict[str, Any], ticket: str | None, data: dict[str, Any], codec: serializers.Codec
    ) -> None:
        exchange, routing_key = reply_to.get("exchange"), reply_to.get("routing_key")
        if not isinstance(exchange, str) or not isinstance(routing_key, str):
            log.error("control request with an unusable reply_to %r", reply_to)
            return
        headers = {"ticket": ticket, "clock": self.clock.forward()}
        try:
            wire = control.encode_message(data, headers, codec, reply=True)
        except SerializationError as exc:
            wire = control.encode_message({self.hostname: {"error": str(exc)}}, headers, codec, reply=True)
        try:
            channel = await self._reply_channel()
            if exchange and exchange not in self._reply_exchanges:
                # kombu declares the reply exchange before every reply; once per channel is enough.
                await control.declare_exchange(channel, exchange, ExchangeType.DIRECT)
                self._reply_exchanges.add(exchange)
            target = await channel.get_exchange(exchange, ensure=False) if exchange else channel.default_exchange
            await target.publish(to_amqp(wire), routing_key, mandatory=False)
        except _TRANSIENT as exc:
            log.warning("could not reply to a control request (%s)", exc)

    async def _reply_channel(self) -> AbstractChannel:
        if self._replies is None or self._replies.is_closed:
            self._replies = await self.worker.runtime.broker.channel(confirms=False)
            self._reply_exchanges.clear()
        return self._replies

    # ------------------------------------------------------------------------------------------ commands
    def registered(self, arguments: dict[str, Any]) -> list[str]:
        """Sorted task names, with ``name [option=value ...]`` for the requested options that are set."""
        items = [
            item
            for item in (arguments.get("taskinfoitems") or DEFAULT_TASK_INFO_ITEMS)
            if isinstance(item, str) and not item.startswith("_")
        ]
        names = []
        for name, task in sorted(self.worker.app.tasks.items()):
            fields = [f"{item}={task.options[item]}" for item in items if task.options.get(item) is not None]
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
            "args": msg.argsrepr if safe else msg.args,
            "kwargs": msg.kwargsrepr if safe else msg.kwargs,
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

    # ------------------------------------------------------------------------------------------ tasks
    def check(self, msg: TaskMessage) -> None:
        """Before a task runs: note its start time, and raise :class:`Revoked` if it was revoked."""
        if msg.id in self.revoked:
            raise Revoked("revoked")
        self.started[msg.id] = time.time()
        self.started.move_to_end(msg.id)
        while len(self.started) > self._max_started:
            self.started.popitem(last=False)


class ControlMiddleware(Middleware):
    """Runs a :class:`ControlNode` for each worker of the app, and skips revoked tasks."""

    def __init__(self) -> None:
        self.nodes: dict[Worker, ControlNode] = {}

    async def on_worker_start(self, worker: Worker) -> None:
        """Start the worker's control consumer; a worker without remote control still runs tasks."""
        node = ControlNode(worker)
        self.nodes[worker] = node
        # Bounded: remote control is not worth delaying the tasks for; it goes on trying in the background.
        await node.start(min(worker.app.conf.publish_timeout_s, CONTROL_READY_WAIT_S))

    async def on_worker_stop(self, worker: Worker) -> None:
        """Stop the worker's control consumer."""
        node = self.nodes.pop(worker, None)
        if node is not None:
            await node.stop()

    async def before_process(self, worker: Worker, message: TaskMessage, wire: WireMessage) -> None:
        """Refuse a revoked task (acked, answered REVOKED) and note when the others start."""
        node = self.nodes.get(worker)
        if node is not None:
            node.check(message)


__all__ = ["CONTROL_READY_WAIT_S", "ControlMiddleware", "ControlNode", "RevokedIds"]
