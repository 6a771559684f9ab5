"""The chord protocol of :mod:`amqtask.chord` against a real broker, and a chord that outlives a killed worker.

The protocol tests drive :class:`ChordKeeper` directly, as header workers would: record a part,
then check. They cover duplicates, concurrent checks over two connections, and a completer that dies
holding the lock and the parts. The last test runs header tasks on two worker processes and kills one
with SIGKILL while it works.
"""

from __future__ import annotations

import asyncio
import builtins
import signal
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from support.broker import TestBroker
from support.queues import QueueStats, delete
from support.workers import stop_process, wait_for, worker_process

from amqtask import App, GroupResult, Signature, TimeoutError, chord, protocol, topology
from amqtask.chords import ChordKeeper, Outcome, Part, queue_name
from amqtask.worker.triage import TRANSIENT_ERRORS

pytestmark = pytest.mark.broker
TIMEOUT = 15


@pytest.fixture
def app(broker_url: str, unique: str) -> Iterator[App]:
    application = App(f"chord-{unique}", broker=broker_url, task_default_queue=f"q-{unique}",
                      publish_timeout_s=10, result_expires_s=600)  # fmt: skip
    yield application
    application.close()


class Finisher:
    """A ``finish`` callback that remembers the part lists it was called with."""

    def __init__(self) -> None:
        self.calls: list[list[Part]] = []

    async def __call__(self, parts: list[Part]) -> None:
        self.calls.append(parts)


def part(index: int, status: str = protocol.SUCCESS) -> Part:
    return Part(index, f"task-{index}", status, index * 10)


async def left_over(app: App, group_id: str) -> bool:
    return await topology.queue_exists(app.runtime().broker, queue_name(group_id))


def test_the_chord_completes_once_every_index_is_in_and_duplicates_count_once(app: App, unique: str) -> None:
    async def main() -> None:
        runtime, keeper, finish, group_id = app.runtime(), ChordKeeper(), Finisher(), f"g-{unique}"
        await keeper.record(runtime, group_id, part(0))
        assert await keeper.complete(runtime, group_id, 3, finish) is Outcome.WAITING
        await keeper.record(runtime, group_id, part(0))  # task 0 ran twice
        await keeper.record(runtime, group_id, part(2))
        assert await keeper.complete(runtime, group_id, 3, finish) is Outcome.WAITING
        assert await topology.queue_depth(runtime.broker, queue_name(group_id)) == 3  # all given back

        await keeper.record(runtime, group_id, part(1))
        assert await keeper.complete(runtime, group_id, 3, finish) is Outcome.COMPLETED
        assert finish.calls == [[part(0), part(1), part(2)]]
        assert not await left_over(app, group_id)
        assert await keeper.complete(runtime, group_id, 3, finish) is Outcome.GONE
        await keeper.close()
        await app.aclose()

    asyncio.run(main())


def test_a_failed_part_wins_over_a_success_for_the_same_index(app: App, unique: str) -> None:
    async def main() -> None:
        runtime, keeper, finish, group_id = app.runtime(), ChordKeeper(), Finisher(), f"g-{unique}"
        for each in (part(0), part(1), part(1, protocol.FAILURE)):
            await keeper.record(runtime, group_id, each)
        assert await keeper.complete(runtime, group_id, 2, finish) is Outcome.COMPLETED
        assert finish.calls == [[part(0), part(1, protocol.FAILURE)]]
        await keeper.close()
        await app.aclose()

    asyncio.run(main())


def test_concurrent_checks_over_two_connections_finish_the_chord_once(app: App, broker_url: str, unique: str) -> None:
    other = App(f"chord2-{unique}", broker=broker_url, publish_timeout_s=10)
    size, group_id, finish = 24, f"g-{unique}", Finisher()

    async def main() -> None:
        workers = [(app.runtime(), ChordKeeper()), (other.runtime(), ChordKeeper())]

        async def header_task(index: int) -> Outcome:
            runtime, keeper = workers[index % 2]
            await keeper.record(runtime, group_id, part(index))
            return await keeper.complete(runtime, group_id, size, finish)

        outcomes = await asyncio.gather(*(header_task(index) for index in range(size)))
        assert outcomes.count(Outcome.COMPLETED) == 1
        assert finish.calls == [[part(index) for index in range(size)]]
        assert not await left_over(app, group_id)
        for (_, keeper), application in zip(workers, (app, other), strict=True):
            await keeper.close()
            await application.aclose()

    asyncio.run(main())
    other.close()


def test_a_completer_that_dies_holding_the_lock_gives_the_parts_back(app: App, broker_url: str, unique: str) -> None:
    async def main() -> None:
        runtime, keeper, finish, group_id = app.runtime(), ChordKeeper(), Finisher(), f"g-{unique}"
        for index in range(3):
            await keeper.record(runtime, group_id, part(index))
        # Another worker took the lock (an exclusive consumer) and the parts, unacked, and then dies.
        doomed = await aio_pika.connect(broker_url)
        channel = await doomed.channel()
        held: asyncio.Queue[object] = asyncio.Queue()
        queue = await channel.declare_queue(queue_name(group_id), passive=True)
        await queue.consume(held.put, exclusive=True)
        for _ in range(3):
            await asyncio.wait_for(held.get(), TIMEOUT)
        checking = asyncio.ensure_future(keeper.complete(runtime, group_id, 3, finish))
        await doomed.close()

        assert await asyncio.wait_for(checking, TIMEOUT) is Outcome.COMPLETED
        assert finish.calls == [[part(0), part(1), part(2)]]
        await keeper.close()
        await app.aclose()

    asyncio.run(main())


def test_a_lock_held_past_its_deadline_is_a_transient_timeout(broker_url: str, unique: str) -> None:
    """A chord lock another worker keeps too long ends the check with amqtask's TimeoutError, which is
    the builtin TimeoutError and, in the worker, transient: the header's delivery is given back for a
    later try (its rerun checks the chord again) instead of being dead-lettered with the chord unfinished."""
    quick = App(f"chord-lock-{unique}", broker=broker_url, publish_timeout_s=0.5, broker_heartbeat_s=1)

    async def main() -> None:
        runtime, keeper, finish, group_id = quick.runtime(), ChordKeeper(), Finisher(), f"g-{unique}"
        for index in range(2):
            await keeper.record(runtime, group_id, part(index))
        holder = await aio_pika.connect(broker_url)
        channel = await holder.channel()
        queue = await channel.declare_queue(queue_name(group_id), passive=True)
        held: asyncio.Queue[object] = asyncio.Queue()
        await queue.consume(held.put, exclusive=True)  # holds the lock and the parts, never lets go
        with pytest.raises(TimeoutError, match="stayed locked by another worker") as caught:
            await keeper.complete(runtime, group_id, 2, finish)
        assert isinstance(caught.value, builtins.TimeoutError) and isinstance(caught.value, TRANSIENT_ERRORS)
        assert finish.calls == []
        await holder.close()
        assert await keeper.complete(runtime, group_id, 2, finish) is Outcome.COMPLETED
        await keeper.close()
        await quick.aclose()

    asyncio.run(main())
    quick.close()


def test_the_chord_queue_expires_when_the_chord_is_abandoned(
    app: App, rabbitmq: TestBroker, broker_vhost: str, unique: str
) -> None:
    name = queue_name(f"g-{unique}")

    async def main() -> None:
        keeper = ChordKeeper()
        await keeper.record(app.runtime(), f"g-{unique}", part(0))
        row = await asyncio.to_thread(QueueStats(rabbitmq, broker_vhost).row, name)
        assert row["arguments"]["x-expires"] == 600_000 and row["messages_ready"] == 1
        await topology.delete_queue(app.runtime().broker, name)
        await keeper.close()
        await app.aclose()

    asyncio.run(main())


@pytest.mark.fault
def test_a_chord_completes_when_a_header_worker_is_killed_mid_chord(
    broker_url: str, unique: str, tmp_path: Path
) -> None:
    queue, log = f"q-{unique}", tmp_path / "body.log"
    env = {"AMQTASK_TASK_DEFAULT_QUEUE": queue, "CANVAS_BODY_LOG": str(log)}
    client = App(f"client-{unique}", broker=broker_url, task_default_queue=queue, publish_timeout_s=30)
    options = ("-c", "1", "--prefetch-multiplier", "2")
    first = worker_process("canvas_tasks", broker_url, *options, env=env)
    second = worker_process("canvas_tasks", broker_url, *options, env=env)
    try:
        header = [Signature("canvas.work", (index, 0.25), app=client) for index in range(12)]
        result = chord(header, Signature("canvas.collect", app=client)).apply_async()
        assert isinstance(result.parent, GroupResult)
        members = result.parent.results
        wait_for(lambda: any(r.successful() and r.result[1] == first.pid for r in members),
                 what="a header task finished by the first worker")  # fmt: skip
        stop_process(first, signal.SIGKILL)

        assert result.get(timeout=60) == list(range(12))
        assert len(log.read_text().split()) >= 1  # at least once; once unless the kill hit the completion
        assert {r.get(timeout=TIMEOUT)[1] for r in members} == {first.pid, second.pid}
    finally:
        for process in (first, second):
            if process.poll() is None:
                stop_process(process, signal.SIGKILL if process is first else signal.SIGTERM)

    async def cleanup() -> None:
        await delete(client, [queue])
        await client.aclose()

    asyncio.run(cleanup())
    client.close()
