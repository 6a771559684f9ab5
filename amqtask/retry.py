"""Task retry policy: when a failed attempt is tried again, and after how long.

Backoff uses tenacity's wait strategies (exponential, capped, with full jitter), the same curve
Celery's ``retry_backoff`` gives: ``min(retry_backoff_max, retry_backoff * 2**retries)``. tenacity here
only *computes* delays; the waiting happens in the broker (the delay levels), never in a worker.
Retries of infrastructure (connecting, publishing) are a different thing, handled in ``connection.py``.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from tenacity import RetryCallState, wait_exponential, wait_random_exponential

from .errors import MaxRetriesExceededError, Retry

if TYPE_CHECKING:
    from .task import Task


def backoff_delay(retries: int, *, factor: float, maximum: float, jitter: bool) -> float:
    """Seconds to wait before attempt ``retries + 1`` with exponential backoff."""
    strategy = (wait_random_exponential if jitter else wait_exponential)(multiplier=factor, max=maximum)
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = retries + 1
    return float(strategy(state))


def retry_countdown(task: Task[Any, Any], retries: int, countdown: float | None) -> float:
    """The countdown of the next attempt: explicit, else backoff when configured, else the default delay."""
    if countdown is not None:
        return max(0.0, countdown)
    backoff = task.options.get("retry_backoff", False)
    if backoff:
        factor = 1.0 if backoff is True else float(backoff)
        return backoff_delay(
            retries,
            factor=factor,
            maximum=float(task.options.get("retry_backoff_max", 600)),
            jitter=bool(task.options.get("retry_jitter", True)),
        )
    return float(task.options.get("default_retry_delay", task.app.conf.task_default_retry_delay))


def autoretry_delay(task: Task[Any, Any], exc: BaseException, retries: int) -> float | None:
    """The countdown of an automatic retry after ``exc``, or None when ``exc`` ends the task.

    ``autoretry_for`` / ``dont_autoretry_for`` pick the exceptions; ``retry_kwargs`` may set
    ``countdown`` and ``max_retries`` like ``self.retry()`` would.
    """
    autoretry = task.options.get("autoretry_for", ())
    excluded = task.options.get("dont_autoretry_for", ())
    if not autoretry or not isinstance(exc, autoretry) or (excluded and isinstance(exc, excluded)):
        return None
    retry_kwargs = task.options.get("retry_kwargs", {})
    limit = retry_kwargs.get("max_retries", task.max_retries)
    if limit is not None and retries >= limit:
        return None
    return retry_countdown(task, retries, retry_kwargs.get("countdown"))


def request_retry(
    task: Task[Any, Any],
    *,
    exc: BaseException | None,
    countdown: float | None,
    eta: dt.datetime | None,
    max_retries: int | None,
    **options: Any,
) -> Any:
    """Raise :class:`Retry` for the worker to act on, or the final error once retries are used up."""
    request = task.request
    limit = max_retries if max_retries is not None else task.max_retries
    if request.is_eager and request.id is None:
        # Called directly (no message): there is nothing to send again. Eager runs have an id and retry.
        raise exc if exc is not None else Retry("retry requested outside a worker")
    if limit is not None and request.retries >= limit:
        if exc is not None:
            raise exc
        raise MaxRetriesExceededError(f"task {task.name}[{request.id}] exceeded max_retries={limit}")
    if eta is not None:
        if eta.tzinfo is None:
            eta = eta.replace(tzinfo=dt.timezone.utc)
        delay = max(0.0, (eta - dt.datetime.now(dt.timezone.utc)).total_seconds())
    else:
        delay = retry_countdown(task, request.retries, countdown)
    raise Retry(f"Retry in {delay:g}s" + (f": {exc!r}" if exc is not None else ""), exc=exc, when=delay)
