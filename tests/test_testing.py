"""Eager mode for users' own unit tests: no broker, same result API."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from amqtask import App, SerializationError, TaskNotRegisteredError, chord, group
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
    real = app.sender
    with eager(app):
        assert app.sender is not real
    assert app.sender is real


# ---------------------------------------------------------------------------------------------- canvas, no sockets


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach a broker (or anything else) fails the test at once."""

    def refuse(self: socket.socket, *args: Any) -> None:
        raise AssertionError(f"eager mode opened a connection to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def canvas_app() -> App:
    app = App("eager-canvas", broker="amqp://guest:guest@127.0.0.1:5672//", publish_timeout_s=0.5)
    seen: list[str] = []

    @app.task(name="c.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="c.mul")
    async def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="c.total")
    def total(values: list[int]) -> int:
        return sum(values)

    @app.task(name="c.fail")
    def fail(x: int) -> None:
        raise ValueError(f"no {x}")

    @app.task(name="c.note")
    def note(value: Any) -> None:
        seen.append(repr(value))

    @app.task(name="c.flaky", bind=True, max_retries=3)
    def flaky(self: Any, times: int) -> int:
        if self.request.retries < times:
            raise self.retry(exc=ValueError("not yet"), countdown=60)
        return int(self.request.retries)

    @app.task(name="c.auto", autoretry_for=(KeyError,), retry_kwargs={"max_retries": 2, "countdown": 30})
    def auto() -> None:
        raise KeyError("always")

    @app.task(name="c.fan_out")
    def fan_out(n: int) -> int:
        # A task that sends tasks itself, through the synchronous API.
        return int(add.delay(n, n).get())

    app.seen = seen  # type: ignore[attr-defined]
    return app


@pytest.mark.usefixtures("no_sockets")
def test_eager_canvas_runs_inline_without_opening_a_socket() -> None:
    app = canvas_app()
    add, mul, total = app.tasks["c.add"], app.tasks["c.mul"], app.tasks["c.total"]
    with eager(app):
        assert (add.s(1, 1) | add.s(2))().get() == 4
        assert (add.s(2, 2) | mul.s(3) | add.s(1)).delay().get() == 13
        assert group(add.s(1, 1), mul.s(2, 3)).delay().get() == [2, 6]
        assert chord([add.s(i, i) for i in range(4)], total.s()).delay().get() == 12
        assert add.s(5).apply_async((5,)).get() == 10
        assert app.send_task("c.add", (20, 22)).get() == 42
        assert app.tasks["c.fan_out"].delay(3).get() == 6


@pytest.mark.usefixtures("no_sockets")
def test_eager_callbacks_errbacks_and_failures_in_a_chain() -> None:
    app = canvas_app()
    add, fail, note = app.tasks["c.add"], app.tasks["c.fail"], app.tasks["c.note"]
    with eager(app):
        assert add.s(1, 2).set(link=note.s()).delay().get() == 3
        failing = fail.s().set(link_error=note.s())
        result = (add.s(1, 1) | failing | add.s(1)).delay()
        with pytest.raises(ValueError, match="no 2"):
            result.get()  # the chain's last step never runs: it reports the step's failure
    assert app.seen[0] == "3"  # type: ignore[attr-defined]
    assert len(app.seen) == 2  # type: ignore[attr-defined] # the errback got the failed task's id


@pytest.mark.usefixtures("no_sockets")
def test_eager_retries_run_again_at_once_until_they_succeed_or_run_out() -> None:
    app = canvas_app()
    with eager(app):
        assert app.tasks["c.flaky"].delay(2).get() == 2
        with pytest.raises(ValueError, match="not yet"):
            app.tasks["c.flaky"].delay(5).get()  # max_retries=3: the last attempt's error
        with pytest.raises(KeyError):
            app.tasks["c.auto"].delay().get()


@pytest.mark.usefixtures("no_sockets")
def test_a_chord_with_a_failed_member_fails_its_body() -> None:
    app = canvas_app()
    add, fail, total = app.tasks["c.add"], app.tasks["c.fail"], app.tasks["c.total"]
    with eager(app):
        result = chord([add.s(1, 1), fail.s(3)], total.s()).delay()
        with pytest.raises(ValueError, match="no 3"):
            result.get()


def test_eager_mode_with_amqp_results_needs_no_broker() -> None:
    app = App("eager-amqp", broker="amqp://guest:guest@127.0.0.1:1//", result_backend="amqp")

    @app.task(name="t.steps", bind=True)
    def steps(self: Any, n: int) -> int:
        self.update_state(state="PROGRESS", meta={"done": n})
        return n

    with eager(app):
        result = steps.delay(3)
        assert result.get(timeout=1) == 3 and result.state == "SUCCESS"
