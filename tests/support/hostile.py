"""Hostile messages for the bad-input fault tests: task messages (each with the dead-letter reason a
worker must give it) and remote-control requests."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import random
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import msgpack

from amqtask import protocol, serializers
from amqtask.signing import sign

#: The task real messages run: it returns its argument.
REAL_TASK = "fault.echo"
#: A task that retries itself after the countdown it is given (up to 3 times).
RETRY_TASK = "fault.retry_in"
MAX_BYTES = 64 * 1024
MAX_ITEMS = 4096
ETA_OUT_OF_RANGE = "eta-out-of-range"


_ids = itertools.count()


def _valid(task: str = REAL_TASK, args: list[Any] | None = None, codec: str = "msgpack") -> protocol.WireMessage:
    message = protocol.TaskMessage(task=task, id=f"fuzz-{next(_ids)}", args=args if args is not None else [1])
    return protocol.encode_task(message, serializers.codec(codec))


def _random_body(rng: random.Random, size: int) -> bytes:
    # Never a msgpack fixarray of 3 or a JSON array: random bytes must not happen to be a real task.
    body = bytes(rng.getrandbits(8) for _ in range(size))
    return body if body[:1] not in (b"\x93", b"[", b" ") else b"\xc1" + body


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


class Hostile:
    """Generators of hostile messages; each returns the wire message and the reason expected for it."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def kinds(self) -> list[Callable[[], tuple[protocol.WireMessage, str]]]:
        return [
            self.random_msgpack, self.random_json, self.truncated_msgpack, self.truncated_json,
            self.wrong_header_type, self.missing_headers, self.unknown_task, self.bad_dates,
            self.too_deep, self.too_big, self.wrong_content_type, self.wrong_body_shape,
            self.bad_time_limit, self.wrong_arity, self.undecodable_task_name, self.bad_reply_to,
            self.huge_headers, self.msgpack_bomb, self.json_bomb, self.far_future_eta, self.huge_retries,
            self.retry_with_huge_countdown,
        ]  # fmt: skip

    def random_msgpack(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        wire.body = _random_body(self.rng, self.rng.randint(0, 300))
        return wire, "malformed"

    def random_json(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid(codec="json")
        wire.body = _random_body(self.rng, self.rng.randint(0, 300))
        return wire, "malformed"

    def truncated_msgpack(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid(args=["x" * self.rng.randint(1, 100), {"k": [1, 2, 3]}])
        wire.body = wire.body[: self.rng.randint(0, len(wire.body) - 1)]
        return wire, "malformed"

    def truncated_json(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid(args=["x" * self.rng.randint(1, 100), {"k": [1, 2, 3]}], codec="json")
        wire.body = wire.body[: self.rng.randint(0, len(wire.body) - 1)]
        return wire, "malformed"

    def wrong_header_type(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        header, value = self.rng.choice([
            ("task", 123), ("task", [REAL_TASK]), ("id", 7), ("id", {"a": 1}), ("retries", "3"),
            ("retries", 1.5), ("group_index", "x"), ("root_id", 5), ("parent_id", [1]), ("argsrepr", 1),
            ("origin", {"x": 1}), ("shadow", 2), ("replaced_task_nesting", "deep"), ("eta", 1700000000),
            ("expires", [2026]), ("group", 3.5),
        ])  # fmt: skip
        wire.headers[header] = value
        return wire, "malformed"

    def missing_headers(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        choice = self.rng.randrange(3)
        if choice == 0:
            wire.headers = {}
        else:
            del wire.headers["task" if choice == 1 else "id"]
        return wire, "malformed"

    def unknown_task(self) -> tuple[protocol.WireMessage, str]:
        return _valid(task=f"fuzz.nope.{self.rng.randrange(10**6)}"), "unknown-task"

    def bad_dates(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        value = self.rng.choice(["not a date", "2026-13-45T00:00:00", "", "tomorrow", "2026-02-30", "1e9", "Z"])
        wire.headers[self.rng.choice(["eta", "expires"])] = value
        return wire, "malformed"

    def too_deep(self) -> tuple[protocol.WireMessage, str]:
        codec = self.rng.choice(["msgpack", "json"])
        if self.rng.random() < 0.5:
            return _valid(args=[_nested(self.rng.randint(70, 500))], codec=codec), "malformed"
        # Deeper than Python's recursion limit, in few bytes: each level is one byte.
        wire = _valid(codec=codec)
        depth = self.rng.randint(2_000, 20_000)
        wire.body = b"\x91" * depth + b"\x01" if codec == "msgpack" else b"[" * depth + b"1" + b"]" * depth
        return wire, "malformed"

    def too_big(self) -> tuple[protocol.WireMessage, str]:
        return _valid(args=["x" * (MAX_BYTES + self.rng.randint(1, 4096))]), "malformed"

    def wrong_content_type(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        wire.content_type = self.rng.choice(
            ["application/x-python-serialize", "text/plain", None, "", "application/x-yaml", "application/data"]
        )
        return wire, "malformed"

    def wrong_body_shape(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        body = self.rng.choice([
            {"task": REAL_TASK, "id": "v1", "args": [1]}, [[1], {}], [[1], {}, {}, {}], "text", 42, None,
            [1, {}, {}], [[1], [], {}], [[1], {1: 2}, {}], [[1], {}, []], [[1], {}, {"callbacks": "x"}],
            [[1], {}, {"chord": [1]}], [[1], {}, {"chain": [1, 2]}],
        ])  # fmt: skip
        wire.body = msgpack.packb(body, use_bin_type=True, strict_types=False)
        return wire, "malformed"

    def bad_time_limit(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid()
        wire.headers["timelimit"] = self.rng.choice([[1, 2, 3], ["a", None], [True, None], "10", 5, [None]])
        return wire, "malformed"

    def wrong_arity(self) -> tuple[protocol.WireMessage, str]:
        # A well-formed message for a real task with arguments it cannot take: the task fails.
        return _valid(args=self.rng.choice([[], [1, 2, 3], ["x", "y"]])), "failed"

    def undecodable_task_name(self) -> tuple[protocol.WireMessage, str]:
        # A byte-array header ('x' in AMQP tables; not UTF-8 either) where a string belongs.
        wire = _valid()
        wire.headers["task"] = bytearray(b"\xff\xfe\x00fuzz")
        return wire, "malformed"

    def bad_reply_to(self) -> tuple[protocol.WireMessage, str]:
        # An unreadable message whose caller asks for the error to be sent to nonsense addresses. (A bare
        # "amq.rabbitmq.reply-to" cannot be sent at all: the broker refuses it from a non-consumer.)
        wire = _valid()
        wire.body = b"\xc1"
        wire.reply_to = self.rng.choice(
            ["no-such-queue", "amq.rabbitmq.reply-to.bogus", "amq.rabbitmq.reply-to.g1h2AA==", " ", "x" * 255]
        )
        return wire, "malformed"

    def huge_headers(self) -> tuple[protocol.WireMessage, str]:
        # Headers of a few KiB, and one time in eight as close to RabbitMQ's frame limit (128 KiB) as a
        # publisher can send: the worker's dead-letter copy, which adds its reason, cannot keep them all.
        self.calls = getattr(self, "calls", 0) + 1
        wire = _valid()
        wire.body = b"\xc1"
        size = self.rng.randint(120_000, 130_400) if self.calls % 8 == 0 else self.rng.randint(1_000, 16_000)
        wire.headers["x-padding"] = "p" * size
        return wire, "malformed"

    def msgpack_bomb(self) -> tuple[protocol.WireMessage, str]:
        # One-byte values (empty arrays and maps, each ~60-70 bytes once decoded), more than the limit.
        wire = _valid()
        fill = self.rng.choice([b"\x90", b"\x80", b"\x91\x90"])
        count = self.rng.randint(MAX_ITEMS, (MAX_BYTES - 16) // len(fill))
        wire.body = b"\x93\xdd" + count.to_bytes(4, "big") + fill * count + b"\x80\x80"
        return wire, "malformed"

    def json_bomb(self) -> tuple[protocol.WireMessage, str]:
        wire = _valid(codec="json")
        count = self.rng.randint(MAX_ITEMS, (MAX_BYTES - 16) // 3)
        fill = self.rng.choice([b"[],", b"{},", b"0,"])
        wire.body = b"[[" + fill * count + b"0], {}, {}]"
        return wire, "malformed"

    def far_future_eta(self) -> tuple[protocol.WireMessage, str]:
        # Valid dates beyond the ~8.5 years the delay levels hold (a countdown is sent as an eta too).
        wire = _valid()
        years = self.rng.choice([9, 50, 1000])
        eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=365 * years)
        wire.headers["eta"] = self.rng.choice(["9999-12-31T23:59:59", "9999-12-31T23:59:59.999999+00:00",
                                               eta.isoformat()])  # fmt: skip
        return wire, ETA_OUT_OF_RANGE

    def huge_retries(self) -> tuple[protocol.WireMessage, str]:
        # A task that retries, told it already retried more often than it may: it fails at once.
        wire = _valid(task=RETRY_TASK, args=[0.01])
        wire.headers["retries"] = self.rng.choice([2**31, 2**63 - 1, 10**12])
        return wire, "failed"

    def retry_with_huge_countdown(self) -> tuple[protocol.WireMessage, str]:
        # The task asks to be retried further away than the delay levels hold: it fails, clearly.
        wire = _valid(task=RETRY_TASK, args=[self.rng.choice([1e10, 1e15, 10**18])])
        return wire, "failed"


def control_flood(rng: random.Random, count: int, *, regex: bool, only_regex: bool = False) -> list[aio_pika.Message]:
    """Hostile remote-control requests for the ``celery.pidbox`` fanout exchange; ``regex``: include
    backtracking pcre patterns (``only_regex``: nothing else)."""

    def request(body: Any, content_type: str = "application/json") -> aio_pika.Message:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"clock": rng.randrange(10**6), "expires": int(time.time()) + 300}
        return aio_pika.Message(data, content_type=content_type, content_encoding="utf-8", headers=headers)

    def ping(**extra: Any) -> dict[str, Any]:
        return {"method": "ping", "arguments": {}, "destination": None, "pattern": None, "matcher": None, **extra}

    def backtracking() -> aio_pika.Message:
        # (.+)+X against a 40-character node name takes hours in Python's re.
        return request(ping(pattern=rng.choice(["(.+)+X", "(.*.*)*X", "((.+)+)+X"]), matcher="pcre"))

    makers: list[Callable[[], aio_pika.Message]] = [
        lambda: request(ping(pattern="*" * rng.randint(100, 5_000) + "x", matcher="glob")),
        lambda: request(ping(pattern="[" * 1000, matcher=rng.choice(["pcre", "glob", "regex", None]))),
        lambda: request(
            ping(
                reply_to={"exchange": "reply.celery.pidbox", "routing_key": f"nobody-{rng.random()}"},
                ticket=str(rng.random()),
            )
        ),
        lambda: request({"method": rng.choice(["no_such", "__init__", "_private", ""]), "arguments": {}}),
        lambda: request(ping(destination="x" * 1000)),
        lambda: request(
            bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200))),
            rng.choice(["application/json", "application/x-msgpack", "application/x-python-serialize", "text/plain"]),
        ),
    ]
    if only_regex:
        makers = [backtracking]
    elif regex:
        makers.append(backtracking)
    return [makers[i % len(makers)]() for i in range(count)]


def _signature(task: str, task_id: str, queue: str) -> dict[str, Any]:
    """A canvas signature in Celery's wire shape."""
    return {"task": task, "args": [task_id], "kwargs": {}, "options": {"task_id": task_id, "queue": queue},
            "subtask_type": None, "immutable": True}  # fmt: skip


class Unverified:
    """Messages a worker with ``signing_keys`` must dead-letter (``rejected``) and act on in no way.

    Every follow-up they name is ``fault.record`` (which records its run in the sink) and every
    reply address is the test's probe queue, so anything they cause is seen.
    """

    #: Header fields the signature must cover, each with a value to tamper it to.
    TAMPERED_HEADERS: dict[str, Any] = {
        "task": REAL_TASK, "id": "tampered-id", "eta": "2000-01-01T00:00:00+00:00",
        "expires": "2999-01-01T00:00:00+00:00", "retries": 2, "timelimit": [1000, 900], "root_id": "other-root",
        "parent_id": "other-parent", "group": "other-group",
    }  # fmt: skip
    TAMPERED_PROPERTIES = ("body", "content_type", "content_encoding", "reply_to", "correlation_id", "priority")

    def __init__(self, rng: random.Random, key: str, queue: str, probe: str) -> None:
        self.rng, self.key, self.queue, self.probe = rng, key, queue, probe

    def kinds(self) -> list[Callable[[], tuple[protocol.WireMessage, str]]]:
        return [self.unknown_task_with_follow_ups, self.signed_with_another_key, self.tampered]

    def _recording(self, task: str = "fault.record") -> protocol.WireMessage:
        task_id = f"unverified-{next(_ids)}"
        message = protocol.TaskMessage(task=task, id=task_id, args=[7], reply_to=self.probe)
        return protocol.encode_task(message, serializers.codec(self.rng.choice(["json", "msgpack"])))

    def unknown_task_with_follow_ups(self) -> tuple[protocol.WireMessage, str]:
        # Unsigned, for a task no worker has: its errbacks, callbacks, chain and chord must not be sent.
        wire = self._recording(task=f"fault.nope.{self.rng.randrange(10**6)}")
        ids = [f"follow-up-{next(_ids)}" for _ in range(4)]
        embed = {"callbacks": [_signature("fault.record", ids[0], self.queue)],
                 "errbacks": [_signature("fault.record", ids[1], self.queue)],
                 "chain": [_signature("fault.record", ids[2], self.queue)],
                 "chord": _signature("fault.record", ids[3], self.queue)}  # fmt: skip
        wire.body = serializers.encode([[7], {}, embed], serializers.codec("msgpack"))
        wire.content_type, wire.content_encoding = serializers.MSGPACK_CONTENT_TYPE, "binary"
        return wire, "rejected"

    def signed_with_another_key(self) -> tuple[protocol.WireMessage, str]:
        wire = self._recording()
        wire.headers["x-amqtask-signature"] = sign("not-the-key", wire)
        return wire, "rejected"

    def tampered(self) -> tuple[protocol.WireMessage, str]:
        # A copy of a correctly signed message with one covered field changed after signing.
        wire = self._recording()
        wire.headers["x-amqtask-signature"] = sign(self.key, wire)
        field = self.rng.choice([*self.TAMPERED_HEADERS, *self.TAMPERED_PROPERTIES])
        if field in self.TAMPERED_HEADERS:
            wire.headers[field] = self.TAMPERED_HEADERS[field]
        elif field == "body":
            wire.body = serializers.encode([[8], {}, {}], serializers.codec("json"))
            wire.content_type, wire.content_encoding = serializers.JSON_CONTENT_TYPE, "utf-8"
        elif field == "priority":
            wire.priority = 9
        else:
            other_type = {serializers.JSON_CONTENT_TYPE: serializers.MSGPACK_CONTENT_TYPE}.get(
                wire.content_type or "", serializers.JSON_CONTENT_TYPE
            )
            forged = {"content_type": other_type, "content_encoding": "utf-16",
                      "reply_to": f"{self.probe}-elsewhere", "correlation_id": "forged"}  # fmt: skip
            setattr(wire, field, forged[field])
        return wire, "rejected"
