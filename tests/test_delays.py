"""Delay levels: routing keys and topology without a broker, then timing and routing on a real one.

Broker tests never sleep: they wait for the message itself, with a deadline. Each declares its own
small delay topology under a unique prefix and deletes it, with its queues, when done.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from amqtask import App
from amqtask.delays import (
    DEFAULT_LEVELS,
    DELAY_QUEUE_HEADER,
    DelayTopology,
    bind_destination,
    declare_delay_topology,
    declare_delay_topology_spread,
    delete_delay_topology,
    strip_death_headers,
    supports_quorum_levels,
)
from amqtask.errors import ConfigurationError, TopologyMismatchError, TopologyNotFoundError

TOP = "amqtask.delay.L27"


def key(bits: str, queue: str = "q") -> str:
    """The expected routing key for the binary number ``bits``: 28 bit words, least significant first."""
    return ".".join(bits.rjust(DEFAULT_LEVELS, "0")[::-1]) + "." + queue


# ------------------------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("delay", "bits"),
    [(1, "1"), (2, "10"), (3, "11"), (1000, "1111101000"), (2**27, "1" + "0" * 27)],
)
def test_route_carries_the_delay_bits_then_the_queue(delay: int, bits: str) -> None:
    assert DelayTopology().route(delay, "q") == (TOP, key(bits), {DELAY_QUEUE_HEADER: "q"})


def test_routing_key_words_are_bits_least_significant_first() -> None:
    assert DelayTopology(levels=4).route(5, "a.b") == (
        "amqtask.delay.L03",
        "1.0.1.0.a.b",
        {DELAY_QUEUE_HEADER: "a.b"},
    )


@pytest.mark.parametrize("delay", [0, 0.0, -0.5, -3600])
def test_no_delay_goes_straight_to_the_queue(delay: float) -> None:
    assert DelayTopology().route(delay, "my.queue") == ("", "my.queue", {})


@pytest.mark.parametrize(("delay", "seconds"), [(0.001, 1), (0.5, 1), (1.0, 1), (1.2, 2), (2.999, 3), (1000.1, 1001)])
def test_delays_round_up_to_whole_seconds(delay: float, seconds: int) -> None:
    assert DelayTopology().route(delay, "q") == DelayTopology().route(seconds, "q")


def test_delays_beyond_the_levels_are_rejected_naming_delay_and_max() -> None:
    topology = DelayTopology()
    assert topology.max_delay_s() == 2**28 - 1
    assert topology.route(topology.max_delay_s(), "q")[1] == key("1" * 28)
    with pytest.raises(ConfigurationError, match=r"268435455\.5 s .* 268435455 s"):
        topology.route(topology.max_delay_s() + 0.5, "q")
    with pytest.raises(ConfigurationError, match=r"4 s .* 3 s"):
        DelayTopology(levels=2).route(4, "q")
    for bad in (math.inf, math.nan):
        with pytest.raises(ConfigurationError, match="finite"):
            topology.route(bad, "q")


def test_queue_names_must_fit_in_a_routing_key() -> None:
    topology = DelayTopology()
    assert topology.route(5, "n" * 199)[1].endswith("n" * 199)
    with pytest.raises(ConfigurationError, match="at most 199 bytes"):
        topology.route(5, "n" * 200)
    with pytest.raises(ConfigurationError, match="destination"):
        topology.route(5, "")


@pytest.mark.parametrize("levels", [0, 33, True, 2.5])
def test_level_count_is_validated(levels: Any) -> None:
    with pytest.raises(ConfigurationError, match="levels"):
        DelayTopology(levels=levels)


def test_level_queues_halve_their_ttl_and_chain_to_the_deliver_exchange() -> None:
    topology = DelayTopology(levels=3, prefix="p")
    assert [(q.name, q.arguments) for q in topology.queues()] == [
        ("p.L00", {"x-message-ttl": 1000, "x-dead-letter-exchange": "p.deliver"}),
        ("p.L01", {"x-message-ttl": 2000, "x-dead-letter-exchange": "p.L00"}),
        ("p.L02", {"x-message-ttl": 4000, "x-dead-letter-exchange": "p.L01"}),
        ("p.unroutable", {}),
    ]
    assert [(b.source, b.destination, b.routing_key, b.to_exchange) for b in topology.bindings()] == [
        ("p.unroutable", "p.unroutable", "", False),
        ("p.L00", "p.L00", "1.#", False),
        ("p.L00", "p.deliver", "0.#", True),
        ("p.L01", "p.L01", "*.1.#", False),
        ("p.L01", "p.L00", "*.0.#", True),
        ("p.L02", "p.L02", "*.*.1.#", False),
        ("p.L02", "p.L01", "*.*.0.#", True),
    ]
    # Bindings do not depend on the level count, so topologies of different sizes can share a vhost.
    assert set(DelayTopology(levels=5, prefix="p").bindings()) >= set(topology.bindings())
    assert DelayTopology().queues()[27].arguments["x-message-ttl"] == 2**27 * 1000
    deliver = next(x for x in topology.exchanges() if x.name == "p.deliver")
    assert (deliver.type.value, deliver.arguments) == ("headers", {"alternate-exchange": "p.unroutable"})
    assert topology.destination_binding("a.b") == {"x-match": "all", DELAY_QUEUE_HEADER: "a.b"}


def test_quorum_levels_dead_letter_at_least_once_and_classic_ones_say_so() -> None:
    topology = DelayTopology(levels=1, prefix="p")
    level, unroutable = topology.queues()
    assert topology.queue_arguments(level, quorum=True) == {
        "x-queue-type": "quorum",
        "x-message-ttl": 1000,
        "x-dead-letter-exchange": "p.deliver",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert topology.queue_arguments(unroutable, quorum=True) == {"x-queue-type": "quorum"}
    assert topology.queue_arguments(level, quorum=False)["x-queue-type"] == "classic"


def _topic_match(pattern: str, routing_key: str) -> bool:
    """RabbitMQ's topic matching, for the patterns the levels use (``*`` words, a trailing ``#``)."""
    words, keys = pattern.split("."), routing_key.split(".")
    if words[-1] == "#":
        words.pop()
        keys = keys[: len(words)]
    return len(words) == len(keys) and all(w in ("*", k) for w, k in zip(words, keys, strict=True))


def _simulate(topology: DelayTopology, routing_key: str, entry: str) -> tuple[int, list[str]]:
    """Follow a message through the bindings and dead-lettering: (total TTL in s, queues waited in)."""
    ttl = {q.name: q.arguments.get("x-message-ttl", 0) for q in topology.queues()}
    dlx = {q.name: str(q.arguments.get("x-dead-letter-exchange")) for q in topology.queues()}
    waited: list[str] = []
    exchange = entry
    while exchange != topology.deliver_exchange:
        (binding,) = [
            b for b in topology.bindings() if b.source == exchange and _topic_match(b.routing_key, routing_key)
        ]
        if binding.to_exchange:
            exchange = binding.destination
        else:
            waited.append(binding.destination)
            exchange = dlx[binding.destination]
    return sum(ttl[q] for q in waited) // 1000, waited


@pytest.mark.parametrize("delay", [1, 2, 3, 5, 17, 1000, 86_399, 2**27, 2**28 - 1])
def test_every_key_waits_exactly_its_delay_in_the_levels_of_its_set_bits(delay: int) -> None:
    topology = DelayTopology()
    entry, routing_key, _ = topology.route(delay, "a.*.#.b")
    total, waited = _simulate(topology, routing_key, entry)
    assert total == delay
    assert waited == [topology.level_name(k) for k in reversed(range(28)) if delay >> k & 1]


@pytest.mark.parametrize("delay", [1, 6, 1000, 2**20 - 1])
def test_a_smaller_topology_routes_right_through_the_bindings_of_a_larger_one(delay: int) -> None:
    entry, routing_key, _ = DelayTopology(levels=20).route(delay, "q")
    assert _simulate(DelayTopology(), routing_key, entry)[0] == delay


def test_strip_death_headers_removes_dead_lettering_history_only() -> None:
    headers = {
        "x-death": [{"count": 1}],
        "x-first-death-queue": "a",
        "x-first-death-reason": "expired",
        "x-first-death-exchange": "b",
        "x-last-death-queue": "a",
        "x-last-death-reason": "expired",
        "x-last-death-exchange": "b",
        "x-deathly": 1,
        "task": "t",
        DELAY_QUEUE_HEADER: "q",
    }
    stripped = strip_death_headers(headers)
    assert stripped == {"x-deathly": 1, "task": "t", DELAY_QUEUE_HEADER: "q"}
    assert "x-death" in headers  # a copy, not in place


@pytest.mark.parametrize(
    ("version", "quorum"),
    [("3.9.29", False), ("3.10.0", True), ("3.13.7", True), ("4.3.6", True), ("", False)],
)
def test_quorum_levels_need_rabbitmq_3_10(version: str, quorum: bool) -> None:
    assert supports_quorum_levels(version) is quorum


# ------------------------------------------------------------------------------------------- broker


@dataclass
class Arrival:
    message: AbstractIncomingMessage
    at: float


@dataclass
class Inbox:
    """Deliveries of one queue, with their arrival time on the monotonic clock."""

    name: str
    arrivals: asyncio.Queue[Arrival] = field(default_factory=asyncio.Queue)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await self.arrivals.put(Arrival(message, time.monotonic()))
        await message.ack()

    async def next(self, within_s: float) -> Arrival:
        try:
            return await asyncio.wait_for(self.arrivals.get(), within_s)
        except asyncio.TimeoutError:
            raise AssertionError(f"no message reached {self.name!r} within {within_s} s") from None


@dataclass
class Rig:
    """A connection with its own small delay topology, and publish/receive helpers."""

    channel: AbstractChannel
    topology: DelayTopology
    queues: list[str] = field(default_factory=list)

    async def destination(self, name: str, arguments: dict[str, Any] | None = None) -> Inbox:
        # Exclusive, so the broker removes it even if the test dies before deleting it.
        queue = await self.channel.declare_queue(name, exclusive=True, arguments=arguments)
        self.queues.append(name)
        await bind_destination(self.channel, self.topology, name)
        inbox = Inbox(name)
        await queue.consume(inbox.on_message)
        return inbox

    async def publish(self, delay_s: float, queue: str, body: bytes = b"", **properties: Any) -> float:
        """Publish (confirmed) and return the monotonic time just before."""
        exchange, routing_key, extra = self.topology.route(delay_s, queue)
        headers = {**strip_death_headers(properties.pop("headers", {})), **extra}
        message = aio_pika.Message(body, headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties)
        target = await self.channel.get_exchange(exchange, ensure=False) if exchange else self.channel.default_exchange
        started = time.monotonic()
        await target.publish(message, routing_key)
        return started


@contextlib.asynccontextmanager
async def rig(broker_url: str, name: str, *, levels: int = 6, quorum: bool = True) -> AsyncIterator[Rig]:
    connection = await aio_pika.connect(broker_url, client_properties={"connection_name": f"test_delays {name}"})
    try:
        channel = await connection.channel()
        topology = DelayTopology(levels=levels, prefix=f"amqtask.test.{name}.{uuid.uuid4().hex[:6]}", quorum=quorum)
        await declare_delay_topology(channel, topology)
        setup = Rig(channel, topology)
        try:
            yield setup
        finally:
            cleanup = await connection.channel()
            for queue in setup.queues:
                await cleanup.queue_delete(queue)
            await delete_delay_topology(cleanup, topology)
    finally:
        await connection.close()


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def within(arrival: Arrival, started: float, delay_s: float) -> float:
    """Assert the message came no earlier than its delay and at most 1 s after; return its lateness."""
    elapsed = arrival.at - started
    late = elapsed - delay_s
    assert 0 <= late <= 1 + (math.ceil(delay_s) - delay_s), f"delay {delay_s} s arrived after {elapsed:.3f} s"
    return late


@pytest.mark.broker
def test_declare_is_idempotent_and_the_default_levels_deliver(broker_url: str, unique: str) -> None:
    async def scenario() -> None:
        connection = await aio_pika.connect(broker_url)
        try:
            channel = await connection.channel()
            topology = DelayTopology()
            await declare_delay_topology(channel, topology)
            await declare_delay_topology(channel, topology)
            # A 1 s delay enters at level 27 and passes 27 exchange-to-exchange hops before level 0.
            inbox_name = f"amqtask.test.{unique}.default"
            queue = await channel.declare_queue(inbox_name, exclusive=True)
            await bind_destination(channel, topology, inbox_name)
            await bind_destination(channel, topology, inbox_name)
            inbox = Inbox(inbox_name)
            await queue.consume(inbox.on_message)
            started = time.monotonic()
            exchange, routing_key, headers = topology.route(1, inbox_name)
            await (await channel.get_exchange(exchange)).publish(aio_pika.Message(b"x", headers=headers), routing_key)
            within(await inbox.next(3), started, 1)
            await queue.delete(if_unused=False, if_empty=False)
        finally:
            await connection.close()

    run(scenario())


@pytest.mark.broker
def test_redeclaring_with_other_arguments_is_a_mismatch(broker_url: str) -> None:
    async def scenario() -> None:
        async with rig(broker_url, "mismatch", levels=2) as r:
            connection = await aio_pika.connect(broker_url)
            try:
                classic = DelayTopology(levels=2, prefix=r.topology.prefix, quorum=False)
                with pytest.raises(TopologyMismatchError, match=r"L00.*x-queue-type"):
                    await declare_delay_topology(await connection.channel(), classic)
                with pytest.raises(TopologyNotFoundError, match="no-such-queue"):
                    await bind_destination(await connection.channel(), r.topology, "no-such-queue")
            finally:
                await connection.close()

    run(scenario())


@pytest.mark.broker
def test_declaring_on_several_channels_at_once_delivers_and_refuses_as_one_by_one(broker_url: str, unique: str) -> None:
    """A worker declares the levels spread over channels (fast start-up): the same topology, the same error."""
    app = App(f"spread-{unique}", broker=broker_url)

    async def scenario() -> None:
        on_channel = app.runtime().broker.run
        topology = DelayTopology(levels=12, prefix=f"amqtask.test.spread.{unique}")
        await declare_delay_topology_spread(on_channel, topology)
        await declare_delay_topology_spread(on_channel, topology)  # idempotent
        try:
            # Every level mismatches, in runs on different channels: the error is the first level's.
            classic = DelayTopology(levels=12, prefix=topology.prefix, quorum=False)
            with pytest.raises(TopologyMismatchError, match=r"L00.*x-queue-type"):
                await declare_delay_topology_spread(on_channel, classic)
            inbox_name = f"amqtask.test.{unique}.spread"
            await on_channel(lambda channel: channel.declare_queue(inbox_name, durable=True))
            await on_channel(lambda channel: bind_destination(channel, topology, inbox_name))
            exchange, routing_key, headers = topology.route(1, inbox_name)
            async with await aio_pika.connect(broker_url) as connection:
                channel = await connection.channel()
                queue = await channel.get_queue(inbox_name)
                inbox = Inbox(inbox_name)
                await queue.consume(inbox.on_message)
                started = time.monotonic()
                await (await channel.get_exchange(exchange)).publish(
                    aio_pika.Message(b"x", headers=headers), routing_key
                )
                within(await inbox.next(3), started, 1)
                await queue.delete(if_unused=False, if_empty=False)
        finally:
            await on_channel(lambda channel: delete_delay_topology(channel, topology))
            await app.aclose()

    run(scenario())


@pytest.mark.broker
def test_a_short_delay_published_after_a_long_one_arrives_first(broker_url: str, unique: str) -> None:
    async def scenario() -> None:
        async with rig(broker_url, "overtake") as r:
            inbox = await r.destination(f"amqtask.test.{unique}.overtake")
            await r.publish(20, inbox.name, b"20s")
            started = await r.publish(1, inbox.name, b"1s")
            arrival = await inbox.next(3)
            assert arrival.message.body == b"1s"
            within(arrival, started, 1)
            # The 20 s message waits in level 4 (16 s); deleting the topology discards it.
            level4 = await r.channel.declare_queue(r.topology.level_name(4), passive=True)
            assert level4.declaration_result.message_count == 1

    run(scenario())


@pytest.mark.broker
def test_topologies_of_two_sizes_share_their_levels(broker_url: str, unique: str) -> None:
    async def scenario() -> None:
        async with rig(broker_url, "sizes", levels=6) as r:
            small = DelayTopology(levels=3, prefix=r.topology.prefix)
            await declare_delay_topology(r.channel, small)
            inbox = await r.destination(f"amqtask.test.{unique}.sizes")
            await r.publish(2, inbox.name, b"big")
            exchange, routing_key, headers = small.route(2, inbox.name)
            await (await r.channel.get_exchange(exchange)).publish(
                aio_pika.Message(b"small", headers=headers), routing_key
            )
            await r.publish(2, inbox.name, b"end")
            assert [(await inbox.next(4)).message.body for _ in range(3)] == [b"big", b"small", b"end"]
            for queue in r.topology.queues():  # no copy left behind in any level
                declared = await r.channel.declare_queue(queue.name, passive=True)
                assert declared.declaration_result.message_count == 0, queue.name
            assert inbox.arrivals.empty()

    run(scenario())


@pytest.mark.broker
@pytest.mark.parametrize("quorum", [True, False], ids=["quorum", "classic"])
def test_delays_arrive_no_earlier_and_at_most_a_second_late(broker_url: str, unique: str, quorum: bool) -> None:
    async def scenario() -> None:
        async with rig(broker_url, f"timing-{quorum}", quorum=quorum) as r:
            inboxes = {d: await r.destination(f"amqtask.test.{unique}.timing.{d}") for d in (0, 1, 3)}
            started = {d: await r.publish(d, inbox.name) for d, inbox in inboxes.items()}
            for delay, inbox in inboxes.items():
                within(await inbox.next(delay + 2), started[delay], delay)

    run(scenario())


@pytest.mark.broker
def test_properties_and_headers_survive_and_republishing_strips_x_death(broker_url: str, unique: str) -> None:
    async def scenario() -> None:
        async with rig(broker_url, "props") as r:
            inbox = await r.destination(f"amqtask.test.{unique}.props", {"x-max-priority": 9})
            properties = {
                "priority": 7,
                "content_type": "application/x-msgpack",
                "correlation_id": "task-1",
                "reply_to": "replies",
                "message_id": "m-1",
            }
            await r.publish(1, inbox.name, b"body", headers={"task": "t", "retries": 2}, **properties)
            first = (await inbox.next(3)).message
            assert first.body == b"body"
            assert {k: getattr(first, k) for k in properties} == properties
            assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert first.headers["task"] == "t" and first.headers["retries"] == 2
            assert _deaths(first.headers) == {r.topology.level_name(0): 1}

            # A retry: the same message back through level 0. Unstripped, 3.x would drop it as a cycle
            # and 4.x would count a second death there.
            await r.publish(1, inbox.name, first.body, headers=dict(first.headers), **properties)
            second = (await inbox.next(3)).message
            assert second.priority == 7 and second.headers["task"] == "t"
            assert _deaths(second.headers) == {r.topology.level_name(0): 1}

    run(scenario())


def _deaths(headers: dict[str, Any]) -> dict[str, int]:
    return {str(d["queue"]): int(d["count"]) for d in headers.get("x-death", [])}


@pytest.mark.broker
def test_queue_names_that_extend_each_other_get_only_their_own_messages(broker_url: str, unique: str) -> None:
    base = f"amqtask.test.{unique}"
    # Each name is another one with words added in front or behind (aio-pika refuses `*` and `#`).
    names = [f"{base}.a.b", f"x.{base}.a.b", f"{base}.a", f"{base}.a.b.c"]

    async def scenario() -> None:
        async with rig(broker_url, "names") as r:
            inboxes = [await r.destination(name) for name in names]
            for delay in (0, 1):
                for name in names:
                    await r.publish(delay, name, name.encode())
            # Last, through the same level queue: a misrouted copy would reach a queue before this.
            for name in names:
                await r.publish(1, name, b"end")
            for inbox in inboxes:
                bodies = [(await inbox.next(3)).message.body for _ in range(3)]
                assert bodies == [inbox.name.encode(), inbox.name.encode(), b"end"]
                assert inbox.arrivals.empty()

    run(scenario())


@pytest.mark.broker
def test_a_due_message_for_an_unbound_queue_is_kept_in_unroutable(broker_url: str, unique: str) -> None:
    async def scenario() -> None:
        async with rig(broker_url, "unroutable", levels=2) as r:
            unroutable = Inbox(r.topology.unroutable_name)
            await (await r.channel.get_queue(unroutable.name)).consume(unroutable.on_message)
            await r.publish(1, f"amqtask.test.{unique}.nobody", b"lost?")
            message = (await unroutable.next(3)).message
            assert message.body == b"lost?"
            assert message.headers[DELAY_QUEUE_HEADER] == f"amqtask.test.{unique}.nobody"

    run(scenario())


async def _lateness(broker_url: str, name: str, delays: Iterable[float], copies: int) -> dict[float, list[float]]:
    async with rig(broker_url, name) as r:
        inboxes = {d: await r.destination(f"amqtask.test.{name}.{uuid.uuid4().hex[:6]}.{d}") for d in delays}
        started = {d: [await r.publish(d, inbox.name) for _ in range(copies)] for d, inbox in inboxes.items()}
        late: dict[float, list[float]] = {}
        for delay, inbox in inboxes.items():
            arrivals = [await inbox.next(delay + 3) for _ in range(copies)]
            late[delay] = [within(a, s, delay) for a, s in zip(arrivals, started[delay], strict=True)]
    for delay, values in late.items():
        p90 = statistics.quantiles(values, n=10)[-1]
        median = statistics.median(values)
        print(
            f"delay {delay:g} s x{len(values)}: late by min {min(values):.3f} median {median:.3f}"
            f" p90 {p90:.3f} max {max(values):.3f} s ({math.ceil(delay) - delay:g} s of it is rounding up)"
        )
    return late


@pytest.mark.broker
def test_lateness_distribution(broker_url: str, unique: str) -> None:
    run(_lateness(broker_url, f"late-{unique}", (0.5, 3), copies=20))


@pytest.mark.broker
@pytest.mark.slow
def test_lateness_of_a_30_s_delay(broker_url: str, unique: str) -> None:
    run(_lateness(broker_url, f"late30-{unique}", (30,), copies=10))
