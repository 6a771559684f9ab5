"""Feeding :class:`~amqtask.monitoring.live_state.LiveState` from the broker, for ``amqtask top``.

Two sources run side by side on one connection: the event stream (a queue of our own on ``celeryev``,
see :mod:`~amqtask.monitoring.receiver`) applied as events arrive, and a passive declare of each known
queue once per refresh. After each round of declares the caller gets a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import receiver
from .live_state import LiveState, Snapshot
from .queue_probe import known_queues, probe_all, task_queue

if TYPE_CHECKING:
    from ..app import App

REFRESH_S = 1.0
QUEUE_OF_CACHE = 4096


async def watch(
    app: App,
    show: Callable[[Snapshot], None],
    *,
    refresh_s: float = REFRESH_S,
    ready: Callable[[], None] | None = None,
) -> None:
    """Call ``show`` with a snapshot every ``refresh_s`` seconds, until cancelled.

    ``ready`` is called once events are being received. An error of the event stream or of a probe (the
    broker stayed away longer than ``publish_timeout_s``) ends the watch with that error.
    """
    broker = app.runtime().broker
    # Routed once per task name, not per event: a name's queue does not change while we watch.
    queue_of = functools.lru_cache(maxsize=QUEUE_OF_CACHE)(functools.partial(task_queue, app))
    state = LiveState(queue_of, known_queues(app), time.monotonic())
    listening = asyncio.Event()

    async def pump() -> None:
        async for event in receiver.stream(broker, ready=listening.set):
            state.apply(event, time.monotonic())

    events = asyncio.create_task(pump(), name="amqtask-top-events")
    try:
        await _until_listening(listening, events)
        if ready is not None:
            ready()
        while True:
            # The known queues, and any that events routed a task to since (a task_routes rule may name one).
            for counts in await probe_all(broker, list(state.queues)):
                state.observe_queue(counts.name, counts.ready, counts.consumers, time.monotonic())
            if events.done():
                events.result()  # raises what ended the stream
            show(state.snapshot(time.monotonic()))
            await asyncio.sleep(refresh_s)  # the screen's refresh period
    finally:
        events.cancel()
        await asyncio.gather(events, return_exceptions=True)


async def _until_listening(listening: asyncio.Event, events: asyncio.Task[None]) -> None:
    waiting = asyncio.create_task(listening.wait())
    try:
        await asyncio.wait({waiting, events}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if events.done():
        events.result()


__all__ = ["REFRESH_S", "watch"]
