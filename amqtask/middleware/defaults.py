"""The middleware every app starts with."""

from __future__ import annotations

from ..signing import SigningMiddleware
from . import Middleware
from .canvas import CanvasMiddleware
from .control import ControlMiddleware


def default_middleware() -> list[Middleware]:
    """A fresh list of the built-in middleware, in the order their hooks run.

    Signing comes first so a forged message is refused before anything acts on it; it is a no-op
    unless ``signing_keys`` is set. Control's revoke check comes before canvas follow-ups.
    """
    return [SigningMiddleware(), ControlMiddleware(), CanvasMiddleware()]
