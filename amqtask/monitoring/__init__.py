"""Observability: Celery-compatible events (and, built the same way on the middleware hooks, the rest of
what operators watch a worker with).

``events`` holds the wire format and the publisher; ``event_middleware`` the hooks that feed it.
"""

from __future__ import annotations

from .event_middleware import EventsMiddleware

__all__ = ["EventsMiddleware"]
