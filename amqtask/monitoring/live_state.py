"""What ``amqtask top`` shows, as plain data: workers, queues and tasks, built from events and queue probes.

Pure and clock-free: the caller hands in each event (as :mod:`~amqtask.monitoring.receiver` yields it)
and each passive-declare sample with the moment it arrived, and asks for a :class:`Snapshot` at a
moment of its choosing, so a test drives it with made-up times.

Where each figure comes from, so that no management plugin is needed:

- workers: ``worker-online``/``-heartbeat``/``-offline`` and the hostname of every task event. A worker
  is down after ``worker-offline``, or when no event came from it for two heartbeat periods (Celery's
  expiry window).
- queues: ``ready`` and ``consumers`` from passive declares; ``unacked`` counts the tasks workers said
  they received (``task-received``) and have not finished; ``out/s`` the tasks received per second;
  ``in/s`` what the ready count grew by plus what went out. A task's queue is found by the app's
  routing from its name, as events do not carry the queue.
- tasks: runtimes from ``task-succeeded``, failures and the last exception from ``task-failed``, named
  by the ``task-received`` (or ``task-sent``) before them, as only those events carry the task's name.

Events are counted from when the view started: a task received before then is not in ``unacked``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

#: Seconds of history behind each rate.
RATE_WINDOW_S = 5.0
#: Celery's heartbeat expiry: a worker is down once two heartbeat periods pass without a word from it.
HEARTBEAT_EXPIRY_PERIODS = 2.0
DEFAULT_HEARTBEAT_S = 2.0
#: Rows in the slowest and failing task tables.
TOP_TASKS = 5
#: Tasks between received and finished that are remembered; beyond it the oldest are forgotten (their
#: finishing events may have been lost), so the view's memory is bounded.
MAX_TRACKED = 100_000
FINISHED = frozenset({"task-succeeded", "task-failed", "task-retried", "task-rejected", "task-revoked"})


@dataclass(frozen=True)
class WorkerRow:
    hostname: str
    up: bool
    in_flight: int
    done: int
    failed: int
    done_per_s: float
    failed_per_s: float


@dataclass(frozen=True)
class QueueRow:
    name: str
    ready: int | None  # None: not probed yet, or the queue does not exist
    unacked: int
    consumers: int | None
    in_per_s: float
    out_per_s: float


@dataclass(frozen=True)
class TaskRow:
    name: str
    succeeded: int
    failed: int
    mean_runtime_s: float | None
    max_runtime_s: float | None
    last_exception: str | None


@dataclass(frozen=True)
class Snapshot:
    """Everything on one screen of ``amqtask top``."""

    workers: list[WorkerRow]
    queues: list[QueueRow]
    slowest: list[TaskRow]
    failing: list[TaskRow]


class _Rate:
    """Moments of one kind of event within the rate window."""

    def __init__(self) -> None:
        self.moments: deque[float] = deque()

    def add(self, now: float) -> None:
        self.moments.append(now)

    def since(self, start: float) -> int:
        return sum(1 for moment in self.moments if moment > start)

    def per_s(self, now: float, span: float) -> float:
        while self.moments and self.moments[0] <= now - RATE_WINDOW_S:
            self.moments.popleft()
        return self.since(now - span) / span


@dataclass
class _Worker:
    last_seen: float
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    offline: bool = False
    running: set[str] = field(default_factory=set)
    done: int = 0
    failed: int = 0
    done_rate: _Rate = field(default_factory=_Rate)
    failed_rate: _Rate = field(default_factory=_Rate)


@dataclass
class _Queue:
    samples: deque[tuple[float, int]] = field(default_factory=deque)  # (moment, ready) within the window
    consumers: int | None = None
    exists: bool = True
    held: set[str] = field(default_factory=set)
    out: _Rate = field(default_factory=_Rate)


@dataclass
class _Task:
    succeeded: int = 0
    failed: int = 0
    runtime_total_s: float = 0.0
    max_runtime_s: float | None = None
    last_exception: str | None = None


class LiveState:
    """Folds events and queue samples into what :class:`Snapshot` shows.

    ``queue_of`` names the queue a task goes to (``None``: unknown); ``queues`` are shown even before
    anything is known about them.
    """

    def __init__(self, queue_of: Callable[[str], str | None], queues: Iterable[str], started: float) -> None:
        self.queue_of = queue_of
        self.started = started
        self.workers: dict[str, _Worker] = {}
        self.queues: dict[str, _Queue] = {name: _Queue() for name in queues}
        self.tasks: dict[str, _Task] = {}
        self._pending: dict[str, tuple[str, str | None]] = {}  # uuid -> (name, queue) of tasks not finished

    # ------------------------------------------------------------------------------------------ input
    def apply(self, event: dict[str, Any], now: float) -> None:
        """Take one event, received at ``now``."""
        kind = str(event.get("type", ""))
        hostname = event.get("hostname")
        if kind.startswith("worker-") and isinstance(hostname, str):
            self._worker_event(kind, hostname, event, now)
            return
        uuid = event.get("uuid")
        if not kind.startswith("task-") or not isinstance(uuid, str):
            return
        worker = self._seen(hostname, now) if isinstance(hostname, str) else None
        if kind == "task-received":
            self._received(uuid, event.get("name"), now)
        elif kind == "task-sent" and isinstance(event.get("name"), str):
            self._remember(uuid, event["name"], None)
        elif kind == "task-started" and worker is not None:
            worker.running.add(uuid)
        elif kind in FINISHED:
            self._finished(kind, uuid, event, worker, now)

    def observe_queue(self, name: str, ready: int | None, consumers: int | None, now: float) -> None:
        """Take one passive declare of queue ``name``: ``ready`` is ``None`` when the queue does not exist."""
        queue = self.queues.setdefault(name, _Queue())
        queue.exists = ready is not None
        queue.consumers = consumers
        if ready is None:
            queue.samples.clear()
            return
        queue.samples.append((now, ready))
        while len(queue.samples) > 1 and queue.samples[0][0] < now - RATE_WINDOW_S:
            queue.samples.popleft()

    def _worker_event(self, kind: str, hostname: str, event: dict[str, Any], now: float) -> None:
        worker = self._seen(hostname, now)
        worker.offline = kind == "worker-offline"
        freq = event.get("freq")
        if isinstance(freq, int | float) and freq > 0:
            worker.heartbeat_s = float(freq)

    def _seen(self, hostname: str, now: float) -> _Worker:
        worker = self.workers.get(hostname)
        if worker is None:
            worker = self.workers[hostname] = _Worker(last_seen=now)
        worker.last_seen = now
        worker.offline = False
        return worker

    def _received(self, uuid: str, name: Any, now: float) -> None:
        if not isinstance(name, str):
            return
        queue_name = self.queue_of(name)
        self._remember(uuid, name, queue_name)
        if queue_name is not None:
            queue = self.queues.setdefault(queue_name, _Queue())
            queue.held.add(uuid)
            queue.out.add(now)

    def _remember(self, uuid: str, name: str, queue_name: str | None) -> None:
        self._pending[uuid] = (name, queue_name)
        if len(self._pending) > MAX_TRACKED:
            forgotten = next(iter(self._pending))
            self._forget(forgotten)

    def _forget(self, uuid: str) -> str | None:
        name, queue_name = self._pending.pop(uuid, (None, None))
        if queue_name is not None:
            self.queues[queue_name].held.discard(uuid)
        return name

    def _finished(self, kind: str, uuid: str, event: dict[str, Any], worker: _Worker | None, now: float) -> None:
        name = self._forget(uuid)
        if worker is not None:
            worker.running.discard(uuid)
        task = self.tasks.setdefault(name, _Task()) if name is not None else None
        if kind == "task-succeeded":
            if worker is not None:
                worker.done += 1
                worker.done_rate.add(now)
            runtime = event.get("runtime")
            if task is not None:
                task.succeeded += 1
                if isinstance(runtime, int | float):
                    task.runtime_total_s += runtime
                    task.max_runtime_s = max(task.max_runtime_s or 0.0, float(runtime))
        elif kind == "task-failed":
            if worker is not None:
                worker.failed += 1
                worker.failed_rate.add(now)
            if task is not None:
                task.failed += 1
                task.last_exception = str(event.get("exception") or "") or None

    # ----------------------------------------------------------------------------------------- output
    def snapshot(self, now: float) -> Snapshot:
        """What the screen shows at ``now``."""
        span = min(RATE_WINDOW_S, max(now - self.started, 1.0))
        workers = [self._worker_row(hostname, worker, now, span) for hostname, worker in sorted(self.workers.items())]
        queues = [self._queue_row(name, queue, now, span) for name, queue in sorted(self.queues.items())]
        tasks = [self._task_row(name, task) for name, task in self.tasks.items()]
        slowest = sorted((t for t in tasks if t.mean_runtime_s is not None), key=lambda t: -(t.mean_runtime_s or 0.0))
        failing = sorted((t for t in tasks if t.failed), key=lambda t: (-t.failed, t.name))
        return Snapshot(workers, queues, slowest[:TOP_TASKS], failing[:TOP_TASKS])

    @staticmethod
    def _worker_row(hostname: str, worker: _Worker, now: float, span: float) -> WorkerRow:
        up = not worker.offline and now - worker.last_seen <= worker.heartbeat_s * HEARTBEAT_EXPIRY_PERIODS
        return WorkerRow(hostname, up, len(worker.running) if up else 0, worker.done, worker.failed,
                         worker.done_rate.per_s(now, span), worker.failed_rate.per_s(now, span))  # fmt: skip

    @staticmethod
    def _queue_row(name: str, queue: _Queue, now: float, span: float) -> QueueRow:
        out_per_s = queue.out.per_s(now, span)
        ready = queue.samples[-1][1] if queue.exists and queue.samples else None
        in_per_s = 0.0
        if len(queue.samples) > 1:
            (first_at, first_ready), (last_at, last_ready) = queue.samples[0], queue.samples[-1]
            elapsed = last_at - first_at
            if elapsed > 0:  # what arrived = what the ready count grew by + what went out meanwhile
                in_per_s = max(0.0, (last_ready - first_ready + queue.out.since(first_at)) / elapsed)
        return QueueRow(name, ready, len(queue.held), queue.consumers, in_per_s, out_per_s)

    @staticmethod
    def _task_row(name: str, task: _Task) -> TaskRow:
        mean = task.runtime_total_s / task.succeeded if task.succeeded and task.max_runtime_s is not None else None
        return TaskRow(name, task.succeeded, task.failed, mean, task.max_runtime_s, task.last_exception)


__all__ = ["RATE_WINDOW_S", "LiveState", "QueueRow", "Snapshot", "TaskRow", "WorkerRow"]
