"""Helpers for your own unit tests: run tasks inline, without a broker or a socket.

``with eager(app): add.delay(2, 2).get()`` runs ``add`` in the calling process and returns its result
through the usual :class:`~amqtask.AsyncResult` API. Eager mode replaces the app's one send seam
(:mod:`amqtask.sending`), so it covers everything that sends a task: ``delay``/``apply_async``,
``send_task`` of registered names, signatures, chains, groups, chords, callbacks and errbacks, and
``self.retry()``/``autoretry_for`` (retried at once, countdowns ignored). It checks what a worker would:
the task must be registered, and its arguments and result must be encodable by the task's serializer.
It does not emulate the broker (no routing, delays, priorities or acks); test those against a real
broker, for instance with the ``amqtask_worker`` fixture of the pytest plugin (:mod:`amqtask.pytest_plugin`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from . import canvas, protocol, serializers
from .errors import Retry
from .failures import encode_exception, format_traceback
from .middleware.canvas import follow_ups
from .protocol import ResultMessage, TaskMessage
from .retry import autoretry_delay
from .sending import Outgoing
from .task import Request, Task, current_request
from .worker.worker import Worker

if TYPE_CHECKING:
    from .app import App

EAGER_HOSTNAME = "eager@localhost"
#: How long a background worker may take to connect, declare its queues and consume.
_START_TIMEOUT_S = 60.0


class EagerSender:
    """A :class:`~amqtask.sending.Sender` that runs each task message inline, as a worker would run it.

    Follow-ups (chain steps, callbacks, errbacks, chord bodies) are sent through the app's sender again,
    so they run inline too; chord parts are counted here, in memory.
    """

    def __init__(self, *, propagate: bool = False) -> None:
        self.propagate = propagate
        self._chords: dict[str, dict[int, tuple[str, Any]]] = {}

    async def send(self, app: App, outgoing: Outgoing) -> None:
        """Check the message as a send would, then run its task (and what follows it) to the end."""
        message = outgoing.message
        protocol.encode_task(message, outgoing.codec)  # what the codec cannot carry fails here, as in a send
        task = app.get_task(message.task)
        retries = message.retries
        while True:
            try:
                value = await _call(task, _request(message, retries))
                serializers.encode(value, outgoing.codec)
            except Retry:
                retries += 1
                continue
            except Exception as exc:
                if autoretry_delay(task, exc, retries) is not None:
                    retries += 1
                    continue
                if self.propagate:
                    raise
                await self._failed(app, message, exc)
                return
            await self._succeeded(app, message, value)
            return

    async def _succeeded(self, app: App, message: TaskMessage, value: Any) -> None:
        report = ResultMessage(message.id, protocol.SUCCESS, value, date_done=protocol.now_iso(),
                               parent_id=message.parent_id)  # fmt: skip
        app.result_store.put(report)
        sends = follow_ups(app, message, message.callbacks, [value])
        if message.chain:
            rest = list(message.chain)
            sends += follow_ups(app, message, [rest.pop()], [value], rest)
        await canvas.publish(app, sends, from_client=False)
        if message.chord is not None:
            await self._chord_part(app, message, message.chord, protocol.SUCCESS, value)

    async def _failed(self, app: App, message: TaskMessage, exc: Exception) -> None:
        report = ResultMessage(message.id, protocol.FAILURE, encode_exception(exc), traceback=format_traceback(exc),
                               date_done=protocol.now_iso(), parent_id=message.parent_id)  # fmt: skip
        app.result_store.put(report)
        await canvas.publish(app, follow_ups(app, message, message.errbacks, [message.id]), from_client=False)
        _unreachable(app, message.chain or [], report)
        if message.chord is not None:
            await self._chord_part(app, message, message.chord, protocol.FAILURE, report)

    async def _chord_part(
        self, app: App, member: TaskMessage, body: Mapping[str, Any], status: str, value: Any
    ) -> None:
        """Count ``member``'s part; the last part sends the body with the results in group order."""
        size = canvas.chord_size(body)
        group = str(member.group)
        parts = self._chords.setdefault(group, {})
        parts[int(member.group_index or 0)] = (status, value)
        if len(parts) < size:
            return
        del self._chords[group]
        failed = next((value for status, value in parts.values() if status != protocol.SUCCESS), None)
        if failed is not None:
            _unreachable(app, [body], failed)
            return
        values = [parts[index][1] for index in sorted(parts)]
        await canvas.publish(app, follow_ups(app, member, [body], [values]), from_client=False)


def _request(message: TaskMessage, retries: int) -> Request:
    return Request(
        id=message.id, task=message.task, args=list(message.args), kwargs=dict(message.kwargs), retries=retries,
        eta=message.eta, expires=message.expires, root_id=message.root_id, parent_id=message.parent_id,
        group=message.group, group_index=message.group_index, reply_to=message.reply_to,
        headers=dict(message.extra_headers), hostname=EAGER_HOSTNAME, is_eager=True, callbacks=message.callbacks,
        errbacks=message.errbacks, chain=message.chain, chord=message.chord,
    )  # fmt: skip


async def _call(task: Task[Any, Any], request: Request) -> Any:
    """Run the task with ``request`` current: ``async def`` tasks here, others in a thread, as a worker does
    (so a task that sends tasks itself through the synchronous API does not wait on its own loop)."""
    token = current_request.set(request)
    try:
        if task.is_async:
            return await task(*request.args, **request.kwargs)
        return await asyncio.to_thread(task, *request.args, **request.kwargs)
    finally:
        current_request.reset(token)


def _unreachable(app: App, signatures: Iterable[Mapping[str, Any]], report: ResultMessage) -> None:
    """Every task in ``signatures`` will never run: its result is the failure that stopped it."""
    for sig in (task for value in signatures for task in canvas.task_signatures(value)):
        task_id = sig.options.get("task_id")
        if task_id:
            app.result_store.put(ResultMessage(str(task_id), protocol.FAILURE, report.result, report.traceback,
                                               date_done=protocol.now_iso()))  # fmt: skip


@contextlib.contextmanager
def eager(app: App, *, propagate: bool = False) -> Iterator[App]:
    """Within the block, every task ``app`` sends runs inline; nothing is sent to a broker.

    With ``propagate=True`` a task's exception is raised by ``delay()`` itself; otherwise it is
    raised by ``get()``, as it would be after a worker ran the task.
    """
    previous = app.sender
    app.sender = EagerSender(propagate=propagate)
    try:
        yield app
    finally:
        app.sender = previous


@contextlib.contextmanager
def background_worker(app: App, *, stop_grace: float | None = None, **options: Any) -> Iterator[Worker]:
    """A :class:`~amqtask.Worker` on an event loop of its own in a thread, consuming until the block ends.

    ``options`` are the worker's (``queues``, ``concurrency``, ``hostname`` ...). Returns once the worker
    consumes; at the end of the block it stops as on SIGTERM (running tasks get ``stop_grace`` seconds,
    default ``worker_shutdown_grace_s``) and the thread ends.
    """
    started: concurrent.futures.Future[tuple[Worker, asyncio.AbstractEventLoop]] = concurrent.futures.Future()

    async def serve() -> None:
        try:
            worker = Worker(app, **options)
            await worker.start()
        except BaseException as exc:
            started.set_exception(exc)
            raise
        started.set_result((worker, asyncio.get_running_loop()))
        await worker.wait_stopped()

    # asyncio.run, not run_until_complete: it also finishes what the closed connection left running.
    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="amqtask-test-worker", daemon=True)
    thread.start()
    try:
        worker, loop = started.result(timeout=_START_TIMEOUT_S)
        try:
            yield worker
        finally:
            asyncio.run_coroutine_threadsafe(worker.stop(stop_grace), loop).result()
    finally:
        thread.join()


def burst_worker(app: App, **options: Any) -> Worker:
    """Run a worker until its queues are empty and nothing runs, then stop it; returns it (``.stats``)."""
    worker = Worker(app, burst=True, **options)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="amqtask-burst") as pool:
        # A thread of its own: the caller may be inside an event loop (an async test).
        pool.submit(asyncio.run, worker.run()).result()
    return worker
