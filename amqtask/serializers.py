"""Body codecs (msgpack, JSON), the ``accept_content`` allowlist and the decoder's limits.

Never pickle: only data that both codecs can carry travels. Values that JSON and msgpack lack
(datetimes, UUIDs, decimals, sets) are turned into strings or lists on the way out, like Celery's
JSON encoder does, so a Celery peer reads the same values.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import ConfigurationError, ContentDisallowedError, SerializationError

JSON_CONTENT_TYPE = "application/json"
MSGPACK_CONTENT_TYPE = "application/x-msgpack"


def _to_plain(value: Any) -> Any:
    """Turn the few non-native types task arguments commonly hold into plain data."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    raise TypeError(f"Object of type {type(value).__name__} cannot be serialized")


def _json_dumps(obj: Any) -> bytes:
    # Python's json defaults (", " / ": " separators, ASCII escapes) are what Celery sends.
    return json.dumps(obj, default=_to_plain).encode("utf-8")


def _json_loads(data: bytes) -> Any:
    return json.loads(data)


def _msgpack_dumps(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_to_plain, use_bin_type=True, datetime=False)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Codec:
    """One body encoding: its name in settings, its AMQP content type and encoding."""

    name: str
    content_type: str
    content_encoding: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what a consumer agrees to decode, so a hostile message cannot exhaust it.

    ``max_items`` bounds the decoded values (containers, their members and scalars alike): each
    costs at most ~90 bytes of Python objects (an empty list is 56 and the pointer to it 8) while it
    may take a single byte on the wire, so this, not the body size, bounds a decode's memory.
    """

    max_bytes: int = 16 * 1024 * 1024
    max_depth: int = 64
    max_items: int = 1024 * 1024


def limits_of(conf: Any) -> DecodeLimits:
    """The limits the ``message_max_*`` settings give task and result consumers."""
    return DecodeLimits(conf.message_max_bytes, conf.message_max_depth, conf.message_max_items)


#: Remote-control requests and replies are short commands: their consumers accept no more.
CONTROL_LIMITS = DecodeLimits(max_bytes=1024 * 1024, max_depth=16, max_items=64 * 1024)


def _msgpack_loads(data: bytes) -> Any:
    # msgpack caps every container and string at the body's own length, so a short body cannot
    # claim a huge allocation; the body's values are counted against the limits before this.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


JSON = Codec("json", JSON_CONTENT_TYPE, "utf-8", _json_dumps, _json_loads)
MSGPACK = Codec("msgpack", MSGPACK_CONTENT_TYPE, "binary", _msgpack_dumps, _msgpack_loads)

CODECS: dict[str, Codec] = {JSON.name: JSON, MSGPACK.name: MSGPACK}
_BY_CONTENT_TYPE: dict[str, Codec] = {c.content_type: c for c in CODECS.values()}
# Celery accepts these aliases in accept_content; so do we.
_ALIASES = {JSON_CONTENT_TYPE: "json", MSGPACK_CONTENT_TYPE: "msgpack", "application/msgpack": "msgpack"}


def codec(name: str) -> Codec:
    """The codec called ``name`` (``json`` or ``msgpack``)."""
    try:
        return CODECS[name]
    except KeyError:
        raise ConfigurationError(f"unknown serializer {name!r}; choose one of {sorted(CODECS)}") from None


def normalize_accept(names: Iterable[str]) -> frozenset[str]:
    """Map ``accept_content`` entries (names or content types) to codec names, rejecting unknown ones."""
    accepted = set()
    for entry in names:
        name = _ALIASES.get(entry, entry)
        if name not in CODECS:
            raise ConfigurationError(f"accept_content: unknown content {entry!r}; choose from {sorted(CODECS)}")
        accepted.add(name)
    return frozenset(accepted)


class _LimitExceeded(Exception):
    """A body went past a :class:`DecodeLimits` bound while it was being checked."""


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


_MSGPACK_ARRAYS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
_MSGPACK_MAPS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def _check_msgpack(body: bytes, limits: DecodeLimits) -> None:
    """Walk the headers of a msgpack body, building nothing, and stop at the first value past a limit."""
    unpacker = msgpack.Unpacker(
        raw=False,
        max_buffer_size=len(body),
        max_array_len=limits.max_items,
        max_map_len=limits.max_items,
    )
    unpacker.feed(body)
    remaining = [1]  # values still to read at each open nesting level; the root is level one
    items = 0
    while remaining:
        if not remaining[-1]:
            remaining.pop()
            continue
        remaining[-1] -= 1
        items += 1
        if items > limits.max_items:
            raise _LimitExceeded(f"holds more than {limits.max_items} values")
        if len(remaining) > limits.max_depth:
            raise _LimitExceeded(f"nests deeper than the limit of {limits.max_depth}")
        if unpacker.tell() >= len(body):
            raise ValueError("Unpack failed: incomplete input")
        head = body[unpacker.tell()]
        if head in _MSGPACK_ARRAYS:
            remaining.append(unpacker.read_array_header())
        elif head in _MSGPACK_MAPS:
            remaining.append(2 * unpacker.read_map_header())
        else:
            unpacker.skip()


# A JSON string, escapes included; unrolled so that it never backtracks.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _json_items(text: bytes) -> int:
    # Every value but the first follows a "," or ":", or opens what a "[" or "{" holds: an upper
    # bound of the values outside strings, exact when the text has no whitespace and no empty "[]"/"{}".
    return sum(text.count(mark) for mark in (b",", b":", b"[", b"{")) + 1


def _check_json(body: bytes, limits: DecodeLimits) -> None:
    """Bound a JSON body's values before it is parsed: a count over the raw bytes, exact once strings are blanked."""
    if _json_items(body) <= limits.max_items:
        return
    bare = _JSON_STRING.sub(b'""', body).translate(None, b" \t\n\r")
    if _json_items(bare) - bare.count(b"[]") - bare.count(b"{}") > limits.max_items:
        raise _LimitExceeded(f"holds more than {limits.max_items} values")


def _check_items(found: Codec, body: bytes, limits: DecodeLimits) -> bool:
    """Check a body's values against the limits before decoding it; True when its depth was checked too.

    Every value takes at least one byte, so a body no longer than ``max_items`` needs no count.
    """
    if len(body) <= limits.max_items:
        return False
    if found is MSGPACK:
        _check_msgpack(body, limits)
        return True
    _check_json(body, limits)
    return False


def for_content_type(content_type: str | None) -> Codec | None:
    """The codec of an AMQP ``content_type`` (or an alias of it), None when amqtask has none for it."""
    if not content_type:
        return None
    return _BY_CONTENT_TYPE.get(content_type) or CODECS.get(_ALIASES.get(content_type, ""))


def decode(body: bytes, content_type: str | None, accept: frozenset[str], limits: DecodeLimits) -> Any:
    """Decode a message body, enforcing the allowlist, the size limit and the nesting limit."""
    found = for_content_type(content_type)
    if found is None or found.name not in accept:
        raise ContentDisallowedError(
            f"content type {content_type!r} is not accepted (accept_content={sorted(accept)})", body
        )
    if len(body) > limits.max_bytes:
        raise SerializationError(f"body of {len(body)} bytes exceeds the limit of {limits.max_bytes}", body)
    try:
        depth_checked = _check_items(found, body, limits)
        value = found.loads(body)
    except _LimitExceeded as exc:
        raise SerializationError(f"{found.name} body {exc}", body) from None
    except RecursionError:
        raise SerializationError(f"{found.name} body nests deeper than the limit of {limits.max_depth}", body) from None
    except Exception as exc:
        raise SerializationError(f"cannot decode {found.name} body: {exc}", body) from exc
    # Each level of nesting takes at least one byte: a body no longer than the limit needs no walk.
    if not depth_checked and len(body) > limits.max_depth and _depth_exceeds(value, limits.max_depth):
        raise SerializationError(f"{found.name} body nests deeper than the limit of {limits.max_depth}", body)
    return value


def encode(value: Any, serializer: Codec) -> bytes:
    """Encode ``value`` with ``serializer``, raising :class:`SerializationError` for unsupported values."""
    try:
        return serializer.dumps(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"cannot encode value as {serializer.name}: {exc}") from exc
