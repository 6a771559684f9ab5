"""The worker: declares its queues, consumes them, runs tasks, and shuts down without losing any.

Shutdown (SIGTERM/SIGINT, or :meth:`Worker.stop`) is decided here once: stop receiving, hand every
delivery that has not started back to the broker at once (nack + requeue, which does not use up a
quorum queue's delivery limit), give running tasks ``worker_shutdown_grace_s`` to finish and ack, then
close the channel, which makes the broker requeue whatever is still unacked. The consumer channel
stays open during the grace period because acks can only travel on the channel a delivery came on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import os
import resource
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from .. import adoption, delays, topology
from ..errors import ConfigurationError
from ..producer import wire_of
from ..protocol import TaskMessage
from ..ratelimit import RateLimits
from ..topology import QueueSpec
from .consumer import Consumer
from .delivery import DeliveryHandler, default_hostname
from .executor import Executor
from .triage import channel_gone

if TYPE_CHECKING:
    from ..app import App, Runtime

log = logging.getLogger("amqtask.worker")


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB, as Celery's ``--max-memory-per-child`` measures it."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS counts bytes, Linux KiB


class Worker:
    """Consumes queues of an :class:`~amqtask.App` and runs its tasks.

    ``burst=True`` makes :meth:`run` return once the queues are empty and nothing is running (tests,
    batch jobs). ``max_tasks`` / ``max_memory_kib`` (a supervised child's ``--max-tasks-per-child`` /
    ``--max-memory-per-child``) make it stop as on SIGTERM once it has started that many tasks, or once
    its peak resident memory reaches that many KiB after a task; its supervisor then starts another.
    """

    def __init__(
        self,
        app: App,
        queues: list[str] | None = None,
        *,
        exclude_queues: list[str] | None = None,
        concurrency: int | None = None,
        prefetch_multiplier: int | None = None,
        hostname: str | None = None,
        burst: bool = False,
        max_tasks: int | None = None,
        max_memory_kib: int | None = None,
    ) -> None:
        self.app = app
        app.import_task_modules()
        conf = app.conf
        names = list(queues) if queues else [conf.task_default_queue, *app.router.queues]
        names = [n for n in dict.fromkeys(names) if n not in set(exclude_queues or ())]
        if not names:
            raise ConfigurationError("the worker has no queue to consume (all excluded?)")
        self.queues: list[QueueSpec] = app.router.all_queues(names)
        self.concurrency = concurrency or conf.worker_concurrency
        self.prefetch = self.concurrency * (prefetch_multiplier or conf.worker_prefetch_multiplier)
        self.hostname = hostname or conf.worker_hostname or default_hostname()
        self.burst = burst
        self.max_tasks = max_tasks
        self.max_memory_kib = max_memory_kib
        self._started_tasks = 0
        self._recycling: asyncio.Task[None] | None = None
        self.pid = os.getpid()
        self.executor = Executor(self.concurrency)
        self.handler = DeliveryHandler(self)
        self.rate_limits = RateLimits(app)
        self.stats: collections.Counter[str] = collections.Counter()
        self.active: dict[str, TaskMessage] = {}
        self.started_at = time.time()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._waiting: dict[AbstractIncomingMessage, asyncio.Task[None]] = {}
        self._stopped = asyncio.Event()
        self._stopping = False
        self._starting: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._runtime: Runtime | None = None
        self.consumer = Consumer(self._channel, self.declare, self.queues, self.prefetch, self._on_message)

    @property
    def runtime(self) -> Runtime:
        """The app runtime (connection, publisher) of the worker's event loop."""
        assert self._runtime is not None, "the worker has not started"
        return self._runtime

    async def _channel(self) -> AbstractChannel:
        return await self.runtime.broker.channel(confirms=False)

    async def declare(self) -> None:
        """Declare the delay levels and every queue the worker consumes (idempotent)."""
        await self.runtime.publisher.ensure_delays()
        for spec in self.queues:
            await self._declare_queue(spec)

    async def _declare_queue(self, spec: QueueSpec) -> None:
        publisher = self.runtime.publisher
        await adoption.declare_or_adopt(self.runtime.broker, spec, strict=self.app.conf.task_queues_strict)
        bind = functools.partial(delays.bind_destination, topology=publisher.delay_topology, queue=spec.name)
        await self.runtime.broker.run(bind)

    async def add_queue(self, spec: QueueSpec) -> None:
        """Declare ``spec`` and consume it too, now and after every reconnect (remote ``add_consumer``)."""
        if any(q.name == spec.name for q in self.queues):
            return
        await self._declare_queue(spec)
        self.queues.append(spec)
        await self.consumer.consume(spec)
        log.info("worker %s now consuming %s", self.hostname, spec.name)

    async def remove_queue(self, name: str) -> None:
        """Stop consuming queue ``name`` (remote ``cancel_consumer``); its deliveries already here still run."""
        self.queues[:] = [q for q in self.queues if q.name != name]
        await self.consumer.cancel_queue(name)
        log.info("worker %s no longer consuming %s", self.hostname, name)

    def reserved(self) -> list[AbstractIncomingMessage]:
        """Deliveries received but not started (waiting for a slot or a rate limit), for ``inspect reserved``."""
        return list(self._waiting)

    # ------------------------------------------------------------------------------------------ running
    async def start(self) -> None:
        """Connect, declare, and begin consuming; returns once consumers are registered."""
        self._runtime = self.app.runtime()
        self.app.portal.attach(asyncio.get_running_loop())
        self._consume_task = asyncio.create_task(self.consumer.run(), name="amqtask-consumer")
        consuming = asyncio.create_task(self.consumer.consuming.wait())
        done, _ = await asyncio.wait({consuming, self._consume_task}, return_when=asyncio.FIRST_COMPLETED)
        if self._consume_task in done:
            consuming.cancel()
            self._consume_task.result()  # raises the topology error that stopped it
        for middleware in self.app.middleware:
            await middleware.on_worker_start(self)
        log.info("worker %s consuming %s (concurrency %d, prefetch %d)", self.hostname,
                 ", ".join(q.name for q in self.queues), self.concurrency, self.prefetch)  # fmt: skip

    async def run(self) -> None:
        """Start and process until stopped (or, in burst mode, until the queues are drained)."""
        self._starting = asyncio.create_task(self.start())
        try:
            await self._starting
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # stop() came while starting (a SIGTERM right after launch): it cancelled the start.
        if self.burst and not self._stopping:
            await self._drain()
            await self.stop()
        await self.wait_stopped()

    async def wait_stopped(self) -> None:
        """Return once the worker has stopped (after :meth:`stop`, or a burst run's end)."""
        await self._stopped.wait()

    async def _drain(self) -> None:
        while True:
            await self._wait_idle()
            depths = [await topology.queue_depth(self.runtime.broker, q.name) for q in self.queues]
            if not any(depths) and not self._inflight:
                return
            # Messages are ready but not delivered yet: wait for work to start, or a short while.
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 0.05)

    async def _wait_idle(self) -> None:
        while self._inflight:
            await asyncio.wait(set(self._inflight))

    async def _on_message(self, message: AbstractIncomingMessage, queue: QueueSpec) -> None:
        task = asyncio.create_task(self._process(message, queue))
        self._inflight.add(task)
        self._waiting[message] = task
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not self._inflight:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery handling crashed", exc_info=task.exception())

    async def _process(self, message: AbstractIncomingMessage, queue: QueueSpec) -> None:
        slot = _Slot(self._slots)
        try:
            # Before taking a slot: a task waiting for its rate limit must not keep other tasks from running.
            bucket = self.rate_limits.bucket(message.headers.get("task"))
            if bucket is not None and self.handler.unverified(wire_of(message)) is None:
                # Only a message that verifies spends a token: forged ones naming a limited task would
                # otherwise use up its budget (and stall the real ones) before they are dead-lettered.
                await bucket.take()
            await slot.acquire()
            _slot.set(slot)
            self._waiting.pop(message, None)
            if self._stopping or self._recycling is not None:
                # Stopping began while this one waited: hand it back now rather than start it.
                await self.handler.release(message)
                return
            if channel_gone(message):
                # The broker requeued this delivery when its channel went, and may already have
                # handed it to another consumer: starting it now would only run the task twice.
                log.debug("skipping delivery %s of a closed channel", message.delivery_tag)
                return
            await self.handler.process(message, queue)
        finally:
            slot.release()
            self._waiting.pop(message, None)

    @contextlib.contextmanager
    def tracking(self, msg: TaskMessage) -> Iterator[None]:
        """Mark ``msg`` as running (for ``inspect active`` and stats) while its task runs.

        When the task has returned, its delivery gives up its concurrency slot: settling it (the reply
        confirmed, then the ack) is waiting on the broker, not running a task, and holding the slot for
        that would make every task wait for the previous ones' confirms (prefetch still bounds them).
        A task limit or memory limit reached here recycles the process (see :meth:`_recycle`).
        """
        self.active[msg.id] = msg
        self._started_tasks += 1
        if self.max_tasks is not None and self._started_tasks >= self.max_tasks:
            self._recycle(f"started {self._started_tasks} tasks (max {self.max_tasks})")
        try:
            yield
        finally:
            self.active.pop(msg.id, None)
            self.stats["processed"] += 1
            slot = _slot.get(None)
            if slot is not None:
                slot.release()
            if self.max_memory_kib is not None and peak_rss_kib() >= self.max_memory_kib:
                self._recycle(f"peak memory {peak_rss_kib()} KiB (max {self.max_memory_kib} KiB)")

    def _recycle(self, why: str) -> None:
        """Stop as on SIGTERM: take no more deliveries, hand back those not started, finish the running ones."""
        if self._recycling is None and not self._stopping:
            log.info("worker %s %s: finishing its tasks, then exiting to be replaced", self.hostname, why)
            self._recycling = asyncio.get_running_loop().create_task(self.stop())

    # ------------------------------------------------------------------------------------------ stopping
    async def stop(self, grace: float | None = None) -> None:
        """Stop consuming, release deliveries not started, let running tasks finish within ``grace``."""
        if self._stopped.is_set() or self._stopping:
            return
        self._stopping = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._starting
        grace = self.app.conf.worker_shutdown_grace_s if grace is None else grace
        await self.consumer.cancel()
        for message, task in list(self._waiting.items()):
            task.cancel()
            await self.handler.release(message)
        self._waiting.clear()
        if self._inflight:
            log.info("waiting up to %.0fs for %d running task(s)", grace, len(self._inflight))
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace or None)
            if pending:
                log.warning("%d task(s) still running after the grace period; the broker will redeliver them",
                            len(pending))  # fmt: skip
                for task in pending:
                    task.cancel()
        await self.consumer.close()
        for middleware in self.app.middleware:
            with contextlib.suppress(Exception):
                await middleware.on_worker_stop(self)
        self.executor.shutdown()
        if hasattr(self, "_consume_task"):
            self._consume_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._consume_task
        self.app.portal.detach()
        await self.app.aclose()
        self._stopped.set()

    def info(self) -> dict[str, Any]:
        """Stats for ``inspect stats``."""
        return {
            "hostname": self.hostname,
            "pid": self.pid,
            "queues": [q.name for q in self.queues],
            "concurrency": self.concurrency,
            "prefetch": self.prefetch,
            "uptime_s": round(time.time() - self.started_at, 1),
            "total": dict(self.stats),
            "active": len(self.active),
        }


class _Slot:
    """One delivery's place among the ``concurrency`` running tasks: released once, whichever comes first."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._held = False

    async def acquire(self) -> None:
        await self._slots.acquire()
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()


#: The slot of the delivery being processed (each delivery is processed in an asyncio task of its own).
_slot: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("amqtask_worker_slot", default=None)
