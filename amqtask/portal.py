"""Synchronous callers (scripts, Django views, worker threads) run amqtask's async code through a portal.

The portal is an event loop on a background thread, one per process; ``delay()`` and ``get()``
submit coroutines to it and block until they finish. After ``fork()`` the child gets a new loop (and
so new connections): the parent's thread does not exist in the child. A worker attaches its own loop
instead, so that sync tasks in its threads share the worker's connection.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import MisuseError

#: How long a stopping portal loop lets pending work (close callbacks) finish before cancelling it.
_FINISH_S = 1.0

T = TypeVar("T")


class Portal:
    """A background event loop that synchronous code can run coroutines on."""

    def __init__(
        self, name: str, loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    ) -> None:
        self.name = name
        self._loop_factory = loop_factory
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._attached: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve sync callers on ``loop`` (a worker's, running on another thread) until :meth:`detach`."""
        with self._lock:
            self._attached = loop

    def detach(self) -> None:
        """Go back to the portal's own loop."""
        with self._lock:
            self._attached = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The attached loop, else the portal's own, started on first use (and again in a forked child)."""
        with self._lock:
            if self._pid != os.getpid():
                self._loop = self._attached = None
                self._pid = os.getpid()
            if self._attached is not None and not self._attached.is_closed():
                return self._attached
            if self._loop is None or self._loop.is_closed():
                self._start()
            assert self._loop is not None
            return self._loop

    def _start(self) -> None:
        loop = self._loop_factory()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                _finish(loop)

        thread = threading.Thread(target=run, name=f"{self.name}-portal", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread = loop, thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the portal loop and return its result (blocking the calling thread)."""
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise MisuseError(
                "a blocking amqtask call was made on the event loop that serves it; in async code use the "
                "awaitable twin (adelay, aapply_async, aget, or `await result`)"
            )
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def stop(self, cleanup: Coroutine[Any, Any, Any] | None = None, timeout: float = 5.0) -> None:
        """Run ``cleanup`` on the portal's own loop, then stop that loop (an attached loop is left alone)."""
        with self._lock:
            loop, pid = self._loop, self._pid
        if loop is None or pid != os.getpid() or loop.is_closed():
            if cleanup is not None:
                cleanup.close()
            return
        if cleanup is not None:
            with contextlib.suppress(Exception):  # best effort at exit
                asyncio.run_coroutine_threadsafe(cleanup, loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        with self._lock:
            self._loop = None


def _finish(loop: asyncio.AbstractEventLoop) -> None:
    """Close a stopped loop after what is still pending on it (aio-pika's close callbacks) has finished.

    Closing it at once destroys those tasks mid-way, with warnings; one that does not finish within a
    second is cancelled.
    """
    try:
        pending = asyncio.all_tasks(loop)
        if pending:
            _, late = loop.run_until_complete(asyncio.wait(pending, timeout=_FINISH_S))
            for task in late:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*late, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def register_exit(portal: Portal, cleanup: Any) -> None:
    """Close the portal's connections when the interpreter exits."""
    atexit.register(lambda: portal.stop(cleanup()))
