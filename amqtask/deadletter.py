"""The dead-letter header format: what a worker writes on a message it dead-letters, and how it is read.

A worker that gives up on a delivery copies it, as received, into ``<queue>.dlq`` and adds
``x-amqtask-*`` headers: the reason (one of the constants below), the reason in words, the exception
with its traceback, the worker, the time and where the message came from. A message the *broker*
dead-lettered by itself (a quorum queue's delivery limit, a TTL) carries RabbitMQ's ``x-death``
headers instead. :func:`build` writes the first kind (``worker/delivery.py``), :func:`read` reads
both (``dlq.py``), so the two sides cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .delays import strip_death_headers
from .failures import format_traceback
from .protocol import now_iso

#: Prefix of every header a worker adds when it dead-letters a message.
PREFIX = "x-amqtask-"
REASON = PREFIX + "reason"
DETAIL = PREFIX + "detail"
WORKER = PREFIX + "worker"
FAILED_AT = PREFIX + "failed-at"
QUEUE = PREFIX + "queue"
EXCHANGE = PREFIX + "exchange"
ROUTING_KEY = PREFIX + "routing-key"
EXCEPTION_TYPE = PREFIX + "exception-type"
EXCEPTION_MESSAGE = PREFIX + "exception-message"
TRACEBACK = PREFIX + "traceback"
#: On a copy that had to leave the received headers out (too large to send with ours): how many.
HEADERS_DROPPED = PREFIX + "headers-dropped"
#: Every header :func:`build` and :func:`slim` add: notes for people, added after the message was verified,
#: not signed again (``signing.py`` leaves them out) and never acted on (``dlq replay`` removes them).
NOTES = frozenset({REASON, DETAIL, WORKER, FAILED_AT, QUEUE, EXCHANGE, ROUTING_KEY, EXCEPTION_TYPE,
                   EXCEPTION_MESSAGE, TRACEBACK, HEADERS_DROPPED})  # fmt: skip

# Reasons a worker gives (x-amqtask-reason).
#: The task raised, after its last retry (or could not be retried).
FAILED = "failed"
#: ``Reject()`` from the task or a middleware (an unverified signature, say).
REJECTED = "rejected"
#: Undecodable body, missing or ill-typed headers, content type not accepted, over the decoder limits.
MALFORMED = "malformed"
#: The task name is not registered on the worker.
UNKNOWN_TASK = "unknown-task"
#: The eta (or a follow-up's countdown) is further away than the delay levels can hold.
ETA_OUT_OF_RANGE = "eta-out-of-range"
#: What the worker had to send because of the message (sent on to the delay levels, say) has headers
#: too large for one AMQP frame.
HEADERS_TOO_LARGE = "headers-too-large"
#: The task raised ``Reject(requeue=True)`` more often than ``task_requeue_limit`` allows.
REQUEUE_LIMIT = "requeue-limit"
#: Any other error while handling the message; the exception headers say which.
WORKER_ERROR = "worker-error"

_DETAIL_MAX = 4096
_TRACEBACK_MAX = 16384


def build(
    received: Mapping[str, Any], *, reason: str, detail: str, worker: str, queue: str, exchange: str,
    routing_key: str, exc: BaseException | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The headers of a dead-letter copy: the received ones without RabbitMQ's history, plus ours."""
    headers = strip_death_headers(received)
    headers.update({
        REASON: reason,
        DETAIL: detail[:_DETAIL_MAX],
        WORKER: worker,
        FAILED_AT: now_iso(),
        QUEUE: queue,
        EXCHANGE: exchange,
        ROUTING_KEY: routing_key,
    })  # fmt: skip
    if exc is not None:
        headers.update({
            EXCEPTION_TYPE: type(exc).__name__,
            EXCEPTION_MESSAGE: str(exc)[:_DETAIL_MAX],
            TRACEBACK: format_traceback(exc)[-_TRACEBACK_MAX:],
        })  # fmt: skip
    return headers


def slim(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Only our headers of ``headers``, and how many others were left out: a copy that fits in a frame."""
    ours = {key: value for key, value in headers.items() if key.startswith(PREFIX)}
    ours[HEADERS_DROPPED] = f"{len(headers) - len(ours)} header(s)"
    return ours


@dataclass(frozen=True)
class Record:
    """Why and when a message was dead-lettered, read from its headers (a worker's or the broker's)."""

    #: A worker's reason (the constants above) or the broker's (``delivery_limit``, ``expired``,
    #: ``rejected``, ``maxlen``); ``unknown`` when neither is there.
    reason: str
    #: ``Type: message`` of the exception, or the worker's detail; empty for broker reasons.
    exception: str
    failed_at: str | None
    #: The queue the message came from, when the headers say.
    queue: str | None


def read(headers: Mapping[str, Any]) -> Record:
    """What the dead-lettering headers of a message say."""
    death = _latest_death(headers)
    exc_type = header_text(headers.get(EXCEPTION_TYPE))
    if exc_type:
        exception = f"{exc_type}: {header_text(headers.get(EXCEPTION_MESSAGE)) or ''}"
    else:
        exception = header_text(headers.get(DETAIL)) or ""
    failed_at = header_text(headers.get(FAILED_AT))
    if failed_at is None and isinstance(death.get("time"), dt.datetime):
        failed_at = death["time"].isoformat()
    reason = header_text(headers.get(REASON)) or header_text(death.get("reason")) or "unknown"
    return Record(reason, exception, failed_at, header_text(headers.get(QUEUE)))


def header_text(value: Any) -> str | None:
    """A header's value as text (AMQP tables may carry strings as bytes), or None if it is not text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def _latest_death(headers: Mapping[str, Any]) -> Mapping[str, Any]:
    """The most recent ``x-death`` entry (RabbitMQ keeps them newest first), or an empty mapping."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return {}
