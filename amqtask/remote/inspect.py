"""Read-only queries to the workers, ``app.control.inspect()``: each answer is ``{node: reply}``.

The requests go out through :class:`~amqtask.remote.client.Control`, which collects the replies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Control

log = logging.getLogger("amqtask.control")


def flatten(replies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``[{node: reply}, ...]`` as one ``{node: reply}``; a name seen twice means two workers share it."""
    merged: dict[str, Any] = {}
    for item in replies:
        for node, reply in item.items():
            if node in merged:
                log.warning("two workers answered as %r; give each worker its own hostname (-n)", node)
            merged[node] = reply
    return merged


class Inspect:
    """Read-only queries to the workers; each returns ``{node: reply}`` (empty when nobody answered)."""

    def __init__(
        self,
        control: Control,
        *,
        timeout: float = 1.0,
        destination: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> None:
        self.control = control
        self.timeout = timeout
        self.destination = destination
        self.limit = limit

    async def _arequest(self, method: str, **arguments: Any) -> dict[str, Any]:
        replies = await self.control.abroadcast(
            method,
            arguments,
            destination=self.destination,
            reply=True,
            timeout=self.timeout,
            limit=self.limit,
        )
        return flatten(replies)

    def _request(self, method: str, **arguments: Any) -> dict[str, Any]:
        return self.control.app.portal.run(self._arequest(method, **arguments))

    async def aping(self) -> dict[str, Any]:
        """``{node: {"ok": "pong"}}``."""
        return await self._arequest("ping")

    def ping(self) -> dict[str, Any]:
        """:meth:`aping` for synchronous code."""
        return self._request("ping")

    async def aregistered(self, *taskinfoitems: str) -> dict[str, Any]:
        """``{node: [task name, ...]}``; with option names, ``"name [option=value ...]"`` (as Celery)."""
        return await self._arequest("registered", taskinfoitems=list(taskinfoitems))

    def registered(self, *taskinfoitems: str) -> dict[str, Any]:
        """:meth:`aregistered` for synchronous code."""
        return self._request("registered", taskinfoitems=list(taskinfoitems))

    async def aactive(self, safe: bool = False) -> dict[str, Any]:
        """``{node: [task info, ...]}`` for the tasks running now; ``safe`` sends argument reprs instead."""
        return await self._arequest("active", safe=safe)

    def active(self, safe: bool = False) -> dict[str, Any]:
        """:meth:`aactive` for synchronous code."""
        return self._request("active", safe=safe)

    async def astats(self) -> dict[str, Any]:
        """``{node: {pid, total, pool, broker, uptime, ...}}``."""
        return await self._arequest("stats")

    def stats(self) -> dict[str, Any]:
        """:meth:`astats` for synchronous code."""
        return self._request("stats")

    async def aactive_queues(self) -> dict[str, Any]:
        """``{node: [queue, ...]}``: the queues each worker consumes, in kombu's ``Queue.as_dict`` shape."""
        return await self._arequest("active_queues")

    def active_queues(self) -> dict[str, Any]:
        """:meth:`aactive_queues` for synchronous code."""
        return self._request("active_queues")

    async def aconf(self) -> dict[str, Any]:
        """``{node: {setting: value}}``: each worker's settings (secrets left out, broker URLs masked)."""
        return await self._arequest("conf")

    def conf(self) -> dict[str, Any]:
        """:meth:`aconf` for synchronous code."""
        return self._request("conf")

    async def areserved(self, safe: bool = False) -> dict[str, Any]:
        """``{node: [task info, ...]}`` for the deliveries each worker holds but has not started."""
        return await self._arequest("reserved", safe=safe)

    def reserved(self, safe: bool = False) -> dict[str, Any]:
        """:meth:`areserved` for synchronous code."""
        return self._request("reserved", safe=safe)

    async def ascheduled(self) -> dict[str, Any]:
        """``{node: []}`` from amqtask workers: tasks with an eta wait in the broker, never in a worker."""
        return await self._arequest("scheduled")

    def scheduled(self) -> dict[str, Any]:
        """:meth:`ascheduled` for synchronous code."""
        return self._request("scheduled")

    async def arevoked(self) -> dict[str, Any]:
        """``{node: [revoked task id, ...]}``, oldest first."""
        return await self._arequest("revoked")

    def revoked(self) -> dict[str, Any]:
        """:meth:`arevoked` for synchronous code."""
        return self._request("revoked")


__all__ = ["Inspect", "flatten"]
