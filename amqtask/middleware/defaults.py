"""The middleware every app starts with."""

from __future__ import annotations

from . import Middleware


def default_middleware() -> list[Middleware]:
    """A fresh list of the built-in middleware, in the order their hooks run."""
    return []
