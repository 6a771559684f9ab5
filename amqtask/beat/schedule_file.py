"""The beat schedule file: periodic tasks declared in TOML or JSON, validated, and watched for changes.

This module owns the file format read by ``amqtask beat --schedule-file`` and its validation, and
:class:`ScheduleFileWatcher`, which lets the beat loop poll the file cheaply and pick up edits without a
restart. Entries come back in the shape of ``app.conf.beat_schedule`` (Celery's shape), so the beat loop
treats both sources alike::

    {"name": {"task": str, "schedule": Schedule, "args": list, "kwargs": dict, "options": dict,
              "catch_up": "once" | "skip"}}

The file format (TOML shown; JSON is the same structure, ``{"timezone": ..., "entries": {...}}``)::

    timezone = "Europe/Berlin"          # optional: default zone of the file's cron entries

    [entries.add-every-30-seconds]
    task = "tasks.add"
    every = "30s"                       # or "5m", "1h30m", "250ms", or a number of seconds
    args = [16, 16]

    [entries.weekly-cleanup]
    task = "tasks.clean_log"
    cron = "0 3 * * sun"                # minute hour day_of_month month day_of_week
    options = { queue = "maintenance", priority = 2, expires = 600 }
    catch_up = "skip"                   # "once" (default): one run for missed fire times; "skip": none

    [entries.nightly]
    task = "tasks.report"
    crontab = { minute = "0", hour = "3", day_of_week = "sunday" }
    timezone = "America/New_York"       # optional, per entry, for cron/crontab only

Each entry needs ``task`` and exactly one of ``every``, ``cron`` or ``crontab``; ``args`` (a list),
``kwargs`` and ``options`` (tables) and ``catch_up`` are optional. Anything else is an error:
:class:`ScheduleFileError` (a :class:`ValueError`) names the file, the entry and the problem.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import logging
import os
import sys
import time
from datetime import tzinfo
from pathlib import Path
from types import ModuleType
from typing import Any

from amqtask.beat.schedules import (
    InvalidScheduleError,
    Schedule,
    crontab,
    interval,
    parse_duration,
    resolve_tz,
)

__all__ = [
    "CATCH_UP_POLICIES",
    "ScheduleFileError",
    "ScheduleFileWatcher",
    "load_schedule_file",
    "parse_schedule_document",
]

logger = logging.getLogger("amqtask.beat")

#: Allowed values of an entry's ``catch_up``; the first is the default.
CATCH_UP_POLICIES = ("once", "skip")

_TOP_KEYS = ("entries", "timezone")
_ENTRY_KEYS = ("task", "every", "cron", "crontab", "timezone", "args", "kwargs", "options", "catch_up")
_SCHEDULE_KEYS = ("every", "cron", "crontab")
_CRONTAB_KEYS = ("minute", "hour", "day_of_week", "day_of_month", "month_of_year")


class ScheduleFileError(InvalidScheduleError):
    """A schedule file cannot be read or is invalid. The message starts with the file (and the entry)."""

    def __init__(self, path: str | os.PathLike[str], problem: str, entry: str | None = None) -> None:
        self.path = str(path)
        self.entry = entry
        self.problem = problem
        where = self.path if entry is None else f"{self.path}: entry {entry!r}"
        super().__init__(f"{where}: {problem}")


class _Problem(Exception):
    """Internal: a validation problem, given its file and entry context by the caller."""


def _import_tomli() -> ModuleType:
    return importlib.import_module("tomli")


def _toml_module(path: Path) -> ModuleType:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        return _import_tomli()
    except ImportError as exc:
        raise ScheduleFileError(
            path, "reading TOML on Python 3.10 needs the 'tomli' package (pip install tomli); or use .json"
        ) from exc


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Problem(f"duplicate key {key!r}")
        result[key] = value
    return result


def _decode(data: bytes, path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ScheduleFileError(path, f"unsupported file type {suffix or '(none)'!r}: use .toml or .json")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScheduleFileError(path, f"not valid UTF-8: {exc}") from exc
    toml = _toml_module(path) if suffix == ".toml" else None
    try:
        if toml is not None:
            document: object = toml.loads(text)
        else:
            document = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except (_Problem, ValueError) as exc:
        raise ScheduleFileError(path, f"invalid {suffix[1:].upper()}: {exc}") from exc
    if not isinstance(document, dict):
        raise ScheduleFileError(path, f"the top level must be an object, got {type(document).__name__}")
    return document


def _unknown_keys(found: dict[str, Any], allowed: tuple[str, ...], what: str) -> str | None:
    unknown = [key for key in found if key not in allowed]
    if not unknown:
        return None
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, allowed, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown {what} {', '.join(hints)}; allowed: {', '.join(allowed)}"


def _type_name(value: object) -> str:
    names = {dict: "table", list: "array", str: "string", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


def _optional_tz(raw: dict[str, Any], key: str) -> tzinfo | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Problem(f"{key} must be a zone name string such as 'Europe/Berlin', got {_type_name(value)}")
    return resolve_tz(value)


def _parse_every(value: object) -> Schedule:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Problem(f"every must be a duration string ('30s', '5m', '1h') or seconds, got {value!r}")
    return interval(parse_duration(value) if isinstance(value, str) else value)


def _parse_crontab_table(value: object, tz: tzinfo | None) -> Schedule:
    if not isinstance(value, dict):
        raise _Problem(f"crontab must be a table of cron fields, got {_type_name(value)}")
    unknown = _unknown_keys(value, _CRONTAB_KEYS, "crontab field")
    if unknown:
        raise _Problem(unknown)
    return crontab(**value, tz=tz)


def _parse_entry_schedule(raw: dict[str, Any], tz: tzinfo | None) -> Schedule:
    given = [key for key in _SCHEDULE_KEYS if key in raw]
    if not given:
        raise _Problem("no schedule: give one of every, cron or crontab")
    if len(given) > 1:
        raise _Problem(f"give exactly one of every, cron or crontab, not {' and '.join(given)}")
    if given[0] == "every":
        if "timezone" in raw:
            raise _Problem("timezone applies only to cron and crontab schedules, not every")
        return _parse_every(raw["every"])
    if given[0] == "cron":
        expression = raw["cron"]
        if not isinstance(expression, str):
            raise _Problem(f"cron must be a string such as '0 3 * * sun', got {_type_name(expression)}")
        return crontab.from_expression(expression, tz=tz)
    return _parse_crontab_table(raw["crontab"], tz)


def _check_task(raw: dict[str, Any]) -> str:
    if "task" not in raw:
        raise _Problem("missing task (the registered task name, e.g. task = 'tasks.add')")
    task = raw["task"]
    if not isinstance(task, str) or not task.strip():
        raise _Problem(f"task must be a non-empty string, got {task!r}")
    return task.strip()


def _check_container(raw: dict[str, Any], key: str, kind: type) -> Any:
    value = raw.get(key, kind())
    if not isinstance(value, kind):
        expected = "an array" if kind is list else "a table"
        raise _Problem(f"{key} must be {expected}, got {_type_name(value)}: {value!r}")
    return value


def _parse_entry(raw: object, file_tz: tzinfo | None) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _Problem(f"an entry must be a table, got {_type_name(raw)}")
    unknown = _unknown_keys(raw, _ENTRY_KEYS, "key")
    if unknown:
        raise _Problem(unknown)
    task = _check_task(raw)
    schedule = _parse_entry_schedule(raw, _optional_tz(raw, "timezone") or file_tz)
    catch_up = raw.get("catch_up", CATCH_UP_POLICIES[0])
    if catch_up not in CATCH_UP_POLICIES:
        raise _Problem(f"catch_up must be one of {', '.join(map(repr, CATCH_UP_POLICIES))}, got {catch_up!r}")
    return {
        "task": task,
        "schedule": schedule,
        "args": list(_check_container(raw, "args", list)),
        "kwargs": dict(_check_container(raw, "kwargs", dict)),
        "options": dict(_check_container(raw, "options", dict)),
        "catch_up": catch_up,
    }


def parse_schedule_document(
    data: bytes, path: str | os.PathLike[str], *, default_tz: tzinfo | str | None = None
) -> dict[str, dict[str, Any]]:
    """Parse and validate the bytes of a schedule file; ``path`` picks the format (by extension) and
    names the file in errors. See :func:`load_schedule_file`."""
    path = Path(path)
    document = _decode(data, path)
    try:
        unknown = _unknown_keys(document, _TOP_KEYS, "top-level key")
        if unknown:
            raise _Problem(unknown + " (entries go under [entries.NAME])")
        file_tz = _optional_tz(document, "timezone") or resolve_tz(default_tz)
        entries = document.get("entries", {})
        if not isinstance(entries, dict):
            raise _Problem(f"entries must be a table of named entries, got {_type_name(entries)}")
    except (_Problem, InvalidScheduleError) as exc:
        raise ScheduleFileError(path, str(exc)) from exc
    result: dict[str, dict[str, Any]] = {}
    for name, raw in entries.items():
        try:
            if not name.strip():
                raise _Problem("the entry name must not be empty")
            result[name] = _parse_entry(raw, file_tz)
        except (_Problem, InvalidScheduleError, TypeError) as exc:
            raise ScheduleFileError(path, str(exc), entry=name) from exc
    return result


def load_schedule_file(
    path: str | os.PathLike[str], *, default_tz: tzinfo | str | None = None
) -> dict[str, dict[str, Any]]:
    """Read a ``.toml`` or ``.json`` schedule file and return its entries in ``beat_schedule`` shape.

    Cron entries are evaluated in the entry's ``timezone``, else the file's top-level ``timezone``, else
    ``default_tz`` (beat passes the app's timezone); when none is given their :class:`crontab` has no zone
    of its own (UTC, or whatever :meth:`crontab.with_default_tz` later supplies). ``every`` entries are
    intervals anchored at the epoch. Raises :class:`ScheduleFileError` (a ``ValueError``) naming the file
    and the entry for a missing or unreadable file, a syntax error, an unknown key, a missing task, zero
    or several schedules, or a value of the wrong type.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ScheduleFileError(path, f"cannot read: {exc.strerror or exc}") from exc
    return parse_schedule_document(data, path, default_tz=default_tz)


class ScheduleFileWatcher:
    """Poll a schedule file for changes; an invalid edit keeps the previous schedule instead of stopping beat.

    Call :meth:`changed` from the beat loop as often as you like: it costs one ``stat`` while the file's
    ``(mtime_ns, size)`` is unchanged, and reads and hashes the file only when they differ, or while the
    file's mtime is within :attr:`racy_seconds` of the last read (a same-size rewrite within the
    filesystem's timestamp granularity would otherwise go unnoticed). A new content hash is parsed; if
    it is valid and gives a different schedule, :attr:`schedule` is replaced and ``changed()`` returns
    True. If the file became invalid or unreadable, :attr:`schedule` keeps the last valid entries,
    :attr:`error` holds the message, the error is logged once on the ``amqtask.beat`` logger, and
    ``changed()`` returns False; fixing the file clears the error.
    """

    #: Re-hash while the file's mtime is this close to (or later than) the time it was last read.
    racy_seconds: float = 2.0

    def __init__(self, path: str | os.PathLike[str], *, default_tz: tzinfo | str | None = None) -> None:
        self.path = Path(path)
        self._default_tz = resolve_tz(default_tz)
        self._signature: tuple[int, int] | None = None
        self._read_at_ns = 0
        self._digest: bytes | None = None
        self._schedule: dict[str, dict[str, Any]] = {}
        self._loaded = False
        self._error: str | None = None
        self._exception: ScheduleFileError | None = None

    @property
    def schedule(self) -> dict[str, dict[str, Any]]:
        """The last valid entries (empty until the file has been read successfully). Do not mutate."""
        return self._schedule

    @property
    def error(self) -> str | None:
        """Why the file's current content is not in use (unreadable or invalid), or None when it is."""
        return self._error

    @property
    def loaded(self) -> bool:
        """Whether a valid schedule has been read at least once."""
        return self._loaded

    def load(self) -> dict[str, dict[str, Any]]:
        """Read the file now and return its entries; raise :class:`ScheduleFileError` if it is invalid.

        For beat's start-up, to refuse to start on a broken file. Later polls use :meth:`changed`.
        """
        self.reload()
        if self._exception is not None:
            raise self._exception
        return self._schedule

    def changed(self) -> bool:
        """Return True when the file now holds a valid schedule different from :attr:`schedule` (which
        has been replaced). Never raises for a bad file: see :attr:`error`."""
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            self._forget_content()
            return self._fail(ScheduleFileError(self.path, f"cannot read: {exc.strerror or exc}"))
        signature = (stat.st_mtime_ns, stat.st_size)
        if signature == self._signature and not self._is_racy(stat.st_mtime_ns):
            return False
        return self._read(signature)

    def reload(self) -> str | None:
        """Re-read the file regardless of its stat; return the error message, or None if it is valid."""
        self._signature = None
        self._digest = None
        self.changed()
        return self._error

    def _is_racy(self, mtime_ns: int) -> bool:
        return mtime_ns >= self._read_at_ns - int(self.racy_seconds * 1e9)

    def _read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def _forget_content(self) -> None:
        self._signature = None
        self._digest = None

    def _read(self, signature: tuple[int, int]) -> bool:
        read_at_ns = time.time_ns()
        try:
            data = self._read_bytes()
        except OSError as exc:
            self._forget_content()
            return self._fail(ScheduleFileError(self.path, f"cannot read: {exc.strerror or exc}"))
        self._signature = signature
        self._read_at_ns = read_at_ns
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            entries = parse_schedule_document(data, self.path, default_tz=self._default_tz)
        except ScheduleFileError as exc:
            return self._fail(exc)
        return self._accept(entries)

    def _accept(self, entries: dict[str, dict[str, Any]]) -> bool:
        if self._error is not None:
            logger.warning("schedule file %s is valid again", self.path)
        self._error = None
        self._exception = None
        if self._loaded and entries == self._schedule:
            return False
        self._schedule = entries
        self._loaded = True
        return True

    def _fail(self, exc: ScheduleFileError) -> bool:
        message = str(exc)
        if message != self._error:
            action = "keeping the previous schedule" if self._loaded else "no schedule loaded yet"
            logger.error("%s (%s)", message, action)
        self._error = message
        self._exception = exc
        return False
