"""The middleware that turns a worker's hooks into Celery's events (``amqtask worker -E``).

Off unless ``worker_send_task_events`` (workers) or ``task_send_sent_event`` (producers) is set, or
a worker's events were switched on (``control enable_events``): until then no hook of it is awaited
(``middleware/hooks.py``), and after that each costs one dict lookup. It sits after signing and
remote control in the middleware list, so a message that failed verification never produces an event
(its ``before_process`` never runs here), and a task refused as revoked yields ``task-revoked`` alone,
as from a Celery worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import os
import platform
import time
import weakref
from importlib import metadata
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..connection import Broker
from ..failures import format_traceback
from ..middleware import Middleware
from ..middleware.hooks import hooks_changed
from ..worker.delivery import ETA_TOLERANCE
from .events import EventPublisher, json_string, quote

if TYPE_CHECKING:
    from ..app import App
    from ..errors import Reject, Retry
    from ..protocol import ResultMessage, TaskMessage, WireMessage
    from ..routing import Route
    from ..worker.worker import Worker

#: Seconds between ``worker-heartbeat`` events (Celery's default; Flower marks a worker offline after ~2x).
HEARTBEAT_S = 2.0
SOFTWARE = "py-amqtask"


@functools.cache
def _version() -> str:
    try:
        return metadata.version("amqtask")
    except metadata.PackageNotFoundError:  # run from a source tree
        return "0"


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _task_members(message: TaskMessage) -> str:
    """What ``task-sent`` and ``task-received`` say about a task, as the JSON members events take."""
    args = message.argsrepr if message.argsrepr is not None else protocol.short_repr(tuple(message.args))
    kwargs = message.kwargsrepr if message.kwargsrepr is not None else protocol.short_repr(message.kwargs)
    return (
        f'"uuid":{quote(message.id)},"name":{quote(message.task)},"args":{quote(args)},"kwargs":{quote(kwargs)},'
        f'"root_id":{quote(message.root_id or message.id)},"parent_id":{json_string(message.parent_id)},'
        f'"retries":{message.retries:d},"eta":{json_string(_iso(message.eta))},'
        f'"expires":{json_string(_iso(message.expires))},'
    )  # fmt: skip


def _runs_now(message: TaskMessage) -> bool:
    """Whether the worker starts the task now (not expired, not sent back to wait for its eta)."""
    if message.eta is None and message.expires is None:  # the common case, without a clock read
        return True
    now = dt.datetime.now(dt.timezone.utc)
    expired = message.expires is not None and now >= message.expires
    early = message.eta is not None and message.eta - now > ETA_TOLERANCE
    return not (expired or early)


class WorkerEvents:
    """The events of one running worker: its publisher, heartbeat and the start times of its tasks."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        # A connection of its own, as a Celery worker's event dispatcher has: on the worker's, each batch of
        # events went through the same socket and broker reader as the deliveries' acks and results (a
        # tenth to a quarter of what events cost a worker per task, in two A/B runs), and a broker blocking publishers
        # would hold the acks up behind them. Quiet about an unreachable broker: the worker's connection says so.
        self.broker = Broker(worker.app.conf, name=f"{worker.app.main}-events-{os.getpid()}", warnings=False)
        self.publisher = EventPublisher(self.broker, worker.hostname)
        self.started: dict[str, float] = {}
        #: Off after ``control disable_events``: heartbeats go on (Flower keeps the worker online), task events stop.
        self.task_events = True
        self._heartbeat: asyncio.Task[None] | None = None

    def worker_event(self, event_type: str) -> None:
        """Queue ``worker-online``, ``-heartbeat`` or ``-offline`` with the worker's counters."""
        self.publisher.send(
            event_type, freq=HEARTBEAT_S, sw_ident=SOFTWARE, sw_ver=_version(), sw_sys=platform.system(),
            active=len(self.worker.active), processed=self.worker.stats["processed"],
            loadavg=[round(load, 2) for load in os.getloadavg()],
        )  # fmt: skip

    def start(self) -> None:
        self.worker_event("worker-online")
        self._heartbeat = asyncio.create_task(self._beat(), name=f"amqtask-heartbeat-{self.worker.hostname}")

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        self.worker_event("worker-offline")
        await self.publisher.close()
        await self.broker.close()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self.worker_event("worker-heartbeat")

    def finished(self, task_id: str) -> float | None:
        """Seconds since the task started, forgetting it; None if it was not seen starting."""
        began = self.started.pop(task_id, None)
        return None if began is None else time.perf_counter() - began


class EventsMiddleware(Middleware):
    """Publishes Celery's task and worker events for workers with ``worker_send_task_events``."""

    def __init__(self) -> None:
        self.workers: dict[Worker, WorkerEvents] = {}
        self._producers: weakref.WeakKeyDictionary[Broker, EventPublisher] = weakref.WeakKeyDictionary()

    def wants(self, hook: str, app: App) -> bool:
        if hook == "after_publish":
            return bool(app.conf.task_send_sent_event)
        # Deliveries waiting when the worker starts arrive before on_worker_start: the setting counts too.
        return bool(app.conf.worker_send_task_events) or any(w.app is app for w in self.workers)

    async def on_worker_start(self, worker: Worker) -> None:
        if worker.app.conf.worker_send_task_events:
            self.switch(worker, on=True)

    async def on_worker_stop(self, worker: Worker) -> None:
        events = self.workers.pop(worker, None)
        if events is not None:
            hooks_changed()
            await events.stop()

    def switch(self, worker: Worker, *, on: bool) -> str:
        """Turn a running worker's task events on or off (``control enable_events``, which Flower sends every
        few seconds, as to Celery workers); the reply text is Celery's."""
        events = self.workers.get(worker)
        if on:
            if events is not None and events.task_events:
                return "task events already enabled"
            if events is None:
                events = self.workers[worker] = WorkerEvents(worker)
                events.start()
                hooks_changed()
            events.task_events = True
            return "task events enabled"
        if events is None or not events.task_events:
            return "task events already disabled"
        events.task_events = False
        return "task events disabled"

    def _sending(self, worker: Worker) -> WorkerEvents | None:
        events = self.workers.get(worker)
        if events is None and worker.app.conf.worker_send_task_events:
            # Deliveries already waiting arrive before on_worker_start: start here, worker-online first.
            self.switch(worker, on=True)
            events = self.workers[worker]
        return events if events is not None and events.task_events else None

    async def after_publish(self, app: App, message: TaskMessage, route: Route) -> None:
        if not app.conf.task_send_sent_event:
            return
        broker = app.runtime().broker
        publisher = self._producers.get(broker)
        if publisher is None:
            # Given a weak proxy of the broker: a value that held its key would keep both alive after
            # their event loop ended (one broker and publisher left behind per loop sent from).
            publisher = self._producers[broker] = EventPublisher(weakref.proxy(broker), protocol.origin_name())
        queue = route.queue.name if route.queue is not None else None
        await publisher.send_now("task-sent", _task_members(message), queue=queue, exchange=route.exchange,
                                 routing_key=route.routing_key)  # fmt: skip

    async def before_process(self, worker: Worker, message: TaskMessage, wire: WireMessage) -> None:
        events = self._sending(worker)
        if events is None:
            return
        publisher = events.publisher
        texts = publisher.text("task-received", _task_members(message))
        if _runs_now(message):
            events.started[message.id] = time.perf_counter()
            texts += "," + publisher.text("task-started", f'"uuid":{quote(message.id)},')
        publisher.send_task_events(texts)

    async def after_success(self, worker: Worker, message: TaskMessage, value: Any, report: ResultMessage) -> None:
        events = self._sending(worker)
        if events is None:
            return
        runtime = events.finished(message.id) or 0.0
        members = (f'"uuid":{quote(message.id)},"result":{quote(protocol.short_repr(value))},'
                   f'"runtime":{runtime!r},')  # fmt: skip
        events.publisher.send_task_events(events.publisher.text("task-succeeded", members))

    async def after_failure(
        self, worker: Worker, message: TaskMessage, exc: BaseException, report: ResultMessage
    ) -> None:
        events = self._sending(worker)
        if events is None:
            return
        started = events.finished(message.id)
        if report.status == protocol.REVOKED:
            # Revoked or expired before running; only verified messages get this far (signing comes first).
            expired = "expired" in str(exc)
            events.publisher.send("task-revoked", uuid=message.id, terminated=False, signum=None, expired=expired)
        elif started is not None:
            # Not for a task that never started here (unknown to this worker, or refused before verification).
            events.publisher.send("task-failed", uuid=message.id, exception=repr(exc), traceback=format_traceback(exc))

    async def on_retry(self, worker: Worker, message: TaskMessage, retry: Retry) -> None:
        events = self._sending(worker)
        if events is None:
            return
        events.finished(message.id)
        cause = retry.exc if retry.exc is not None else retry
        events.publisher.send("task-retried", uuid=message.id, exception=repr(cause),
                              traceback=format_traceback(cause))  # fmt: skip

    async def after_reject(self, worker: Worker, message: TaskMessage, reject: Reject) -> None:
        events = self._sending(worker)
        if events is None:
            return
        events.finished(message.id)
        events.publisher.send("task-rejected", uuid=message.id, requeue=reject.requeue)


__all__ = ["HEARTBEAT_S", "EventsMiddleware", "WorkerEvents"]
