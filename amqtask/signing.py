"""Optional message signing: HMAC-SHA256 over everything in a message that amqtask acts on.

With ``signing_keys`` set, everything amqtask publishes carries an ``x-amqtask-signature`` header:
task messages (``delay``, beat, canvas follow-ups, a worker's retries), results, chord parts, and
remote-control requests and replies. Workers verify a delivery before anything else happens to it and dead-letter
it, untouched, when it is unsigned or its signature matches none of the keys; result and control
consumers drop such messages.

The MAC covers the body, the ``content_type``, ``content_encoding``, ``correlation_id``, ``reply_to``
and ``priority`` properties, and every header (task, id, eta, expires, retries, timelimit, root/parent/
group ids, and any header a sender adds) except those the broker and amqtask add or change in transit,
which nothing acts on (a task should not either, when signing matters):

- names starting with ``x-`` that are not amqtask's: the broker's (``x-death`` and ``x-first-death-*``/
  ``x-last-death-*``, which the worker strips before it sends a message on and only ``dlq list`` shows;
  ``x-delivery-count``/``x-acquired-count``, which ``dlq replay`` removes; ``x-stream-offset``, set on
  each stream delivery, where a result reader resumes after a reconnect) and any a sender adds;
- the signature itself, and the notes a worker adds when it dead-letters a message (``x-amqtask-reason``
  and the rest of :data:`amqtask.deadletter.NOTES`): written after the message was verified, shown by
  ``dlq list``, removed by ``dlq replay``, which sends only to the queue the DLQ belongs to or ``--to``;
- the delay levels' routing header (``amqtask-delay-queue``): it picks the queue a due message enters,
  as a routing key does for any message, and neither is signed: a holder of a captured signed message
  can publish it to any queue anyway.

amqtask's other ``x-amqtask-*`` headers drive an action where they arrive, so they are covered: the
requeue count of ``Reject(requeue=True)`` (the worker dead-letters at ``task_requeue_limit``; it signs
the message again when it counts one more), and a result record's kind and expiry (a ``forget`` record
deletes a result; an expired one is dropped). What kind of message it is (task, result, control) is
part of the MAC, so a signed message of one kind is no use as another. Each part is encoded with a
type tag and a length prefix, so no two different messages encode alike.

Key rotation: put the new key first (it signs) and keep the old one after it (it still verifies)
until every old message is gone, then drop it. Workers sign a result or a control reply with the key
that signed the request, so a caller still signing with the old key reads its answers.

Signing proves a message came from a holder of a key; it does not hide the message (use TLS) or stop
a captured signed message from being sent again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import hashlib
import hmac
import struct
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

from . import deadletter
from .delays import DELAY_QUEUE_HEADER
from .middleware import Middleware
from .protocol import TaskMessage, WireMessage

if TYPE_CHECKING:
    from .app import App

SIGNATURE_HEADER = "x-amqtask-signature"
#: Headers with this prefix are transport bookkeeping, changed in transit, and not covered...
UNCOVERED_PREFIX = "x-"
#: ...except amqtask's own, which are covered unless named in UNCOVERED_HEADERS.
COVERED_PREFIX = deadletter.PREFIX
#: What amqtask adds in transit: a delayed message's destination, the signature, dead-letter notes.
UNCOVERED_HEADERS = frozenset({DELAY_QUEUE_HEADER, SIGNATURE_HEADER, *deadletter.NOTES})
_VERSION = b"amqtask-mac-v2"


class Kind(Enum):
    """What a signed message is; part of its MAC."""

    TASK = "task"
    RESULT = "result"
    CONTROL = "control"
    #: A chord header task's outcome, kept in the chord's queue until the body is sent.
    CHORD_PART = "chord-part"


def _framed(tag: bytes, payload: bytes) -> bytes:
    return tag + len(payload).to_bytes(8, "big") + payload


def canonical(value: Any) -> bytes:
    """``value`` as type-tagged, length-prefixed bytes, the same before and after an AMQP header table.

    AMQP carries a Python float as a 32-bit float and a timestamp in whole seconds, so both are
    encoded as they arrive.
    """
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"T" if value else b"F"
    if isinstance(value, int):
        return _framed(b"i", str(value).encode())
    if isinstance(value, float):
        # Too large for 32 bits: it cannot travel as a header either (publishing fails).
        with contextlib.suppress(OverflowError):
            value = struct.unpack(">f", struct.pack(">f", value))[0]
        return _framed(b"f", repr(value).encode())
    if isinstance(value, str):
        return _framed(b"s", value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes | bytearray):
        return _framed(b"b", bytes(value))
    if isinstance(value, decimal.Decimal):
        return _framed(b"d", str(value).encode())
    if isinstance(value, dt.datetime):
        return _framed(b"t", str(int(value.timestamp())).encode())
    if isinstance(value, Mapping):
        items = sorted((canonical(str(k)), canonical(v)) for k, v in value.items())
        return _framed(b"m", b"".join(k + v for k, v in items))
    if isinstance(value, Sequence):
        return _framed(b"l", b"".join(canonical(item) for item in value))
    return _framed(b"r", repr(value).encode())


def is_covered(header: str) -> bool:
    """Whether the MAC covers ``header`` (see the module doc for why each that is not is harmless)."""
    if header in UNCOVERED_HEADERS:
        return False
    return header.startswith(COVERED_PREFIX) or not header.startswith(UNCOVERED_PREFIX)


def covered(wire: WireMessage, kind: Kind) -> bytes:
    """The bytes the MAC is computed over (see the module doc for what they cover)."""
    headers = {k: v for k, v in wire.headers.items() if is_covered(str(k))}
    # An absent property arrives as None or as its zero value, depending on the client: both mean "none".
    parts = (
        kind.value,
        wire.content_type or "",
        wire.content_encoding or "",
        wire.correlation_id or "",
        wire.reply_to or "",
        wire.priority or 0,
        headers,
        wire.body,
    )
    return _VERSION + b"".join(canonical(part) for part in parts)


def sign(key: str, wire: WireMessage, kind: Kind = Kind.TASK) -> str:
    """The signature of ``wire`` as a message of ``kind`` under ``key`` (hex)."""
    return hmac.new(key.encode("utf-8"), covered(wire, kind), hashlib.sha256).hexdigest()


def seal(keys: Sequence[str], wire: WireMessage, kind: Kind) -> None:
    """Sign ``wire`` in place with the first of ``keys``; without keys, leave it unsigned."""
    wire.headers.pop(SIGNATURE_HEADER, None)
    if keys:
        wire.headers[SIGNATURE_HEADER] = sign(keys[0], wire, kind)


def _given(wire: WireMessage) -> str | None:
    given = wire.headers.get(SIGNATURE_HEADER)
    if isinstance(given, bytes):
        given = given.decode("ascii", errors="replace")
    return given if isinstance(given, str) else None


def _signer(keys: Sequence[str], wire: WireMessage, kind: Kind) -> str | None:
    """The one of ``keys`` that signed ``wire``, if any."""
    given = _given(wire)
    if given is None:
        return None
    return next((key for key in keys if hmac.compare_digest(sign(key, wire, kind), given)), None)


def problem(keys: Sequence[str], wire: WireMessage, kind: Kind) -> str | None:
    """Why ``wire`` must not be acted on under ``keys``, or None when it verifies (or no keys are set)."""
    if not keys:
        return None
    if _given(wire) is None:
        return "unsigned message (signing_keys is set: only signed messages are accepted)"
    if _signer(keys, wire, kind) is None:
        return "bad signature: signed with none of the signing_keys, or altered"
    return None


def replying_keys(keys: Sequence[str], request: WireMessage, kind: Kind) -> list[str]:
    """``keys`` with the one that signed ``request`` first: an answer is signed with the key its caller used.

    So a caller still on the old key during a rotation can read the answers to what it sent.
    """
    if not keys:
        return []
    signer = _signer(keys, request, kind)
    return [signer, *(key for key in keys if key != signer)] if signer is not None else list(keys)


def verify(keys: Sequence[str], wire: WireMessage, kind: Kind = Kind.TASK) -> bool:
    """Whether ``wire`` carries a signature made with one of ``keys``."""
    return bool(keys) and problem(keys, wire, kind) is None


class SigningMiddleware(Middleware):
    """Signs outgoing task messages when ``signing_keys`` is set (workers verify at the delivery's entry)."""

    async def before_publish(self, app: App, message: TaskMessage, wire: WireMessage) -> None:
        """Add the signature header (hooks after this one must not change the message)."""
        seal(app.conf.signing_keys, wire, Kind.TASK)


__all__ = [
    "SIGNATURE_HEADER",
    "Kind",
    "SigningMiddleware",
    "canonical",
    "covered",
    "is_covered",
    "problem",
    "replying_keys",
    "seal",
    "sign",
    "verify",
]
