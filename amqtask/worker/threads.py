"""The threads plain (``def``) tasks run in: a pool that never keeps the process alive, and is cheap per task.

The standard ``ThreadPoolExecutor`` joins its threads when the interpreter exits, so a task stuck in
its thread (a blocking C call no time limit can interrupt) would keep a stopping worker alive for as
long as it is stuck, past any grace period. These threads are daemon threads instead: once the worker
has stopped, the process exits, and the stuck task's delivery, never acked, is redelivered by the
broker. A thread is started only when a call finds none idle, up to the pool's size.

It is also cheaper per task than ``loop.run_in_executor``, which made the worker's event loop (the
bottleneck of a drain: it also reads frames, decodes and acks) chain a concurrent future to an
asyncio one and wake up through its self-pipe for every result. Here a finished call appends its
outcome to a batch, and only the call that starts a batch wakes the loop, which then settles every
outcome gathered by then in one go.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]
_Outcome = tuple["asyncio.Future[Any]", bool, Any]


class DaemonThreadPool:
    """Up to ``size`` daemon threads running calls submitted from event loops, outcomes as asyncio futures."""

    def __init__(self, size: int, name_prefix: str) -> None:
        self.size = size
        self.name_prefix = name_prefix
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)  # one count per thread waiting for a call
        self._lock = threading.Lock()
        self._outcomes: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        self._closed = False

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn()`` in a pool thread; the returned future (of the running loop) gets its outcome."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the thread pool was shut down")
            self._calls.put((loop, future, fn))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._serve, name=f"{self.name_prefix}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return future

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, future, fn = call
            del call
            if not future.cancelled():  # given up on before it started (a shutdown, a stopped delivery)
                try:
                    self._hand_back(loop, (future, True, fn()))
                except BaseException as exc:  # the task's own, for its caller: as ThreadPoolExecutor does
                    self._hand_back(loop, (future, False, exc))
            del loop, future, fn  # no reference to the last call's objects while idle
            self._idle.release()

    def _hand_back(self, loop: asyncio.AbstractEventLoop, outcome: _Outcome) -> None:
        with self._lock:
            batch = self._outcomes.setdefault(loop, [])
            batch.append(outcome)
            first = len(batch) == 1
        if first:  # later outcomes join this batch until the loop settles it
            try:
                loop.call_soon_threadsafe(self._settle, loop)
            except RuntimeError:  # the loop is closed: nobody waits for these any more
                with self._lock:
                    self._outcomes.pop(loop, None)

    def _settle(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            batch = self._outcomes.pop(loop, [])
        for future, ok, value in batch:
            if future.cancelled():  # given up on while it ran (a hard time limit, a shutdown)
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value if not isinstance(value, StopIteration) else RuntimeError(repr(value)))

    def shutdown(self) -> None:
        """Take no more calls, cancel those not started; threads end once idle (never waited for)."""
        with self._lock:
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
