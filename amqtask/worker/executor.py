"""Running one task: ``async def`` tasks on the worker's event loop, plain ones in a thread pool.

The request context (``self.request``) is a context variable, set around the call; for threads the
context is copied into the thread explicitly (the pool, ``threads.py``, runs plain callables).

Time limits, as Celery has them, counted from the moment the task starts running (on the loop, or in
its thread: not while it waits for a free thread behind one a stubborn task keeps). The soft limit
(``soft_time_limit``) raises :class:`~amqtask.errors.SoftTimeLimitExceeded` inside a plain task,
delivered to its thread as an asynchronous exception (so at the thread's next Python instruction: a
blocking C call, such as a long ``time.sleep`` or socket read, ends first); an ``async def`` task is
cancelled instead, and if the cancellation ends it, it fails with ``SoftTimeLimitExceeded``. Either
can catch it and clean up. The hard limit (``time_limit``) stops waiting for the task and fails it
with :class:`~amqtask.errors.TimeLimitExceeded`: an async task is cancelled, and a plain task's
thread gets ``TimeLimitExceeded`` raised the same way. A thread cannot be killed in Python, so a
plain task that catches that too, or is stuck in a C call, keeps its thread until it returns
(documented); a stopping worker does not wait for it past its grace period (``threads.py``).
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from ..errors import SoftTimeLimitExceeded, TimeLimitExceeded
from ..task import Request, Task, current_request
from .threads import DaemonThreadPool


class Executor:
    """Runs task functions: coroutines on the loop, sync functions in ``concurrency`` threads."""

    def __init__(self, concurrency: int) -> None:
        self.threads = DaemonThreadPool(concurrency, "amqtask-task")

    async def run(
        self, task: Task[Any, Any], request: Request, time_limit: float | None, soft_time_limit: float | None = None
    ) -> Any:
        """Call the task with the request's arguments and return its result (or raise its exception)."""
        token = current_request.set(request)
        try:
            if task.is_async:
                coroutine = task(*request.args, **request.kwargs)
                if not (time_limit or soft_time_limit):
                    return await coroutine
                return await _Limits(task, request, time_limit, soft_time_limit).run(asyncio.ensure_future(coroutine))
            fn = functools.partial(contextvars.copy_context().run, task, *request.args, **request.kwargs)
            if not (time_limit or soft_time_limit):
                return await self.threads.submit(fn)
            interruptible = _Interruptible(fn, asyncio.get_running_loop())
            limits = _Limits(task, request, time_limit, soft_time_limit, interruptible)
            return await limits.run(self.threads.submit(interruptible), interruptible.started)
        finally:
            current_request.reset(token)

    def shutdown(self) -> None:
        """Release the thread pool without waiting for threads still running (nor, at exit, for stuck ones)."""
        self.threads.shutdown()


class _Limits:
    """One call's time limits: what ends it at each, and what its end then means."""

    def __init__(
        self, task: Task[Any, Any], request: Request, time_limit: float | None, soft_time_limit: float | None,
        interruptible: _Interruptible | None = None,
    ) -> None:  # fmt: skip
        self.what = f"task {task.name}[{request.id}]"
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
        self.interruptible = interruptible
        self.soft_expired = False

    async def run(self, call: asyncio.Future[Any], started: asyncio.Event | None = None) -> Any:
        """The call's result, or the limit it ran past (the soft one only if the task let it end it).

        With ``started`` (a call handed to the thread pool), the limits run from the moment the call
        starts in its thread: time spent waiting for a free thread is not the task's.
        """
        if started is not None:
            await _first(started.wait(), call)
        timer = None
        if self.soft_time_limit:
            timer = asyncio.get_running_loop().call_later(self.soft_time_limit, self._soft_expiry, call)
        try:
            return await asyncio.wait_for(self._outcome(call), self.time_limit or None)
        except asyncio.TimeoutError:
            if call.done() and not call.cancelled():
                raise  # the task's own TimeoutError (a result it waited for, a socket): not its limit
            if self.interruptible is not None:  # an async task was cancelled; ask the thread to end too
                self.interruptible.interrupt(TimeLimitExceeded)
            raise TimeLimitExceeded(f"{self.what} exceeded its time limit of {self.time_limit or 0:g}s") from None
        finally:
            if timer is not None:
                timer.cancel()

    def _soft_expiry(self, call: asyncio.Future[Any]) -> None:
        self.soft_expired = True
        if self.interruptible is not None:
            self.interruptible.interrupt(SoftTimeLimitExceeded)
        else:
            call.cancel()

    async def _outcome(self, call: asyncio.Future[Any]) -> Any:
        soft_error = f"{self.what} exceeded its soft time limit of {self.soft_time_limit or 0:g}s"
        try:
            # Shielded, so that a hard limit (wait_for) cancels an async task only through the finally below.
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            if self.soft_expired and call.cancelled():  # the async task let the soft limit's cancellation end it
                raise SoftTimeLimitExceeded(soft_error) from None
            raise
        except SoftTimeLimitExceeded as exc:
            if exc.args:
                raise
            raise SoftTimeLimitExceeded(soft_error) from None  # raised in the thread, without words
        finally:
            if not call.done():
                call.cancel()


class _Interruptible:
    """A function run in a pool thread that a time limit can interrupt with an exception raised in it.

    The exception is only ever set while the function runs, and one still pending when it returns is
    withdrawn, so it can never land in the pool's own code or in the thread's next task.
    """

    def __init__(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> None:
        self._fn = fn
        self._loop = loop
        #: Set (on the loop) once the function starts in its thread.
        self.started = asyncio.Event()
        self._lock = threading.Lock()
        self._thread: int | None = None
        self._interrupted = False

    def __call__(self) -> Any:
        with self._lock:
            self._thread = threading.get_ident()
        self._loop.call_soon_threadsafe(self.started.set)
        try:
            return self._fn()
        finally:
            with self._lock:
                if self._interrupted:
                    _async_exception(self._thread, None)
                self._thread = None

    def interrupt(self, exc_type: type[BaseException]) -> None:
        """Raise ``exc_type`` in the thread, if the function still runs there."""
        with self._lock:
            if self._thread is not None:
                self._interrupted = True
                _async_exception(self._thread, exc_type)


async def _first(waiting: Coroutine[Any, Any, Any], call: asyncio.Future[Any]) -> None:
    """Wait for ``waiting`` or for ``call`` to end (a call cancelled before it started), whichever comes first."""
    waiter = asyncio.ensure_future(waiting)
    try:
        await asyncio.wait({waiter, call}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def _async_exception(thread: int | None, exc_type: type[BaseException] | None) -> None:
    """Raise ``exc_type`` in ``thread`` at its next Python instruction (CPython's documented
    ``PyThreadState_SetAsyncExc``); ``None`` withdraws one not raised yet."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread or 0), ctypes.py_object(exc_type) if exc_type is not None else None
    )
