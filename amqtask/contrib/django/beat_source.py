"""``amqtask beat --scheduler django``: periodic tasks read from django-celery-beat's tables.

A team moving from Celery keeps its admin screens: :class:`DatabaseSource` is a
:class:`~amqtask.beat.sources.ScheduleSource` over django-celery-beat's ``PeriodicTask`` rows (each
converted by :mod:`amqtask.contrib.django.beat_entries`). Beat still decides who sends (one leader
across many beats) and keeps its own last-run state in RabbitMQ; the tables say what to send and when.

**Noticing edits.** django-celery-beat stamps ``PeriodicTasks.last_update`` on every save or delete of
a periodic task or schedule (and code that bulk-updates rows calls ``PeriodicTasks.update_changed()``,
as its documentation asks). Each tick reads that one row; only a new stamp re-reads the tables. The
stamp is read *before* the rows, so an edit made during a re-read is caught by the next tick.

**Writing back.** After each send the leader sets the row's ``last_run_at`` and adds one to
``total_run_count`` (what the admin shows), with an ``UPDATE`` rather than ``save()``: it neither fires
the change signal (no pointless re-read by every beat) nor overwrites an edit made meanwhile. A
``one_off`` row is disabled after its run and the change stamped, as django-celery-beat does.

**Not blocking the loop.** Every database call runs in one worker thread of this source (so
``CONN_MAX_AGE`` connections are reused, one at a time), between ``close_old_connections()`` calls, as
Django does around a request; Django would refuse ORM calls on the event loop's thread anyway.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from ...beat.entries import Entry
from ...beat.sources import Fired
from ...errors import ConfigurationError
from .beat_entries import WHERE, entry_from_row

if TYPE_CHECKING:
    from ...app import App

__all__ = ["DatabaseSource"]

log = logging.getLogger("amqtask.beat")
T = TypeVar("T")

_MISSING = "amqtask beat --scheduler django needs django-celery-beat: pip install 'amqtask[django-beat]'"


def _set_up_django() -> None:
    """Set Django up (as ``manage.py`` would) or say why it cannot be; check django-celery-beat is usable."""
    try:
        import django
        from django.apps import apps
        from django.conf import settings
    except ImportError as exc:
        raise ConfigurationError(f"{_MISSING} ({exc})") from exc
    if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        raise ConfigurationError(
            "amqtask beat --scheduler django: Django is not configured; set DJANGO_SETTINGS_MODULE "
            "(or run `python manage.py amqtask beat --scheduler django`)"
        )
    if not apps.ready:
        django.setup()
    if not apps.is_installed("django_celery_beat"):
        raise ConfigurationError(
            "amqtask beat --scheduler django: add 'django_celery_beat' to INSTALLED_APPS, "
            "then run `python manage.py migrate`"
        )


class DatabaseSource:
    """django-celery-beat's enabled periodic tasks as beat entries; see the module documentation.

    ``DatabaseSource(app)`` sets Django up when it is not yet (``DJANGO_SETTINGS_MODULE``) and raises
    :class:`~amqtask.errors.ConfigurationError` when django-celery-beat is missing or not installed
    in Django. The app is not needed: the rows name their tasks.
    """

    name = WHERE

    def __init__(self, app: App | None = None) -> None:
        try:
            import django_celery_beat  # noqa: F401  (only to say clearly when it is missing)
        except ImportError as exc:
            raise ConfigurationError(f"{_MISSING} ({exc})") from exc
        _set_up_django()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="amqtask-beat-db")
        self._stamp: datetime | None = None
        self._loaded = False
        self._one_off: frozenset[str] = frozenset()
        self._names: frozenset[str] = frozenset()

    async def load(self) -> Mapping[str, Entry]:
        """Read every enabled periodic task; a row that cannot run is logged and left out."""
        return await self._run(self._load)

    async def changed(self) -> bool:
        """Whether django-celery-beat's change stamp moved since the last load (one primary-key read)."""
        return not self._loaded or await self._run(_last_change) != self._stamp

    async def record(self, fired: Sequence[Fired]) -> None:
        """Write ``last_run_at`` and ``total_run_count`` of the rows sent; disable sent one-off rows."""
        ours = [one for one in fired if one.entry in self._names]
        if ours:
            await self._run(functools.partial(self._record, ours))

    # ------------------------------------------------------------------------------------------ in the thread
    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(_in_request, call))

    def _load(self) -> dict[str, Entry]:
        from django.db import DatabaseError
        from django_celery_beat.models import PeriodicTask

        try:
            stamp = _last_change()
            rows = list(PeriodicTask.objects.filter(enabled=True).select_related("interval", "crontab", "clocked"))
        except DatabaseError as exc:
            raise ConfigurationError(
                f"{WHERE}: cannot read its tables ({type(exc).__name__}: {exc}); "
                "is 'django_celery_beat' migrated (`python manage.py migrate`)?"
            ) from exc
        entries: dict[str, Entry] = {}
        for row in rows:
            try:
                entry = entry_from_row(row)
            except ConfigurationError as exc:
                log.error("%s (left out)", exc)
                continue
            if entry is not None:
                entries[entry.name] = entry
        self._stamp, self._loaded = stamp, True
        self._names = frozenset(entries)
        self._one_off = frozenset(row.name for row in rows if row.one_off)
        return entries

    def _record(self, fired: Sequence[Fired]) -> None:
        from django.db.models import F
        from django.utils import timezone
        from django_celery_beat.models import PeriodicTask, PeriodicTasks

        now = timezone.now()
        for one in fired:
            rows = PeriodicTask.objects.filter(name=one.entry)
            rows.update(last_run_at=now, total_run_count=F("total_run_count") + 1)
            if one.entry in self._one_off:
                rows.update(enabled=False)
        if self._one_off & {one.entry for one in fired}:
            PeriodicTasks.update_changed()


def _last_change() -> Any:
    from django_celery_beat.models import PeriodicTasks

    return PeriodicTasks.last_change()


def _in_request(call: Callable[[], T]) -> T:
    from django.db import close_old_connections

    close_old_connections()
    try:
        return call()
    finally:
        close_old_connections()
