"""Only the middleware hooks that can do something are awaited, and switching a feature on takes effect at once."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from amqtask import App, Middleware
from amqtask.middleware.hooks import hooks_changed
from amqtask.monitoring.event_middleware import EventsMiddleware
from amqtask.monitoring.logs import TaskLogMiddleware
from amqtask.monitoring.metrics import MetricsMiddleware
from amqtask.protocol import TaskMessage, WireMessage


class Counting(Middleware):
    """Overrides one hook; says whether it wants it through ``on``."""

    def __init__(self) -> None:
        self.on = True
        self.calls = 0

    def wants(self, hook: str, app: App) -> bool:
        return self.on

    async def before_publish(self, app: App, message: TaskMessage, wire: WireMessage) -> None:
        self.calls += 1


@pytest.fixture
def app() -> Iterator[App]:
    application = App("hooks", broker="amqp://guest:guest@127.0.0.1:1/")
    yield application
    application.close()


def owners(app: App, hook: str) -> list[type[Middleware]]:
    return [type(bound.__self__) for bound in app.hooks(hook)]


def test_observability_off_awaits_nothing_per_message_and_a_setting_turns_it_on(app: App) -> None:
    logging.getLogger("amqtask.worker").setLevel(logging.WARNING)
    try:
        for hook in ("after_success", "on_retry", "after_reject", "after_delivery", "after_publish"):
            assert not {EventsMiddleware, MetricsMiddleware, TaskLogMiddleware} & set(owners(app, hook)), hook
        app.conf.worker_send_task_events = True
        app.conf.worker_metrics_port = 9999
        assert {EventsMiddleware, MetricsMiddleware} <= set(owners(app, "after_success"))
        assert EventsMiddleware not in owners(app, "after_publish")
        app.conf.task_send_sent_event = True
        assert EventsMiddleware in owners(app, "after_publish")
    finally:
        logging.getLogger("amqtask.worker").setLevel(logging.NOTSET)


def test_task_lines_follow_the_log_level_and_failures_are_always_logged(app: App) -> None:
    worker_log = logging.getLogger("amqtask.worker")
    worker_log.setLevel(logging.WARNING)
    try:
        assert TaskLogMiddleware not in owners(app, "after_success")
        assert TaskLogMiddleware in owners(app, "after_failure")
        assert TaskLogMiddleware in owners(app, "before_process")  # the task fields of any record
        worker_log.setLevel(logging.INFO)
        assert TaskLogMiddleware in owners(app, "after_success")
    finally:
        worker_log.setLevel(logging.NOTSET)


def test_middleware_added_later_or_switched_is_asked_again(app: App) -> None:
    counting = Counting()
    assert Counting not in owners(app, "before_publish")
    app.middleware.insert(0, counting)
    assert owners(app, "before_publish")[0] is Counting
    assert Counting not in owners(app, "after_publish")  # not overridden: never awaited
    counting.on = False
    hooks_changed()
    assert Counting not in owners(app, "before_publish")
