"""Which middleware hooks a message's path awaits: only those that can do something now.

Awaiting every hook of every middleware costs a coroutine per hook and message, even for a hook the
middleware does not override or one that returns at once because its feature is off (events,
metrics, INFO task lines). :class:`Hooks` keeps, per hook name, the bound hooks worth calling: those
a middleware overrides and says it :meth:`~amqtask.middleware.Middleware.wants` for the app. The lists
are rebuilt when the middleware list, a setting, the ``amqtask.worker`` log level or a middleware's
own switch (:func:`hooks_changed`) changes, so turning a feature on at run time (``control
enable_events``, ``app.conf.task_send_sent_event = True``) takes effect at the next message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import Middleware

if TYPE_CHECKING:
    from ..app import App

#: Hooks called for each message (the worker's start and stop hooks are called on every middleware).
MESSAGE_HOOKS = (
    "before_publish", "after_publish", "before_process", "after_success", "after_failure", "on_retry",
    "after_reject", "after_delivery",
)  # fmt: skip
_worker_log = logging.getLogger("amqtask.worker")
_generation = 0


def hooks_changed() -> None:
    """Tell every app's :class:`Hooks` to ask its middleware again (a middleware's answer to ``wants`` changed)."""
    global _generation
    _generation += 1


class Hooks:
    """The hooks of ``app.middleware`` worth awaiting, per hook name, in list order."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._seen: list[Middleware] = []
        self._state: tuple[int, int, bool] | None = None
        self._lists: dict[str, tuple[Callable[..., Any], ...]] = {}

    def __call__(self, name: str) -> tuple[Callable[..., Any], ...]:
        """The bound hooks called ``name`` to await, in order."""
        app = self.app
        state = (_generation, app.conf._changes, _worker_log.isEnabledFor(logging.INFO))
        if state != self._state or self._seen != app.middleware:
            self._rebuild(state)
        return self._lists[name]

    def _rebuild(self, state: tuple[int, int, bool]) -> None:
        self._seen = list(self.app.middleware)
        self._state = state
        self._lists = {
            name: tuple(
                getattr(middleware, name)
                for middleware in self._seen
                if getattr(type(middleware), name) is not getattr(Middleware, name) and middleware.wants(name, self.app)
            )
            for name in MESSAGE_HOOKS
        }


__all__ = ["MESSAGE_HOOKS", "Hooks", "hooks_changed"]
