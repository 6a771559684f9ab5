"""Protocol v2 against real Celery 5.7 messages: every captured task message and rpc reply decodes to the
right fields and re-encodes to what Celery itself sends (headers, properties, body bytes).

Fixtures: ``shared/fixtures/celery-v2`` (see its README); loaded by ``fixtures_celery``.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import json
import os
import reprlib
import socket
from typing import Any

import pytest
from fixtures_celery import (
    fixture_names,
    fixtures_dir,
    load,
    record_body,
    reply_records,
    task_records,
    wire_from_record,
)

from amqtask import protocol, serializers
from amqtask.errors import ContentDisallowedError, RemoteTaskError
from amqtask.failures import decode_exception, encode_exception
from amqtask.protocol import TaskMessage, WireMessage, decode_result, decode_task, encode_result, encode_task
from amqtask.serializers import JSON, MSGPACK, Codec, DecodeLimits

UTC = dt.timezone.utc
ACCEPT = frozenset({"json", "msgpack"})
LIMITS = DecodeLimits()
CODECS = {"application/json": JSON, "application/x-msgpack": MSGPACK}

#: The 19 headers Celery 5.7 always sends, in its order (README, "Headers").
PROTOCOL_HEADERS = [
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries", "timelimit",
    "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result", "replaced_task_nesting",
    "stamped_headers", "stamps",
]  # fmt: skip

#: Fixture files with no task message at all (the chord refused by the rpc backend publishes nothing).
NO_TASK_MESSAGES = {"canvas_chord_rpc_error.json"}

ALL_TASK_FILES = fixture_names("task_*.json", "canvas_*.json", "result_*.json")
TASK_FILES = [name for name in ALL_TASK_FILES if name not in NO_TASK_MESSAGES]
RESULT_FILES = fixture_names("result_*.json")
REPLY_FILES = [name for name in RESULT_FILES if name != "result_ignore_result.json"]

#: Every file the README lists that carries task messages or replies; a missing one fails loudly.
EXPECTED_FILES = {
    "task_add_json.json", "task_add_msgpack.json", "task_noop_no_args.json", "task_kwargs.json",
    "task_send_task_by_name.json", "task_countdown.json", "task_eta_utc.json", "task_eta_naive.json",
    "task_countdown_tz_berlin.json", "task_expires.json", "task_priority.json",
    "task_queue_high_priority.json", "task_ignore_result.json", "task_time_limits.json",
    "task_link_callbacks.json", "task_custom_headers.json", "task_value_types.json", "canvas_chain.json",
    "canvas_chain3.json", "canvas_group.json", "canvas_chord.json", "result_client_add_success.json",
    "result_success.json", "result_failure.json", "result_failure_custom_exception.json",
    "result_retry.json", "result_ignore_result.json", "result_chain.json", "result_started_success.json",
    "result_started_failure.json",
}  # fmt: skip


def _aware(value: str | None) -> dt.datetime | None:
    """What an ISO header means: naive values are UTC (Celery's default ``enable_utc``)."""
    if value is None:
        return None
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _codec(record: dict[str, Any]) -> Codec:
    return CODECS[record["properties"]["content_type"]]


def _expected_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The TaskMessage fields a record must decode to, read straight from the fixture's JSON."""
    props = record["properties"]
    headers = props["headers"]
    args, kwargs, embed = record["body_decoded"]
    hard, soft = headers["timelimit"]
    return {
        "task": headers["task"],
        "id": headers["id"],
        "args": args,
        "kwargs": kwargs,
        "eta": _aware(headers["eta"]),
        "expires": _aware(headers["expires"]),
        "retries": headers["retries"],
        "root_id": headers["root_id"],
        "parent_id": headers["parent_id"],
        "group": headers["group"],
        "group_index": headers["group_index"],
        "time_limit": hard,
        "soft_time_limit": soft,
        "ignore_result": headers["ignore_result"],
        "origin": headers["origin"],
        "shadow": headers["shadow"],
        "reply_to": props["reply_to"],
        "priority": props.get("priority"),
        "callbacks": embed["callbacks"],
        "errbacks": embed["errbacks"],
        "chain": embed["chain"],
        "chord": embed["chord"],
        "stamps": headers["stamps"],
        "replaced_task_nesting": headers["replaced_task_nesting"],
        "extra_headers": {k: v for k, v in headers.items() if k not in PROTOCOL_HEADERS},
        "argsrepr": headers["argsrepr"],
        "kwargsrepr": headers["kwargsrepr"],
        "serializer": record["body_decoded_as"],
    }


def _decode(record: dict[str, Any]) -> TaskMessage:
    return decode_task(wire_from_record(record), ACCEPT, LIMITS)


def _records(name: str) -> list[dict[str, Any]]:
    records = task_records(load(name))
    assert records, f"{name}: no task message found in the fixture"
    return records


def _record(name: str, index: int) -> dict[str, Any]:
    return _records(name)[index]


# ------------------------------------------------------------------------------------------ the fixture set


def test_every_documented_fixture_is_present() -> None:
    present = {p.name for p in fixtures_dir().glob("*.json")}
    assert present >= EXPECTED_FILES, f"missing fixtures: {sorted(EXPECTED_FILES - present)}"


# --------------------------------------------------------------------------------------------- task decode


@pytest.mark.parametrize("name", TASK_FILES)
def test_task_messages_decode_every_field(name: str) -> None:
    for i, record in enumerate(_records(name)):
        msg = _decode(record)
        expected = _expected_fields(record)
        for field_name, value in expected.items():
            got = getattr(msg, field_name)
            assert got == value, f"{name}[{i}].{field_name}: {got!r} != {value!r}"
            assert type(got) is type(value), f"{name}[{i}].{field_name}: type {type(got).__name__}"
        for moment in (msg.eta, msg.expires):
            assert moment is None or moment.utcoffset() is not None, "datetimes must be aware"
        assert set(dataclasses.asdict(msg)) == set(expected), "a TaskMessage field is not checked here"


@pytest.mark.parametrize(
    ("name", "index", "field_name", "expected"),
    [
        pytest.param("task_add_json.json", 0, "args", [4, 4], id="add-args"),
        pytest.param("task_add_msgpack.json", 0, "args", [4, 4], id="msgpack-args"),
        pytest.param("task_noop_no_args.json", 0, "args", [], id="noop-args"),
        pytest.param("task_noop_no_args.json", 0, "argsrepr", "()", id="noop-argsrepr"),
        pytest.param("task_kwargs.json", 0, "kwargs", {"y": 4}, id="kwargs"),
        pytest.param("task_kwargs.json", 0, "argsrepr", "(3,)", id="kwargs-argsrepr"),
        pytest.param("task_kwargs.json", 0, "kwargsrepr", "{'y': 4}", id="kwargs-kwargsrepr"),
        pytest.param("task_send_task_by_name.json", 0, "ignore_result", None, id="send_task-ignore-null"),
        pytest.param("task_ignore_result.json", 0, "ignore_result", True, id="ignore-result-true"),
        pytest.param("task_add_json.json", 0, "ignore_result", False, id="ignore-result-false"),
        pytest.param(
            "task_countdown.json",
            0,
            "eta",
            dt.datetime(2026, 11, 21, 19, 55, 22, 470927, UTC),
            id="countdown-eta",
        ),
        pytest.param(
            "task_eta_utc.json",
            0,
            "eta",
            dt.datetime(2026, 11, 21, 20, 4, 22, 981544, UTC),
            id="eta-utc",
        ),
        pytest.param(
            "task_eta_naive.json",
            0,
            "eta",
            dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
            id="eta-naive",
        ),
        pytest.param(
            "task_countdown_tz_berlin.json",
            0,
            "eta",
            dt.datetime(2026, 11, 21, 19, 55, 24, 7453, UTC),
            id="eta-berlin",
        ),
        pytest.param(
            "task_expires.json",
            0,
            "expires",
            dt.datetime(2026, 11, 21, 19, 54, 54, 521911, UTC),
            id="expires",
        ),
        pytest.param("task_time_limits.json", 0, "time_limit", 30, id="hard-limit-first"),
        pytest.param("task_time_limits.json", 0, "soft_time_limit", 20, id="soft-limit-second"),
        pytest.param("task_priority.json", 0, "priority", 5, id="priority-5"),
        pytest.param("task_add_json.json", 0, "priority", 0, id="priority-default-route"),
        pytest.param("task_queue_high_priority.json", 0, "priority", None, id="priority-absent"),
        pytest.param(
            "task_custom_headers.json",
            0,
            "extra_headers",
            {"x-custom": "hello", "x-num": 7},
            id="custom-headers",
        ),
        pytest.param("task_add_json.json", 0, "extra_headers", {}, id="no-custom-headers"),
        pytest.param("task_add_json.json", 0, "origin", "gen17094@vm", id="origin"),
        pytest.param(
            "task_add_json.json",
            0,
            "reply_to",
            "075e8095-6dd4-3205-bb26-127c13a48af7",
            id="reply-to",
        ),
        pytest.param(
            "task_value_types.json",
            0,
            "args",
            [[1, 2.5, None, True, "h\u00e9llo \u2603", {"k": [1, "two"]}, 2**40]],
            id="value-types",
        ),
        pytest.param(
            "task_value_types.json",
            0,
            "argsrepr",
            "([1, 2.5, None, True, 'h\u00e9llo \u2603', {'k': [...]}, 1099511627776],)",
            id="value-types-argsrepr",
        ),
        pytest.param("canvas_group.json", 0, "group_index", 0, id="group-index-0"),
        pytest.param("canvas_group.json", 1, "group_index", 1, id="group-index-1"),
        pytest.param("canvas_group.json", 1, "group", "647795ab-79bb-44b3-9e05-ad6aa12605bd", id="group-id"),
        pytest.param("canvas_chord.json", 1, "group_index", 1, id="chord-header-index"),
        pytest.param("result_retry.json", 2, "retries", 1, id="retry-republish-retries"),
        pytest.param(
            "result_retry.json",
            2,
            "parent_id",
            "169e46d6-6069-4bca-a84c-798aca1e6ee1",
            id="retry-parent-is-self",
        ),
        pytest.param(
            "result_retry.json",
            2,
            "eta",
            dt.datetime(2026, 11, 21, 19, 54, 49, 534291, UTC),
            id="retry-eta",
        ),
        pytest.param("result_chain.json", 2, "args", [8, 2], id="chain-step-args"),
        pytest.param("result_chain.json", 2, "chain", [], id="chain-step-empty-chain"),
        pytest.param(
            "result_chain.json",
            2,
            "root_id",
            "a0cf6615-ef9c-48a6-ae82-e9d6340639bf",
            id="chain-step-root",
        ),
    ],
)
def test_decoded_values_match_the_call(name: str, index: int, field_name: str, expected: Any) -> None:
    got = getattr(_decode(_record(name, index)), field_name)
    assert got == expected
    assert type(got) is type(expected)


def test_berlin_eta_keeps_its_offset() -> None:
    eta = _decode(_record("task_countdown_tz_berlin.json", 0)).eta
    assert eta is not None and eta.utcoffset() == dt.timedelta(hours=1)


def test_link_callbacks_and_errbacks_are_signatures() -> None:
    msg = _decode(_record("task_link_callbacks.json", 0))
    assert msg.callbacks == [
        {
            "task": "tasks.mul",
            "args": [3],
            "kwargs": {},
            "options": {},
            "subtask_type": None,
            "immutable": False,
        }
    ]
    assert msg.errbacks == [
        {
            "task": "tasks.noop",
            "args": [],
            "kwargs": {},
            "options": {},
            "subtask_type": None,
            "immutable": True,
        }
    ]
    assert msg.chain is None and msg.chord is None


def test_chain_is_kept_in_reverse_order() -> None:
    msg = _decode(_record("canvas_chain3.json", 0))
    assert msg.chain is not None
    assert [(sig["task"], sig["args"]) for sig in msg.chain] == [("tasks.add", [10]), ("tasks.mul", [2])]
    assert msg.chain[-1]["options"]["task_id"] == "eb6ae48b-92bb-4311-a420-0191defd6805"


def test_chord_header_messages_carry_the_body_signature() -> None:
    first, second = (_decode(r) for r in _records("canvas_chord.json"))
    assert first.group == second.group == "36d21279-d7d5-448b-bc46-e878f7029f12"
    assert (first.group_index, second.group_index) == (0, 1)
    assert first.chord == second.chord
    assert first.chord is not None and first.chord["task"] == "tasks.tsum"
    assert first.chord["options"]["group_id"] == first.group


def test_decode_refuses_a_content_type_outside_accept() -> None:
    wire = wire_from_record(_record("task_add_json.json", 0))
    with pytest.raises(ContentDisallowedError, match="application/json"):
        decode_task(wire, frozenset({"msgpack"}), LIMITS)


# ------------------------------------------------------------------------------------------- task encode


def _expected_headers(fixture_headers: dict[str, Any]) -> dict[str, Any]:
    expected = dict(fixture_headers)
    for key in ("eta", "expires"):
        value = expected[key]
        if value is not None and dt.datetime.fromisoformat(value).tzinfo is None:
            # A naive time is taken as UTC and re-sent with its offset (same instant for Celery).
            expected[key] = value + "+00:00"
    return expected


@pytest.mark.parametrize("name", TASK_FILES)
def test_task_messages_reencode_to_celerys_headers(name: str) -> None:
    for i, record in enumerate(_records(name)):
        fixture_headers = record["properties"]["headers"]
        wire = encode_task(_decode(record), _codec(record))
        assert list(wire.headers)[: len(PROTOCOL_HEADERS)] == PROTOCOL_HEADERS, f"{name}[{i}]"
        assert wire.headers == _expected_headers(fixture_headers), f"{name}[{i}]"
        if next(iter(fixture_headers)) == "lang":  # Celery's own order (tap copies have sorted headers)
            assert list(wire.headers) == list(fixture_headers), f"{name}[{i}]"


@pytest.mark.parametrize("name", TASK_FILES)
def test_task_messages_reencode_to_celerys_properties(name: str) -> None:
    for i, record in enumerate(_records(name)):
        props = record["properties"]
        wire = encode_task(_decode(record), _codec(record))
        assert wire.content_type == props["content_type"], f"{name}[{i}]"
        assert wire.content_encoding == props["content_encoding"], f"{name}[{i}]"
        assert wire.delivery_mode == props["delivery_mode"] == 2, f"{name}[{i}]"
        assert wire.correlation_id == props["correlation_id"] == props["headers"]["id"], f"{name}[{i}]"
        assert wire.reply_to == props["reply_to"], f"{name}[{i}]"
        assert wire.priority == props.get("priority"), f"{name}[{i}]"


@pytest.mark.parametrize("name", TASK_FILES)
def test_task_messages_reencode_to_celerys_body_bytes(name: str) -> None:
    for i, record in enumerate(_records(name)):
        codec = _codec(record)
        wire = encode_task(_decode(record), codec)
        assert serializers.decode(wire.body, wire.content_type, ACCEPT, LIMITS) == record["body_decoded"]
        # json.dumps defaults (", " / ": ", \uXXXX escapes) and msgpack's packb: byte for byte.
        assert wire.body == record_body(record), f"{name}[{i}] ({codec.name})"


@pytest.mark.parametrize("name", TASK_FILES)
def test_task_messages_survive_a_decode_encode_decode_cycle_in_both_codecs(name: str) -> None:
    for i, record in enumerate(_records(name)):
        msg = _decode(record)
        for codec in (JSON, MSGPACK):
            again = decode_task(encode_task(msg, codec), ACCEPT, LIMITS)
            assert again == msg, f"{name}[{i}] via {codec.name}"


@pytest.mark.parametrize("name", TASK_FILES)
def test_argsrepr_computed_when_sending_matches_celerys(name: str) -> None:
    for i, record in enumerate(_records(name)):
        headers = record["properties"]["headers"]
        msg = dataclasses.replace(_decode(record), argsrepr=None, kwargsrepr=None)
        wire = encode_task(msg, _codec(record))
        assert wire.headers["argsrepr"] == headers["argsrepr"], f"{name}[{i}]"
        assert wire.headers["kwargsrepr"] == headers["kwargsrepr"], f"{name}[{i}]"


def test_naive_eta_is_resent_as_utc() -> None:
    wire = encode_task(_decode(_record("task_eta_naive.json", 0)), JSON)
    assert wire.headers["eta"] == "2030-01-02T03:04:05+00:00"


def test_berlin_eta_is_resent_with_its_offset() -> None:
    wire = encode_task(_decode(_record("task_countdown_tz_berlin.json", 0)), JSON)
    assert wire.headers["eta"] == "2026-11-21T20:55:24.007453+01:00"


def test_time_limits_are_sent_hard_first() -> None:
    msg = TaskMessage(task="tasks.add", id="i", time_limit=30, soft_time_limit=20)
    assert encode_task(msg, JSON).headers["timelimit"] == [30, 20]


def test_a_new_message_gets_celerys_defaults() -> None:
    msg = TaskMessage(task="tasks.add", id="abc", args=[1, 2])
    wire = encode_task(msg, JSON)
    assert wire.headers["root_id"] == "abc"
    assert wire.headers["origin"] == f"gen{os.getpid()}@{socket.gethostname()}"
    assert wire.headers["argsrepr"] == "(1, 2)" and wire.headers["kwargsrepr"] == "{}"
    assert wire.headers["stamps"] == {} and wire.headers["stamped_headers"] is None
    assert wire.headers["lang"] == "py" and wire.headers["retries"] == 0
    assert wire.body == b'[[1, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    assert (wire.delivery_mode, wire.correlation_id) == (2, "abc")


# ----------------------------------------------------------------------------------------------- replies


def _reply_wire_and_body(record: dict[str, Any]) -> tuple[WireMessage, dict[str, Any]]:
    return wire_from_record(record), record["body_decoded"]


@pytest.mark.parametrize("name", REPLY_FILES)
def test_replies_decode(name: str) -> None:
    replies = reply_records(load(name))
    assert replies, f"{name}: no reply in the fixture"
    for i, record in enumerate(replies):
        wire, body = _reply_wire_and_body(record)
        res = decode_result(wire, ACCEPT, LIMITS)
        assert res.task_id == body["task_id"] == record["properties"]["correlation_id"], f"{name}[{i}]"
        assert res.status == body["status"], f"{name}[{i}]"
        assert res.result == body["result"], f"{name}[{i}]"
        assert res.traceback == body["traceback"], f"{name}[{i}]"
        assert res.children == body["children"], f"{name}[{i}]"
        assert res.date_done == body["date_done"], f"{name}[{i}]"
        assert res.parent_id == body.get("parent_id"), f"{name}[{i}]"
        assert res.group_id == body.get("group_id"), f"{name}[{i}]"


@pytest.mark.parametrize("persistent", [False, True], ids=["transient", "persistent"])
@pytest.mark.parametrize("name", REPLY_FILES)
def test_replies_reencode_like_celery(name: str, persistent: bool) -> None:
    for i, record in enumerate(reply_records(load(name))):
        wire, body = _reply_wire_and_body(record)
        out = encode_result(decode_result(wire, ACCEPT, LIMITS), JSON, persistent=persistent)
        assert list(json.loads(out.body)) == list(body), f"{name}[{i}]: key order"
        assert out.body == record_body(record), f"{name}[{i}]: body bytes"
        assert (out.content_type, out.content_encoding) == ("application/json", "utf-8")
        assert out.headers == {}
        assert out.correlation_id == record["properties"]["correlation_id"]
        assert out.reply_to is None
        assert out.priority == record["properties"]["priority"] == 0
        # Celery sends replies with delivery_mode 1; amqtask's result_persistent picks.
        assert record["properties"]["delivery_mode"] == 1
        assert out.delivery_mode == (2 if persistent else 1)


@pytest.mark.parametrize("name", REPLY_FILES)
def test_replies_survive_msgpack(name: str) -> None:
    for record in reply_records(load(name)):
        res = decode_result(wire_from_record(record), ACCEPT, LIMITS)
        out = encode_result(res, MSGPACK)
        assert out.content_type == "application/x-msgpack"
        assert decode_result(out, ACCEPT, LIMITS) == res


def test_reply_key_order_with_group_and_parent() -> None:
    res = protocol.ResultMessage(task_id="t", status="SUCCESS", result=1, parent_id="p", group_id="g")
    body = json.loads(encode_result(res, JSON).body)
    assert list(body) == [
        "status",
        "result",
        "traceback",
        "children",
        "date_done",
        "group_id",
        "parent_id",
        "task_id",
    ]


# ---------------------------------------------------------------------------------------------- failures


def _exception_replies() -> list[Any]:
    params = []
    for name in REPLY_FILES:
        for i, record in enumerate(reply_records(load(name)) if not name.startswith("<") else []):
            if record["body_decoded"]["status"] in ("FAILURE", "RETRY"):
                params.append(pytest.param(name, i, id=f"{name[:-5]}[{i}]"))
    return params or [pytest.param("<none>", 0, id="no-exception-replies")]


@pytest.mark.parametrize(("name", "index"), _exception_replies())
def test_exception_replies_decode_to_named_exceptions(name: str, index: int) -> None:
    body = reply_records(load(name))[index]["body_decoded"]
    value = body["result"]
    exc = decode_exception(value, body["traceback"])
    assert isinstance(exc, RemoteTaskError)
    assert type(exc).__name__ == value["exc_type"]
    assert exc.args == tuple(value["exc_message"])
    assert exc.remote_traceback == body["traceback"]
    assert exc.exc_module == value["exc_module"]
    if value["exc_module"] == "builtins":
        assert isinstance(exc, getattr(builtins, value["exc_type"]))


def _failure_reply(name: str) -> dict[str, Any]:
    records = reply_records(load(name))
    (failure,) = [r["body_decoded"] for r in records if r["body_decoded"]["status"] == "FAILURE"]
    return failure


def test_celery_value_error_is_caught_as_value_error() -> None:
    body = _failure_reply("result_failure.json")
    exc = decode_exception(body["result"], body["traceback"])
    assert type(exc).__name__ == "ValueError"
    assert isinstance(exc, ValueError)
    assert str(exc) == "something bad happened"
    assert exc.remote_traceback == body["traceback"]
    assert exc.remote_traceback.endswith("ValueError: something bad happened\n")
    with pytest.raises(ValueError, match="something bad happened"):
        raise exc


def test_celery_custom_exception_keeps_its_name_module_and_args() -> None:
    body = _failure_reply("result_failure_custom_exception.json")
    exc = decode_exception(body["result"], body["traceback"])
    assert type(exc).__name__ == "CwCustomError"
    assert exc.args == ("bad thing", 42)
    assert exc.exc_module == "tasks"
    assert not isinstance(exc, ValueError)
    assert exc.remote_traceback == body["traceback"]


@pytest.mark.parametrize(
    ("name", "exc"),
    [
        ("result_failure.json", ValueError("something bad happened")),
        ("result_started_failure.json", ValueError("boom")),
    ],
)
def test_amqtask_encodes_exceptions_like_celery(name: str, exc: BaseException) -> None:
    assert encode_exception(exc) == _failure_reply(name)["result"]


@pytest.mark.parametrize(
    "value",
    [(1,), (), [], {}, ("a" * 30,), (1.5, None, True, "x"), (10**38,), (10**39,), (10**45,), ("é",), ("\x00",),
     ("a'b\"c",), [1, 2, 3], (float("nan"),), {"b": 1, "a": 2}, ((1,),), ("x" * 2000,), tuple(range(100))],
)  # fmt: skip
def test_argsrepr_reads_as_celery_bounds_it_whatever_the_arguments(value: object) -> None:
    # Celery bounds argsrepr with reprlib; amqtask's quicker path for short plain arguments must not differ.
    celery_like = reprlib.Repr()
    celery_like.maxlevel, celery_like.maxstring, celery_like.maxother = 3, 1024, 1024
    celery_like.maxlist = celery_like.maxtuple = celery_like.maxdict = 64
    assert protocol.short_repr(value) == celery_like.repr(value)
