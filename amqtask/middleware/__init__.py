"""Middleware: the one extension mechanism, async hooks around publishing and processing.

Subclass :class:`Middleware`, override the hooks you need, and add an instance to ``app.middleware``.
Hooks run in list order. Canvas follow-ups (chains, callbacks, chords) and message signing are
middleware; a hook that raises :class:`~amqtask.errors.Reject` in ``before_process`` dead-letters the
message.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..app import App
    from ..errors import Reject, Retry
    from ..protocol import ResultMessage, TaskMessage, WireMessage
    from ..routing import Route
    from ..worker.worker import Worker


#: The queue of the delivery being handled, for hooks that label by queue (metrics, logs). Set by the worker
#: in each delivery's own asyncio task, so it never leaks into the next delivery.
current_queue: contextvars.ContextVar[str | None] = contextvars.ContextVar("amqtask_queue", default=None)


class Middleware:
    """Base class with no-op hooks."""

    def wants(self, hook: str, app: App) -> bool:
        """Whether the per-message ``hook`` of this middleware is worth awaiting for ``app`` now (default: yes).

        A hook left as the base class's no-op is never awaited. A middleware whose feature is off answers
        no, so that a message's path awaits nothing for it (``hooks.py``). The answer is asked again after
        a setting or the ``amqtask.worker`` log level changed; a middleware whose answer depends on
        anything else calls :func:`amqtask.middleware.hooks.hooks_changed` when that changes.
        """
        return True

    async def before_publish(self, app: App, message: TaskMessage, wire: WireMessage) -> None:
        """Called with the encoded message before it is published (may change ``wire.headers``)."""

    async def after_publish(self, app: App, message: TaskMessage, route: Route) -> None:
        """Called once the broker confirmed a task message sent on ``route``."""

    async def before_process(self, worker: Worker, message: TaskMessage, wire: WireMessage) -> None:
        """Called after a delivery was decoded and its task found, before it runs."""

    async def after_success(self, worker: Worker, message: TaskMessage, value: Any, report: ResultMessage) -> None:
        """Called after a task succeeded, before its reply is sent and its delivery acked."""

    async def after_failure(
        self, worker: Worker, message: TaskMessage, exc: BaseException, report: ResultMessage
    ) -> None:
        """Called after a task finally failed (no retry left), before it is dead-lettered and acked."""

    async def on_retry(self, worker: Worker, message: TaskMessage, retry: Retry) -> None:
        """Called when a task is to run again, before its next attempt is published (which may then run
        at once, on another worker)."""

    async def after_reject(self, worker: Worker, message: TaskMessage, reject: Reject) -> None:
        """Called when a running task raised :class:`~amqtask.errors.Reject` (dead-lettered or requeued)."""

    async def after_delivery(self, worker: Worker) -> None:
        """Called when the worker is done with a delivery, whatever became of it (run, dead-lettered,
        requeued, sent on to its eta), in the same context as ``before_process``."""

    async def on_worker_start(self, worker: Worker) -> None:
        """Called once the worker consumes."""

    async def on_worker_stop(self, worker: Worker) -> None:
        """Called when the worker stops."""


__all__ = ["Middleware", "current_queue"]
