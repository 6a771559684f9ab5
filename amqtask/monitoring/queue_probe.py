"""The app's known queues and their counts from passive declares (``amqtask queues``, ``amqtask top``).

A passive declare answers with the ready count and the consumer count of one queue, needs no
management plugin and no permission beyond the vhost's, and declares nothing: a queue that does not
exist is reported missing, not created. Unacked counts are not in that answer; ``top`` estimates them
from events (see :mod:`~amqtask.monitoring.live_state`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import topology
from ..errors import TopologyNotFoundError

if TYPE_CHECKING:
    from ..app import App
    from ..connection import Broker


@dataclass(frozen=True)
class QueueCounts:
    """One queue as a passive declare sees it; ``ready`` and ``consumers`` are ``None`` when it is missing."""

    name: str
    ready: int | None
    consumers: int | None

    @property
    def exists(self) -> bool:
        return self.ready is not None


def known_queues(app: App) -> list[str]:
    """The queues the app's routing knows: the default queue, the configured ones, and each task's own."""
    router = app.router
    names = [spec.name for spec in router.all_queues()]
    for name in sorted(app.tasks):
        queue = task_queue(app, name)
        if queue is not None:
            names.append(queue)
    return list(dict.fromkeys(names))


def task_queue(app: App, name: str) -> str | None:
    """The queue a task of this name is sent to by the app's routing (``None``: an exchange route only)."""
    task = app.tasks.get(name)
    try:
        route = app.router.route(name, {}, task.route_options() if task else {})
    except Exception:  # a routing rule that fails on a bare name: the queue is simply unknown here
        return None
    return route.queue.name if route.queue is not None else None


async def probe(broker: Broker, name: str) -> QueueCounts:
    """Ready and consumer counts of queue ``name``, by a passive declare on a channel of its own."""
    try:
        ready, consumers = await topology.queue_counts(broker, name)
    except TopologyNotFoundError:
        return QueueCounts(name, None, None)
    return QueueCounts(name, ready, consumers)


async def probe_all(broker: Broker, names: list[str]) -> list[QueueCounts]:
    """:func:`probe` for each queue, in order."""
    return [await probe(broker, name) for name in names]


__all__ = ["QueueCounts", "known_queues", "probe", "probe_all", "task_queue"]
