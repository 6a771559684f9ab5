"""The test broker itself: the session vhost works over AMQP and keeps its queues apart."""

from __future__ import annotations

import asyncio

import aio_pika
from support.broker import TestBroker


async def _declare_durable_queue(url: str, name: str) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True)


def test_broker_runs_the_requested_version(rabbitmq: TestBroker, rabbitmq_version_info: tuple[int, ...]) -> None:
    # Fails on purpose when deploy/rabbitmq.sh had to fall back from sid (4.3) to trixie (4.0).
    requested = tuple(int(part) for part in rabbitmq.requested_version.split("."))
    assert rabbitmq_version_info[:2] == requested


def test_durable_queue_round_trip_in_the_session_vhost(broker_url: str, unique: str) -> None:
    async def round_trip() -> bytes:
        async with await aio_pika.connect(broker_url) as connection:
            # publisher confirms are on: once publish() returns, the message is in the queue
            channel = await connection.channel()
            queue = await channel.declare_queue(unique, durable=True)
            message = aio_pika.Message(b"ping", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=unique)
            received = await queue.get(timeout=5)
            await received.ack()
            return bytes(received.body)

    assert asyncio.run(round_trip()) == b"ping"


def test_session_vhost_queues_are_not_visible_in_the_default_vhost(
    rabbitmq: TestBroker, broker_url: str, broker_vhost: str, unique: str
) -> None:
    asyncio.run(_declare_durable_queue(broker_url, unique))

    assert unique in rabbitmq.ctl("-q", "list_queues", "-p", broker_vhost, "name").split()
    assert unique not in rabbitmq.ctl("-q", "list_queues", "-p", "/", "name").split()
