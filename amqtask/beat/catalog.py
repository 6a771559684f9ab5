"""The entries of a running beat, from every place they are kept, and their re-reading while it runs.

:class:`Catalog` merges (:func:`~amqtask.beat.entries.collect`) ``beat_schedule``, code-registered
entries, the schedule file (:class:`~amqtask.beat.schedule_file.ScheduleFileWatcher`) and a
:class:`~amqtask.beat.sources.ScheduleSource` (a database), and answers the beat loop's one question
on every tick: did any of it change? The file costs a ``stat``, the source its own cheap check; only a
change re-reads and re-validates. An invalid edit keeps the previous entries (logged), so a typo never
stops a running beat.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from .entries import Entry, collect
from .schedule_file import ScheduleFileWatcher
from .sources import Fired, ScheduleSource

if TYPE_CHECKING:
    from ..app import App

__all__ = ["Catalog"]

log = logging.getLogger("amqtask.beat")


class Catalog:
    """The entries beat runs for ``app``; see the module documentation.

    Entries of ``beat_schedule``, code and the file are validated here, so a bad schedule fails before
    any connection is made; the source's are read by :meth:`load_source` (a coroutine: the source may
    do I/O), which the scheduler awaits before it starts.
    """

    def __init__(self, app: App, schedule_file: str | os.PathLike[str] | None, source: ScheduleSource | None) -> None:
        self.app = app
        self.source = source
        path = schedule_file if schedule_file is not None else app.conf.beat_schedule_file
        #: The schedule file's watcher, None without a file.
        self.watcher = ScheduleFileWatcher(path, default_tz=app.conf.timezone) if path else None
        self._source_entries: Mapping[str, Entry] = {}
        self._source_error: str | None = None
        self.entries: dict[str, Entry] = self._collect(self.watcher.load() if self.watcher else {})

    async def load_source(self) -> None:
        """Read the source's entries now; its :class:`~amqtask.errors.ConfigurationError` propagates."""
        if self.source is not None:
            self._source_entries = await self.source.load()
            self.entries = self._collect(self._file_entries())

    async def refresh(self) -> tuple[list[str], list[str]] | None:
        """Re-read what changed; return the (added, removed) entry names when :attr:`entries` was replaced.

        Never raises for bad content: an invalid file or an unreadable source keeps the entries (logged).
        """
        file_changed = self.watcher is not None and self.watcher.changed()
        source_changed = await self._refresh_source()
        if not (file_changed or source_changed):
            return None
        try:
            entries = self._collect(self._file_entries())
        except ConfigurationError as exc:
            log.error("%s (keeping the previous schedule)", exc)
            return None
        added = sorted(set(entries) - set(self.entries))
        removed = sorted(set(self.entries) - set(entries))
        where = " and ".join(
            name for name, changed in ((self.file_name, file_changed), (self._source_name, source_changed)) if changed
        )
        log.info("%s reloaded: %d entries (added %s, removed %s)", where, len(entries), added, removed)
        self.entries = entries
        return added, removed

    async def _refresh_source(self) -> bool:
        if self.source is None:
            return False
        try:
            changed = await self.source.changed()
            if changed:
                self._source_entries = await self.source.load()
        except Exception as exc:  # a database briefly away must not stop the sends
            problem = f"{type(exc).__name__}: {exc}"
            if problem != self._source_error:  # once, not on every tick while it lasts
                log.error("reading %s failed (keeping the previous schedule): %s", self.source.name, problem)
            self._source_error = problem
            return False
        if self._source_error is not None:
            log.warning("%s can be read again", self.source.name)
            self._source_error = None
        return changed

    async def record(self, fired: Sequence[Fired]) -> None:
        """Tell the source what was sent; a failure is logged (the sends stand, the state has them)."""
        if self.source is None or not fired:
            return
        try:
            await self.source.record(fired)
        except Exception as exc:
            log.error("recording runs in %s failed: %s: %s", self.source.name, type(exc).__name__, exc)

    @property
    def file_name(self) -> str:
        """The schedule file as errors name it."""
        return f"schedule file {self.watcher.path}" if self.watcher is not None else "schedule file"

    @property
    def _source_name(self) -> str:
        return self.source.name if self.source is not None else "source"

    def _file_entries(self) -> dict[str, dict[str, Any]]:
        return self.watcher.schedule if self.watcher is not None else {}

    def _collect(self, file_entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Entry]:
        source = (self._source_name, self._source_entries) if self.source is not None else None
        return collect(self.app, file_entries, file_name=self.file_name, source=source)
