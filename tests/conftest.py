"""Fixtures for the whole suite: the RabbitMQ broker, a vhost per session, unique names.

The broker fixtures start (or reuse) a broker only when a test that needs one runs, so
pure-logic tests run anywhere. Tests that use them are marked ``broker``, so
``-m "not broker"`` runs the rest.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from support.broker import TestBroker

BROKER_FIXTURES = frozenset({"rabbitmq", "rabbitmq_version_info", "broker_vhost", "broker_url", "private_rabbitmq"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--rabbitmq",
        default=os.environ.get("AMQTASK_TEST_RABBITMQ", "3.10"),
        choices=("3.10", "4.3"),
        help="RabbitMQ version for broker tests (default: $AMQTASK_TEST_RABBITMQ, else 3.10)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if BROKER_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.broker)
        if item.get_closest_marker("fault"):
            # The fault pass runs in two processes (--dist loadgroup): tests that stop brokers of their own
            # (a private node, a cluster) beside those that cut and load the shared one. Each group
            # runs its tests one at a time, so no fault lands in another test of the same broker.
            own = "private_rabbitmq" in fixtures or item.get_closest_marker("cluster")
            item.add_marker(pytest.mark.xdist_group("own-brokers" if own else "shared-broker"))


@pytest.fixture(scope="session")
def rabbitmq(pytestconfig: pytest.Config) -> TestBroker:
    """The broker of the requested version, started through deploy/rabbitmq.sh or reused."""
    broker = TestBroker()
    broker.start(pytestconfig.getoption("--rabbitmq"))
    return broker


@pytest.fixture(scope="session")
def rabbitmq_version_info(rabbitmq: TestBroker) -> tuple[int, ...]:
    """The server's real version, e.g. (3, 10, 8)."""
    return rabbitmq.version_info


@pytest.fixture(scope="session")
def broker_vhost(rabbitmq: TestBroker) -> Iterator[str]:
    """A vhost of this session's own, deleted at its end: other users of the broker stay apart."""
    vhost = f"amqtask-test-{uuid.uuid4().hex[:8]}"
    rabbitmq.add_vhost(vhost)
    yield vhost
    rabbitmq.delete_vhost(vhost)


@pytest.fixture(scope="session")
def broker_url(rabbitmq: TestBroker, broker_vhost: str) -> str:
    """AMQP URL of ``broker_vhost`` (guest, full permissions)."""
    return rabbitmq.vhost_url(broker_vhost)


@pytest.fixture(scope="session")
def private_rabbitmq(pytestconfig: pytest.Config) -> Iterator[TestBroker]:
    """A broker of this session's own, for tests that stop or restart it.

    Restarting the shared broker would break other processes using it (other test sessions,
    developers); a private one costs a few seconds to start and is deleted at the end.
    """
    version = pytestconfig.getoption("--rabbitmq")
    broker = TestBroker(name=f"amqtask-private-{version.replace('.', '')}-{os.getpid()}")
    broker.start(version)
    yield broker
    broker.stop()


@pytest.fixture
def unique() -> str:
    """A short unique name for queues, exchanges and the like."""
    return f"t{uuid.uuid4().hex[:8]}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # tox runs the suite in passes (-m "not fault and not ecosystem", -m fault, -m ecosystem); a
    # selection such as `tox -- tests/test_cli.py` leaves some passes empty, which is fine, not an error.
    markexpr = session.config.option.markexpr
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and markexpr.startswith(("fault", "ecosystem")):
        session.exitstatus = pytest.ExitCode.OK
