"""Which event loop amqtask runs on: asyncio's own, or uvloop (an optional extra) for a faster one.

The ``event_loop`` setting picks it for the worker (``amqtask worker``) and for the portal that serves
synchronous callers. uvloop is never imported unless asked for; asking without it installed is a
:class:`~amqtask.errors.ConfigurationError` that says what to install.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import ConfigurationError

T = TypeVar("T")
LOOPS = ("asyncio", "uvloop")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a new event loop of the kind ``name``."""
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        raise ConfigurationError(
            "event_loop = 'uvloop' needs the uvloop package: pip install 'amqtask[uvloop]'"
        ) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(coro: Coroutine[Any, Any, T], name: str) -> T:
    """``asyncio.run(coro)`` on an event loop of the kind ``name``."""
    if name == "asyncio":
        return asyncio.run(coro)
    try:
        factory = loop_factory(name)
    except ConfigurationError:
        coro.close()
        raise
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)
    loop = factory()  # pragma: no cover (Python 3.10)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()
