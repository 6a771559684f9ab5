"""``amqtask top`` and ``amqtask queues``: the state model from made-up events, the screen drawn at a fixed
size from a known state, and both against a real broker and a real ``amqtask worker -E``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console
from support.queues import cleanup, run_cli
from support.workers import TESTS_DIR, stop_process, wait_for, worker_process
from test_logs import send

from amqtask import App
from amqtask.cli import main
from amqtask.monitoring import live_feed, top_screen
from amqtask.monitoring.live_state import LiveState, QueueRow, Snapshot, TaskRow, WorkerRow
from amqtask.monitoring.queue_probe import known_queues, task_queue

QUEUE_OF = {"tasks.add": "default", "tasks.mail": "emails"}


def event(kind: str, uuid: str | None = None, hostname: str = "w1@host", **fields: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"type": kind, "hostname": hostname, **fields}
    if uuid is not None:
        found["uuid"] = uuid
    return found


def state_at_zero() -> LiveState:
    return LiveState(QUEUE_OF.get, ["default", "emails"], started=0.0)


def test_workers_are_up_while_their_heartbeats_come_and_down_after_offline_or_silence() -> None:
    state = state_at_zero()
    state.apply(event("worker-online", freq=2.0), 0.0)
    state.apply(event("worker-heartbeat", hostname="w2@host", freq=2.0), 0.0)
    assert [(w.hostname, w.up) for w in state.snapshot(3.9).workers] == [("w1@host", True), ("w2@host", True)]
    state.apply(event("worker-heartbeat", freq=2.0), 4.0)
    # w2 said nothing for two heartbeat periods (Celery's expiry); w1 spoke at 4.0.
    assert [(w.hostname, w.up) for w in state.snapshot(4.1).workers] == [("w1@host", True), ("w2@host", False)]
    state.apply(event("worker-offline"), 5.0)
    assert [w.up for w in state.snapshot(5.0).workers] == [False, False]


def test_tasks_in_flight_done_failed_and_their_rates_per_worker() -> None:
    state = state_at_zero()
    state.apply(event("worker-online", freq=2.0), 0.0)
    for i in range(10):
        state.apply(event("task-received", f"a{i}", name="tasks.add"), 1.0)
        state.apply(event("task-started", f"a{i}"), 1.0)
    for i in range(6):
        state.apply(event("task-succeeded", f"a{i}", runtime=0.1 * (i + 1)), 2.0 + i * 0.1)
    state.apply(event("task-failed", "a6", exception="ValueError('x')"), 3.0)
    state.apply(event("task-retried", "a7"), 3.0)
    # 4 s of a 5 s window have passed since the start: rates over those 4 s; then over the whole window.
    assert state.snapshot(4.0).workers[0] == WorkerRow("w1@host", True, 2, 6, 1, 6 / 4.0, 1 / 4.0)
    assert state.snapshot(5.0).workers[0] == WorkerRow("w1@host", True, 2, 6, 1, 6 / 5.0, 1 / 5.0)
    # Later, the window slides past them.
    state.apply(event("worker-heartbeat", freq=2.0), 9.0)
    later = state.snapshot(9.5).workers[0]
    assert (later.done, later.failed, later.done_per_s, later.failed_per_s) == (6, 1, 0.0, 0.0)


def test_queue_counts_and_rates_come_from_probes_and_events_routed_by_task_name() -> None:
    state = state_at_zero()
    state.observe_queue("default", 100, 1, 0.0)
    state.observe_queue("emails", None, None, 0.0)
    for i in range(8):  # 8 go out to the worker in 4 s, while the ready count grows by 12: 20 came in
        state.apply(event("task-received", f"t{i}", name="tasks.add"), 0.5 + i * 0.5)
    for i in range(5):
        state.apply(event("task-succeeded", f"t{i}", runtime=0.01), 4.0)
    state.apply(event("task-received", "other", name="unknown.task"), 4.0)  # no queue for it: not counted
    state.observe_queue("default", 112, 2, 4.0)
    default, emails = state.snapshot(4.0).queues
    assert default == QueueRow("default", 112, 3, 2, 20 / 4.0, 8 / 4.0)
    assert emails == QueueRow("emails", None, 0, None, 0.0, 0.0)


def test_slowest_and_failing_tasks() -> None:
    state = state_at_zero()
    runs = [("tasks.add", 0.2), ("tasks.add", 0.4), ("tasks.mail", 1.5), ("tasks.quick", 0.001)]
    # Only task-received (or task-sent) names the task: the outcome events say only its id, as Celery's.
    for i, (name, runtime) in enumerate(runs):
        state.apply(event("task-received", f"s{i}", name=name), 1.0)
        state.apply(event("task-succeeded", f"s{i}", runtime=runtime), 1.0)
    for i in range(3):
        state.apply(event("task-received", f"f{i}", name="tasks.mail"), 1.0)
        state.apply(event("task-failed", f"f{i}", exception=f"OSError({i})"), 1.0)
    state.apply(event("task-sent", "g", name="tasks.add"), 1.0)
    state.apply(event("task-failed", "g", exception="KeyError('k')"), 1.0)
    state.apply(event("task-succeeded", "before-the-view", runtime=9.0), 1.0)  # unnamed: not shown
    snapshot = state.snapshot(1.0)
    slowest = [(t.name, t.succeeded, t.mean_runtime_s, t.max_runtime_s) for t in snapshot.slowest]
    assert slowest == [("tasks.mail", 1, 1.5, 1.5), ("tasks.add", 2, pytest.approx(0.3), 0.4),
                       ("tasks.quick", 1, 0.001, 0.001)]  # fmt: skip
    assert [(t.name, t.failed, t.last_exception) for t in snapshot.failing] == [
        ("tasks.mail", 3, "OSError(2)"), ("tasks.add", 1, "KeyError('k')")]  # fmt: skip


KNOWN = Snapshot(
    workers=[WorkerRow("celery@alpha", True, 3, 1200, 4, 41.5, 0.2), WorkerRow("celery@beta", False, 0, 7, 0, 0, 0)],
    queues=[QueueRow("default", 1534, 12, 2, 55.0, 41.5), QueueRow("gone", None, 0, None, 0, 0)],
    slowest=[TaskRow("tasks.report", 10, 0, 2.5, 7.25, None)],
    failing=[TaskRow("tasks.mail", 3, 4, 0.5, 0.9, "SMTPServerDisconnected('Connection unexpectedly closed')")],
)


def cells(text: str, first: str) -> list[str]:
    """The cells of the table row that starts with ``first``."""
    for line in text.splitlines():
        parts = [part.strip() for part in re.split("[│┃]", line.strip("│┃ "))]
        if parts and parts[0] == first:
            return parts
    raise AssertionError(f"no row {first!r} in:\n{text}")


def test_the_screen_drawn_at_a_fixed_size_from_a_known_state() -> None:
    console = Console(width=100, height=40, record=True, file=io.StringIO(), color_system=None)
    console.print(top_screen.render(KNOWN, "amqtask top - proj - 12:00:00"))
    text = console.export_text()
    lines = text.splitlines()
    assert lines[0] == "amqtask top - proj - 12:00:00"
    assert all(len(line) <= 100 for line in lines) and len(lines) <= 40
    titles = [line.strip() for line in lines if line.strip() in ("Workers", "Queues", "Slowest tasks", "Failing tasks")]
    assert titles == ["Workers", "Queues", "Slowest tasks", "Failing tasks"]
    assert cells(text, "worker") == ["worker", "state", "in flight", "done", "failed", "done/s", "failed/s"]
    assert cells(text, "celery@alpha") == ["celery@alpha", "up", "3", "1200", "4", "41.5", "0.2"]
    assert cells(text, "celery@beta") == ["celery@beta", "down", "0", "7", "0", "0.0", "0.0"]
    assert cells(text, "queue") == ["queue", "ready", "unacked", "consumers", "in/s", "out/s"]
    assert cells(text, "default") == ["default", "1534", "12", "2", "55.0", "41.5"]
    assert cells(text, "gone") == ["gone", "missing", "0", "-", "0.0", "0.0"]
    assert cells(text, "tasks.report") == ["tasks.report", "10", "2.500s", "7.250s"]
    failing = cells(text, "tasks.mail")
    assert failing[:2] == ["tasks.mail", "4"] and failing[2].startswith("SMTPServerDisconnected(")


def test_top_without_rich_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    result = CliRunner().invoke(main, ["top", "-A", "monitoring_tasks"])
    assert result.exit_code == 2
    assert "pip install 'amqtask[top]'" in result.output


def test_known_queues_follow_the_apps_routing() -> None:
    app = App("routes", task_default_queue="main", task_queues={"emails": {}}, task_routes={"mail.*": "emails"})

    @app.task(name="mail.send")
    def send_mail() -> None: ...

    @app.task(name="own", queue="own-queue")
    def own() -> None: ...

    assert known_queues(app) == ["main", "emails", "own-queue"]
    assert (task_queue(app, "mail.send"), task_queue(app, "own"), task_queue(app, "other")) == (
        "emails", "own-queue", "main")  # fmt: skip


class Watcher:
    """``live_feed.watch`` on a loop in a thread; the latest snapshot kept for the test to wait on."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.latest: Snapshot | None = None
        self.listening = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.task = asyncio.current_task()
            try:
                await live_feed.watch(self.app, self._show, refresh_s=0.2, ready=self.listening.set)
            finally:
                await self.app.aclose()

        with contextlib.suppress(asyncio.CancelledError):  # how stop() ends it
            self.loop.run_until_complete(main())

    def _show(self, snapshot: Snapshot) -> None:
        self.latest = snapshot

    def stop(self) -> None:
        task = self.task
        if task is not None:
            self.loop.call_soon_threadsafe(task.cancel)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def watcher(broker_url: str, unique: str) -> Iterator[Watcher]:
    # No tasks of its own: the worker's task names route to the default queue, as in the worker's app.
    app = App("top-test", broker=broker_url, task_default_queue=unique)
    found = Watcher(app)
    found.thread.start()
    assert found.listening.wait(30), "the watch never listened for events"
    yield found
    found.stop()


def queues_cli(broker_url: str, unique: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    monkeypatch.setenv("AMQTASK_TASK_DEFAULT_QUEUE", unique)
    result = run_cli(broker_url, unique, "queues", "-A", "monitoring_tasks", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def queues_json(broker_url: str, unique: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    return json.loads(queues_cli(broker_url, unique, monkeypatch, "--json"))


@pytest.mark.broker
def test_queues_and_top_against_a_real_worker_sending_events(
    broker_url: str, unique: str, watcher: Watcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    send(broker_url, unique, [("mon.add", (1, 1)), ("mon.add", (2, 2)), ("mon.add", (3, 3)), ("mon.fail", ())])
    assert queues_json(broker_url, unique, monkeypatch) == {unique: {"ready": 4, "consumers": 0}}
    process = worker_process("monitoring_tasks", broker_url, "-E", "-n", f"{unique}@top",
                             env={"AMQTASK_TASK_DEFAULT_QUEUE": unique})  # fmt: skip
    try:

        def settled() -> Snapshot | None:
            snapshot = watcher.latest
            if snapshot is None or not snapshot.workers or snapshot.workers[0].done + snapshot.workers[0].failed < 4:
                return None
            queue = next(q for q in snapshot.queues if q.name == unique)
            return snapshot if (queue.ready, queue.unacked, queue.consumers) == (0, 0, 1) else None

        snapshot = wait_for(settled, 60, "the worker's four tasks in the live state")
        worker = snapshot.workers[0]
        assert (worker.hostname, worker.up, worker.in_flight, worker.done, worker.failed) == (
            f"{unique}@top", True, 0, 3, 1)  # fmt: skip
        assert [(t.name, t.succeeded) for t in snapshot.slowest] == [("mon.add", 3)]
        assert [(t.name, t.failed, t.last_exception) for t in snapshot.failing] == [("mon.fail", 1, "ValueError('x')")]
        assert queues_json(broker_url, unique, monkeypatch) == {unique: {"ready": 0, "consumers": 1}}
        assert [line.split() for line in queues_cli(broker_url, unique, monkeypatch).splitlines()] == [
            ["queue", "ready", "consumers"], [unique, "0", "1"]]  # fmt: skip
    finally:
        stop_process(process)
    wait_for(lambda: watcher.latest is not None and not watcher.latest.workers[0].up, 30, "the worker down")
    asyncio.run(cleanup(App("cleanup", broker=broker_url), [unique]))


@pytest.mark.broker
def test_top_draws_the_full_screen_in_a_terminal_and_quits_on_ctrl_c(broker_url: str, unique: str) -> None:
    path = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "AMQTASK_BROKER_URL": broker_url, "AMQTASK_TASK_DEFAULT_QUEUE": unique, "COLUMNS": "100",
           "LINES": "40", "PYTHONPATH": path}  # fmt: skip
    terminal, its_side = pty.openpty()  # a pseudo-terminal: rich draws full screen only on a terminal
    process = subprocess.Popen([sys.executable, "-m", "amqtask", "top", "-A", "monitoring_tasks"], env=env,
                               stdin=its_side, stdout=its_side, stderr=its_side)  # fmt: skip
    os.close(its_side)
    screen = bytearray()

    def read() -> None:
        if select.select([terminal], [], [], 0.1)[0]:
            with contextlib.suppress(OSError):  # EIO once the child has gone
                screen.extend(os.read(terminal, 65536))

    try:
        wait_for(lambda: read() or (b"Failing tasks" in screen and unique.encode() in screen), 30, "the screen")
        process.send_signal(signal.SIGINT)
        wait_for(lambda: read() or process.poll() is not None, 30, "top to quit")
        read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(terminal)
    assert process.returncode == 0
    assert b"\x1b[?1049h" in screen and bytes(screen).rstrip().endswith(b"\x1b[?1049l")  # the terminal given back
    assert b"missing" in screen  # nothing declared the queue: shown, not created
    assert b"Traceback" not in screen
