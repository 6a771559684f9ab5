"""The public API of ``amqtask``: exactly these names, each importable and documented."""

from __future__ import annotations

import importlib
import inspect

import pytest

import amqtask

# Deliberately pinned: adding or removing a public name must be a conscious change, made here in the
# same commit.
PUBLIC_API = [
    # canvas
    "GroupResult",
    "Signature",
    "chain",
    "chord",
    "group",
    "signature",
    # application, tasks and errors
    "AmqtaskError",
    "App",
    "AsyncResult",
    "BrokerConnectionError",
    "ConfigurationError",
    "ContentDisallowedError",
    "MaxRetriesExceededError",
    "MessageError",
    "Middleware",
    "MisuseError",
    "PublishError",
    "QueueSpec",
    "Reject",
    "RemoteTaskError",
    "Request",
    "Retry",
    "SerializationError",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskNotRegisteredError",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "TimeoutError",
    "TopologyError",
    "TopologyMismatchError",
    "TopologyNotFoundError",
    "UnroutableError",
    "Worker",
    "crontab",
    "current_app",
    "interval",
]


def test_all_is_pinned() -> None:
    assert sorted(set(amqtask.__all__)) == sorted(PUBLIC_API)


def test_all_has_no_duplicates() -> None:
    assert len(amqtask.__all__) == len(set(amqtask.__all__))


@pytest.mark.parametrize("name", sorted(set(amqtask.__all__) | set(PUBLIC_API)))
def test_every_public_name_is_importable_and_documented(name: str) -> None:
    module = importlib.import_module("amqtask")
    assert hasattr(module, name), f"amqtask.{name} is in __all__ but not importable"
    obj = getattr(module, name)
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"amqtask.{name} has no docstring"
    if inspect.isclass(obj) and obj.__doc__ is None:
        pytest.fail(f"amqtask.{name} only inherits its docstring")


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from amqtask import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(PUBLIC_API)


def test_errors_share_one_root() -> None:
    from amqtask.errors import AmqtaskError, ControlFlow

    for name in PUBLIC_API:
        obj = getattr(amqtask, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert issubclass(obj, AmqtaskError | ControlFlow), name
