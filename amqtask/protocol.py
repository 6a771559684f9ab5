"""Celery message protocol v2: task messages and rpc result messages, to and from the wire.

A task message is AMQP properties, 19 headers and a ``[args, kwargs, embed]`` body; a result is a
JSON/msgpack object ``{status, result, traceback, children, date_done, task_id}`` sent to the
caller's ``reply_to`` queue with ``correlation_id`` = task id. The layout follows what Celery 5.7
really sends (``shared/fixtures/celery-v2``), including its quirks (``timelimit`` is ``[hard, soft]``).
This module knows nothing of AMQP libraries: it maps :class:`TaskMessage` to :class:`WireMessage`.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import reprlib
import socket
from dataclasses import dataclass, field
from typing import Any

from . import serializers
from .errors import MessageError, SerializationError
from .serializers import Codec, DecodeLimits

PERSISTENT = 2
TRANSIENT = 1

_KNOWN_HEADERS = frozenset(
    {
        "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries", "timelimit",
        "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
        "replaced_task_nesting", "stamped_headers", "stamps",
    }
)  # fmt: skip
_EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")


@dataclass
class WireMessage:
    """An AMQP message as the protocol sees it: body bytes plus the basic properties amqtask uses."""

    body: bytes
    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    # Kept when a worker copies a message (dead-letter queue, replay) so the copy still says where it came
    # from; amqtask's own task messages leave them unset, as Celery's do, except the timestamp: the sent
    # time, which the worker's queue-wait metric reads (see encode_task).
    message_id: str | None = None
    timestamp: dt.datetime | None = None
    app_id: str | None = None
    type: str | None = None


@dataclass
class TaskMessage:
    """One task invocation in protocol v2 terms."""

    task: str
    id: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    eta: dt.datetime | None = None
    expires: dt.datetime | None = None
    retries: int = 0
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    ignore_result: bool | None = False
    origin: str | None = None
    shadow: str | None = None
    reply_to: str | None = None
    priority: int | None = None
    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None
    stamps: dict[str, Any] = field(default_factory=dict)
    replaced_task_nesting: int = 0
    #: Headers beyond the 19 of the protocol (``headers=`` of ``apply_async``, amqtask's own ``x-`` ones).
    extra_headers: dict[str, Any] = field(default_factory=dict)
    #: ``argsrepr`` / ``kwargsrepr`` as received; computed when sending.
    argsrepr: str | None = None
    kwargsrepr: str | None = None
    #: The codec name (``json``/``msgpack``) a received message came in, set by :func:`decode_task`, so
    #: what a worker sends on the caller's behalf (replies, chain steps) can keep the caller's encoding:
    #: a Celery client often accepts JSON only. Not part of the message's identity; ignored by
    #: :func:`encode_task`, which is given its codec.
    serializer: str | None = field(default=None, compare=False)


def origin_name() -> str:
    """``gen<pid>@<hostname>``, the ``origin`` header Celery writes for the publishing process."""
    return _origin_of(os.getpid())


@functools.lru_cache(maxsize=1)
def _origin_of(pid: int) -> str:
    # Once per process (a fork gets its own pid): gethostname() is a system call, and this is on every send.
    return f"gen{pid}@{socket.gethostname()}"


_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = 1024
_repr.maxother = 1024
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 64


#: Types whose ``repr`` reprlib leaves as it is while it is short (ints up to 40 digits, strings up to 1024).
_PLAIN = frozenset({type(None), bool, int, float, str})
#: Below this length, a tuple or list of plain values reads the same from ``repr`` as from reprlib.
_PLAIN_REPR_MAX = 40


def short_repr(value: Any) -> str:
    """A bounded ``repr`` (depth 3, 64 items, 1024 characters): what ``argsrepr`` and event fields show."""
    # Most calls' arguments are a few numbers or short strings: the builtin repr says the same, faster.
    kind = type(value)
    plain_items = (kind is tuple or kind is list) and len(value) <= 8 and all(type(item) in _PLAIN for item in value)
    if kind in _PLAIN or plain_items:  # a task's result (task-succeeded events), or a call's arguments
        text = repr(value)
        if len(text) <= _PLAIN_REPR_MAX:
            return text
    elif kind is dict and not value:
        return "{}"
    return _repr.repr(value)


def isoformat(moment: dt.datetime | None) -> str | None:
    """``datetime.isoformat()`` as Celery writes it (microseconds only when non-zero)."""
    return None if moment is None else moment.isoformat()


def parse_datetime(value: Any, header: str) -> dt.datetime | None:
    """Parse an ISO 8601 header into an aware datetime; naive values are taken as UTC."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise MessageError(f"header {header!r} must be an ISO 8601 string, got {type(value).__name__}")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise MessageError(f"header {header!r} is not an ISO 8601 datetime: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _embed(msg: TaskMessage) -> dict[str, Any]:
    return {"callbacks": msg.callbacks, "errbacks": msg.errbacks, "chain": msg.chain, "chord": msg.chord}


def encode_task(msg: TaskMessage, codec: Codec) -> WireMessage:
    """Build the wire form of a task message, header for header as Celery 5.7 sends it."""
    headers: dict[str, Any] = {
        "lang": "py",
        "task": msg.task,
        "id": msg.id,
        "shadow": msg.shadow,
        "eta": isoformat(msg.eta),
        "expires": isoformat(msg.expires),
        "group": msg.group,
        "group_index": msg.group_index,
        "retries": msg.retries,
        "timelimit": [msg.time_limit, msg.soft_time_limit],
        "root_id": msg.root_id or msg.id,
        "parent_id": msg.parent_id,
        "argsrepr": msg.argsrepr if msg.argsrepr is not None else short_repr(tuple(msg.args)),
        "kwargsrepr": msg.kwargsrepr if msg.kwargsrepr is not None else short_repr(msg.kwargs),
        "origin": msg.origin or origin_name(),
        "ignore_result": msg.ignore_result,
        "replaced_task_nesting": msg.replaced_task_nesting,
        "stamped_headers": None,
        "stamps": msg.stamps,
    }
    headers.update(msg.extra_headers)
    body = serializers.encode([list(msg.args), dict(msg.kwargs), _embed(msg)], codec)
    return WireMessage(
        body=body,
        content_type=codec.content_type,
        content_encoding=codec.content_encoding,
        headers=headers,
        delivery_mode=PERSISTENT,
        priority=msg.priority,
        correlation_id=msg.id,
        reply_to=msg.reply_to,
        # The sent time, for the worker's queue-wait metric: AMQP's own timestamp property (whole seconds),
        # as Celery's protocol v2 has no header for it and other clients pass a property by untouched.
        timestamp=dt.datetime.now(dt.timezone.utc),
    )


def _header(headers: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = False) -> Any:
    value = headers.get(name)
    if value is None:
        if required:
            raise MessageError(f"missing header {name!r}")
        return None
    if isinstance(value, bytes) and kind is str:
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise MessageError(f"header {name!r} has type {type(value).__name__}, expected {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def _time_limits(value: Any) -> tuple[float | None, float | None]:
    if value is None:
        return None, None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise MessageError(f"header 'timelimit' must be [hard, soft], got {value!r}")
    for limit in value:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float)):
            raise MessageError(f"header 'timelimit' must hold numbers or null, got {value!r}")
    return value[0], value[1]


def _split_body(payload: Any) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    if isinstance(payload, dict) and "task" in payload:
        raise MessageError("protocol v1 message (task in the body) is not supported; send protocol v2")
    if not isinstance(payload, list | tuple) or len(payload) != 3:
        raise MessageError("body must be a 3-element array [args, kwargs, embed]")
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        raise MessageError(f"body args must be an array, got {type(args).__name__}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise MessageError("body kwargs must be an object with string keys")
    if embed is None:
        embed = {}
    if not isinstance(embed, dict):
        raise MessageError(f"body embed must be an object, got {type(embed).__name__}")
    return list(args), kwargs, embed


def _embed_list(embed: dict[str, Any], key: str) -> list[dict[str, Any]] | None:
    value = embed.get(key)
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(item, dict) for item in value):
        raise MessageError(f"embed {key!r} must be a list of signatures")
    return list(value)


def decode_task(wire: WireMessage, accept: frozenset[str], limits: DecodeLimits) -> TaskMessage:
    """Parse and validate a task message; raise :class:`MessageError` / :class:`SerializationError`."""
    headers = wire.headers
    if not isinstance(headers, dict):
        raise MessageError("message has no headers table")
    task = _header(headers, "task", str, required=True)
    task_id = _header(headers, "id", str, required=True)
    payload = serializers.decode(wire.body, wire.content_type, accept, limits)
    args, kwargs, embed = _split_body(payload)
    chord = embed.get("chord")
    if chord is not None and not isinstance(chord, dict):
        raise MessageError("embed 'chord' must be a signature")
    hard, soft = _time_limits(headers.get("timelimit"))
    retries = _header(headers, "retries", int) or 0
    ignore_result = headers.get("ignore_result")
    stamps = headers.get("stamps")
    return TaskMessage(
        task=task,
        id=task_id,
        args=args,
        kwargs=kwargs,
        eta=parse_datetime(headers.get("eta"), "eta"),
        expires=parse_datetime(headers.get("expires"), "expires"),
        retries=retries,
        root_id=_header(headers, "root_id", str) or task_id,
        parent_id=_header(headers, "parent_id", str),
        group=_header(headers, "group", str),
        group_index=_header(headers, "group_index", int),
        time_limit=hard,
        soft_time_limit=soft,
        ignore_result=bool(ignore_result) if ignore_result is not None else None,
        origin=_header(headers, "origin", str),
        shadow=_header(headers, "shadow", str),
        reply_to=wire.reply_to,
        priority=wire.priority,
        callbacks=_embed_list(embed, "callbacks"),
        errbacks=_embed_list(embed, "errbacks"),
        chain=_embed_list(embed, "chain"),
        chord=chord,
        stamps=stamps if isinstance(stamps, dict) else {},
        replaced_task_nesting=_header(headers, "replaced_task_nesting", int) or 0,
        extra_headers={k: v for k, v in headers.items() if k not in _KNOWN_HEADERS},
        argsrepr=_header(headers, "argsrepr", str),
        kwargsrepr=_header(headers, "kwargsrepr", str),
        serializer=codec.name if (codec := serializers.for_content_type(wire.content_type)) else None,
    )


# ---------------------------------------------------------------------------------------------- results

PENDING = "PENDING"
STARTED = "STARTED"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
RETRY = "RETRY"
REVOKED = "REVOKED"
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})


@dataclass
class ResultMessage:
    """One state report for a task, in Celery's rpc result format."""

    task_id: str
    status: str
    result: Any = None
    traceback: str | None = None
    children: list[Any] = field(default_factory=list)
    date_done: str | None = None
    parent_id: str | None = None
    group_id: str | None = None


def encode_result(res: ResultMessage, codec: Codec, *, persistent: bool = True) -> WireMessage:
    """The reply a worker sends to ``reply_to``; keys in Celery's order."""
    body: dict[str, Any] = {
        "status": res.status,
        "result": res.result,
        "traceback": res.traceback,
        "children": res.children,
        "date_done": res.date_done,
    }
    if res.group_id is not None:
        body["group_id"] = res.group_id
    if res.parent_id is not None:
        body["parent_id"] = res.parent_id
    body["task_id"] = res.task_id
    return WireMessage(
        body=serializers.encode(body, codec),
        content_type=codec.content_type,
        content_encoding=codec.content_encoding,
        headers={},
        delivery_mode=PERSISTENT if persistent else TRANSIENT,
        priority=0,
        correlation_id=res.task_id,
    )


def decode_result(wire: WireMessage, accept: frozenset[str], limits: DecodeLimits) -> ResultMessage:
    """Parse a reply; raise :class:`MessageError` when it is not a result in Celery's format."""
    payload = serializers.decode(wire.body, wire.content_type, accept, limits)
    if not isinstance(payload, dict) or not isinstance(payload.get("status"), str):
        raise MessageError("result body must be an object with a string 'status'")
    task_id = payload.get("task_id") or wire.correlation_id
    if not isinstance(task_id, str):
        raise MessageError("result has no task id")
    children = payload.get("children")
    return ResultMessage(
        task_id=task_id,
        status=payload["status"],
        result=payload.get("result"),
        traceback=payload.get("traceback"),
        children=children if isinstance(children, list) else [],
        date_done=payload.get("date_done"),
        parent_id=payload.get("parent_id"),
        group_id=payload.get("group_id"),
    )


def now_iso() -> str:
    """The current UTC time as Celery writes ``date_done``."""
    return dt.datetime.now(dt.timezone.utc).isoformat()


__all__ = [
    "FAILURE",
    "PENDING",
    "READY_STATES",
    "RETRY",
    "REVOKED",
    "STARTED",
    "SUCCESS",
    "MessageError",
    "ResultMessage",
    "SerializationError",
    "TaskMessage",
    "WireMessage",
    "decode_result",
    "decode_task",
    "encode_result",
    "encode_task",
]
