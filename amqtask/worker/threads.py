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
outcome gathered by then in one go. No Python lock is taken on the way (the GIL orders the few
steps that matter, see ``_hand_back``): a loop blocked on a lock a task thread holds gives up the
GIL and waits for it back, which cost a drain of no-op tasks more than the tasks themselves. The
pool serves one event loop (the worker's), whose thread alone counts the calls in flight.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

_Call = tuple["asyncio.Future[Any]", Callable[[], Any]]
_Outcome = tuple["asyncio.Future[Any]", bool, Any]


class DaemonThreadPool:
    """Up to ``size`` daemon threads running calls submitted from one event loop, outcomes as asyncio futures."""

    def __init__(self, size: int, name_prefix: str) -> None:
        self.size = size
        self.name_prefix = name_prefix
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._in_flight = 0  # calls submitted whose outcome the loop has not settled (loop thread only)
        self._outcomes: collections.deque[_Outcome] = collections.deque()
        self._waking = False  # a settle is scheduled on the loop for the outcomes gathered so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn()`` in a pool thread; the returned future (of the running loop) gets its outcome."""
        if self._closed:
            raise RuntimeError("the thread pool was shut down")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._in_flight:
                raise RuntimeError("a thread pool serves one event loop at a time")
            self._loop = loop
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.put((future, fn))
        self._in_flight += 1
        if self._in_flight > len(self._threads) < self.size:
            thread = threading.Thread(target=self._serve, name=f"{self.name_prefix}_{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return future

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn = call
            del call
            if future.cancelled():  # given up on before it started (a shutdown, a stopped delivery)
                outcome: _Outcome = (future, False, None)
            else:
                try:
                    outcome = (future, True, fn())
                except BaseException as exc:  # the task's own, for its caller: as ThreadPoolExecutor does
                    outcome = (future, False, exc)
            self._hand_back(outcome)
            del future, fn, outcome  # no reference to the last call's objects while idle

    def _hand_back(self, outcome: _Outcome) -> None:
        # Lock-free under the GIL: the outcome is appended before the flag is read, and the loop clears
        # the flag before it takes outcomes, so each outcome is either taken by a settle already under
        # way or sees the flag down and schedules one.
        self._outcomes.append(outcome)
        if not self._waking:
            self._waking = True
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._settle)
            except RuntimeError:  # the loop is closed: nobody waits for these any more
                self._outcomes.clear()

    def _settle(self) -> None:
        self._waking = False
        outcomes = self._outcomes
        while outcomes:
            future, ok, value = outcomes.popleft()
            self._in_flight -= 1
            if future.cancelled():  # given up on while it ran (a hard time limit, a shutdown)
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value if not isinstance(value, StopIteration) else RuntimeError(repr(value)))

    def shutdown(self) -> None:
        """Take no more calls, cancel those not started; threads end once idle (never waited for)."""
        self._closed = True
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                call[0].cancel()
        for _ in self._threads:
            self._calls.put(None)
