"""Exceptions across the wire: Celery's ``{exc_type, exc_message, exc_module}`` dict out, and back in as a
:class:`RemoteTaskError` named like the original (deriving from the builtin, so ``except ValueError`` works).
Whatever a result carries, decoding never crashes and never imports anything."""

from __future__ import annotations

import builtins
import datetime as dt
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from amqtask.errors import RemoteTaskError, TaskRevokedError
from amqtask.failures import decode_exception, encode_exception, format_traceback
from amqtask.serializers import JSON, MSGPACK, encode

TRACEBACK = 'Traceback (most recent call last):\n  File "/srv/app/tasks.py", line 1, in f\nValueError: boom\n'


class CwCustomError(Exception):
    """A user exception with several arguments."""


class Unprintable:
    def __repr__(self) -> str:
        return "<Unprintable>"


def _decode(exc_type: str, args: list[Any], module: str = "builtins") -> RemoteTaskError:
    value = {"exc_type": exc_type, "exc_message": args, "exc_module": module}
    return decode_exception(value, TRACEBACK)


# ------------------------------------------------------------------------------------------------ encode


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ValueError("boom"), {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}),
        (KeyError("k"), {"exc_type": "KeyError", "exc_message": ["k"], "exc_module": "builtins"}),
        (TypeError(), {"exc_type": "TypeError", "exc_message": [], "exc_module": "builtins"}),
        (
            CwCustomError("bad thing", 42),
            {"exc_type": "CwCustomError", "exc_message": ["bad thing", 42], "exc_module": __name__},
        ),
        (
            TaskRevokedError("revoked"),
            {"exc_type": "TaskRevokedError", "exc_message": ["revoked"], "exc_module": "amqtask.errors"},
        ),
        (
            ValueError(1.5, None, True),
            {"exc_type": "ValueError", "exc_message": [1.5, None, True], "exc_module": "builtins"},
        ),
    ],
    ids=["builtin", "key-error", "no-args", "custom", "amqtask-error", "scalars"],
)
def test_encode_exception_is_celerys_dict(exc: BaseException, expected: dict[str, Any]) -> None:
    assert encode_exception(exc) == expected


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        (Unprintable(), "<Unprintable>"),
        (b"raw", "b'raw'"),
        ({1, 2}, "{1, 2}"),
        (dt.date(2030, 1, 2), "datetime.date(2030, 1, 2)"),
    ],
    ids=["object", "bytes", "set", "date"],
)
def test_unserializable_args_become_their_repr(arg: Any, expected: str) -> None:
    value = encode_exception(ValueError(arg, "kept"))
    assert value["exc_message"] == [expected, "kept"]


@pytest.mark.parametrize(
    "arg",
    [{"field": ["required"]}, ["a", 1, None], {"nested": {"n": [1.5, True]}}],
    ids=["dict", "list", "nested"],
)
def test_json_able_container_args_are_kept(arg: Any) -> None:
    # Celery (kombu's ensure_serializable) keeps every argument its encoder can write; only the rest
    # become reprs. A ValidationError({'field': [...]}) must reach the caller as a dict.
    assert encode_exception(ValueError(arg))["exc_message"] == [arg]


@pytest.mark.parametrize(
    "exc",
    [
        ValueError(Unprintable(), {"k": Unprintable()}, [b"x"]),
        CwCustomError({"a": {1, 2}}, 2**70),
        KeyError(("tuple", "key")),
        OSError(2, "No such file or directory", "/x"),
    ],
    ids=["unprintables", "custom-with-set", "tuple-key", "oserror"],
)
def test_encoded_exceptions_always_serialize(exc: BaseException) -> None:
    value = encode_exception(exc)
    encode(value, JSON)
    if value["exc_type"] != "CwCustomError":  # msgpack has no ints beyond 64 bits
        encode(value, MSGPACK)


def test_format_traceback_names_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        text = format_traceback(exc)
    assert text.startswith("Traceback (most recent call last):")
    assert text.endswith("ValueError: boom\n")


# ------------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize(
    ("exc_type", "args"),
    [
        ("ValueError", ["something bad happened"]),
        ("KeyError", ["missing"]),
        ("TypeError", ["bad type", 3]),
        ("ZeroDivisionError", ["division by zero"]),
        ("LookupError", []),
        ("RuntimeError", ["r"]),
        ("NotImplementedError", ["n"]),
    ],
)
def test_builtin_exceptions_derive_from_the_builtin(exc_type: str, args: list[Any]) -> None:
    exc = _decode(exc_type, args)
    builtin = getattr(builtins, exc_type)
    assert type(exc).__name__ == exc_type
    assert isinstance(exc, builtin) and isinstance(exc, RemoteTaskError)
    assert exc.args == tuple(args)
    assert exc.remote_traceback == TRACEBACK
    assert (exc.exc_type, exc.exc_module) == (exc_type, "builtins")
    with pytest.raises(builtin):
        raise exc


def test_a_remote_value_error_reads_like_one() -> None:
    exc = _decode("ValueError", ["something bad happened"])
    assert str(exc) == "something bad happened"
    assert "ValueError" in repr(exc)


def test_a_remote_key_error_is_a_lookup_error() -> None:
    exc = _decode("KeyError", ["k"])
    assert isinstance(exc, LookupError)
    with pytest.raises(LookupError):
        raise exc


@pytest.mark.parametrize(
    ("exc_type", "args"),
    [
        ("OSError", []),
        ("OSError", ["plain message"]),
        ("FileNotFoundError", [2, "No such file or directory"]),
        ("ConnectionRefusedError", [111, "Connection refused"]),
        ("PermissionError", ["denied"]),
        ("BlockingIOError", [11, "again"]),
        ("TimeoutError", ["timed out"]),
        ("BrokenPipeError", [32, "Broken pipe"]),
    ],
)
def test_oserror_subclasses_decode_without_crashing(exc_type: str, args: list[Any]) -> None:
    exc = _decode(exc_type, args)
    assert isinstance(exc, RemoteTaskError)
    assert type(exc).__name__ == exc_type
    assert exc.args == tuple(args)
    assert exc.remote_traceback == TRACEBACK
    assert isinstance(exc, getattr(builtins, exc_type))
    str(exc)
    repr(exc)


def test_oserror_fields_survive() -> None:
    exc = _decode("FileNotFoundError", [2, "No such file or directory"])
    assert isinstance(exc, OSError)
    assert (exc.errno, exc.strerror) == (2, "No such file or directory")


@pytest.mark.parametrize(
    ("exc_type", "args"),
    [
        ("UnicodeDecodeError", ["'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"]),
        ("UnicodeEncodeError", ["x"]),
        ("UnicodeTranslateError", []),
        ("SyntaxError", ["invalid syntax", 42]),
        ("IndentationError", ["unexpected indent", 3]),
        ("MemoryError", []),
        ("MemoryError", ["out of memory"]),
        ("ExceptionGroup", ["several", "things"]),
    ],
)
def test_builtins_with_picky_constructors_still_decode(exc_type: str, args: list[Any]) -> None:
    # Their C constructors insist on their own arguments (5 for UnicodeDecodeError, a location tuple
    # for SyntaxError); a Celery worker sends whatever args the exception had, as strings.
    exc = _decode(exc_type, args)
    assert isinstance(exc, RemoteTaskError)
    assert type(exc).__name__ == exc_type
    assert exc.args == tuple(args)
    assert exc.remote_traceback == TRACEBACK
    str(exc)


@pytest.mark.parametrize("exc_type", ["SystemExit", "KeyboardInterrupt", "GeneratorExit", "BaseException"])
def test_base_exceptions_are_not_re_raised_as_themselves(exc_type: str) -> None:
    # A remote SystemExit must not stop the caller's process: it is an ordinary RemoteTaskError.
    exc = _decode(exc_type, ["from the worker"])
    assert type(exc).__name__ == exc_type
    assert isinstance(exc, Exception) and isinstance(exc, RemoteTaskError)
    assert not isinstance(exc, getattr(builtins, exc_type)) or exc_type == "BaseException"


def test_custom_exceptions_keep_name_module_and_args() -> None:
    exc = _decode("CwCustomError", ["bad thing", 42], module="tasks")
    assert type(exc).__name__ == "CwCustomError"
    assert exc.args == ("bad thing", 42)
    assert exc.exc_module == "tasks"
    assert isinstance(exc, RemoteTaskError) and not isinstance(exc, ValueError)


def test_a_user_class_named_like_a_builtin_is_not_the_builtin() -> None:
    exc = _decode("ValueError", ["mine"], module="tasks")
    assert type(exc).__name__ == "ValueError"
    assert not isinstance(exc, ValueError)


def test_decoding_never_imports_the_named_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "this", raising=False)
    exc = _decode("Zen", ["beautiful is better than ugly"], module="this")
    assert type(exc).__name__ == "Zen"
    assert "this" not in sys.modules


def test_round_trip_of_a_builtin() -> None:
    exc = decode_exception(encode_exception(KeyError("k")), None)
    assert isinstance(exc, KeyError) and exc.args == ("k",) and exc.remote_traceback is None


@pytest.mark.parametrize(
    "value",
    [
        None,
        "boom",
        42,
        [],
        {},
        {"exc_message": ["no type"]},
        {"exc_type": 5, "exc_message": ["x"]},
        {"exc_type": "ValueError", "exc_message": "not a list", "exc_module": "builtins"},
        {"exc_type": "ValueError", "exc_message": ["x"], "exc_module": 7},
        {"exc_type": "Nul\x00Name", "exc_message": ["x"], "exc_module": "tasks"},
        {"exc_type": "\ud800", "exc_message": ["x"], "exc_module": "tasks"},
        {"exc_type": "", "exc_message": ["x"], "exc_module": "tasks"},
        {"exc_type": "has space", "exc_message": ["x"], "exc_module": "tasks"},
        {"exc_type": "__class__", "exc_message": [], "exc_module": "builtins"},
        {"exc_type": "print", "exc_message": [], "exc_module": "builtins"},
    ],
    ids=[
        "none", "str", "int", "list", "empty-dict", "no-type", "int-type", "str-message", "int-module",
        "nul-name", "surrogate-name", "empty-name", "space-name", "dunder-name", "builtin-function",
    ],
)  # fmt: skip
def test_unknown_or_malformed_values_give_a_remote_task_error(value: Any) -> None:
    exc = decode_exception(value, TRACEBACK)
    assert isinstance(exc, RemoteTaskError)
    assert exc.remote_traceback == TRACEBACK
    str(exc)
    repr(exc)


def test_a_malformed_value_is_shown_in_the_message() -> None:
    exc = decode_exception("boom", None)
    assert type(exc) is RemoteTaskError
    assert "boom" in str(exc)


BUILTIN_EXCEPTIONS = sorted(
    name for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, BaseException)
)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)


@hsettings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    exc_type=st.sampled_from(BUILTIN_EXCEPTIONS) | st.text(max_size=12),
    exc_module=st.sampled_from(["builtins", "exceptions", "", "tasks"]) | st.text(max_size=8) | st.none(),
    message=st.lists(scalars | st.lists(scalars, max_size=2), max_size=6) | scalars,
)
def test_decode_exception_never_raises(exc_type: str, exc_module: str | None, message: Any) -> None:
    value = {"exc_type": exc_type, "exc_module": exc_module, "exc_message": message}
    exc = decode_exception(value, "tb")
    assert isinstance(exc, RemoteTaskError)
    assert exc.remote_traceback == "tb"
    str(exc)
