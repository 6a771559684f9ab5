"""Canvas without a broker: signatures, how canvases become messages, and the wire form against Celery 5.7.

The fixture tests build the same canvas Celery built (``shared/fixtures/celery-v2``), encode it, and
compare it with Celery's message field by field: properties, all headers and the body. Ids differ
from run to run, so both sides have their UUIDs replaced by ``<id0>``, ``<id1>``... in order of first
appearance: the same id must sit in the same places. The reply queue and ``origin`` are the process's
own, so they are compared as placeholders too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fixtures_celery import load, published_task_record, task_records, wire_from_record

from amqtask import App, GroupResult, Signature, chain, chord, group, protocol, serializers, signature
from amqtask.canvas import Send, chord_size, follow_up, prepare, task_signatures
from amqtask.errors import ConfigurationError, MessageError, MisuseError
from amqtask.serializers import DecodeLimits

ACCEPT = frozenset({"json", "msgpack"})
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
HEADERS = [
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries", "timelimit",
    "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result", "replaced_task_nesting",
    "stamped_headers", "stamps",
]  # fmt: skip
PROPERTIES = ["content_type", "content_encoding", "delivery_mode", "priority", "correlation_id", "reply_to"]


@pytest.fixture
def app() -> Iterator[App]:
    """An app configured like the fixture's Celery app (json, queue ``celery``, default priority 0)."""
    application = App("fixture", broker="amqp://guest:guest@127.0.0.1:1//", task_serializer="json",
                      task_default_queue="celery", task_default_priority=0)  # fmt: skip

    @application.task(name="tasks.add")
    def add(x: int, y: int) -> int:
        return x + y

    @application.task(name="tasks.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @application.task(name="tasks.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @application.task(name="tasks.noop")
    def noop(*args: Any) -> None:
        return None

    yield application
    application.close()


def sig(app: App, name: str, *args: Any, **kwargs: Any) -> Signature:
    return app.tasks[f"tasks.{name}"].s(*args, **kwargs)


def encoded(app: App, sends: list[Send]) -> list[dict[str, Any]]:
    """The messages ``sends`` become, in the layout of a fixture record (properties, headers, body)."""
    records = []
    for send in sends:
        message, _route, codec = app.build_message(send.task, send.args, send.kwargs, app.tasks.get(send.task),
                                                   send.options)  # fmt: skip
        wire = protocol.encode_task(message, serializers.codec(codec))
        records.append({"wire": wire, "body": json.loads(wire.body)})
    return records


def canonical(messages: list[dict[str, Any]], reply_to: str | None) -> Any:
    """Messages as one JSON document with the reply queue, ``origin`` and every UUID replaced by placeholders."""
    doc = []
    for message in messages:
        props, headers = message["properties"], message["properties"]["headers"]
        doc.append({
            "properties": {name: props.get(name) for name in PROPERTIES},
            "headers": {name: ("<origin>" if name == "origin" else headers[name]) for name in HEADERS},
            "extra_headers": sorted(set(headers) - set(HEADERS)),
            "body": message["body_decoded"],
        })  # fmt: skip
    text = json.dumps(doc)
    if reply_to:
        text = text.replace(json.dumps(reply_to), '"<reply>"')
    ids: dict[str, str] = {}
    return json.loads(UUID.sub(lambda m: ids.setdefault(m.group(0), f"<id{len(ids)}>"), text))


def ours(app: App, sends: list[Send], reply_to: str | None = None) -> Any:
    records = [{"properties": {**vars(r["wire"]), "headers": r["wire"].headers}, "body_decoded": r["body"]}
               for r in encoded(app, sends)]  # fmt: skip
    return canonical(records, reply_to or app.reply_queue)


def celery(name: str) -> Any:
    records = task_records(load(name))
    return canonical(records, records[0]["properties"]["reply_to"])


# ---------------------------------------------------------------------------------------------- fixtures


def test_chain_is_one_message_with_the_next_step_in_embed_chain(app: App) -> None:
    sends, result = prepare(sig(app, "add", 4, 4) | sig(app, "mul", 2))

    assert ours(app, sends) == celery("canvas_chain.json")
    assert result.id == sends[0].options["chain"][0]["options"]["task_id"]
    assert result.parent is not None and result.parent.id == sends[0].id


def test_three_step_chain_travels_reversed(app: App) -> None:
    sends, result = prepare(sig(app, "add", 1, 1) | sig(app, "mul", 2) | sig(app, "add", 10))

    assert ours(app, sends) == celery("canvas_chain3.json")
    assert [step["task"] for step in sends[0].options["chain"]] == ["tasks.add", "tasks.mul"]
    assert result.id == sends[0].options["chain"][0]["options"]["task_id"]


def test_chain_bytes_equal_celerys_once_ids_are_replaced(app: App) -> None:
    sends, _ = prepare(sig(app, "add", 1, 1) | sig(app, "mul", 2) | sig(app, "add", 10))
    fixture = task_records(load("canvas_chain3.json"))[0]
    body = encoded(app, sends)[0]["wire"].body.decode()
    ids: dict[str, str] = {}

    def normal(text: str, reply_to: str) -> str:
        return UUID.sub(lambda m: ids.setdefault(m.group(0), f"<id{len(ids)}>"), text.replace(reply_to, "<reply>"))

    expected = normal(json.dumps(fixture["body_decoded"]), fixture["properties"]["reply_to"])
    ids.clear()
    assert normal(body, app.reply_queue) == expected


def test_group_is_one_message_per_member_with_group_and_index(app: App) -> None:
    sends, result = prepare(group(sig(app, "add", 1, 1), sig(app, "add", 2, 2)))

    assert ours(app, sends) == celery("canvas_group.json")
    assert isinstance(result, GroupResult)
    assert [r.id for r in result.results] == [s.id for s in sends]
    assert {s.options["group_id"] for s in sends} == {result.id}


def test_chord_members_carry_the_body_and_amqtask_adds_chord_size(app: App) -> None:
    sends, result = prepare(chord([sig(app, "add", 1, 1), sig(app, "add", 2, 2)], sig(app, "tsum")))
    for send in sends:  # chord_size is the one key amqtask adds (Celery's backends read it too)
        body = send.options["chord"]
        assert body["chord_size"] == 2
        send.options["chord"] = {key: value for key, value in body.items() if key != "chord_size"}

    assert ours(app, sends) == celery("canvas_chord.json")
    assert result.id == sends[0].options["chord"]["options"]["task_id"]
    assert isinstance(result.parent, GroupResult) and result.parent.id == sends[0].options["group_id"]
    assert [r.id for r in result.parent.results] == [s.id for s in sends]


@pytest.mark.parametrize("path", ["task", "signature"])
def test_link_and_link_error_fill_callbacks_and_errbacks_unfrozen(app: App, path: str) -> None:
    options = {"link": sig(app, "mul", 3), "link_error": app.tasks["tasks.noop"].si()}
    if path == "task":
        message, _, codec = app.build_message("tasks.add", (1, 1), {}, app.tasks["tasks.add"], options)
        wire = protocol.encode_task(message, serializers.codec(codec))
        records = [{"properties": {**vars(wire), "headers": wire.headers}, "body_decoded": json.loads(wire.body)}]
        mine = canonical(records, app.reply_queue)
    else:
        sends, _ = prepare(sig(app, "add", 1, 1), **options)
        mine = ours(app, sends)

    assert mine == celery("task_link_callbacks.json")


def test_worker_publishes_the_next_chain_step_as_celery_does(app: App) -> None:
    """``result_chain``: add(4, 4) finished with 8; the next message is Celery's mul message exactly."""
    data = load("result_chain.json")
    first, celery_step = published_task_record(data["published_task"]), data["task_messages_seen_on_tap"][1]
    msg = protocol.decode_task(wire_from_record(first), ACCEPT, DecodeLimits())
    rest = list(msg.chain or [])

    sends = follow_up(app, rest.pop(), [8], reply_to=msg.reply_to, parent_id=msg.id, root_id=msg.root_id, rest=rest)

    assert ours(app, sends, msg.reply_to) == canonical([celery_step], msg.reply_to)
    assert sends[0].args == [8, 2] and sends[0].options["chain"] == []


def test_follow_ups_keep_the_encoding_of_the_message_that_triggered_them(app: App) -> None:
    own = sig(app, "add", 1).set(serializer="msgpack")
    steps = [dict(own), dict(sig(app, "mul", 2))]

    sends = follow_up(app, steps.pop(), [1], reply_to="r", parent_id="p", root_id="p", rest=steps,
                      serializer="json")  # fmt: skip
    assert sends[0].options["serializer"] == "json"
    assert sends[0].options["chain"] == [dict(own)]  # later steps decide when their turn comes
    sends = follow_up(app, own, [1], reply_to="r", parent_id="p", root_id="p", serializer="json")
    assert sends[0].options["serializer"] == "msgpack"


# ---------------------------------------------------------------------------------------------- signatures


def test_partial_arguments_merge_like_celery(app: App) -> None:
    partial = sig(app, "add", 2, y=3)

    assert partial.clone((1,), {"z": 4}).args == (1, 2)
    assert partial.clone((1,), {"z": 4}).kwargs == {"y": 3, "z": 4}
    assert partial.clone((1,), {"y": 9}).kwargs == {"y": 9}
    frozen = app.tasks["tasks.add"].si(2, 3)
    assert frozen.clone((1,), {"z": 4}).args == (2, 3) and frozen.clone((1,)).kwargs == {}
    assert sig(app, "add", 2)(3) == 5


def test_signature_is_its_wire_dict(app: App) -> None:
    partial = sig(app, "add", 2).set(queue="q1", countdown=5, priority=7)

    assert dict(partial) == {"task": "tasks.add", "args": [2], "kwargs": {}, "subtask_type": None,
                             "options": {"queue": "q1", "countdown": 5, "priority": 7}, "immutable": False}  # fmt: skip
    assert app.tasks["tasks.add"].si(1, 2)["immutable"] is True
    assert signature(dict(partial)) == partial
    assert repr(partial) == "tasks.add(2)" and repr(app.tasks["tasks.add"].si(1)) == "%tasks.add(1)"


def test_unknown_option_is_refused_when_set(app: App) -> None:
    with pytest.raises(ConfigurationError, match="qeue"):
        sig(app, "add", 1).set(qeue="x")


def test_pipe_builds_flat_chains_and_a_group_piped_into_a_task_is_a_chord(app: App) -> None:
    a, b, c = sig(app, "add", 1), sig(app, "mul", 2), sig(app, "tsum")

    assert isinstance(a | b | c, chain) and (a | b | c).tasks == [a, b, c]
    assert isinstance(group(a, b) | c, chord)
    assert ((a | b) | (b | c)).tasks == [a, b, b, c]
    assert (chord([a], c) | b).tasks[1] == b


def test_signatures_from_celery_round_trip(app: App) -> None:
    for name in ("canvas_chain3.json", "canvas_chord.json"):
        embed = task_records(load(name))[0]["body_decoded"][2]
        for value in [*(embed["chain"] or []), *([embed["chord"]] if embed["chord"] else [])]:
            assert dict(signature(value, app)) == value
    assert dict(signature(CELERY_CHORD_STEP, app)) == CELERY_CHORD_STEP


def test_freeze_assigns_ids_that_the_send_keeps(app: App) -> None:
    step = sig(app, "add", 1)
    result = step.freeze()
    sends, again = prepare(step, (1,))

    assert step.id == result.id == again.id == sends[0].id
    canvas = chord([sig(app, "add", 1, 1)], sig(app, "tsum"))
    body = canvas.freeze()
    sends, again = prepare(canvas)
    assert again.id == body.id and sends[0].options["group_id"] == body.parent.id  # type: ignore[union-attr]


def test_chain_options_reach_the_steps_as_documented(app: App) -> None:
    callback, errback = sig(app, "noop"), app.tasks["tasks.noop"].si()
    canvas = chain(sig(app, "add", 1, 1), sig(app, "mul", 2)).set(queue="hp", countdown=5, link=callback,
                                                                   link_error=errback, task_id="last")  # fmt: skip
    sends, result = prepare(canvas)
    first, second = sends[0].options, sends[0].options["chain"][0]["options"]

    assert first["queue"] == second["queue"] == "hp"
    assert first["countdown"] == 5 and "countdown" not in second
    assert "link" not in first and second["link"] == [dict(callback)]
    assert first["link_error"] == second["link_error"] == [errback]
    assert second["task_id"] == result.id == "last"


def test_group_and_chord_options_reach_members_and_body(app: App) -> None:
    sends, result = prepare(group(sig(app, "add", 1, 1), sig(app, "add", 2, 2).set(queue="own")), queue="g",
                            countdown=3)  # fmt: skip
    assert [s.options["queue"] for s in sends] == ["g", "own"] and all(s.options["countdown"] == 3 for s in sends)

    sends, result = prepare(chord([sig(app, "add", 1, 1)], sig(app, "tsum")), queue="c", task_id="body")
    assert sends[0].options["queue"] == "c" and sends[0].options["chord"]["options"]["queue"] == "c"
    assert result.id == "body" == sends[0].options["chord"]["options"]["task_id"]


def test_partial_arguments_of_a_send_reach_first_steps_and_every_member(app: App) -> None:
    sends, _ = prepare(sig(app, "add", 1) | sig(app, "mul", 2), (5,))
    assert sends[0].args == [5, 1] and sends[0].options["chain"][0]["args"] == [2]

    sends, _ = prepare(group(sig(app, "add", 1), app.tasks["tasks.add"].si(7, 7)), (5,))
    assert [s.args for s in sends] == [[5, 1], [7, 7]]


def test_group_inside_a_chain_becomes_a_chord_step(app: App) -> None:
    sends, result = prepare(sig(app, "add", 1, 1) | group(sig(app, "add", 1), sig(app, "add", 2)) | sig(app, "tsum"))
    (step,) = sends[0].options["chain"]

    assert step["subtask_type"] == "chord"
    assert [m["options"]["group_index"] for m in step["kwargs"]["header"]["kwargs"]["tasks"]] == [0, 1]
    assert step["kwargs"]["body"]["options"]["task_id"] == result.id
    assert isinstance(result.parent, GroupResult) and result.parent.parent is not None
    assert result.parent.parent.id == sends[0].id


def test_chain_ending_in_a_group_returns_a_group_result(app: App) -> None:
    sends, result = prepare(sig(app, "add", 1, 1) | group(sig(app, "add", 1), sig(app, "add", 2)))

    assert isinstance(result, GroupResult) and len(result) == 2
    assert sends[0].options["chain"][0]["options"]["task_id"] == result.id


def test_chain_member_of_a_chord_carries_the_chord_on_its_last_step(app: App) -> None:
    sends, _ = prepare(chord([sig(app, "add", 1, 1) | sig(app, "mul", 2), sig(app, "add", 3, 3)], sig(app, "tsum")))
    first, second = sends

    assert first.options.get("chord") is None and "group_id" not in first.options
    last_step = first.options["chain"][0]["options"]
    assert last_step["group_index"] == 0 and last_step["chord"]["chord_size"] == 2
    assert last_step["group_id"] == second.options["group_id"] and second.options["group_index"] == 1


def test_a_chain_member_that_ends_in_a_group_is_refused(app: App) -> None:
    with pytest.raises(MisuseError, match="cannot end with a group"):
        prepare(group(sig(app, "add", 1, 1) | group(sig(app, "add", 1)), sig(app, "add", 2, 2)))


def test_empty_chain_and_chord_without_body_are_refused(app: App) -> None:
    with pytest.raises(MisuseError, match="empty chain"):
        prepare(chain(app=app))
    with pytest.raises(MisuseError, match="needs a body"):
        prepare(chord([sig(app, "add", 1, 1)]))


def test_empty_chord_header_sends_the_body_with_an_empty_list(app: App) -> None:
    sends, result = prepare(chord([], sig(app, "tsum")))

    assert [(s.task, s.args, s.id) for s in sends] == [("tasks.tsum", [[]], result.id)]


#: What Celery 5.7 embedded for ``add.s(1, 1) | group(add.s(1), add.s(2)) | tsum.s()`` (captured).
CELERY_CHORD_STEP: dict[str, Any] = {
    "task": "celery.chord", "args": [], "subtask_type": "chord", "immutable": False,
    "options": {"task_id": "af4df162-c766-4fc7-836b-ed9aefcb5479"},
    "kwargs": {
        "kwargs": {},
        "header": {
            "task": "celery.group", "args": [], "subtask_type": "group", "immutable": False,
            "options": {"task_id": "af4df162-c766-4fc7-836b-ed9aefcb5479", "root_id": None, "parent_id": None},
            "kwargs": {"tasks": [
                {"task": "tasks.add", "args": [1], "kwargs": {}, "subtask_type": None, "immutable": False,
                 "options": {"task_id": "51b60cde-af31-4f73-9957-aa7bb9e58726", "reply_to": "r", "group_index": 0}},
                {"task": "tasks.add", "args": [2], "kwargs": {}, "subtask_type": None, "immutable": False,
                 "options": {"task_id": "bce4f924-8aad-48ec-908c-ec534b571b12", "reply_to": "r", "group_index": 1}},
            ]},
        },
        "body": {"task": "tasks.tsum", "args": [], "kwargs": {}, "subtask_type": None, "immutable": False,
                 "options": {"task_id": "a41349b6-5157-45b1-84c0-f2441b4807a7", "reply_to": "r"}},
    },
}  # fmt: skip


def test_worker_applies_a_chord_step_celery_embedded(app: App) -> None:
    sends = follow_up(app, CELERY_CHORD_STEP, [2], reply_to="r", parent_id="p", root_id="root", rest=[])

    assert [(s.task, s.args, s.id) for s in sends] == [
        ("tasks.add", [2, 1], "51b60cde-af31-4f73-9957-aa7bb9e58726"),
        ("tasks.add", [2, 2], "bce4f924-8aad-48ec-908c-ec534b571b12"),
    ]
    for index, send in enumerate(sends):
        assert send.options["group_id"] == "af4df162-c766-4fc7-836b-ed9aefcb5479"
        assert send.options["group_index"] == index
        assert send.options["parent_id"] == "p" and send.options["root_id"] == "root"
        body = send.options["chord"]
        assert body["options"]["task_id"] == "a41349b6-5157-45b1-84c0-f2441b4807a7" and body["chord_size"] == 2
        assert body["options"]["chain"] == []


def test_task_signatures_finds_every_task_that_would_report(app: App) -> None:
    ids = [s.id for s in task_signatures(CELERY_CHORD_STEP)]

    assert ids == ["51b60cde-af31-4f73-9957-aa7bb9e58726", "bce4f924-8aad-48ec-908c-ec534b571b12",
                   "a41349b6-5157-45b1-84c0-f2441b4807a7"]  # fmt: skip


def test_chord_size_must_be_there() -> None:
    assert chord_size({"chord_size": 3}) == 3
    with pytest.raises(MessageError, match="chord_size"):
        chord_size(CELERY_CHORD_STEP["kwargs"]["body"])


@pytest.mark.parametrize("value", [[], {"task": 1}, {"task": "t", "subtask_type": "mystery"}, {"task": "t", "args": 3}])
def test_malformed_signatures_are_message_errors(value: Any) -> None:
    with pytest.raises(MessageError):
        signature(value)
