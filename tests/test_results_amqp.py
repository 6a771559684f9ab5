"""``result_backend="amqp"``: results any process reads by id, from a RabbitMQ stream (issue 15).

A worker runs in this process; the readers are separate processes (tests/results_reader.py), started
before or after the task finished, with the sender gone or alive.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest
from support.workers import TESTS_DIR, wait_for, worker_thread

from amqtask import App, AsyncResult, GroupResult, RemoteTaskError, chain, chord, group
from amqtask.producer import to_amqp
from amqtask.protocol import ResultMessage, encode_result
from amqtask.serializers import JSON

pytestmark = pytest.mark.broker
TIMEOUT = 30


@pytest.fixture
def stream(broker_url: str, unique: str) -> Iterator[str]:
    name = f"results-{unique}"
    yield name

    async def delete() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(name)

    asyncio.run(delete())


@pytest.fixture
def app(broker_url: str, unique: str, stream: str) -> Iterator[App]:
    application = App(f"amqp-{unique}", broker=broker_url, task_default_queue=f"q-{unique}",
                      result_backend="amqp", result_stream=stream, task_track_started=True)  # fmt: skip
    yield application
    application.close()


def reader(broker_url: str, stream: str, action: str, task_id: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "results_reader.py"), broker_url, stream, action, task_id],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip


def reads(process: subprocess.Popen[str]) -> list[Any]:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def define(app: App) -> dict[str, Any]:
    gate = threading.Event()

    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.gated")
    def gated(x: int) -> int:
        assert gate.wait(TIMEOUT)
        return x

    @app.task(name="t.progress", bind=True)
    def progress(self: Any, total: int) -> int:
        for done in range(total):
            self.update_state(state="PROGRESS", meta={"done": done, "total": total})
        assert gate.wait(TIMEOUT)
        return total

    @app.task(name="t.fail")
    def fail() -> None:
        raise KeyError("missing")

    @app.task(name="t.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="t.short", result_expires=1)
    def short() -> str:
        return "soon gone"

    return {"add": add, "gated": gated, "progress": progress, "fail": fail, "tsum": tsum, "short": short,
            "gate": gate}  # fmt: skip


def test_two_readers_in_other_processes_wait_for_a_result_and_read_it_twice(
    app: App, broker_url: str, stream: str
) -> None:
    tasks = define(app)
    with worker_thread(app, concurrency=2):
        sent = tasks["gated"].delay(7)
        early = [reader(broker_url, stream, "get", sent.id) for _ in range(2)]  # started before it finished
        wait_for(lambda: AsyncResult(sent.id, app=app).state == "STARTED", TIMEOUT, "STARTED by id")
        tasks["gate"].set()
        assert sent.get(timeout=TIMEOUT) == 7  # the sender, over its reply queue
        expected = {"id": sent.id, "state": "SUCCESS", "result": 7}
        for process in early:
            assert reads(process) == [expected, expected]
        assert reads(reader(broker_url, stream, "get", sent.id)) == [expected, expected]  # started after


def test_a_result_outlives_its_sender_and_the_worker(app: App, broker_url: str, stream: str, unique: str) -> None:
    tasks = define(app)
    script = (
        "import sys; from amqtask import App;"
        f"app = App('sender', broker={broker_url!r}, result_backend='amqp', result_stream={stream!r},"
        f" task_default_queue='q-{unique}');"
        "print(app.send_task('t.add', (2, 3)).id); app.close()"
    )
    sender = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    task_id = sender.stdout.strip()
    with worker_thread(app):
        assert AsyncResult(task_id, app=app).get(timeout=TIMEOUT) == 5
    assert reads(reader(broker_url, stream, "get", task_id))[0]["result"] == 5  # sender and worker both gone
    assert tasks


def test_progress_and_started_are_visible_by_id(app: App, broker_url: str, stream: str) -> None:
    tasks = define(app)
    with worker_thread(app):
        sent = tasks["progress"].delay(3)
        by_id: AsyncResult[int] = AsyncResult(sent.id, app=app)
        wait_for(lambda: by_id.state == "PROGRESS" and by_id.info == {"done": 2, "total": 3}, TIMEOUT, "PROGRESS")
        seen = reads(reader(broker_url, stream, "peek", sent.id))
        assert seen[0] == {"id": sent.id, "state": "PROGRESS", "result": {"done": 2, "total": 3}}
        assert sent.state == "PROGRESS"  # the sender sees it over its reply queue too
        tasks["gate"].set()
        assert by_id.get(timeout=TIMEOUT) == 3


def test_failure_is_rebuilt_and_an_expired_task_reads_revoked(app: App, broker_url: str, stream: str) -> None:
    tasks = define(app)
    with worker_thread(app):
        failed = tasks["fail"].delay()
        with pytest.raises(RemoteTaskError):
            failed.get(timeout=TIMEOUT)
        by_id: AsyncResult[None] = AsyncResult(failed.id, app=app)
        with pytest.raises(KeyError):
            by_id.get(timeout=TIMEOUT)
        assert by_id.state == "FAILURE" and isinstance(by_id.result, KeyError)
        assert reads(reader(broker_url, stream, "get", failed.id))[0]["result"] == "KeyError: missing"
        expired = tasks["add"].apply_async((1, 1), expires=-1)
        revoked: AsyncResult[int] = AsyncResult(expired.id, app=app)
        assert isinstance(revoked.get(timeout=TIMEOUT, propagate=False), Exception)
        assert revoked.state == "REVOKED"


def test_results_expire_per_task_and_forget_deletes_for_every_reader(app: App, broker_url: str, stream: str) -> None:
    tasks = define(app)
    with worker_thread(app):
        short = tasks["short"].delay()
        kept = tasks["add"].delay(1, 2)
        assert short.get(timeout=TIMEOUT) == "soon gone" and kept.get(timeout=TIMEOUT) == 3
    by_id: AsyncResult[str] = AsyncResult(short.id, app=app)
    assert by_id.state == "SUCCESS"
    wait_for(lambda: by_id.state == "PENDING", 10, "the 1 s result to expire")
    assert reads(reader(broker_url, stream, "peek", short.id))[0]["state"] == "PENDING"
    assert reads(reader(broker_url, stream, "peek", kept.id))[0]["state"] == "SUCCESS"
    AsyncResult(kept.id, app=app).forget()
    assert AsyncResult(kept.id, app=app).state == "PENDING"
    assert reads(reader(broker_url, stream, "peek", kept.id))[0]["state"] == "PENDING"


def test_group_chain_and_chord_results_by_the_id_the_caller_got(app: App, broker_url: str, stream: str) -> None:
    tasks = define(app)
    add, tsum = tasks["add"], tasks["tsum"]
    with worker_thread(app, concurrency=2):
        members = group(add.s(i, i) for i in range(3)).apply_async()
        assert isinstance(members, GroupResult)
        members.save()
        chained = chain(add.s(1, 2), add.s(10)).apply_async()
        chorded = chord([add.s(i, 1) for i in range(3)], tsum.s()).apply_async()
        assert reads(reader(broker_url, stream, "group", members.id)) == [[0, 2, 4], [0, 2, 4]]
        assert reads(reader(broker_url, stream, "get", chained.id))[0]["result"] == 13
        assert reads(reader(broker_url, stream, "get", chorded.id))[0]["result"] == 6
        broken = chain(tasks["fail"].si(), add.s(1)).apply_async()  # its last step never runs
        assert reads(reader(broker_url, stream, "get", broken.id))[0] == {
            "id": broken.id, "state": "FAILURE", "result": "KeyError: missing"}  # fmt: skip
        restored = GroupResult.restore(members.id, app=app)
        assert restored is not None and restored.get(timeout=TIMEOUT) == [0, 2, 4]
    assert GroupResult.restore("no-such-group", app=app) is None


def test_with_signing_an_unsigned_record_in_the_stream_is_ignored(broker_url: str, unique: str, stream: str) -> None:
    app = App(f"signed-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", result_backend="amqp",
              result_stream=stream, signing_keys=["k-results"])  # fmt: skip
    tasks = define(app)
    forged_id = f"forged-{unique}"
    forged = encode_result(ResultMessage(forged_id, "SUCCESS", "forged"), JSON)

    async def forge() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            await channel.default_exchange.publish(to_amqp(forged), stream)

    try:
        with worker_thread(app):
            genuine = tasks["add"].delay(2, 2)
            assert genuine.get(timeout=TIMEOUT) == 4
            asyncio.run(forge())
            assert AsyncResult(genuine.id, app=app).get(timeout=TIMEOUT) == 4  # signed by the worker: read
        reader_app = App(f"reader-{unique}", broker=broker_url, result_backend="amqp", result_stream=stream,
                         signing_keys=["k-results"])  # fmt: skip
        try:
            assert AsyncResult(genuine.id, app=reader_app).state == "SUCCESS"
            assert AsyncResult(forged_id, app=reader_app).state == "PENDING"
        finally:
            reader_app.close()
    finally:
        app.close()


def test_an_id_nobody_sent_is_told_from_a_task_sent_but_not_started(app: App, broker_url: str, stream: str) -> None:
    tasks = define(app)
    queued = tasks["add"].delay(1, 2)  # no worker yet: it waits in its queue
    chained = chain(tasks["add"].s(1, 2), tasks["add"].s(10)).apply_async()  # the caller holds the last step's id
    members = group(tasks["add"].s(i, i) for i in range(3)).apply_async()  # announced together, in one record
    assert reads(reader(broker_url, stream, "known", queued.id))[0] == {"id": queued.id, "state": "PENDING",
                                                                          "known": True}  # fmt: skip
    assert reads(reader(broker_url, stream, "known", chained.id))[0]["known"] is True
    assert all(reads(reader(broker_url, stream, "known", member.id))[0]["known"] for member in members.results)
    assert reads(reader(broker_url, stream, "known", "never-sent"))[0] == {"id": "never-sent", "state": "PENDING",
                                                                             "known": False}  # fmt: skip
    assert queued.known and not AsyncResult("never-sent", app=app).known
    with worker_thread(app):
        assert AsyncResult(chained.id, app=app).get(timeout=TIMEOUT) == 13
        assert members.get(timeout=TIMEOUT) == [0, 2, 4]
    AsyncResult(queued.id, app=app).forget()
    assert reads(reader(broker_url, stream, "known", queued.id))[0]["known"] is False


def test_a_reader_reads_records_older_than_its_window_from_the_history(app: App, broker_url: str, stream: str) -> None:
    tasks = define(app)
    with worker_thread(app):
        done = tasks["add"].delay(4, 4)
        assert done.get(timeout=TIMEOUT) == 8
        members = group(tasks["add"].s(i, 1) for i in range(2)).apply_async()
        members.save()
        assert members.get(timeout=TIMEOUT) == [1, 2]
    written = time.time()
    # A stream offset given as a time has one-second resolution: past that, a reader starting 0 s back has
    # every record above behind its first one, so only its history reader can find them.
    wait_for(lambda: time.time() > written + 1.5, 5, "the records to be older than the window")
    recent = {"AMQTASK_RESULT_STREAM_LOOKBACK_S": "0"}
    assert reads(reader(broker_url, stream, "get", done.id, **recent))[0]["result"] == 8  # get() waits for it
    assert reads(reader(broker_url, stream, "known", done.id, **recent))[0] == {"id": done.id, "state": "SUCCESS",
                                                                                 "known": True}  # fmt: skip
    assert reads(reader(broker_url, stream, "known", "never-sent", **recent))[0]["known"] is False
    assert reads(reader(broker_url, stream, "group", members.id, **recent)) == [[1, 2], [1, 2]]


def test_a_send_goes_out_when_its_id_cannot_be_announced(
    broker_url: str, unique: str, stream: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(f"unannounced-{unique}", broker=broker_url, task_default_queue=f"q-{unique}", result_backend="amqp",
              result_stream=stream)  # fmt: skip

    async def occupy() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(stream, durable=True)  # a classic queue: the stream's declaration is refused

    asyncio.run(occupy())
    try:
        with caplog.at_level("WARNING", logger="amqtask.sending"):
            sent = app.send_task("t.add", (1, 2))  # the task is on its way: no error for the caller
        assert "could not be announced" in caplog.text

        async def queued() -> int:
            connection = await aio_pika.connect(broker_url)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(f"q-{unique}", passive=True)
                count = queue.declaration_result.message_count or 0
                await channel.queue_delete(f"q-{unique}")
                await channel.queue_delete(f"q-{unique}.dlq")
                return count

        assert asyncio.run(queued()) == 1 and sent.id
    finally:
        app.close()
