"""The middleware every app starts with."""

from __future__ import annotations

from ..signing import SigningMiddleware
from . import Middleware
from .canvas import CanvasMiddleware
from .control import ControlMiddleware


def default_middleware() -> list[Middleware]:
    """A fresh list of the built-in middleware, in the order their hooks run.

    Control's revoke check comes before canvas follow-ups. Signing (a no-op unless ``signing_keys``
    is set) signs what is published, so it comes after anything that changes outgoing messages; it
    verifies nothing here: a worker verifies each delivery before any middleware sees it.
    """
    return [ControlMiddleware(), CanvasMiddleware(), SigningMiddleware()]
