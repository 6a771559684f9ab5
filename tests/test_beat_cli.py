"""``amqtask beat``: ``beat list`` through click's CliRunner, and ``amqtask beat`` processes killed with -9.

The apps live in modules written to ``tmp_path`` (the CLI imports them by name), each with names of its
own, so tests share the session's vhost without meeting.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from support.workers import wait_for

from amqtask import App
from amqtask.beat import Scheduler
from amqtask.beat.entries import ENTRY_HEADER, SLOT_HEADER
from amqtask.beat.state import StateStore
from amqtask.cli import main

MODULE = """
from amqtask import App, crontab

app = App("{main}", task_default_queue="q-{unique}", timezone="Europe/Berlin", beat_lock_retry_s=0.2)
app.conf.beat_schedule = {{
    "tick": {{"task": "beat.tick", "schedule": 1.0}},
    "weekly-cleanup": {{"task": "beat.clean", "schedule": crontab(minute=0, hour=3, day_of_week="sunday")}},
}}


@app.periodic_task("30 2 * * *", name="beat.nightly", options={{"expires": 600}})
def nightly() -> None:
    pass
"""


@pytest.fixture
def beat_module(tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of an importable module holding an app with three entries."""
    name = f"beatcli_{unique}"
    (tmp_path / f"{name}.py").write_text(MODULE.format(main=f"beat-{unique}", unique=unique))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def beat_list(module: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["beat", "-A", module, "list"], catch_exceptions=False)
    return result.exit_code, result.output


@contextlib.contextmanager
def beat_thread(app: App) -> Iterator[Scheduler]:
    """A scheduler running on an event loop of its own in a thread (so the test can use the CLI)."""
    scheduler = Scheduler(app)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(scheduler.run(),), daemon=True)
    thread.start()
    try:
        yield scheduler
    finally:
        loop.call_soon_threadsafe(scheduler.stop)
        thread.join(15)
        loop.run_until_complete(app.aclose())
        loop.close()


@pytest.mark.broker
def test_beat_list_shows_schedules_next_and_last_runs(
    beat_module: str, broker_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMQTASK_BROKER_URL", broker_url)
    code, output = beat_list(beat_module)
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0] == f"no beat is leading ('amqtask.beat.beat-{unique}.lock' is free)"
    assert lines[1].split() == ["NAME", "TASK", "SCHEDULE", "NEXT", "RUN", "(Europe/Berlin)", "LAST", "RUN"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"tick", "weekly-cleanup", "beat.nightly"}
    assert "cron '0 3 * * sunday' (Europe/Berlin)" in rows["weekly-cleanup"]
    assert re.search(r"\d{4}-\d\d-\d\d 03:00:00 CES?T\s+-$", rows["weekly-cleanup"]), rows["weekly-cleanup"]
    assert re.search(r"cron '30 2 \* \* \*' \(Europe/Berlin\)\s+\S+ 02:30:00 CES?T\s+-$", rows["beat.nightly"])
    assert "every 1s" in rows["tick"]

    app = importlib.import_module(beat_module).app
    with beat_thread(app) as scheduler:
        wait_for(lambda: scheduler.leading and scheduler.states["tick"].sent_at, 15, "a tick to be sent")
        code, output = beat_list(beat_module)
    assert code == 0, output
    assert output.splitlines()[0] == f"a beat is leading (it holds 'amqtask.beat.beat-{unique}.lock')"
    tick = next(line for line in output.splitlines() if line.startswith("tick"))
    assert re.search(r"every 1s\s+\S+ \S+ CES?T\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d CES?T$", tick), tick
    code, output = beat_list(beat_module)  # the state outlives the beat
    assert output.splitlines()[0].startswith("no beat is leading")
    assert re.search(r"\d\d:\d\d:\d\d CES?T$", next(line for line in output.splitlines() if line.startswith("tick")))
    asyncio.run(_delete(app, f"q-{unique}", f"amqtask.beat.beat-{unique}.state"))


async def _delete(app: App, *queues: str) -> None:
    from support.queues import delete

    await delete(app, queues)
    await app.aclose()


def test_beat_list_without_a_broker_still_shows_the_entries(beat_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQTASK_BROKER_URL", "amqp://guest:guest@127.0.0.1:1/")
    monkeypatch.setenv("AMQTASK_BROKER_CONNECT_TIMEOUT_S", "0.3")
    code, output = beat_list(beat_module)
    assert code == 0, output
    assert output.splitlines()[0].startswith("state unavailable (BrokerConnectionError: no connection to the broker")
    assert all(line.endswith("?") for line in output.splitlines()[2:])


def test_an_invalid_schedule_is_a_usage_error_naming_the_entry(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"beatbad_{unique}"
    (tmp_path / f"{name}.py").write_text(
        "from amqtask import App\n"
        "app = App('bad')\n"
        "app.conf.beat_schedule = {'broken': {'task': 't', 'schedule': '61 * * * *'}}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for args in (["beat", "-A", name, "list"], ["beat", "-A", name]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert "beat_schedule entry 'broken': crontab minute: '61' out of range 0-59" in result.output


class BeatProcess:
    """``python -m amqtask beat`` with its output collected line by line, each with its arrival time."""

    def __init__(self, module_dir: Path, module: str, env: dict[str, str]) -> None:
        environment = {**os.environ, **env}
        environment["PYTHONPATH"] = os.pathsep.join([str(module_dir), environment.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "amqtask", "beat", "-A", module, "-l", "info"],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def seen(self, text: str) -> float | None:
        """When a line containing ``text`` was printed (monotonic), or None."""
        return next((at for at, line in self.lines if text in line), None)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(15)
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


@pytest.mark.broker
def test_kill_9_the_leader_the_standby_takes_over_without_a_lost_or_double_fire(
    beat_module: str, tmp_path: Path, broker_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMQTASK_BROKER_URL", broker_url)
    app = importlib.import_module(beat_module).app
    env = {"AMQTASK_BROKER_URL": broker_url}

    async def last_sent() -> datetime | None:
        found = await StateStore(app.runtime().broker, f"amqtask.beat.beat-{unique}.state").read(passive=True)
        tick = found.entries.get("tick") if found else None
        return tick.sent_slot if tick else None

    async def scenario() -> dict[str, Any]:
        first = BeatProcess(tmp_path, beat_module, env)
        second: BeatProcess | None = None
        try:
            await _until(lambda: first.seen("beat is the leader"), 20, "the first beat to lead")
            second = BeatProcess(tmp_path, beat_module, env)
            await _until(lambda: second and second.seen("standby: another beat holds"), 20, "the standby")
            # Kill right after the leader recorded a slot: far from the next one and from the
            # send/state-write window (covered in test_beat_scheduler).
            recorded = await last_sent()
            await _until_async(lambda: _newer(last_sent, recorded), 5, "the leader to record a slot")
            killed_at = time.monotonic()
            first.stop(signal.SIGKILL)
            await _until(lambda: second and second.seen("beat is the leader"), 10, "the standby to take over")
            assert second is not None
            took_over = (second.seen("beat is the leader") or 0) - killed_at
            moved_on = await last_sent()
            await _until_async(lambda: _newer(last_sent, moved_on, by=timedelta(seconds=2)), 10, "two more ticks")
        finally:
            codes = [first.stop()] + ([second.stop()] if second else [])
            await app.aclose()
        return {"took_over": took_over, "codes": codes, "outputs": [first.output, second.output]}

    outcome = asyncio.run(scenario())
    assert outcome["codes"] == [-signal.SIGKILL, 0], outcome["outputs"]
    slots = asyncio.run(_drain(app, f"q-{unique}"))
    assert slots == sorted(set(slots)), f"a slot was sent twice: {slots}"
    gaps = {later - earlier for earlier, later in itertools.pairwise(slots)}
    assert gaps == {timedelta(seconds=1)}, f"a slot was lost: {slots}"
    print(f"takeover after kill -9: {outcome['took_over']:.2f}s (lock retry 0.2s)")
    assert outcome["took_over"] < 1.5
    asyncio.run(_delete(app, f"q-{unique}", f"amqtask.beat.beat-{unique}.state"))


async def _newer(read: Any, than: datetime | None, by: timedelta = timedelta(0)) -> bool:
    latest = await read()
    return latest is not None and (than is None or latest >= than + max(by, timedelta(microseconds=1)))


async def _until(condition: Any, timeout: float, what: str) -> None:
    async def check() -> bool:
        return bool(condition())

    await _until_async(check, timeout, what)


async def _until_async(condition: Any, timeout: float, what: str) -> None:
    from support.queues import eventually

    await eventually(condition, timeout, what)


async def _drain(app: App, queue: str) -> list[datetime]:
    """The slots of the tick messages in ``queue``, taking them."""
    import aio_pika

    slots = []
    connection = await aio_pika.connect(app.conf.broker_url[0])
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        while (message := await declared.get(fail=False, no_ack=True)) is not None:
            headers = message.headers or {}
            assert headers[ENTRY_HEADER] == "tick"
            slots.append(datetime.fromisoformat(str(headers[SLOT_HEADER])))
    await app.aclose()
    return slots
