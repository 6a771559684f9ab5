"""The pytest plugin shipped with amqtask (entry point ``pytest11``): fixtures for testing code that uses it.

``amqtask_eager(app, propagate=False)``: for the rest of the test, everything ``app`` sends runs inline
(:func:`amqtask.testing.eager`); no broker needed, no socket opened.

``amqtask_worker(app, queues=None, concurrency=1, burst=False)``: an in-process worker against the
app's broker. In the background (default) it consumes until the test ends and is stopped cleanly at
teardown (running tasks finish); with ``burst=True`` the call returns once the queues are drained and
nothing runs, the worker stopped. Returns the :class:`~amqtask.Worker` (``.stats`` counts what it did).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .app import App
from .testing import background_worker, burst_worker, eager
from .worker.worker import Worker


@pytest.fixture
def amqtask_eager() -> Iterator[Callable[..., App]]:
    """Put an app into eager mode for the rest of the test: ``amqtask_eager(app)``."""
    with contextlib.ExitStack() as stack:

        def make_eager(app: App, *, propagate: bool = False) -> App:
            return stack.enter_context(eager(app, propagate=propagate))

        yield make_eager


@pytest.fixture
def amqtask_worker() -> Iterator[Callable[..., Worker]]:
    """Run an in-process worker: ``amqtask_worker(app, queues=["q"], concurrency=2, burst=False)``."""
    with contextlib.ExitStack() as stack:

        def start(
            app: App, queues: list[str] | None = None, *, concurrency: int = 1, burst: bool = False, **options: Any
        ) -> Worker:
            if burst:
                return burst_worker(app, queues=queues, concurrency=concurrency, **options)
            return stack.enter_context(background_worker(app, queues=queues, concurrency=concurrency, **options))

        yield start
