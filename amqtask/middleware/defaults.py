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

    Signing comes first so a forged message is refused before anything acts on it; it is a no-op
    unless ``signing_keys`` is set. Control's revoke check comes before events (a revoked task yields
    ``task-revoked`` alone) and canvas follow-ups; task logging comes before canvas, so the follow-ups'
    log records carry the task's fields.
    """
    return [
        SigningMiddleware(), ControlMiddleware(), EventsMiddleware(), MetricsMiddleware(), TaskLogMiddleware(),
        CanvasMiddleware(),
    ]  # fmt: skip
