"""Routing without a broker: precedence of call > task > task_routes > default, route rules (exact, glob,
functions, lists), queue definitions, and the arguments, exchanges and keys queues are declared and reached
with."""

from __future__ import annotations

from typing import Any

import pytest

from amqtask.errors import ConfigurationError
from amqtask.routing import Route, Router, parse_queues
from amqtask.settings import Settings
from amqtask.topology import QueueSpec


def router(**settings: Any) -> Router:
    return Router(Settings(**settings))


def queue_of(route: Route) -> str:
    assert route.queue is not None
    return route.queue.name


def topic_matches(pattern: str, key: str) -> bool:
    """RabbitMQ topic matching: ``*`` is exactly one word, ``#`` zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


def delivered_to(spec: QueueSpec, exchange: str, routing_key: str) -> bool:
    """Whether a message published as (exchange, routing_key) lands in the queue ``spec`` declares."""
    if exchange == "":
        return routing_key == spec.name
    if exchange != spec.exchange:
        return False
    if spec.exchange_type == "fanout":
        return True
    if spec.exchange_type == "topic":
        return any(topic_matches(key, routing_key) for key in spec.bindings)
    return routing_key in spec.bindings


# -------------------------------------------------------------------------------------------- precedence

ROUTES = {"tasks.add": "from-routes"}
CALL = {"queue": "from-call"}
TASK = {"queue": "from-task"}


@pytest.mark.parametrize(
    ("call", "task", "routes", "expected"),
    [
        (CALL, TASK, None, "from-call"),
        (CALL, {}, ROUTES, "from-call"),
        (CALL, {}, None, "from-call"),
        ({}, TASK, ROUTES, "from-task"),
        ({}, TASK, None, "from-task"),
        ({}, {}, ROUTES, "from-routes"),
        ({}, {}, None, "default"),
        (CALL, TASK, ROUTES, "from-call"),
    ],
    ids=[
        "call>task", "call>routes", "call>default", "task>routes", "task>default", "routes>default",
        "default", "call>all",
    ],
)  # fmt: skip
def test_precedence(call: dict[str, Any], task: dict[str, Any], routes: Any, expected: str) -> None:
    route = router(task_routes=routes).route("tasks.add", call, task)
    assert queue_of(route) == expected
    assert (route.exchange, route.routing_key) == ("", expected)


def test_a_call_option_set_to_none_falls_through() -> None:
    r = router(task_routes=ROUTES)
    assert queue_of(r.route("tasks.add", {"queue": None, "priority": 5}, {})) == "from-routes"
    assert queue_of(r.route("tasks.add", {"queue": None}, {"queue": None})) == "from-routes"


def test_options_that_are_not_routes_do_not_decide() -> None:
    route = router().route("tasks.add", {"priority": 9, "countdown": 3}, {"max_retries": 1})
    assert queue_of(route) == "default"


def test_celery_default_layout_publishes_to_the_default_exchange() -> None:
    route = router(task_default_queue="celery").route("tasks.add", {}, {})
    assert (route.exchange, route.routing_key) == ("", "celery")
    assert route.queue == QueueSpec("celery")


def test_default_exchange_setting_routes_the_default_queue_through_it() -> None:
    route = router(task_default_exchange="tasks").route("tasks.add", {}, {})
    assert (route.exchange, route.routing_key) == ("tasks", "default")
    assert route.queue is not None and route.queue.bindings == ("default",)


def test_explicit_exchange_and_routing_key() -> None:
    route = router().route("tasks.add", {"exchange": "media", "routing_key": "media.video"}, {})
    assert (route.exchange, route.routing_key, route.queue) == ("media", "media.video", None)


def test_a_routing_key_alone_goes_to_the_queue_of_that_name() -> None:
    route = router().route("tasks.add", {"routing_key": "direct-q"}, {})
    assert (route.exchange, route.routing_key, queue_of(route)) == ("", "direct-q", "direct-q")


# ------------------------------------------------------------------------------------------- route rules


@pytest.mark.parametrize(
    ("name", "expected"),
    [("tasks.add", "glob"), ("tasks.deep.mul", "glob"), ("other.add", "default"), ("tasks", "default")],
)
def test_glob_routes(name: str, expected: str) -> None:
    assert queue_of(router(task_routes={"tasks.*": "glob"}).route(name, {}, {})) == expected


def test_exact_beats_glob_whatever_the_order() -> None:
    r = router(task_routes={"tasks.*": "glob", "tasks.add": "exact"})
    assert queue_of(r.route("tasks.add", {}, {})) == "exact"
    assert queue_of(r.route("tasks.mul", {}, {})) == "glob"


def test_first_matching_glob_wins() -> None:
    r = router(task_routes={"tasks.a*": "first", "tasks.*": "second"})
    assert queue_of(r.route("tasks.add", {}, {})) == "first"
    assert queue_of(r.route("tasks.mul", {}, {})) == "second"


def test_glob_question_mark_and_brackets() -> None:
    r = router(task_routes={"tasks.ad?": "q", "jobs.[ab]*": "b"})
    assert queue_of(r.route("tasks.add", {}, {})) == "q"
    assert queue_of(r.route("tasks.adds", {}, {})) == "default"
    assert queue_of(r.route("jobs.beta", {}, {})) == "b"


def test_a_dict_route_value_gives_queue_and_options() -> None:
    r = router(task_routes={"tasks.add": {"exchange": "media", "routing_key": "media.add"}})
    route = r.route("tasks.add", {}, {})
    assert (route.exchange, route.routing_key) == ("media", "media.add")


def test_function_route_returning_a_queue_name_a_dict_or_none() -> None:
    def by_size(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("size", 0) > 10:
            return "big"
        if name == "tasks.special":
            return {"queue": "special"}
        return None

    r = router(task_routes=by_size)
    assert queue_of(r.route("tasks.add", {}, {}, (), {"size": 11})) == "big"
    assert queue_of(r.route("tasks.special", {}, {})) == "special"
    assert queue_of(r.route("tasks.add", {}, {}, (), {"size": 1})) == "default"


def test_function_route_taking_only_the_name() -> None:
    r = router(task_routes=lambda name: "n" if name.startswith("tasks.") else None)
    assert queue_of(r.route("tasks.add", {}, {})) == "n"
    assert queue_of(r.route("other.add", {}, {})) == "default"


def test_celery_style_function_route() -> None:
    seen: list[Any] = []

    def route_task(
        name: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: Any, task: Any = None, **kw: Any
    ) -> Any:
        seen.append((name, args, kwargs, dict(options)))
        return {"queue": "video"} if name == "tasks.compress_video" else None

    r = router(task_routes=(route_task,))
    assert queue_of(r.route("tasks.compress_video", {"priority": 3}, {}, (1,), {"k": 2})) == "video"
    assert seen == [("tasks.compress_video", (1,), {"k": 2}, {"priority": 3})]
    assert queue_of(r.route("tasks.add", {}, {})) == "default"


def test_a_type_error_inside_a_route_function_is_not_swallowed() -> None:
    def broken(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise TypeError("bug in my router")

    with pytest.raises(TypeError, match="bug in my router"):
        router(task_routes=broken).route("tasks.add", {}, {})


def test_a_list_of_rules_is_tried_in_order() -> None:
    rules = [lambda name: None, {"tasks.add": "first"}, {"tasks.*": "second", "tasks.add": "never"}]
    r = router(task_routes=rules)
    assert queue_of(r.route("tasks.add", {}, {})) == "first"
    assert queue_of(r.route("tasks.mul", {}, {})) == "second"
    assert queue_of(r.route("jobs.x", {}, {})) == "default"


@pytest.mark.parametrize("routes", [[5], "tasks.add", 3.5], ids=["int-rule", "str-rule", "float"])
def test_invalid_rules_are_configuration_errors(routes: Any) -> None:
    with pytest.raises(ConfigurationError, match="task_routes"):
        router(task_routes=routes)


def test_an_invalid_route_value_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"tasks\.add"):
        router(task_routes={"tasks.add": 5}).route("tasks.add", {}, {})


# -------------------------------------------------------------------------------------------- task_queues


def test_task_queues_as_a_dict() -> None:
    r = router(task_queues={"hi": {"max_priority": 10}, "plain": None, "q": {"queue_type": "quorum"}})
    assert set(r.queues) == {"hi", "plain", "q"}
    assert r.queue("hi").max_priority == 10
    assert r.queue("plain") == QueueSpec("plain")
    assert r.queue("q").queue_type == "quorum"


def test_task_queues_as_a_list() -> None:
    r = router(task_queues=[{"name": "hi", "max_priority": 10}, QueueSpec("lo", exchange="ex")])
    assert set(r.queues) == {"hi", "lo"}
    assert r.queue("hi").max_priority == 10
    assert r.queue("lo").exchange == "ex"


def test_binding_keys_may_be_a_single_string() -> None:
    spec = parse_queues({"t": {"exchange": "ex", "exchange_type": "topic", "binding_keys": "a.#"}})["t"]
    assert spec.binding_keys == ("a.#",)


@pytest.mark.parametrize(
    ("queues", "match"),
    [
        ([{"max_priority": 10}], "name"),
        ({"q": {"max_prio": 10}}, "max_prio"),
        ({"q": 5}, "'q'"),
        ("q1,q2", "task_queues"),
    ],
    ids=["list-item-without-name", "unknown-option", "options-not-a-dict", "string"],
)
def test_invalid_task_queues(queues: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        router(task_queues=queues)


def test_an_unknown_queue_is_a_durable_classic_queue_on_the_default_exchange() -> None:
    spec = router(task_queues={"known": {"max_priority": 5}}).queue("high_priority")
    assert spec == QueueSpec("high_priority")
    assert (spec.exchange, spec.queue_type, spec.max_priority, spec.queue_arguments()) == ("", "classic", None, {})
    assert (spec.publish_exchange, spec.publish_routing_key, spec.bindings) == ("", "high_priority", ())


def test_all_queues_lists_the_default_queue_and_every_configured_one_once() -> None:
    r = router(task_default_queue="celery", task_queues={"celery": {"max_priority": 3}, "other": {}})
    assert [s.name for s in r.all_queues()] == ["celery", "other"]
    assert r.all_queues()[0].max_priority == 3
    assert [s.name for s in r.all_queues(["x", "x", "other"])] == ["x", "other"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"queue_type": "quorum", "max_priority": 10}, "max_priority"),
        ({"delivery_limit": 5}, "delivery_limit"),
        ({"queue_type": "classic", "delivery_limit": 5}, "quorum"),
        ({"max_priority": 0}, "1..255"),
        ({"max_priority": 256}, "1..255"),
        ({"queue_type": "stream"}, "queue_type"),
        ({"exchange_type": "x-delayed"}, "exchange_type"),
    ],
    ids=["quorum+priority", "delivery-limit-classic", "delivery-limit-explicit-classic", "priority-0",
         "priority-256", "stream", "exchange-type"],
)  # fmt: skip
def test_invalid_queue_definitions_name_the_queue(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        router(task_queues={"jobs": options})
    assert "'jobs'" in str(info.value)


@pytest.mark.parametrize("name", ["", "amq.mine"])
def test_reserved_or_empty_queue_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError):
        QueueSpec(name)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        ({"queue": "bad!name"}, r"queue name 'bad!name' holds '!'"),
        ({"queue": "q" * 252}, r"queue name 'q{60}'\.\.\. is 252 bytes long; AMQP allows at most 251 \(leaving room"),
        ({"queue": "\u00e9" * 126}, r"is 252 bytes long"),
        ({"queue": "tab\there"}, r"holds '\\t'"),
        ({"queue": 5}, r"queue name must be a string, got 5"),
        ({"exchange": "ex/ok but *", "routing_key": "k"}, r"exchange name 'ex/ok but \*' holds '\*'"),
        ({"exchange": "x" * 256, "routing_key": "k"}, r"exchange name 'x{60}'\.\.\. is 256 bytes long"),
        ({"exchange": "amq.topic", "routing_key": "k" * 256}, r"routing key 'k{60}'\.\.\. is 256 bytes long"),
        ({"routing_key": "\ud800"}, r"routing key '\\ud800' is not valid UTF-8"),
    ],
    ids=["char", "too-long-for-its-dlq", "utf8-bytes", "control-char", "not-a-string", "exchange-char",
         "exchange-long", "routing-key-long", "surrogate"],
)  # fmt: skip
def test_names_the_broker_cannot_take_are_configuration_errors_naming_them(call: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        router().route("tasks.add", call, {})


@pytest.mark.parametrize("name", ["with space", "a-b_c.d:e@f#g,h/i+j", "q" * 251, "celery"])
def test_names_with_the_characters_celery_users_use_are_taken(name: str) -> None:
    assert router().route("tasks.add", {"queue": name}, {}).routing_key == name


def test_a_configured_queue_with_a_bad_exchange_or_binding_key_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"exchange name 'ex\$' holds '\$'"):
        router(task_queues={"q": {"exchange": "ex$"}})
    with pytest.raises(ConfigurationError, match=r"routing key 'k{60}'\.\.\. is 300 bytes long"):
        router(task_queues={"q": {"exchange": "ex", "binding_keys": ["k" * 300]}})


# -------------------------------------------------------------------------------------- queue arguments


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (QueueSpec("q", dead_letter=True), {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "q.dlq"}),
        (QueueSpec("q"), {}),
        (QueueSpec("q", dead_letter=False), {}),
        (QueueSpec("q", max_priority=10, dead_letter=False), {"x-max-priority": 10}),
        (
            QueueSpec("q", queue_type="quorum", delivery_limit=5),
            {
                "x-queue-type": "quorum",
                "x-delivery-limit": 5,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "q.dlq",
            },
        ),
        (
            QueueSpec("q", queue_type="quorum", delivery_limit=5, dead_letter=False),
            {
                "x-queue-type": "quorum",
                "x-delivery-limit": 5,
            },
        ),
        (
            QueueSpec("q", queue_type="quorum"),
            {"x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "q.dlq"},
        ),
        (
            QueueSpec("q", dead_letter=False, arguments={"x-message-ttl": 60000, "x-max-priority": 4}),
            {"x-message-ttl": 60000, "x-max-priority": 4},
        ),
    ],
    ids=[
        "classic-dlq",
        "plain",
        "plain-explicit",
        "priority",
        "quorum-limit-dlq",
        "quorum-limit",
        "quorum",
        "extra-arguments",
    ],
)
def test_queue_arguments(spec: QueueSpec, expected: dict[str, Any]) -> None:
    """By default a classic queue is declared as Celery, kombu and celery-node declare theirs (any of them
    can come first); broker-side dead-lettering only when asked for or on quorum queues, whose delivery
    limit (20 by default on RabbitMQ 4) would otherwise drop a message."""
    assert spec.queue_arguments() == expected


def test_dead_letter_queue_is_of_the_same_type() -> None:
    assert QueueSpec("q", queue_type="quorum").dlq_arguments() == {"x-queue-type": "quorum"}
    assert QueueSpec("q").dlq_arguments() == {}
    assert QueueSpec("q").dlq_name == "q.dlq"


def test_queue_options_from_settings_reach_the_arguments() -> None:
    r = router(task_queues={"cw_priority": {"max_priority": 10, "dead_letter": False}})
    spec = r.queue("cw_priority")
    assert spec.queue_arguments() == {"x-max-priority": 10}


# --------------------------------------------------------------------------------- exchanges and bindings


@pytest.mark.parametrize(
    ("spec", "exchange", "routing_key", "bindings"),
    [
        (QueueSpec("celery"), "", "celery", ()),
        (QueueSpec("q", exchange="ex"), "ex", "q", ("q",)),
        (QueueSpec("q", exchange="ex", routing_key="rk"), "ex", "rk", ("rk",)),
        (
            QueueSpec("media", exchange="media", exchange_type="topic", routing_key="media.video",
                      binding_keys=("media.#", "audio.*")),
            "media", "media.video", ("media.#", "audio.*"),
        ),
    ],
    ids=["default-exchange", "direct", "direct-routing-key", "topic"],
)  # fmt: skip
def test_publish_exchange_routing_key_and_bindings(
    spec: QueueSpec, exchange: str, routing_key: str, bindings: tuple[str, ...]
) -> None:
    assert (spec.publish_exchange, spec.publish_routing_key, spec.bindings) == (
        exchange,
        routing_key,
        bindings,
    )
    assert delivered_to(spec, spec.publish_exchange, spec.publish_routing_key)


@pytest.mark.parametrize(
    "spec",
    [
        QueueSpec("q"),
        QueueSpec("q", exchange="ex"),
        QueueSpec("q", exchange="ex", routing_key="rk"),
        QueueSpec("q", exchange="ex", binding_keys=("k1", "k2")),
        QueueSpec("t", exchange="top", exchange_type="topic", binding_keys=("a.*", "b.#")),
        QueueSpec("t", exchange="top", exchange_type="topic", binding_keys=("#",)),
        QueueSpec("t", exchange="top", exchange_type="topic", routing_key="a.x", binding_keys=("a.*",)),
        QueueSpec("f", exchange="fan", exchange_type="fanout"),
    ],
    ids=[
        "default",
        "direct",
        "direct-rk",
        "direct-bindings",
        "topic-bindings",
        "topic-hash",
        "topic-rk",
        "fanout",
    ],
)
def test_a_queues_own_publish_key_reaches_it(spec: QueueSpec) -> None:
    assert delivered_to(spec, spec.publish_exchange, spec.publish_routing_key)


QUEUES = {
    "direct_q": {"exchange": "jobs", "routing_key": "jobs.direct"},
    "topic_q": {"exchange": "feeds", "exchange_type": "topic", "binding_keys": ["feed.#"]},
}


@pytest.mark.parametrize(
    ("call", "task_routes"),
    [
        ({"queue": "direct_q"}, None),
        ({"queue": "topic_q"}, None),
        ({"queue": "topic_q", "routing_key": "feed.import"}, None),
        ({}, {"tasks.add": {"queue": "topic_q", "routing_key": "feed.import"}}),
        ({"queue": "unlisted"}, None),
        ({}, {"tasks.*": "unlisted"}),
        ({"queue": "unlisted", "routing_key": "feed.import"}, None),
        ({}, {"tasks.add": {"queue": "unlisted", "routing_key": "feed.import"}}),
        ({"queue": "direct_q", "routing_key": "something.else"}, None),
    ],
    ids=[
        "direct", "topic", "topic-key", "topic-key-from-routes", "unlisted", "unlisted-from-routes",
        "unlisted-with-key", "unlisted-with-key-from-routes", "direct-with-other-key",
    ],
)  # fmt: skip
def test_a_route_to_a_queue_delivers_to_that_queue(call: dict[str, Any], task_routes: Any) -> None:
    # The worker consumes route.queue (and the client declares it), so the published message must land
    # there. Celery: a queue on the default or a direct exchange, given without an exchange, is reached
    # through the default exchange by its name, whatever routing_key the route names.
    route = router(task_queues=QUEUES, task_routes=task_routes).route("tasks.add", call, {})
    assert route.queue is not None
    where = f"published to {route.exchange!r} with key {route.routing_key!r}"
    missed = f"{where} misses queue {route.queue.name!r}"
    assert delivered_to(route.queue, route.exchange, route.routing_key), missed
