"""Per-task rate limits with Celery's semantics: ``rate_limit="10/s" | "10/m" | "10/h"``, per worker process.

Each task name has a token bucket holding at most one token, as a Celery worker's buckets do: a
limited task starts at most once every ``1/rate`` seconds in this process, and an idle period earns
no burst. A delivery waiting for its token is not yet holding a concurrency slot, so other tasks keep
running; it stays unacked, so the broker's prefetch (``basic.qos``) still bounds how many deliveries
the worker holds, waiting or not. On shutdown a waiting delivery is handed back like any other not
started.

The limit comes from, first to last: ``amqtask control rate_limit`` (Celery's ``rate_limit`` command),
the task's ``rate_limit`` option, the ``task_default_rate_limit`` setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .app import App

#: Seconds per unit of a rate string.
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(value: Any) -> float | None:
    """Tasks per second of ``"N/s"``, ``"N/m"``, ``"N/h"`` or a number (per second); ``None`` for no limit.

    As in Celery, ``0`` (or an empty string, or ``None``) means no limit.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigurationError(f"invalid rate limit {value!r}: expected N/s, N/m or N/h")
    number, _, unit = str(value).strip().partition("/")
    try:
        per_second = float(number) / UNITS[unit.strip() or "s"]
    except (ValueError, KeyError):
        raise ConfigurationError(f"invalid rate limit {value!r}: expected N/s, N/m or N/h") from None
    if not math.isfinite(per_second) or per_second < 0:
        raise ConfigurationError(f"invalid rate limit {value!r}: must be a finite number >= 0")
    return per_second or None


class TokenBucket:
    """A bucket of capacity one: :meth:`take` returns at most once every ``1/rate`` seconds, in arrival order."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._last = -math.inf
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    def set_rate(self, rate: float | None) -> None:
        """Change the rate; tasks already waiting wait according to the new one."""
        self.rate = rate
        self._changed.set()

    async def take(self) -> None:
        """Wait for the token."""
        async with self._lock:
            while self.rate is not None:
                wait = self._last + 1.0 / self.rate - time.monotonic()
                if wait <= 0:
                    break
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait)
            self._last = time.monotonic()


class RateLimits:
    """The buckets of one worker process, and the limits remote control set at runtime."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._set: dict[str, float | None] = {}
        #: The limits as remote control gave them ("10/s"), for ``registered``.
        self.given: dict[str, Any] = {}
        self._buckets: dict[str, TokenBucket] = {}

    def rate_of(self, name: str) -> float | None:
        """The limit in force for task ``name``, in tasks per second."""
        if name in self._set:
            return self._set[name]
        task = self.app.tasks.get(name)
        limit = task.options.get("rate_limit") if task is not None else None
        return parse_rate(self.app.conf.task_default_rate_limit if limit is None else limit)

    def set(self, name: str, value: Any) -> None:
        """Set task ``name``'s limit in this process (``value`` as for :func:`parse_rate`)."""
        rate = parse_rate(value)
        self._set[name] = rate
        self.given[name] = value or None
        if name in self._buckets:
            self._buckets[name].set_rate(rate)

    def bucket(self, name: Any) -> TokenBucket | None:
        """The bucket a task called ``name`` takes its token from here; None for unknown names and unlimited tasks."""
        if not isinstance(name, str) or name not in self.app.tasks:
            return None
        bucket = self._buckets.get(name)
        if bucket is None:
            rate = self.rate_of(name)
            if rate is None:
                return None
            bucket = self._buckets[name] = TokenBucket(rate)
        return bucket


__all__ = ["UNITS", "RateLimits", "TokenBucket", "parse_rate"]
