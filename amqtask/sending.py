"""The one seam where a built task message becomes a send: ``app.sender.send(app, outgoing)``.

Every task message an app sends passes here, once: ``delay``/``apply_async``/``send_task``, canvas
(signatures, chains, groups, chords) from clients, and the follow-ups a worker publishes. The
default :class:`BrokerSender` encodes the message, runs the ``before_publish`` middleware (signing)
exactly once, makes sure the queue exists, publishes with confirms (through the delay levels when
the eta is ahead), then runs ``after_publish`` (events) once. :func:`amqtask.testing.eager` swaps
in a sender that runs the task inline instead, so nothing before this seam opens a socket.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from . import protocol, serializers
from .errors import ConfigurationError
from .protocol import TaskMessage
from .results import reporting
from .routing import Route

if TYPE_CHECKING:
    from .app import App, Runtime

log = logging.getLogger("amqtask.sending")


@dataclass(frozen=True)
class Outgoing:
    """A task message built and routed, on its way out: what a :class:`Sender` receives.

    ``awaits_reply``: a client in this process will wait for the result (a worker's follow-ups answer
    the client that started them, not the worker). ``runtime``: the broker objects to publish with,
    when not the app's runtime of the current event loop (beat publishes on its own, fenced by its lock).
    """

    message: TaskMessage
    route: Route
    codec: serializers.Codec
    awaits_reply: bool = False
    runtime: Runtime | None = None


class Sender(Protocol):
    """Where built task messages go: the broker (the default), or an inline runner in tests."""

    async def send(self, app: App, outgoing: Outgoing) -> None:
        """Send (or otherwise carry out) one task message; returns once it is safely on its way."""


class BrokerSender:
    """Publishes with confirms on the app's runtime of the current event loop."""

    async def send(self, app: App, outgoing: Outgoing) -> None:
        """Encode, sign (``before_publish``), ensure the queue, and publish, delayed when the eta is ahead."""
        message, route = outgoing.message, outgoing.route
        runtime = outgoing.runtime or app.runtime()
        if outgoing.awaits_reply:
            # Consume the reply queue before the task can answer.
            await runtime.results.ensure_started(app.conf.publish_timeout_s)
        wire = protocol.encode_task(message, outgoing.codec)
        for hook in app.hooks("before_publish"):
            await hook(app, message, wire)
        if route.queue is not None and app.conf.task_create_missing_queues:
            await runtime.publisher.ensure_queue(route.queue)
        delay = (message.eta - dt.datetime.now(dt.timezone.utc)).total_seconds() if message.eta else 0.0
        if delay > 0 and route.queue is None:
            raise ConfigurationError(
                f"task {message.task!r}: countdown/eta need a route to a queue (got exchange {route.exchange!r} only)"
            )
        if delay > 0 and route.queue is not None:
            publishing = runtime.publisher.publish_delayed(wire, route.queue, delay)
        else:
            publishing = runtime.publisher.publish(wire, route.exchange, route.routing_key)
        # A client's send announces the amqp ids it hands out to readers by id, beside the publish rather
        # than after it: the send waits for the slower confirm, not for both in turn.
        announcing = reporting.announcement(app, runtime, message, max(0.0, delay)) if outgoing.awaits_reply else None
        await (publishing if announcing is None else _with_announce(publishing, announcing))
        for hook in app.hooks("after_publish"):
            await hook(app, message, route)


async def _with_announce(publishing: Awaitable[None], announcing: Awaitable[None]) -> None:
    """Both at once; a failed publish raises, a failed announcement only warns: the task is on its way, and
    readers learn its id from its first state report (until then it reads as unknown)."""
    sent, announced = await asyncio.gather(publishing, announcing, return_exceptions=True)
    if isinstance(sent, BaseException):
        raise sent
    if isinstance(announced, BaseException):
        if not isinstance(announced, Exception):
            raise announced
        log.warning("task sent, but its id could not be announced to readers by id: %s", announced)
