"""Schedule sources: entries kept outside the code (a database table, a service), re-read while beat runs.

A :class:`ScheduleSource` is what ``amqtask beat --scheduler`` (or the ``beat_scheduler`` setting)
plugs into the beat loop: its entries are merged over ``beat_schedule``, code-registered entries and the
schedule file (a name clash goes to the source). The loop asks :meth:`ScheduleSource.changed` on every
tick, so that check must be cheap; only when it says so does the loop call :meth:`ScheduleSource.load`.
After a batch of sends the leader calls :meth:`ScheduleSource.record`, so a source can keep its own
bookkeeping (django-celery-beat's ``last_run_at``/``total_run_count``). Only the beat holding the lock
calls ``changed``, ``load`` (after start-up) and ``record``: one sender, one writer.

All three are coroutines: a source doing blocking I/O runs it in a thread, never on the loop.

:func:`resolve_source` turns the ``--scheduler`` value into a source: ``"django"`` (also spelled as
Celery's ``django_celery_beat.schedulers:DatabaseScheduler``) or ``"module:factory"``, a callable
taking the app. The core never imports a source's dependencies until it is named.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..errors import ConfigurationError
from .entries import Entry

if TYPE_CHECKING:
    from ..app import App

__all__ = ["SCHEDULER_ALIASES", "Fired", "ScheduleSource", "resolve_source"]

_DJANGO = "amqtask.contrib.django.beat_source:DatabaseSource"
#: Names ``--scheduler`` accepts for the built-in sources, Celery's spellings included.
SCHEDULER_ALIASES: Mapping[str, str] = {
    "django": _DJANGO,
    "django_celery_beat": _DJANGO,
    "django_celery_beat.schedulers:DatabaseScheduler": _DJANGO,
    "django_celery_beat.schedulers.DatabaseScheduler": _DJANGO,
}


@dataclass(frozen=True)
class Fired:
    """One message beat sent: which entry, for which slot, with which task id."""

    entry: str
    slot: datetime
    task_id: str


@runtime_checkable
class ScheduleSource(Protocol):
    """Entries beat reads from elsewhere; see the module documentation."""

    #: Where the entries come from, as errors and logs name it (``"django-celery-beat"``).
    name: str

    async def load(self) -> Mapping[str, Entry]:
        """Read every entry now. Raise :class:`~amqtask.errors.ConfigurationError` when the source is
        unusable (not installed, not migrated); skip (and log) a single bad entry instead of failing."""

    async def changed(self) -> bool:
        """Whether the entries may have changed since the last :meth:`load` (cheap: called every tick)."""

    async def record(self, fired: Sequence[Fired]) -> None:
        """Note the sends of a batch (the leader calls it after each non-empty batch; entries of other
        sources included: skip them). An error is logged by the loop and does not stop it."""


def resolve_source(app: App, spec: str) -> ScheduleSource:
    """The source named by ``spec``: an alias of :data:`SCHEDULER_ALIASES` or ``"module:factory"``."""
    target = SCHEDULER_ALIASES.get(spec.strip(), spec.strip())
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        known = ", ".join(sorted(SCHEDULER_ALIASES))
        raise ConfigurationError(f"beat scheduler {spec!r}: expected one of {known} or 'module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"beat scheduler {spec!r}: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigurationError(f"beat scheduler {spec!r}: {module_name} has no callable {attribute!r}")
    source = _call(factory, app, spec)
    if not isinstance(source, ScheduleSource):
        raise ConfigurationError(f"beat scheduler {spec!r}: {target} did not return a ScheduleSource")
    return source


def _call(factory: Callable[[App], object], app: App, spec: str) -> object:
    try:
        return factory(app)
    except ConfigurationError:
        raise
    except ImportError as exc:
        raise ConfigurationError(f"beat scheduler {spec!r}: {exc}") from exc
