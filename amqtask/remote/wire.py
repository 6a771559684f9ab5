"""Remote control on the wire: Celery's pidbox names, message properties, and the one reader of them.

A client publishes a request to the fanout exchange ``celery.pidbox``. Every worker consumes an
exclusive queue ``<hostname>.celery.pidbox`` bound to it, runs the command when the request is meant
for it (``destination``), and, when the request names a ``reply_to``, publishes ``{hostname: reply}``
to ``reply.celery.pidbox`` with the request's ticket in its headers. The client collects replies on a
private queue ``<oid>.reply.celery.pidbox`` bound with routing key ``oid``, until the timeout or the
reply limit. Exchanges, queue arguments, bodies and headers are Celery 5.7's
(``shared/fixtures/celery-v2/control_*.json``), so ``celery inspect ping`` reaches amqtask workers and
``amqtask inspect ping`` reaches Celery workers on the same vhost.

Requests and replies are read by one function, :func:`read`: signatures (when ``signing_keys`` is
set), the clock, the expiry and the decoding limits apply the same way on both sides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from .. import serializers, signing
from ..errors import SerializationError
from ..producer import wire_of
from ..protocol import PERSISTENT, TRANSIENT, WireMessage
from ..topology import translate

log = logging.getLogger("amqtask.control")

#: Celery derives the mailbox names from its ``control_exchange`` setting, "celery" by default. amqtask
#: uses that default (a constant, not a setting) so that Celery and amqtask clients and workers on one
#: vhost answer each other.
NAMESPACE = "celery"
EXCHANGE = f"{NAMESPACE}.pidbox"
REPLY_EXCHANGE = f"reply.{NAMESPACE}.pidbox"
#: kombu's arguments for both mailbox queues: a queue outlives its consumer by 10 s, and a request or
#: reply nobody read within 5 minutes is dropped.
QUEUE_ARGUMENTS: dict[str, Any] = {"x-expires": 10_000, "x-message-ttl": 300_000}


def worker_queue_name(hostname: str) -> str:
    """The queue a worker with this node name receives requests on."""
    return f"{hostname}.{EXCHANGE}"


def reply_queue_name(oid: str) -> str:
    """The queue a client collects the replies to one call on."""
    return f"{oid}.{REPLY_EXCHANGE}"


async def declare_exchange(channel: AbstractChannel, name: str, kind: ExchangeType) -> None:
    """Declare a mailbox exchange as kombu does (transient); a mismatch raises a TopologyError."""
    try:
        await channel.declare_exchange(name, kind, durable=False)
    except aiormq.exceptions.AMQPChannelError as exc:
        raise translate(exc, "exchange", name, {"type": kind.value, "durable": False}) from None


class LamportClock:
    """The logical clock kombu sends in the ``clock`` header (nobody orders by it; peers expect it)."""

    def __init__(self) -> None:
        self.value = 0

    def forward(self) -> int:
        """Advance for an event of our own and return the new value."""
        self.value += 1
        return self.value

    def adjust(self, other: Any) -> None:
        """Move past a clock value received from a peer (non-numbers are ignored)."""
        if isinstance(other, int) and not isinstance(other, bool):
            self.value = max(self.value, other) + 1


def header_text(value: Any) -> str | None:
    """A string header as text (AMQP long strings may arrive as bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def expired(headers: dict[str, Any]) -> bool:
    """Whether the ``expires`` header (epoch seconds; 0 or absent: never) lies in the past."""
    expires = headers.get("expires")
    return isinstance(expires, int | float) and not isinstance(expires, bool) and 0 < expires < time.time()


def encode_message(
    body: Any, headers: dict[str, Any], codec: serializers.Codec, *, reply: bool, keys: Sequence[str]
) -> WireMessage:
    """A request (persistent) or reply (transient) with the properties kombu gives them; signed with ``keys``."""
    message = WireMessage(
        body=serializers.encode(body, codec),
        content_type=codec.content_type,
        content_encoding=codec.content_encoding,
        headers=headers,
        delivery_mode=TRANSIENT if reply else PERSISTENT,
        priority=0,
    )
    signing.seal(keys, message, signing.Kind.CONTROL)
    return message


@dataclass
class Reader:
    """How one side reads mailbox messages: its clock, what it accepts, its limits, its signing keys."""

    clock: LamportClock
    accept: frozenset[str]
    limits: serializers.DecodeLimits
    #: What is read, for the log: "control request" or "control reply".
    what: str
    #: With keys, only messages signed with one of them are read.
    keys: Sequence[str] = ()
    #: Whether an unverified message was already logged at WARNING (a flood of them is not).
    complained: bool = False


@dataclass(frozen=True)
class Envelope:
    """A mailbox message that was read: its headers, its body (always an object), its content type."""

    headers: dict[str, Any]
    body: dict[str, Any]
    content_type: str | None
    #: The keys to sign an answer with: the one that signed this message first.
    reply_keys: Sequence[str] = ()


def read(reader: Reader, message: AbstractIncomingMessage) -> Envelope | None:
    """The request or reply in ``message``; None (logged) when it is unverified, expired or unreadable."""
    received = wire_of(message)
    unverified = signing.problem(reader.keys, received, signing.Kind.CONTROL)
    if unverified is not None:
        level = logging.DEBUG if reader.complained else logging.WARNING
        log.log(level, "ignoring a %s: %s (logged once)", reader.what, unverified)
        reader.complained = True
        return None
    headers = dict(message.headers or {})
    reader.clock.adjust(headers.get("clock"))
    if expired(headers):
        log.debug("dropping an expired %s", reader.what)
        return None
    try:
        body = serializers.decode(message.body, message.content_type, reader.accept, reader.limits)
    except SerializationError as exc:
        log.warning("dropping an unreadable %s: %s", reader.what, exc)
        return None
    if not isinstance(body, dict):
        log.warning("dropping a %s that is not an object: %.200r", reader.what, body)
        return None
    reply_keys = signing.replying_keys(reader.keys, received, signing.Kind.CONTROL)
    return Envelope(headers, body, message.content_type, reply_keys)


__all__ = [
    "EXCHANGE",
    "NAMESPACE",
    "QUEUE_ARGUMENTS",
    "REPLY_EXCHANGE",
    "Envelope",
    "LamportClock",
    "Reader",
    "declare_exchange",
    "encode_message",
    "expired",
    "header_text",
    "read",
    "reply_queue_name",
    "worker_queue_name",
]
