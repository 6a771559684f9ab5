"""The threads plain (``def``) tasks run in: a pool that never keeps the process alive.

The standard ``ThreadPoolExecutor`` joins its threads when the interpreter exits, so a task stuck in
its thread (a blocking C call no time limit can interrupt) would keep a stopping worker alive for as
long as it is stuck, past any grace period. These threads are daemon threads instead: once the worker
has stopped, the process exits, and the stuck task's delivery, never acked, is redelivered by the
broker. A thread is started only when a call finds none idle, up to the pool's size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")
_Call = tuple[Future[Any], Callable[[], Any]]


class DaemonThreadPool(Executor):
    """Up to ``size`` daemon threads taking calls in turn (an ``Executor`` for ``loop.run_in_executor``)."""

    def __init__(self, size: int, name_prefix: str) -> None:
        self.size = size
        self.name_prefix = name_prefix
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)  # one count per thread waiting for a call
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` in a pool thread; its future has the outcome."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the thread pool was shut down")
            self._calls.put((future, lambda: fn(*args, **kwargs)))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._serve, name=f"{self.name_prefix}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return future

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            future, call = item
            del item
            if future.set_running_or_notify_cancel():
                _settle(future, call)
            del future, call  # no reference to the last call's objects while idle
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls; threads end once idle. ``wait`` joins them (never done for a stuck one)."""
        with self._lock:
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        item = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in self._threads:
                self._calls.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


def _settle(future: Future[Any], call: Callable[[], Any]) -> None:
    try:
        result = call()
    except BaseException as exc:  # the task's own, for its caller: as ThreadPoolExecutor does
        future.set_exception(exc)
    else:
        future.set_result(result)
