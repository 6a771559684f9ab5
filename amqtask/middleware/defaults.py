"""The middleware every app starts with."""

from __future__ import annotations

from . import Middleware
from .canvas import CanvasMiddleware
from .control import ControlMiddleware


def default_middleware() -> list[Middleware]:
    """A fresh list of the built-in middleware, in the order their hooks run."""
    return [ControlMiddleware(), CanvasMiddleware()]
