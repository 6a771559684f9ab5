"""The periodic-task scheduler behind ``amqtask beat``: schedules, entries, the leader lock, the state, the loop.

Submodules, one concept each: :mod:`~amqtask.beat.schedules` (when: interval, crontab, each in a module
of its own),
:mod:`~amqtask.beat.schedule_file` (the TOML/JSON file and its watcher), :mod:`~amqtask.beat.entries`
(what: entries from ``beat_schedule``, code and files), :mod:`~amqtask.beat.sources` (entries kept
elsewhere, such as django-celery-beat's tables), :mod:`~amqtask.beat.catalog` (all of them, re-read on
change), :mod:`~amqtask.beat.leader` (which beat sends: an
exclusive-queue lock), :mod:`~amqtask.beat.state` (last runs, kept in a queue) and
:mod:`~amqtask.beat.scheduler` (the loop). docs/beat.md is the user's guide.
"""

from .entries import Entry
from .leader import NotLeaderError
from .schedule_file import ScheduleFileError, ScheduleFileWatcher, load_schedule_file
from .scheduler import Scheduler, serve
from .schedules import InvalidScheduleError, Schedule, crontab, interval, parse_schedule
from .sources import Fired, ScheduleSource, resolve_source
from .state import EntryState, status

__all__ = [
    "Entry",
    "EntryState",
    "Fired",
    "InvalidScheduleError",
    "NotLeaderError",
    "Schedule",
    "ScheduleFileError",
    "ScheduleFileWatcher",
    "ScheduleSource",
    "Scheduler",
    "crontab",
    "interval",
    "load_schedule_file",
    "parse_schedule",
    "resolve_source",
    "serve",
    "status",
]
