"""The threads plain (``def``) tasks run in: a few long-lived threads fed from one queue.

Cheaper per task than ``loop.run_in_executor`` on a ``ThreadPoolExecutor``, which the worker's event
loop (the bottleneck of a drain: it also reads frames, decodes and acks) paid for on every task: a
concurrent future chained to an asyncio one, and a wake-up of the loop through its self-pipe for each
result. Here a finished call appends its outcome to a batch, and only the call that starts a batch
wakes the loop, which then settles every outcome gathered by then in one go.

The threads are daemon threads: a process that exits does not wait for a task stuck in a C call or
ignoring its time limits (the worker has already given up on it; the broker redelivers it).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

_Outcome = tuple["asyncio.Future[Any]", bool, Any]


class TaskThreads:
    """``size`` threads running calls submitted from an event loop; each call's outcome comes back as a future."""

    def __init__(self, size: int, name: str = "amqtask-task") -> None:
        self.size, self.name = size, name
        self._calls: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]] | None]
        self._calls = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._outcomes: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        self._closed = False

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn()`` in a thread; the future (of the running loop) gets its result or exception."""
        if self._closed:
            raise RuntimeError("the task threads are shut down")
        loop = asyncio.get_running_loop()
        if len(self._threads) < self.size:
            self._start_thread()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.put((loop, future, fn))
        return future

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, future, fn = call
            try:
                outcome: _Outcome = (future, True, fn())
            except BaseException as exc:  # the task's own exception, whatever it is, is its outcome
                outcome = (future, False, exc)
            del call, fn  # drop references to the task's arguments before waiting for the next call
            with self._lock:
                batch = self._outcomes.setdefault(loop, [])
                batch.append(outcome)
                first = len(batch) == 1
            if first:
                try:
                    loop.call_soon_threadsafe(self._settle, loop)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    with self._lock:
                        self._outcomes.pop(loop, None)

    def _settle(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            batch = self._outcomes.pop(loop, [])
        for future, ok, value in batch:
            if future.cancelled():  # given up on (a hard time limit, a shutdown)
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value if not isinstance(value, StopIteration) else RuntimeError(repr(value)))

    def shutdown(self) -> None:
        """Cancel calls not started yet and let the threads end after their current call (without waiting)."""
        self._closed = True
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                with contextlib.suppress(RuntimeError):  # a closed loop: its futures are moot
                    call[0].call_soon_threadsafe(call[1].cancel)
        for _ in self._threads:
            self._calls.put(None)
