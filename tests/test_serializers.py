"""Body codecs: JSON/msgpack round trips, Celery's JSON bytes, the accept list and the decoder's limits,
plus property tests that no input makes the decoders raise anything but amqtask's own errors."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from fixtures_celery import load, record_body
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from amqtask import serializers
from amqtask.errors import ConfigurationError, ContentDisallowedError, MessageError, SerializationError
from amqtask.protocol import WireMessage, decode_task, encode_task
from amqtask.serializers import JSON, MSGPACK, Codec, DecodeLimits, decode, encode

BOTH = frozenset({"json", "msgpack"})
LIMITS = DecodeLimits()
CODECS = [pytest.param(JSON, id="json"), pytest.param(MSGPACK, id="msgpack")]
PROPERTY = hsettings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _strict(value: Any) -> Any:
    """``value`` with every scalar tagged by its type, so ``1 == 1.0 == True`` cannot hide a change."""
    if isinstance(value, list):
        return ["list", [_strict(v) for v in value]]
    if isinstance(value, dict):
        return ["dict", {k: _strict(v) for k, v in value.items()}]
    return [type(value).__name__, value]


def _roundtrip(value: Any, codec: Codec, limits: DecodeLimits = LIMITS) -> Any:
    return decode(encode(value, codec), codec.content_type, BOTH, limits)


def _nested_list(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# ----------------------------------------------------------------------------------------------- values


def _value_types_args() -> list[Any]:
    (record,) = load("task_value_types.json")["messages"]
    args: list[Any] = record["body_decoded"][0]
    return args


@pytest.mark.parametrize("codec", CODECS)
def test_celery_value_types_round_trip(codec: Codec) -> None:
    value = _value_types_args()
    assert value == [[1, 2.5, None, True, "h\u00e9llo \u2603", {"k": [1, "two"]}, 2**40]]
    back = _roundtrip(value, codec)
    assert _strict(back) == _strict(value)
    assert type(back[0][1]) is float and type(back[0][3]) is bool and back[0][6] == 1099511627776


def test_json_body_is_byte_for_byte_celerys() -> None:
    (record,) = load("task_value_types.json")["messages"]
    body = encode(record["body_decoded"], JSON)
    assert body == record_body(record)
    assert b"h\\u00e9llo \\u2603" in body  # ASCII escapes, as json.dumps writes them


def test_msgpack_body_is_byte_for_byte_celerys() -> None:
    (record,) = load("task_add_msgpack.json")["messages"]
    assert encode(record["body_decoded"], MSGPACK) == record_body(record)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.datetime(2030, 1, 2, 3, 4, 5, 6, dt.timezone.utc), "2030-01-02T03:04:05.000006+00:00"),
        (dt.datetime(2030, 1, 2, 3, 4, 5), "2030-01-02T03:04:05"),
        (dt.date(2030, 1, 2), "2030-01-02"),
        (dt.time(3, 4, 5), "03:04:05"),
        (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
        (decimal.Decimal("1.10"), "1.10"),
        ((1, 2), [1, 2]),
        (frozenset({3}), [3]),
    ],
    ids=["aware-datetime", "naive-datetime", "date", "time", "uuid", "decimal", "tuple", "frozenset"],
)
def test_non_native_values_are_sent_as_plain_data(codec: Codec, value: Any, expected: Any) -> None:
    assert _roundtrip({"v": value}, codec) == {"v": expected}


@pytest.mark.parametrize("codec", CODECS)
def test_unserializable_values_raise_serialization_error(codec: Codec) -> None:
    with pytest.raises(SerializationError, match="object"):
        encode({"v": object()}, codec)


# -------------------------------------------------------------------------------------- accept and limits


@pytest.mark.parametrize(
    ("content_type", "accept"),
    [
        ("application/json", frozenset({"msgpack"})),
        ("application/x-msgpack", frozenset({"json"})),
        ("application/x-python-serialize", BOTH),
        ("application/yaml", BOTH),
    ],
    ids=["json-not-accepted", "msgpack-not-accepted", "pickle", "yaml"],
)
def test_decode_refuses_content_types_outside_accept(content_type: str, accept: frozenset[str]) -> None:
    body = b"\x80\x04K\x01."
    with pytest.raises(ContentDisallowedError) as info:
        decode(body, content_type, accept, LIMITS)
    assert content_type in str(info.value)
    assert isinstance(info.value, SerializationError) and info.value.body == body


def test_decode_refuses_a_message_without_content_type() -> None:
    with pytest.raises(ContentDisallowedError):
        decode(b"[]", None, BOTH, LIMITS)


def test_decode_accepts_the_msgpack_alias_content_type() -> None:
    assert decode(msgpack.packb([1]), "application/msgpack", BOTH, LIMITS) == [1]


@pytest.mark.parametrize("codec", CODECS)
def test_decode_enforces_max_bytes(codec: Codec) -> None:
    body = encode("x" * 200, codec)
    assert decode(body, codec.content_type, BOTH, DecodeLimits(max_bytes=len(body))) == "x" * 200
    with pytest.raises(SerializationError, match=str(len(body) - 1)) as info:
        decode(body, codec.content_type, BOTH, DecodeLimits(max_bytes=len(body) - 1))
    assert info.value.body == body


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("max_items", [LIMITS.max_items, 16], ids=["after-decoding", "while-counting"])
def test_decode_enforces_max_depth(codec: Codec, max_items: int) -> None:
    # The long leaf makes each body longer than 16 bytes: with 16 values allowed, msgpack bodies are
    # checked while their values are counted, before anything is built.
    limits = DecodeLimits(max_depth=5, max_items=max_items)
    leaf = "x" * 40
    assert _roundtrip([[[leaf]]], codec, limits) == [[[leaf]]]
    for value in ([[[[[[leaf]]]]]], {"a": {"b": {"c": {"d": {"e": leaf}}}}}):
        with pytest.raises(SerializationError, match="deeper than the limit of 5"):
            _roundtrip(value, codec, limits)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda n: list(range(n - 1)), id="flat-list"),
        pytest.param(lambda n: [[] for _ in range(n - 1)], id="empty-lists"),
        pytest.param(lambda n: [{} for _ in range(n - 1)], id="empty-maps"),
        pytest.param(lambda n: {str(i): None for i in range((n - 1) // 2)}, id="map-keys-and-values"),
        pytest.param(lambda n: [[["ab"] for _ in range((n - 2) // 2)]], id="nested"),
    ],
)
def test_decode_bounds_the_number_of_values_a_body_holds(codec: Codec, make: Callable[[int], Any]) -> None:
    # Every container, key and scalar is a value: 1,000 of them fit, one more is refused before any is built.
    limits = DecodeLimits(max_items=1000)
    value = make(1000)
    assert _roundtrip(value, codec, limits) == value
    wrapped = [value, 1] if not isinstance(value, dict) else {**value, "extra": None}
    with pytest.raises(SerializationError, match="more than 1000 values") as info:
        _roundtrip(wrapped, codec, limits)
    assert len(info.value.body) > 0


def test_json_strings_full_of_separators_are_not_counted_as_values() -> None:
    # The quick count over raw bytes sees 4,000 marks; blanking the strings shows 3 values.
    value = ["a,b:c[d{" * 1000, {"k": '\\"[,]"'}]
    assert _roundtrip(value, JSON, DecodeLimits(max_items=10)) == value


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"[" + b"[]," * 1_100_000 + b"[]]"),
        ("application/json", b"[" + b"{}," * 1_100_000 + b"{}]"),
        ("application/x-msgpack", b"\xdd" + (1_200_000).to_bytes(4, "big") + b"\x90" * 1_200_000),
        ("application/x-msgpack", b"\xdd" + (1_100_000).to_bytes(4, "big") + b"\xa2ab" * 1_100_000),
    ],
    ids=["json-empty-lists", "json-empty-objects", "msgpack-empty-arrays", "msgpack-short-strings"],
)
def test_a_memory_bomb_is_refused_by_the_default_limits(content_type: str, body: bytes) -> None:
    # Each of these values costs ~60-90 bytes of Python objects for 1-3 bytes of body.
    with pytest.raises(SerializationError, match=f"more than {LIMITS.max_items} values") as info:
        decode(body, content_type, BOTH, LIMITS)
    assert info.value.body == body


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"[" * 100_000 + b"]" * 100_000),
        ("application/json", b'{"a": ' * 100_000 + b"1" + b"}" * 100_000),
        ("application/x-msgpack", b"\x91" * 100_000 + b"\xc0"),
        ("application/x-msgpack", b"\x81\xa1a" * 100_000 + b"\xc0"),
    ],
    ids=["json-arrays", "json-objects", "msgpack-arrays", "msgpack-maps"],
)
def test_a_100k_deep_nest_is_a_serialization_error_not_a_crash(content_type: str, body: bytes) -> None:
    with pytest.raises(SerializationError) as info:
        decode(body, content_type, BOTH, LIMITS)
    assert info.value.body == body


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("cut", [1, 5, 20])
def test_a_truncated_body_is_a_serialization_error_keeping_the_body(codec: Codec, cut: int) -> None:
    body = encode([[1, "two", 3.0], {"k": "v" * 10}, {"chain": None}], codec)[:-cut]
    with pytest.raises(SerializationError, match=codec.name) as info:
        decode(body, codec.content_type, BOTH, LIMITS)
    assert info.value.body == body


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"\xff\xfe[]"),
        ("application/json", b"[1] [2]"),
        ("application/x-msgpack", b"\x91\x01\x01"),
        ("application/x-msgpack", b"\xc1"),
        ("application/json", b""),
        ("application/x-msgpack", b""),
    ],
    ids=[
        "json-bad-utf8",
        "json-extra-data",
        "msgpack-extra-data",
        "msgpack-reserved-byte",
        "json-empty",
        "msgpack-empty",
    ],
)
def test_garbage_is_a_serialization_error(content_type: str, body: bytes) -> None:
    with pytest.raises(SerializationError) as info:
        decode(body, content_type, BOTH, LIMITS)
    assert info.value.body == body


def test_codec_names_and_accept_aliases() -> None:
    assert serializers.codec("json") is JSON and serializers.codec("msgpack") is MSGPACK
    assert serializers.normalize_accept(["application/json", "application/x-msgpack"]) == BOTH
    assert serializers.normalize_accept(["json"]) == frozenset({"json"})
    with pytest.raises(ConfigurationError, match="pickle"):
        serializers.codec("pickle")
    with pytest.raises(ConfigurationError, match="pickle"):
        serializers.normalize_accept(["json", "pickle"])


# ------------------------------------------------------------------------------------------ property tests


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    _containers,
    max_leaves=25,
)


@PROPERTY
@given(value=json_values)
def test_encode_decode_is_identity_for_json(value: Any) -> None:
    assert _strict(_roundtrip(value, JSON, DecodeLimits(max_depth=1000))) == _strict(value)


@PROPERTY
@given(value=json_values)
def test_encode_decode_is_identity_for_msgpack(value: Any) -> None:
    assert _strict(_roundtrip(value, MSGPACK, DecodeLimits(max_depth=1000))) == _strict(value)


content_types = st.sampled_from(["application/json", "application/x-msgpack"])


@PROPERTY
@given(body=st.binary(max_size=256), content_type=content_types, max_items=st.sampled_from([4, LIMITS.max_items]))
def test_arbitrary_bytes_decode_or_raise_serialization_error(body: bytes, content_type: str, max_items: int) -> None:
    # With 4 values allowed, most bodies are longer than that and are counted before decoding.
    try:
        decode(body, content_type, BOTH, DecodeLimits(max_depth=8, max_items=max_items))
    except SerializationError as exc:
        assert exc.body == body


@PROPERTY
@given(value=json_values, max_items=st.integers(1, 40))
def test_the_value_count_never_refuses_a_body_within_the_limit(value: Any, max_items: int) -> None:
    """Counting before decoding agrees with the decoded value: refused exactly when it holds too many."""
    count = _values(value)
    for codec in (JSON, MSGPACK):
        limits = DecodeLimits(max_depth=1000, max_items=max_items)
        body = encode(value, codec)
        if count <= max_items:
            assert _strict(decode(body, codec.content_type, BOTH, limits)) == _strict(value)
        elif len(body) > max_items:  # a body no longer than the limit cannot hold more values than bytes
            with pytest.raises(SerializationError, match=f"more than {max_items} values"):
                decode(body, codec.content_type, BOTH, limits)


def _values(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(_values(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(1 + _values(v) for v in value.values())
    return 1


PROTOCOL_HEADERS = [
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries", "timelimit",
    "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result", "replaced_task_nesting",
    "stamped_headers", "stamps",
]  # fmt: skip
header_values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=10)
    | st.sampled_from(["2030-01-02T03:04:05", "2030-01-02T03:04:05+01:00", "2030-13-45", "Z", ""])
    | st.lists(st.none() | st.integers() | st.floats() | st.text(max_size=3), max_size=3)
    | st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=4), max_size=3)
)
headers_tables = st.builds(
    lambda valid, extra: {**valid, **extra},
    st.fixed_dictionaries({"task": st.just("tasks.add"), "id": st.just("i-1")}),
    st.dictionaries(st.sampled_from(PROTOCOL_HEADERS) | st.text(max_size=8), header_values, max_size=10),
)
embeds = json_values | st.dictionaries(
    st.sampled_from(["callbacks", "errbacks", "chain", "chord"]),
    json_values | st.lists(st.dictionaries(st.text(max_size=4), json_values, max_size=2), max_size=2),
)
well_shaped_bodies = st.tuples(
    st.lists(json_values, max_size=3), st.dictionaries(st.text(max_size=4), json_values, max_size=3), embeds
).map(list)
any_bodies = st.one_of(
    st.binary(max_size=128),
    json_values.map(lambda v: encode(v, JSON)),
    json_values.map(lambda v: encode(v, MSGPACK)),
    st.tuples(json_values, json_values, embeds).map(lambda t: encode(list(t), JSON)),
    st.tuples(json_values, json_values, embeds).map(lambda t: encode(list(t), MSGPACK)),
)


def _decode_task_or_message_error(wire: WireMessage, codec: Codec) -> None:
    try:
        msg = decode_task(wire, BOTH, DecodeLimits(max_depth=16))
    except (MessageError, SerializationError):
        return
    # What decodes can be sent on again (a retry republishes it), or is refused as unserializable.
    with contextlib.suppress(SerializationError):
        encode_task(msg, codec)


@PROPERTY
@given(headers=headers_tables, body=well_shaped_bodies, codec=st.sampled_from([JSON, MSGPACK]))
def test_decode_task_with_arbitrary_headers_raises_only_amqtask_errors(
    headers: dict[str, Any], body: list[Any], codec: Codec
) -> None:
    wire = WireMessage(body=encode(body, codec), content_type=codec.content_type, headers=headers)
    _decode_task_or_message_error(wire, codec)


@PROPERTY
@given(
    body=any_bodies,
    content_type=st.sampled_from([None, "text/plain", "application/json", "application/x-msgpack"]),
    codec=st.sampled_from([JSON, MSGPACK]),
)
def test_decode_task_with_arbitrary_bodies_raises_only_amqtask_errors(
    body: bytes, content_type: str | None, codec: Codec
) -> None:
    headers = {"task": "tasks.add", "id": "i-1"}
    _decode_task_or_message_error(WireMessage(body=body, content_type=content_type, headers=headers), codec)
