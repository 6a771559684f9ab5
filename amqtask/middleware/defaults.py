"""The middleware every app starts with."""

from __future__ import annotations

from ..monitoring.event_middleware import EventsMiddleware
from ..monitoring.logs import TaskLogMiddleware
from ..monitoring.metrics import MetricsMiddleware
from ..signing import SigningMiddleware
from . import Middleware
from .canvas import CanvasMiddleware
from .control import ControlMiddleware


def default_middleware() -> list[Middleware]:
    """A fresh list of the built-in middleware, in the order their hooks run.

    Control's revoke check comes before events (a revoked task yields ``task-revoked`` alone), metrics
    and task logging, and those before canvas follow-ups (whose log records then carry the task's
    fields). Signing (a no-op unless ``signing_keys`` is set) signs what is published, so it comes after
    anything that changes outgoing messages; it verifies nothing here: a worker verifies each delivery
    before any middleware sees it, so an unverified message causes no event, metric or log of a task.
    """
    return [
        ControlMiddleware(), EventsMiddleware(), MetricsMiddleware(), TaskLogMiddleware(), CanvasMiddleware(),
        SigningMiddleware(),
    ]  # fmt: skip
