"""Beat entries: what a periodic task sends and when, built from ``beat_schedule``, code and schedule files.

This module owns :class:`Entry` (one named periodic task: the task name, its
:class:`~amqtask.beat.schedules.Schedule`, arguments, publish options and catch-up policy) and the three
ways entries are made, each validated with errors that name the entry and where it came from:

* ``app.conf.beat_schedule``, Celery's dict shape;
* ``@app.periodic_task(schedule)`` and ``app.add_periodic_task(schedule, target)``, kept in
  ``app.periodic_entries``;
* a schedule file (:mod:`amqtask.beat.schedule_file`).

:func:`collect` merges them; on a name clash the later source wins: ``beat_schedule``, then entries
registered in code, then the schedule file, so operators can override a deployed entry without a deploy.
It also builds (without sending) each entry's message once, so a bad route, option or argument fails at
start-up rather than at the first fire time.

An entry fires at *slots*, the fire times its schedule gives. Each fire's task id is derived from
(app, entry, slot): a slot sent twice (the at-least-once window described in
:mod:`amqtask.beat.scheduler`) goes out with the same id both times, visible and deduplicable.
"""

from __future__ import annotations

import difflib
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any, TypeAlias

from .. import protocol, serializers
from ..errors import ConfigurationError
from .schedule_file import CATCH_UP_POLICIES
from .schedules import InvalidScheduleError, Schedule, parse_schedule

if TYPE_CHECKING:
    from ..app import App

__all__ = [
    "ENTRY_OPTIONS",
    "ENTRY_HEADER",
    "SLOT_HEADER",
    "Entry",
    "ScheduleLike",
    "add_periodic_task",
    "collect",
    "make_entry",
]

log = logging.getLogger("amqtask.beat")

#: What a schedule may be given as: a Schedule, a timedelta, seconds, or a 5-field cron expression.
ScheduleLike: TypeAlias = "Schedule | timedelta | float | str"

#: Publish options an entry may carry (a subset of ``apply_async``'s: no eta/countdown, no canvas links).
ENTRY_OPTIONS = frozenset(
    {
        "queue", "exchange", "routing_key", "priority", "expires", "headers", "ignore_result", "reply_to",
        "serializer", "time_limit", "soft_time_limit",
    }
)  # fmt: skip

#: Headers beat adds to every task message: which entry sent it, and for which slot (ISO 8601, UTC).
ENTRY_HEADER = "amqtask_beat_entry"
SLOT_HEADER = "amqtask_beat_slot"

_ENTRY_KEYS = ("task", "schedule", "args", "kwargs", "options", "catch_up")
# Task ids of beat fires are UUIDv5 in this namespace, from "<app>\0<entry>\0<slot>".
_TASK_ID_NAMESPACE = uuid.UUID("6f1c8a52-4d1e-5b3a-9c57-2a1e0b7d9e41")


@dataclass(frozen=True)
class Entry:
    """One periodic task: send ``task(*args, **kwargs)`` with ``options`` at each slot of ``schedule``.

    ``catch_up`` decides what happens to slots that came due while no beat was leading (all beats down,
    a fail-over, a restart):

    * ``"once"`` (default): one message is sent for the latest missed slot, then the entry continues on
      its schedule (a beat down for a day does not send an hourly task 24 times);
    * ``"skip"``: missed slots are dropped; the entry next fires at its first slot after the new leader
      took over.

    While a beat leads, a slot is never skipped: if sending is late (a slow broker, a failing publish
    being retried), the latest due slot is sent once it can be.
    """

    name: str
    task: str
    schedule: Schedule
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    catch_up: str = CATCH_UP_POLICIES[0]

    def with_default_tz(self, tz: tzinfo | str | None) -> Entry:
        """This entry with a crontab that has no zone of its own evaluated in ``tz``."""
        schedule = parse_schedule(self.schedule, tz)
        return self if schedule is self.schedule else replace(self, schedule=schedule)

    def latest_slot(self, after: datetime, now: datetime) -> datetime | None:
        """The latest slot ``s`` with ``after < s <= now``, or None when no slot is due.

        Searches back from ``now`` in doubling windows, so finding the slot to catch up after a long
        outage costs a few dozen ``next_after`` calls, not one per missed slot.
        """
        first = self.schedule.next_after(after)
        if first > now:
            return None
        window = timedelta(seconds=1)
        slot = first
        while now - window > after:
            candidate = self.schedule.next_after(now - window)
            if candidate <= now:
                slot = candidate
                break
            window *= 2
        while (following := self.schedule.next_after(slot)) <= now:
            slot = following
        return slot

    def task_id(self, app_name: str, slot: datetime) -> str:
        """The task id of this entry's message for ``slot``: the same for every send of that slot."""
        return str(uuid.uuid5(_TASK_ID_NAMESPACE, f"{app_name}\0{self.name}\0{slot.isoformat()}"))

    def send_options(self, app_name: str, slot: datetime) -> dict[str, Any]:
        """The ``apply_async`` options of the message for ``slot`` (results ignored unless asked for)."""
        options = dict(self.options)
        options.setdefault("ignore_result", True)
        options["task_id"] = self.task_id(app_name, slot)
        options["headers"] = {
            **(options.get("headers") or {}),
            ENTRY_HEADER: self.name,
            SLOT_HEADER: slot.isoformat(),
        }
        return options


def make_entry(
    name: str,
    task: str,
    schedule: ScheduleLike,
    *,
    args: Any = (),
    kwargs: Any = None,
    options: Any = None,
    catch_up: Any = CATCH_UP_POLICIES[0],
    where: str = "beat_schedule",
    tz: tzinfo | str | None = None,
) -> Entry:
    """Validate the parts of an entry and build it; errors name the entry and ``where`` it was defined."""
    prefix = f"{where} entry {name!r}"
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"{where}: an entry name must be a non-empty string, got {name!r}")
    if not isinstance(task, str) or not task.strip():
        raise ConfigurationError(f"{prefix}: task must be a non-empty task name, got {task!r}")
    try:
        parsed = parse_schedule(schedule, tz)
    except (InvalidScheduleError, TypeError) as exc:
        raise ConfigurationError(f"{prefix}: {exc}") from None
    if not isinstance(args, list | tuple):
        raise ConfigurationError(f"{prefix}: args must be a list or tuple, got {type(args).__name__}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
        raise ConfigurationError(f"{prefix}: kwargs must be a dict with string keys, got {kwargs!r}")
    if catch_up not in CATCH_UP_POLICIES:
        allowed = " or ".join(map(repr, CATCH_UP_POLICIES))
        raise ConfigurationError(f"{prefix}: catch_up must be {allowed}, got {catch_up!r}")
    return Entry(name, task.strip(), parsed, tuple(args), dict(kwargs), _check_options(prefix, options), catch_up)


def _check_options(prefix: str, options: Any) -> dict[str, Any]:
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise ConfigurationError(f"{prefix}: options must be a dict, got {type(options).__name__}")
    for key in options:
        if key not in ENTRY_OPTIONS:
            close = difflib.get_close_matches(str(key), ENTRY_OPTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(
                f"{prefix}: unknown option {key!r}{hint}; allowed: {', '.join(sorted(ENTRY_OPTIONS))}"
            )
    if options.get("headers") is not None and not isinstance(options["headers"], Mapping):
        raise ConfigurationError(f"{prefix}: options.headers must be a dict, got {options['headers']!r}")
    priority = options.get("priority")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 255
    ):
        raise ConfigurationError(f"{prefix}: options.priority must be an integer 0-255, got {priority!r}")
    if "ignore_result" in options and not isinstance(options["ignore_result"], bool):
        raise ConfigurationError(f"{prefix}: options.ignore_result must be true or false")
    if options.get("ignore_result") is False and not options.get("reply_to"):
        # Beat never reads results; without a queue of the user's to collect them they would pile up.
        raise ConfigurationError(
            f"{prefix}: ignore_result=False needs options.reply_to, the queue that collects the results "
            "(beat itself does not read them)"
        )
    return dict(options)


def _entry_from_config(name: str, raw: Any, where: str) -> Entry:
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{where} entry {name!r}: must be a dict, got {type(raw).__name__}")
    unknown = [key for key in raw if key not in _ENTRY_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), _ENTRY_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigurationError(
            f"{where} entry {name!r}: unknown key {unknown[0]!r}{hint}; allowed: {', '.join(_ENTRY_KEYS)}"
        )
    for key in ("task", "schedule"):
        if key not in raw:
            raise ConfigurationError(f"{where} entry {name!r}: missing {key!r}")
    return make_entry(
        name, raw["task"], raw["schedule"], args=raw.get("args", ()), kwargs=raw.get("kwargs"),
        options=raw.get("options"), catch_up=raw.get("catch_up", CATCH_UP_POLICIES[0]), where=where,
    )  # fmt: skip


def _target_parts(target: Any, where: str) -> tuple[str, tuple[Any, ...], dict[str, Any], dict[str, Any]]:
    """(task name, args, kwargs, options) of a task name, a task, or a signature (duck-typed)."""
    if isinstance(target, str):
        return target, (), {}, {}
    if getattr(target, "subtask_type", None) is not None:
        raise ConfigurationError(
            f"{where}: only a single task's signature can be scheduled, not a {target.subtask_type}; "
            "schedule a task that builds it"
        )
    task_name = getattr(target, "task", None)
    if isinstance(task_name, str):  # a signature: task name, partial args, kwargs and options
        return (
            task_name,
            tuple(getattr(target, "args", None) or ()),
            dict(getattr(target, "kwargs", None) or {}),
            dict(getattr(target, "options", None) or {}),
        )
    task_name = getattr(target, "name", None)
    if isinstance(task_name, str):  # a task object; its own options apply when its message is built
        return task_name, (), {}, {}
    raise ConfigurationError(f"{where}: expected a task, a task name or a signature, got {target!r}")


def add_periodic_task(
    app: App,
    schedule: ScheduleLike,
    target: Any,
    *,
    name: str | None = None,
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    catch_up: str = CATCH_UP_POLICIES[0],
) -> Entry:
    """Register an entry in ``app.periodic_entries`` (see :meth:`amqtask.App.add_periodic_task`).

    A signature's args come first, then ``args`` (as for a partial); ``kwargs`` and ``options`` update
    the signature's. The entry name defaults to the task name; registering a different entry under a
    name already taken is an error (give ``name=``), registering the same one again is a no-op.
    """
    where = "add_periodic_task"
    task_name, base_args, base_kwargs, base_options = _target_parts(target, where)
    entry = make_entry(
        name or task_name, task_name, schedule, args=(*base_args, *(args or ())),
        kwargs={**base_kwargs, **(kwargs or {})}, options={**base_options, **(options or {})},
        catch_up=catch_up, where=where,
    )  # fmt: skip
    existing = app.periodic_entries.get(entry.name)
    if existing is not None and existing != entry:
        raise ConfigurationError(
            f"{where} entry {entry.name!r}: another entry is registered under this name; give name= to tell them apart"
        )
    app.periodic_entries[entry.name] = entry
    return entry


def collect(
    app: App,
    file_entries: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    file_name: str = "schedule file",
    source: tuple[str, Mapping[str, Entry]] | None = None,
) -> dict[str, Entry]:
    """All entries beat runs for ``app``: ``beat_schedule``, code-registered entries, the file's, then
    ``source``'s (a :class:`~amqtask.beat.sources.ScheduleSource`'s name and entries).

    A later source replaces an earlier entry of the same name (logged). Crontabs without a zone of their
    own use ``app.conf.timezone``. Every entry's message is built and encoded once, unsent, so a bad
    route, option or argument raises :class:`~amqtask.errors.ConfigurationError` naming the entry now;
    except for ``source``'s entries, each edited on its own (in an admin screen): a bad one is logged
    and left out, the others run.
    """
    configured = app.conf.beat_schedule or {}
    sources: list[tuple[str, dict[str, Entry]]] = [
        ("beat_schedule", {n: _entry_from_config(n, raw, "beat_schedule") for n, raw in configured.items()}),
        ("add_periodic_task", dict(app.periodic_entries)),
        (file_name, {n: _entry_from_config(n, raw, file_name) for n, raw in (file_entries or {}).items()}),
    ]
    if source is not None:
        sources.append((source[0], {n: e for n, e in source[1].items() if _usable(app, e, source[0])}))
    merged: dict[str, tuple[str, Entry]] = {}
    for where, entries in sources:
        for entry_name, entry in entries.items():
            if entry_name in merged and merged[entry_name][1] != entry:
                log.info("entry %r from %s replaces the one from %s", entry_name, where, merged[entry_name][0])
            merged[entry_name] = (where, entry)
    result: dict[str, Entry] = {}
    for entry_name, (where, entry) in merged.items():
        try:
            result[entry_name] = entry.with_default_tz(app.conf.timezone)
        except InvalidScheduleError as exc:
            raise ConfigurationError(f"{where} entry {entry_name!r}: {exc}") from None
        _check_sendable(app, result[entry_name], where)
    return result


def _usable(app: App, entry: Entry, where: str) -> bool:
    try:
        _check_sendable(app, entry.with_default_tz(app.conf.timezone), where)
    except (ConfigurationError, InvalidScheduleError) as exc:
        log.error("%s (left out)", exc)
        return False
    return True


def _check_sendable(app: App, entry: Entry, where: str) -> None:
    """Build and encode the entry's message without sending it, naming the entry in any error."""
    try:
        slot = entry.schedule.next_after(datetime.now(timezone.utc))
        options = entry.send_options(app.main, slot)
        message, _route, codec_name = app.build_message(
            entry.task, entry.args, dict(entry.kwargs), app.tasks.get(entry.task), options
        )
        protocol.encode_task(message, serializers.codec(codec_name))
    except Exception as exc:
        raise ConfigurationError(f"{where} entry {entry.name!r}: cannot build its message: {exc}") from exc
