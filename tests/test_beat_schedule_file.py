"""Tests of amqtask.beat.schedule_file: the TOML/JSON format, its validation, and the file watcher."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from amqtask.beat import schedule_file
from amqtask.beat.schedule_file import (
    ScheduleFileError,
    ScheduleFileWatcher,
    load_schedule_file,
    parse_schedule_document,
)
from amqtask.beat.schedules import crontab, interval
from amqtask.errors import ConfigurationError

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")

EXAMPLE_TOML = """
[entries.add-every-30-seconds]
task = "tasks.add"
every = "30s"
args = [16, 16]

[entries.weekly-cleanup]
task = "tasks.clean_log"
cron = "0 3 * * sun"
options = { queue = "maintenance", priority = 2, expires = 600 }
catch_up = "skip"
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- format


def test_example_toml(tmp_path: Path) -> None:
    entries = load_schedule_file(write(tmp_path / "beat.toml", EXAMPLE_TOML))
    assert list(entries) == ["add-every-30-seconds", "weekly-cleanup"]
    assert entries["add-every-30-seconds"] == {
        "task": "tasks.add",
        "schedule": interval(30),
        "args": [16, 16],
        "kwargs": {},
        "options": {},
        "catch_up": "once",
    }
    assert entries["weekly-cleanup"] == {
        "task": "tasks.clean_log",
        "schedule": crontab(minute=0, hour=3, day_of_week="sun"),
        "args": [],
        "kwargs": {},
        "options": {"queue": "maintenance", "priority": 2, "expires": 600},
        "catch_up": "skip",
    }


def test_json_has_the_same_structure(tmp_path: Path) -> None:
    document = {
        "entries": {
            "report": {
                "task": "tasks.report",
                "every": 90,
                "kwargs": {"fmt": "pdf"},
            },
            "nightly": {"task": "tasks.nightly", "crontab": {"minute": 15, "hour": [1, 2]}},
        }
    }
    entries = load_schedule_file(write(tmp_path / "beat.json", json.dumps(document)))
    assert entries["report"]["schedule"] == interval(90)
    assert entries["report"]["kwargs"] == {"fmt": "pdf"}
    assert entries["nightly"]["schedule"] == crontab(minute=15, hour="1,2")


@pytest.mark.parametrize(
    ("every", "expected"),
    [
        ('"5m"', timedelta(minutes=5)),
        ('"1h"', timedelta(hours=1)),
        ('"1h30m"', timedelta(minutes=90)),
        ("45", timedelta(seconds=45)),
        ("0.5", timedelta(milliseconds=500)),
    ],
)
def test_every_forms(tmp_path: Path, every: str, expected: timedelta) -> None:
    path = write(tmp_path / "beat.toml", f'[entries.e]\ntask = "t"\nevery = {every}\n')
    assert load_schedule_file(path)["e"]["schedule"] == interval(expected)


def test_crontab_table_with_names(tmp_path: Path) -> None:
    path = write(
        tmp_path / "beat.toml",
        '[entries.e]\ntask = "t"\ncrontab = { minute = "0", hour = "3", day_of_week = "sunday" }\n',
    )
    assert load_schedule_file(path)["e"]["schedule"] == crontab.from_expression("0 3 * * 0")


def test_time_zones_entry_then_file_then_default(tmp_path: Path) -> None:
    text = """
timezone = "Europe/Berlin"
[entries.file-zone]
task = "t"
cron = "0 3 * * *"
[entries.own-zone]
task = "t"
cron = "0 3 * * *"
timezone = "America/New_York"
"""
    entries = load_schedule_file(write(tmp_path / "beat.toml", text), default_tz="Asia/Tokyo")
    assert entries["file-zone"]["schedule"] == crontab(0, 3, tz=BERLIN)
    assert entries["own-zone"]["schedule"] == crontab(0, 3, tz="America/New_York")
    # 03:00 CEST on 2025-07-01 is 01:00 UTC.
    assert entries["file-zone"]["schedule"].next_after(datetime(2025, 7, 1, tzinfo=UTC)) == datetime(
        2025, 7, 1, 1, tzinfo=UTC
    )
    plain = write(tmp_path / "plain.toml", '[entries.e]\ntask = "t"\ncron = "0 3 * * *"\n')
    assert load_schedule_file(plain, default_tz="Asia/Tokyo")["e"]["schedule"] == crontab(0, 3, tz="Asia/Tokyo")
    assert load_schedule_file(plain)["e"]["schedule"].tz is None  # the caller's default applies later


def test_empty_file_has_no_entries(tmp_path: Path) -> None:
    assert load_schedule_file(write(tmp_path / "beat.toml", "# nothing yet\n")) == {}
    assert load_schedule_file(write(tmp_path / "beat.json", '{"entries": {}}')) == {}


# --- validation


@pytest.mark.parametrize(
    ("body", "entry", "message"),
    [
        ('task = "t"\nevery = "30s"\nqueue = "x"', "e", "unknown key 'queue'"),
        ('task = "t"\nevry = "30s"', "e", "unknown key 'evry' (did you mean 'every'?)"),
        ('every = "30s"', "e", "missing task"),
        ('task = ""\nevery = "30s"', "e", "task must be a non-empty string"),
        ("task = 3\nevery = 1", "e", "task must be a non-empty string"),
        ('task = "t"', "e", "no schedule: give one of every, cron or crontab"),
        ('task = "t"\nevery = "30s"\ncron = "* * * * *"', "e", "not every and cron"),
        ('task = "t"\nevery = "30 seconds"', "e", "invalid duration '30 seconds'"),
        ('task = "t"\nevery = 0', "e", "interval every must be > 0"),
        ('task = "t"\nevery = true', "e", "every must be a duration string"),
        ('task = "t"\nevery = [30]', "e", "every must be a duration string"),
        ('task = "t"\ncron = 5', "e", "cron must be a string"),
        ('task = "t"\ncron = "0 3 * *"', "e", "must have 5 fields"),
        ('task = "t"\ncron = "61 * * * *"', "e", "crontab minute: '61' out of range 0-59"),
        ('task = "t"\ncrontab = "0 3 * * *"', "e", "crontab must be a table"),
        (
            'task = "t"\ncrontab = { minutes = 5 }',
            "e",
            "unknown crontab field 'minutes' (did you mean 'minute'?)",
        ),
        ('task = "t"\ncrontab = { hour = 25 }', "e", "crontab hour: '25' out of range 0-23"),
        ('task = "t"\nevery = 5\nargs = { a = 1 }', "e", "args must be an array, got table"),
        ('task = "t"\nevery = 5\nkwargs = [1]', "e", "kwargs must be a table, got array"),
        ('task = "t"\nevery = 5\noptions = "fast"', "e", "options must be a table, got string"),
        ('task = "t"\nevery = 5\ncatch_up = "all"', "e", "catch_up must be one of 'once', 'skip', got 'all'"),
        ('task = "t"\nevery = 5\ntimezone = "Europe/Berlin"', "e", "timezone applies only to cron"),
        (
            'task = "t"\ncron = "* * * * *"\ntimezone = "Nowhere/City"',
            "e",
            "unknown time zone 'Nowhere/City'",
        ),
    ],
)
def test_entry_errors_name_file_and_entry(tmp_path: Path, body: str, entry: str, message: str) -> None:
    path = write(tmp_path / "beat.toml", f'[entries.ok]\ntask = "t"\nevery = 1\n\n[entries.{entry}]\n{body}\n')
    with pytest.raises(ValueError) as info:
        load_schedule_file(path)
    text = str(info.value)
    assert text.startswith(f"{path}: entry {entry!r}: "), text
    assert message in text
    assert isinstance(info.value, ScheduleFileError) and isinstance(info.value, ConfigurationError)
    assert info.value.entry == entry and info.value.path == str(path)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("beat.toml", "[entries.e\ntask = 1", "invalid TOML"),
        ("beat.json", "{not json", "invalid JSON"),
        (
            "beat.json",
            '{"entries": {"a": {"task": "t", "every": 1}, "a": {"task": "u", "every": 2}}}',
            "duplicate key",
        ),
        ("beat.json", "[1, 2]", "the top level must be an object, got list"),
        ("beat.json", '{"entries": [1]}', "entries must be a table of named entries, got array"),
        ("beat.json", '{"entries": {"e": 5}}', "entry 'e': an entry must be a table, got int"),
        ("beat.toml", '[add-every-30]\ntask = "t"', "unknown top-level key 'add-every-30'"),
        ("beat.toml", "timezone = 1\n", "timezone must be a zone name string"),
        ("beat.yaml", "entries: {}", "unsupported file type '.yaml': use .toml or .json"),
    ],
)
def test_file_errors_name_the_file(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(ScheduleFileError) as info:
        load_schedule_file(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScheduleFileError, match=r"missing\.toml: cannot read: No such file"):
        load_schedule_file(tmp_path / "missing.toml")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "beat.toml"
    path.write_bytes(b'[entries.e]\ntask = "\xff"\n')
    with pytest.raises(ScheduleFileError, match="not valid UTF-8"):
        load_schedule_file(path)


def test_parse_document_from_bytes() -> None:
    entries = parse_schedule_document(b'{"entries": {"e": {"task": "t", "cron": "@hourly"}}}', "x.json")
    assert entries["e"]["schedule"] == crontab(minute=0)


# --- watcher


VALID_A = '[entries.a]\ntask = "tasks.a"\nevery = "30s"\n'
VALID_B = '[entries.b]\ntask = "tasks.b"\nevery = "30s"\n'  # same size as VALID_A
INVALID = '[entries.a]\ntask = "tasks.a"\nevery = "3Os"\n'  # a typo: letter O


def set_mtime(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


class TestWatcher:
    def test_first_poll_loads_then_nothing_changes(self, tmp_path: Path) -> None:
        path = write(tmp_path / "beat.toml", VALID_A)
        watcher = ScheduleFileWatcher(path)
        assert not watcher.loaded and watcher.schedule == {}
        assert watcher.changed() is True
        assert watcher.loaded and list(watcher.schedule) == ["a"]
        assert watcher.changed() is False
        assert watcher.error is None

    def test_detects_an_edit(self, tmp_path: Path) -> None:
        path = write(tmp_path / "beat.toml", VALID_A)
        watcher = ScheduleFileWatcher(path)
        watcher.changed()
        write(path, VALID_A + '[entries.c]\ntask = "tasks.c"\ncron = "0 * * * *"\n')
        assert watcher.changed() is True
        assert list(watcher.schedule) == ["a", "c"]
        assert watcher.changed() is False

    def test_same_size_rewrite_with_same_mtime_is_detected_while_racy(self, tmp_path: Path) -> None:
        path = write(tmp_path / "beat.toml", VALID_A)
        watcher = ScheduleFileWatcher(path)
        watcher.changed()
        stat = path.stat()
        write(path, VALID_B)
        set_mtime(path, stat.st_mtime_ns)  # a rewrite within the filesystem's timestamp granularity
        assert (path.stat().st_mtime_ns, path.stat().st_size) == (stat.st_mtime_ns, stat.st_size)
        assert watcher.changed() is True
        assert list(watcher.schedule) == ["b"]

    def test_unchanged_old_file_costs_only_a_stat(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = write(tmp_path / "beat.toml", VALID_A)
        set_mtime(path, time.time_ns() - 3600 * 10**9)
        watcher = ScheduleFileWatcher(path)
        reads = []
        original = ScheduleFileWatcher._read_bytes

        def counting(self: ScheduleFileWatcher) -> bytes:
            reads.append(1)
            return original(self)

        parses = []
        original_parse = schedule_file.parse_schedule_document

        def counting_parse(*args: Any, **kwargs: Any) -> dict[str, dict[str, Any]]:
            parses.append(1)
            return original_parse(*args, **kwargs)

        monkeypatch.setattr(ScheduleFileWatcher, "_read_bytes", counting)
        monkeypatch.setattr(schedule_file, "parse_schedule_document", counting_parse)
        assert watcher.changed() is True
        assert [watcher.changed() for _ in range(5)] == [False] * 5
        assert (len(reads), len(parses)) == (1, 1)
        set_mtime(path, time.time_ns() - 1800 * 10**9)  # touched: read and hashed, but not parsed again
        assert watcher.changed() is False
        assert (len(reads), len(parses)) == (2, 1)

    def test_comment_only_edit_is_not_a_change(self, tmp_path: Path) -> None:
        path = write(tmp_path / "beat.toml", VALID_A)
        watcher = ScheduleFileWatcher(path)
        watcher.changed()
        write(path, "# reformatted\n" + VALID_A)
        assert watcher.changed() is False
        assert watcher.error is None

    def test_invalid_edit_keeps_previous_schedule_and_reports(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = write(tmp_path / "beat.toml", VALID_A)
        watcher = ScheduleFileWatcher(path)
        watcher.changed()
        previous = watcher.schedule
        write(path, INVALID)
        with caplog.at_level(logging.ERROR, logger="amqtask.beat"):
            assert watcher.changed() is False
            assert watcher.changed() is False
        assert watcher.schedule is previous
        assert watcher.error is not None
        assert f"{path}: entry 'a': invalid duration '3Os'" in watcher.error
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1  # logged once, not on every poll
        assert "keeping the previous schedule" in errors[0].getMessage()
        assert watcher.reload() == watcher.error  # reload returns the error

        write(path, VALID_B)
        assert watcher.changed() is True
        assert watcher.error is None and list(watcher.schedule) == ["b"]

    def test_restoring_the_previous_content_clears_the_error(self, tmp_path: Path) -> None:
        path = write(tmp_path / "beat.toml", VALID_A)
        watcher = ScheduleFileWatcher(path)
        watcher.changed()
        write(path, INVALID)
        watcher.changed()
        assert watcher.error is not None
        write(path, VALID_A)
        assert watcher.changed() is False  # same schedule as the one in use
        assert watcher.error is None

    def test_deleted_file_keeps_schedule_and_recovers(self, tmp_path: Path) -> None:
        path = write(tmp_path / "beat.toml", VALID_A)
        watcher = ScheduleFileWatcher(path)
        watcher.changed()
        path.unlink()
        assert watcher.changed() is False
        assert list(watcher.schedule) == ["a"]
        assert watcher.error is not None and "cannot read" in watcher.error
        write(path, VALID_B)
        assert watcher.changed() is True
        assert watcher.error is None

    def test_load_raises_at_startup_and_reload_returns_none_when_valid(self, tmp_path: Path) -> None:
        path = write(tmp_path / "beat.toml", INVALID)
        watcher = ScheduleFileWatcher(path)
        with pytest.raises(ScheduleFileError, match="entry 'a': invalid duration"):
            watcher.load()
        assert watcher.schedule == {} and not watcher.loaded
        write(path, VALID_A)
        assert list(watcher.load()) == ["a"]
        assert watcher.reload() is None

    def test_default_tz_applies_to_cron_entries(self, tmp_path: Path) -> None:
        path = write(tmp_path / "beat.toml", '[entries.e]\ntask = "t"\ncron = "0 3 * * *"\n')
        watcher = ScheduleFileWatcher(path, default_tz="Europe/Berlin")
        watcher.changed()
        assert watcher.schedule["e"]["schedule"] == crontab(0, 3, tz=BERLIN)


class TestPython310TomlFallback:
    def test_uses_tomli_when_importable(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        seen = []

        def fake_tomli() -> Any:
            def loads(text: str) -> dict[str, Any]:
                seen.append(text)
                return {"entries": {"a": {"task": "tasks.a", "every": "30s"}}}

            return SimpleNamespace(loads=loads)

        monkeypatch.setattr(schedule_file, "sys", SimpleNamespace(version_info=(3, 10, 0)))
        monkeypatch.setattr(schedule_file, "_import_tomli", fake_tomli)
        assert load_schedule_file(write(tmp_path / "beat.toml", VALID_A))["a"]["schedule"] == interval(30)
        assert seen == [VALID_A]

    def test_clear_error_without_tomli(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        def missing() -> ModuleType:
            raise ModuleNotFoundError("No module named 'tomli'")

        monkeypatch.setattr(schedule_file, "sys", SimpleNamespace(version_info=(3, 10, 0)))
        monkeypatch.setattr(schedule_file, "_import_tomli", missing)
        path = write(tmp_path / "beat.toml", VALID_A)
        with pytest.raises(ScheduleFileError, match=r"beat\.toml: reading TOML on Python 3\.10 needs the 'tomli'"):
            load_schedule_file(path)
        # JSON files need nothing extra.
        assert load_schedule_file(write(tmp_path / "beat.json", '{"entries": {}}')) == {}
