"""Results of a group: :class:`GroupResult`, the handle on every member's outcome, in group order.

A group has no message and no reply of its own: its id is the ``group`` header its members carry, and
everything a :class:`GroupResult` knows comes from its members' replies in the process's result store.
It is an :class:`~amqtask.results.AsyncResult` whose value is the list of the members' values, so a
chain that ends in a group, or ``await`` on a group, reads like any other result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..protocol import ResultMessage
from . import stream
from .async_result import AsyncResult

if TYPE_CHECKING:
    from ..app import App


class GroupResult(AsyncResult[list[Any]]):
    """The members' results of a group (or of a chord's header), in the order the members were given."""

    def __init__(self, id: str, results: Iterable[AsyncResult[Any]], app: App | None = None) -> None:
        super().__init__(id, app)
        self.results: list[AsyncResult[Any]] = list(results)

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} {self.completed_count()}/{len(self.results)} done>"

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[AsyncResult[Any]]:
        return iter(self.results)

    def __getitem__(self, index: int) -> AsyncResult[Any]:
        return self.results[index]

    @property
    def children(self) -> list[AsyncResult[Any]]:
        """The members' results (Celery's name for them)."""
        return self.results

    @property
    def state(self) -> str:
        """FAILURE once any member failed, SUCCESS once all succeeded, else PENDING."""
        if self.failed():
            return protocol.FAILURE
        return protocol.SUCCESS if self.successful() else protocol.PENDING

    status = state

    def ready(self) -> bool:
        """Whether every member finished (successfully or not)."""
        return all(result.ready() for result in self.results)

    def successful(self) -> bool:
        """Whether every member finished successfully."""
        return all(result.successful() for result in self.results)

    def failed(self) -> bool:
        """Whether any member failed (or was revoked)."""
        return any(result.failed() for result in self.results)

    def waiting(self) -> bool:
        """Whether some member has not finished yet."""
        return not self.ready()

    def completed_count(self) -> int:
        """How many members finished successfully (Celery's meaning of "completed")."""
        return sum(1 for result in self.results if result.successful())

    @property
    def result(self) -> list[Any]:
        """Each member's value, exception, or None while it runs."""
        return [result.result for result in self.results]

    @property
    def traceback(self) -> str | None:
        """The remote traceback of the first failed member."""
        return next((r.traceback for r in self.results if r.failed()), None)

    async def aget(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        """Wait for every member; the values in group order. ``timeout`` bounds the whole wait.

        With ``propagate`` the first failed member (in group order) raises; without it, failures
        take their place in the list as exceptions.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        values = []
        for result in self.results:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            values.append(await result.aget(remaining, propagate))
        return values

    def get(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        """Block until every member finished; like :meth:`aget` for synchronous code."""
        return self.app.portal.run(self.aget(timeout, propagate))

    join = get

    def save(self) -> None:
        """Store the group's member ids in the result stream, so :meth:`restore` finds it by id in any process."""
        self.app.portal.run(self.asave())

    async def asave(self) -> None:
        """:meth:`save` for async code."""
        record = ResultMessage(self.id, protocol.SUCCESS, children=[result.id for result in self.results])
        await stream.append_record(self.app.runtime().publisher, self.app.conf, record, stream.GROUP)

    @classmethod
    def restore(cls, id: str, app: App | None = None) -> GroupResult | None:
        """The group saved under ``id`` (its members' results read by id), or None if none was saved."""
        from ..app import current_app

        application = app if app is not None else current_app()
        return application.portal.run(cls.arestore(id, application))

    @classmethod
    async def arestore(cls, id: str, app: App) -> GroupResult | None:
        """:meth:`restore` for async code."""
        saved = await app.runtime().stream.lookup(stream.GROUP_KEY + id, app.conf.publish_timeout_s)
        if saved is None:
            return None
        return cls(id, [AsyncResult(member, app) for member in saved.children], app)

    def __await__(self) -> Generator[Any, None, list[Any]]:
        return self.aget().__await__()


__all__ = ["GroupResult"]
