"""Eager mode for users' own unit tests: no broker, same result API."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from amqtask import App, SerializationError, TaskNotRegisteredError
from amqtask.testing import eager


def make_app() -> App:
    app = App("eager-test", broker="amqp://guest:guest@127.0.0.1:1//")

    @app.task(name="e.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="e.aadd")
    async def aadd(x: int, y: int) -> int:
        return x + y

    @app.task(name="e.fail")
    def fail() -> None:
        raise KeyError("missing")

    return app


def test_delay_runs_inline_and_get_returns_the_value() -> None:
    app = make_app()
    with eager(app):
        assert app.tasks["e.add"].delay(2, 3).get() == 5
        result = app.send_task("e.aadd", (4, 4))
        assert result.successful() and result.get() == 8


def test_async_callers_work_too() -> None:
    app = make_app()

    async def scenario() -> int:
        return await (await app.tasks["e.aadd"].adelay(1, 1))

    with eager(app):
        assert asyncio.run(scenario()) == 2


def test_failures_are_raised_by_get_or_by_delay_with_propagate() -> None:
    app = make_app()
    with eager(app):
        result = app.tasks["e.fail"].delay()
        assert result.failed()
        with pytest.raises(KeyError):
            result.get()
    with eager(app, propagate=True), pytest.raises(KeyError):
        app.tasks["e.fail"].delay()


def test_what_a_worker_would_refuse_is_refused() -> None:
    app = make_app()
    with eager(app):
        with pytest.raises(TaskNotRegisteredError):
            app.send_task("e.unknown")
        with pytest.raises(SerializationError):
            app.tasks["e.add"].delay(object(), 1)


def test_leaving_the_block_restores_real_sending() -> None:
    app = make_app()
    with eager(app):
        pass
    assert "asend_task" not in vars(app)


def test_eager_mode_with_amqp_results_needs_no_broker() -> None:
    app = App("eager-amqp", broker="amqp://guest:guest@127.0.0.1:1//", result_backend="amqp")

    @app.task(name="t.steps", bind=True)
    def steps(self: Any, n: int) -> int:
        self.update_state(state="PROGRESS", meta={"done": n})
        return n

    with eager(app):
        result = steps.delay(3)
        assert result.get(timeout=1) == 3 and result.state == "SUCCESS"
