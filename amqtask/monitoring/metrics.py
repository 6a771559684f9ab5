"""Prometheus metrics of a worker (``amqtask worker --metrics-port 9808``), with ``prometheus-client``.

The optional extra ``amqtask[metrics]`` brings the library; it is imported only when metrics are on, and
its absence is a :class:`~amqtask.errors.ConfigurationError` saying what to install.

One process serves its own registry on the port. With ``-P N`` the supervisor serves the port and the
children record into files under ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode),
so one scrape shows the sum of all children; a child's counts stay after it is replaced, and its gauges
leave with it.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import os
import time
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..errors import ConfigurationError
from ..middleware import Middleware, current_queue

if TYPE_CHECKING:
    from ..app import App
    from ..errors import Reject, Retry
    from ..protocol import ResultMessage, TaskMessage, WireMessage
    from ..worker.worker import Worker

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONNECTION_POLL_S = 1.0
OUTCOMES = ("succeeded", "failed", "retried", "dead_lettered", "revoked", "rejected")
#: Queue wait buckets (seconds). The sent time travels as the AMQP timestamp, in whole seconds, so finer
#: buckets would only show its rounding.
QUEUE_WAIT_BUCKETS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, float("inf"))
#: Start time of the task of the current delivery (set when it starts, cleared by its outcome).
_started: contextvars.ContextVar[float | None] = contextvars.ContextVar("amqtask_metrics_started", default=None)


def prometheus() -> Any:
    """The ``prometheus_client`` module, or a clear error saying how to get it."""
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            "metrics need prometheus-client: pip install 'amqtask[metrics]' (or prometheus-client)"
        ) from None
    return prometheus_client


class Metrics:
    """The metric objects of this process."""

    def __init__(self) -> None:
        client = prometheus()
        multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # Children in multiprocess mode write files only; a single process keeps a registry of its own
        # (not the global one, which may hold the application's metrics and names of its own).
        self.registry = None if multiprocess else client.CollectorRegistry()
        registry = {"registry": self.registry}
        self.tasks = client.Counter("amqtask_tasks", "Tasks finished, by outcome", ["task", "queue", "outcome"],
                                    **registry)  # fmt: skip
        self.runtime = client.Histogram("amqtask_task_runtime_seconds", "Task run time", ["task", "queue"], **registry)
        self.queue_wait = client.Histogram("amqtask_task_queue_wait_seconds",
                                           "From a task's sending (or its eta) until a worker starts it",
                                           ["task", "queue"], buckets=QUEUE_WAIT_BUCKETS, **registry)  # fmt: skip
        self.publish_confirm = client.Histogram("amqtask_publish_confirm_seconds",
                                                "From a publish until the broker confirmed it", **registry)  # fmt: skip
        self.in_flight = client.Gauge("amqtask_tasks_in_flight", "Tasks running now", ["queue"],
                                      multiprocess_mode="livesum", **registry)  # fmt: skip
        self.prefetch = client.Gauge("amqtask_prefetch", "Prefetch of the worker's consumers", ["queue"],
                                     multiprocess_mode="livesum", **registry)  # fmt: skip
        self.connected = client.Gauge("amqtask_broker_connected", "1 while the worker's broker connection is up",
                                      multiprocess_mode="livemin", **registry)  # fmt: skip

    def serve(self, port: int) -> None:
        """Serve the registry over HTTP on ``port`` (all interfaces, as Prometheus exporters do)."""
        global _serving
        prometheus().start_http_server(port, registry=self.registry)
        _serving = True


_metrics: Metrics | None = None
_serving = False


def process_metrics() -> Metrics:
    """This process's metrics, created on first use (metric names may be registered once per process)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def serve_children(port: int, directory: str) -> None:
    """The supervisor's endpoint: the sum of what the children under ``directory`` recorded."""
    client = prometheus()
    from prometheus_client import multiprocess

    registry = client.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    client.start_http_server(port, registry=registry)


def child_exited(pid: int) -> None:
    """Drop a dead child's live gauges (its counters stay in the sum)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _time_confirms(worker: Worker, metrics: Metrics) -> None:
    # Also from before_process: deliveries already waiting run (and retry, dead-letter) before
    # on_worker_start.
    publisher = worker.runtime.publisher
    if publisher.on_confirmed is None:
        publisher.on_confirmed = metrics.publish_confirm.observe


def queue_wait_s(message: TaskMessage, wire: WireMessage) -> float | None:
    """Seconds since the message was sent, or since its eta when that came later; ``None`` when unknown.

    The sent time is the AMQP ``timestamp`` property, which amqtask's producers set: Celery's protocol v2
    has no sent-time header, and a property of AMQP's own needs no header of ours that other clients
    would carry along or have to ignore. Messages sent without one (by Celery, say) are not observed. A
    task whose eta is still ahead is not observed either: it goes back to the delay levels, and is
    observed when it is delivered again, due.
    """
    sent = wire.timestamp
    if sent is None:
        return None
    now = dt.datetime.now(dt.timezone.utc)
    if sent.tzinfo is None:
        sent = sent.replace(tzinfo=dt.timezone.utc)  # AMQP timestamps are POSIX time: UTC
    due = max(sent, message.eta) if message.eta is not None else sent
    if due > now + dt.timedelta(seconds=1):
        return None  # not due yet: sent on to the delay levels (a second's grace for clocks that differ)
    return max(0.0, (now - due).total_seconds())


class MetricsMiddleware(Middleware):
    """Counts outcomes and times tasks for workers of apps with ``worker_metrics_port`` set."""

    def __init__(self) -> None:
        self._watchers: dict[Worker, asyncio.Task[None]] = {}

    def wants(self, hook: str, app: App) -> bool:
        return app.conf.worker_metrics_port is not None

    async def on_worker_start(self, worker: Worker) -> None:
        port = worker.app.conf.worker_metrics_port
        if port is None:
            return
        serving = _serving
        metrics = process_metrics()
        for queue in worker.queues:
            metrics.prefetch.labels(queue.name).set(worker.prefetch)
        _time_confirms(worker, metrics)
        self._watchers[worker] = asyncio.create_task(self._watch_connection(worker, metrics))
        if not serving and not os.environ.get(MULTIPROC_ENV):
            metrics.serve(port)

    async def on_worker_stop(self, worker: Worker) -> None:
        worker.runtime.publisher.on_confirmed = None
        watcher = self._watchers.pop(worker, None)
        if watcher is not None:
            watcher.cancel()

    async def _watch_connection(self, worker: Worker, metrics: Metrics) -> None:
        # Polled: gauges computed at scrape time do not work in multiprocess mode.
        while True:
            metrics.connected.set(1 if worker.runtime.broker.connected else 0)
            await asyncio.sleep(CONNECTION_POLL_S)

    @staticmethod
    def _metrics(worker: Worker) -> Metrics | None:
        # Looked up per hook, not set at worker start: deliveries already waiting arrive before that.
        return process_metrics() if worker.app.conf.worker_metrics_port is not None else None

    async def before_process(self, worker: Worker, message: TaskMessage, wire: WireMessage) -> None:
        metrics = self._metrics(worker)
        if metrics is not None:
            _started.set(time.perf_counter())
            _time_confirms(worker, metrics)
            queue = current_queue.get()
            metrics.in_flight.labels(queue).inc()
            waited = queue_wait_s(message, wire)
            if waited is not None:
                metrics.queue_wait.labels(message.task, queue).observe(waited)

    @staticmethod
    def _count(metrics: Metrics, message: TaskMessage, outcome: str, *, timed: bool = False) -> None:
        queue = current_queue.get()
        began = _started.get()
        if began is not None:
            _started.set(None)
            metrics.in_flight.labels(queue).dec()
            if timed:
                metrics.runtime.labels(message.task, queue).observe(time.perf_counter() - began)
        metrics.tasks.labels(message.task, queue, outcome).inc()

    async def after_success(self, worker: Worker, message: TaskMessage, value: Any, report: ResultMessage) -> None:
        metrics = self._metrics(worker)
        if metrics is not None:
            self._count(metrics, message, "succeeded", timed=True)

    async def after_failure(
        self, worker: Worker, message: TaskMessage, exc: BaseException, report: ResultMessage
    ) -> None:
        metrics = self._metrics(worker)
        if metrics is None:
            return
        if report.status == protocol.REVOKED:
            self._count(metrics, message, "revoked")
        else:
            # A task that never started here (unknown to this worker) goes straight to the dead-letter queue.
            self._count(metrics, message, "failed" if _started.get() is not None else "dead_lettered", timed=True)

    async def on_retry(self, worker: Worker, message: TaskMessage, retry: Retry) -> None:
        metrics = self._metrics(worker)
        if metrics is not None:
            self._count(metrics, message, "retried", timed=True)

    async def after_reject(self, worker: Worker, message: TaskMessage, reject: Reject) -> None:
        metrics = self._metrics(worker)
        if metrics is not None:
            self._count(metrics, message, "rejected", timed=True)


__all__ = ["MULTIPROC_ENV", "OUTCOMES", "Metrics", "MetricsMiddleware", "child_exited", "serve_children"]
