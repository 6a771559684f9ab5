"""Memory bombs: the worst 16 MiB bodies a worker can be sent cost it a bounded amount of memory (issue 11, item 4).

A msgpack body of 16 million empty arrays, decoded, is ~1.3 GiB of Python lists (each 1-byte array is
a 56-byte list plus the 8-byte pointer to it); a JSON ``[[],[],...]`` of 16 MiB is ~400 MiB. A real
worker subprocess (default limits: 16 MiB bodies, 1,048,576 values) is sent both. Promised: each is
dead-lettered with reason ``malformed`` and a detail naming the value limit, the worker's peak RSS
(``VmHWM``) stays under 300 MiB, and it goes on serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from support.faults import consumer_count, log_tail, spawn_worker, stop, wait_until

from amqtask import App, protocol, serializers
from amqtask.producer import to_amqp

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.timeout(180)]

MIB = 1024 * 1024
BODY_BYTES = 16 * MIB  # the default message_max_bytes: the largest body a worker decodes
RSS_BOUND_MIB = 300


def _msgpack_bomb() -> bytes:
    count = BODY_BYTES - 5  # an array32 header, then one byte per empty array
    return b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def _json_bomb() -> bytes:
    count = (BODY_BYTES - 2) // 3
    return b"[" + b"[]," * (count - 1) + b"[]]"


def peak_rss_mib(pid: int) -> float:
    """The process's high-water mark of resident memory (``VmHWM`` in /proc/<pid>/status), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


@pytest.fixture
def client(broker_url: str, unique: str) -> Iterator[App]:
    app = App(f"bomb-{unique}", broker=broker_url, task_default_queue=f"q-{unique}")
    yield app
    app.close()


def test_a_16_mib_memory_bomb_is_dead_lettered_and_the_worker_stays_under_300_mib(
    client: App, broker_url: str, unique: str, tmp_path: Path
) -> None:
    queue = f"q-{unique}"
    worker_log = tmp_path / "worker.log"
    worker = spawn_worker(broker_url, worker_log, "-c", "2", env={"AMQTASK_TASK_DEFAULT_QUEUE": queue})
    bombs = {"msgpack": _msgpack_bomb(), "json": _json_bomb()}
    assert all(len(body) <= BODY_BYTES for body in bombs.values())

    async def scenario() -> dict[str, aio_pika.abc.AbstractIncomingMessage]:
        await wait_until(lambda: _consuming(broker_url, queue), 30, "the worker consuming")
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for name, body in bombs.items():
                wire = protocol.encode_task(protocol.TaskMessage("fault.echo", f"bomb-{name}"), serializers.codec(name))
                wire.body = body
                wire.correlation_id = name
                await channel.default_exchange.publish(to_amqp(wire), queue)
            dead = await _take(channel, f"{queue}.dlq", len(bombs))
        # Still serving, and promptly: a real task sent after the bombs completes.
        assert await (await client.asend_task("fault.echo", ("after",))).aget(timeout=20) == "after"
        await client.aclose()
        return dead

    try:
        dead = asyncio.run(scenario())
        peak = peak_rss_mib(worker.pid)
    except BaseException:
        print(log_tail(worker_log))
        raise
    finally:
        status = stop(worker)
    assert status == 0, log_tail(worker_log)
    assert set(dead) == set(bombs)
    for name, message in dead.items():
        headers = message.headers or {}
        assert headers["x-amqtask-reason"] == "malformed", (name, headers)
        assert "more than 1048576 values" in str(headers["x-amqtask-detail"]), (name, headers)
        assert message.body == bombs[name], "the dead-letter copy keeps the body as received"
    assert peak < RSS_BOUND_MIB, f"worker peak RSS {peak:.0f} MiB"
    print(f"\nmemory bombs: 16 MiB msgpack + 16 MiB JSON dead-lettered; worker peak RSS {peak:.0f} MiB")


async def _consuming(url: str, queue: str) -> bool:
    return await consumer_count(url, queue) >= 1


async def _take(
    channel: aio_pika.abc.AbstractChannel, dlq: str, count: int
) -> dict[str, aio_pika.abc.AbstractIncomingMessage]:
    """Take ``count`` messages from ``dlq``, by correlation id."""
    queue = await channel.declare_queue(dlq, passive=True)
    found: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}
    async with queue.iterator(no_ack=True) as messages:
        while len(found) < count:
            message = await asyncio.wait_for(messages.__anext__(), 60)
            found[str(message.correlation_id)] = message
    return found
