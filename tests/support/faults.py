"""Shared pieces of the fault tests (tests/test_faults_*.py): worker subprocesses, sends, the run sink.

The sink is how a fault test knows which tasks *ran*, independently of results and acks: every
``fault_tasks`` task publishes its id to a durable sink queue (confirmed, persistent) before it
returns. :func:`read_sink` drains it at the end and counts each id, so "every task ran at least
once" and "how many ran twice" are read from the broker, not from the worker's memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import aiormq

from amqtask import App, AsyncResult
from amqtask.protocol import READY_STATES
from amqtask.settings import SPECS

from .broker import TestBroker
from .workers import TESTS_DIR

log = logging.getLogger("faults")


def spawn_worker(broker_url: str, log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``python -m amqtask worker -A fault_tasks ARGS``, its output appended to ``log``.

    A file rather than a pipe: a pipe nobody reads fills up after 64 KiB of log lines and then
    blocks the worker, which would look exactly like the stalls these tests look for.
    """
    environment = {**os.environ, "AMQTASK_BROKER_URL": broker_url, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), environment.get("PYTHONPATH", "")])
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "amqtask", "worker", "-A", "fault_tasks", "-l", "warning", *args],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=TESTS_DIR,
        )


@contextlib.contextmanager
def worker_processes(
    broker_url: str,
    logs: Sequence[Path],
    *args: str,
    env: dict[str, str] | None = None,
    names: Sequence[str] | None = None,
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One worker subprocess per log file for the block (node names from ``names`` when given): their log
    tails are logged if the block fails, and they are stopped (SIGTERM, then SIGKILL) after it."""
    named = [("-n", name) for name in names] if names else [() for _ in logs]
    workers = [spawn_worker(broker_url, path, *args, *name, env=env) for path, name in zip(logs, named, strict=True)]
    try:
        yield workers
    except BaseException:
        for path in logs:
            log.error("%s:\n%s", path.name, log_tail(path))
        raise
    finally:
        for worker in workers:
            stop(worker)
            kill(worker)


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker process and reap it (no-op when it is gone already)."""
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(10)


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM (graceful drain), then SIGKILL after ``timeout``; returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            kill(process)
    return int(process.returncode)


def new_ids(count: int) -> list[str]:
    """Task ids chosen before sending, so progress can be followed while the sends are still running."""
    return [str(uuid.uuid4()) for _ in range(count)]


async def send_all(
    app: App,
    name: str,
    ids: Sequence[str],
    args: Callable[[int], tuple[Any, ...]],
    *,
    window: int = 200,
    timings: dict[int, tuple[float, float]] | None = None,
) -> list[AsyncResult[Any] | BaseException]:
    """Send task ``name`` once per id (call ``i`` with ``args(i)``), up to ``window`` sends in flight.

    Concurrent sends share one confirm channel, so their confirms pipeline. Each entry of the result
    is the confirmed :class:`AsyncResult`, or the exception its send raised: a send that fails is
    reported to its caller, which is one of the promises under test. ``timings`` receives each
    send's (start, end) on the monotonic clock.
    """
    semaphore = asyncio.Semaphore(window)

    async def one(i: int) -> AsyncResult[Any] | BaseException:
        async with semaphore:
            started = time.monotonic()
            try:
                return await app.asend_task(name, args(i), task_id=ids[i])
            except Exception as exc:
                return exc
            finally:
                if timings is not None:
                    timings[i] = (started, time.monotonic())

    return list(await asyncio.gather(*(one(i) for i in range(len(ids)))))


async def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Check ``condition`` (plain or async) every 50 ms on the running loop until truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def ready_count(app: App, ids: Iterable[str]) -> int:
    """How many of the tasks ``ids`` have their outcome in the client's result store."""
    store = app.result_store
    return sum(1 for i in ids if (report := store.get(i)) is not None and report.status in READY_STATES)


async def declare_sink(url: str, name: str, *, quorum: bool = False) -> None:
    """Declare the durable sink queue the tasks record their runs in."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        arguments = {"x-queue-type": "quorum"} if quorum else None
        await channel.declare_queue(name, durable=True, arguments=arguments)


@dataclasses.dataclass
class Runs:
    """What the sink says about a test's tasks: the runs of each task id, by delivery kind."""

    #: task id -> one flag per run: True when the run's delivery was a broker redelivery.
    by_task: dict[str, list[bool]]

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.by_task

    def ids(self) -> set[str]:
        """The ids of the tasks that ran at least once."""
        return set(self.by_task)

    def count(self, task_id: str) -> int:
        """How many times ``task_id`` ran."""
        return len(self.by_task.get(task_id, ()))

    @property
    def extra(self) -> int:
        """Runs beyond the first of each task."""
        return sum(len(runs) - 1 for runs in self.by_task.values() if runs)

    @property
    def extra_from_copies(self) -> int:
        """Extra runs of a second copy of a message (first deliveries beyond one per task): a send
        that was retried because its confirm was lost, though the broker had the message."""
        return sum(max(0, runs.count(False) - 1) for runs in self.by_task.values())

    def summary(self) -> str:
        """``N extra run(s) (R redeliveries, C duplicate sends) over T task(s)``."""
        copies = self.extra_from_copies
        twice = sum(len(runs) > 1 for runs in self.by_task.values())
        return (
            f"{self.extra} extra run(s) over {twice} task(s): {self.extra - copies} rerun(s) of redelivered "
            f"messages, {copies} run(s) of re-sent copies"
        )


#: The prefetch multiplier the fault tests' workers run with (the setting's default).
PREFETCH_MULTIPLIER = int(SPECS["worker_prefetch_multiplier"].default)


def assert_duplicates_bounded(
    runs: Runs, *, faults: int, workers_hit: int, concurrency: int, sends_in_flight: int
) -> str:
    """Assert the README's bound on duplicate runs after ``faults`` faults, and say what was seen.

    A rerun needs a delivery that was unacked on a connection the fault ended: at most a worker's
    prefetch (concurrency x multiplier) for each of the ``workers_hit`` workers the fault cut off. A
    second copy needs a send whose confirm the fault lost: at most the client's sends in flight.
    """
    reruns_bound = faults * workers_hit * concurrency * PREFETCH_MULTIPLIER
    copies_bound = faults * sends_in_flight
    copies = runs.extra_from_copies
    reruns = runs.extra - copies
    seen = f"{runs.summary()} (bounds: {reruns_bound} reruns, {copies_bound} copies)"
    assert reruns <= reruns_bound, f"more reruns than deliveries the faults could leave unacked: {seen}"
    assert copies <= copies_bound, f"more copies than sends the faults could catch in flight: {seen}"
    return seen


async def read_sink(url: str, name: str, *, delete: bool = True, timeout: float = 60) -> Runs:
    """Take every record out of the sink and group the distinct runs (nonces) by task id."""
    runs: dict[str, dict[str, bool]] = collections.defaultdict(dict)
    records_read = 0
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(name, passive=True)
        expected = int(queue.declaration_result.message_count or 0)
        deadline = time.monotonic() + timeout
        async with queue.iterator(no_ack=True) as records:
            while records_read < expected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"read {records_read} of {expected} sink records in {timeout}s")
                record = await asyncio.wait_for(records.__anext__(), remaining)
                task_id, nonce, redelivered = record.body.decode().split(" ")
                runs[task_id][nonce] = redelivered == "r"
                records_read += 1
        if delete:
            await queue.delete(if_unused=False, if_empty=False)
    return Runs({task_id: list(by_nonce.values()) for task_id, by_nonce in runs.items()})


def queue_counts(rabbitmq: TestBroker, vhost: str, node: int = 0) -> dict[str, tuple[int, int]]:
    """``{queue: (messages, messages_unacknowledged)}`` for every queue of ``vhost``, from rabbitmqctl."""
    out = rabbitmq.ctl(
        "-q", "list_queues", "-p", vhost, "name", "messages", "messages_unacknowledged", "--formatter", "json",
        node=node,
    )  # fmt: skip
    return {row["name"]: (int(row["messages"]), int(row["messages_unacknowledged"])) for row in json.loads(out)}


async def wait_settled(rabbitmq: TestBroker, vhost: str, queues: Iterable[str], timeout: float, node: int = 0) -> None:
    """Wait until none of ``queues`` holds a ready or unacked message, while clients and workers still run.

    A task redelivered after a fault may run again after its caller already has the result; its second
    reply reaches the reply queue later. Only a live client takes it, so "nothing left" is checked
    before the client closes, once every redelivery has run and every reply has been taken.
    """
    names = list(queues)
    last: dict[str, tuple[int, int]] = {}

    async def settled() -> bool:
        counts = await asyncio.to_thread(queue_counts, rabbitmq, vhost, node)
        last.update({name: counts.get(name, (0, 0)) for name in names})
        return not any(any(count) for count in last.values())

    try:
        await wait_until(settled, timeout, "the queues to empty")
    except AssertionError as error:
        raise AssertionError(f"{error}; (messages, unacked) = {last}") from None


async def consumer_count(url: str, queue: str) -> int:
    """How many consumers the broker has on ``queue``, 0 if it does not exist yet."""
    return (await _declaration(url, queue))[1]


async def message_count(url: str, queue: str) -> int:
    """How many messages are ready in ``queue``, 0 if it does not exist yet."""
    return (await _declaration(url, queue))[0]


async def _declaration(url: str, queue: str) -> tuple[int, int]:
    """``(messages, consumers)`` of ``queue`` by a passive declare: far cheaper than rabbitmqctl, which
    boots an Erlang VM per call."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0, 0
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)


def log_tail(path: Path, lines: int = 60) -> str:
    """The end of a worker's log, for assertion messages."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
