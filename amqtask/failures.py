"""How exceptions travel between a worker and its caller.

On the wire an exception is Celery's ``{"exc_type", "exc_message": [args], "exc_module"}``. On the
caller's side it becomes a :class:`~amqtask.errors.RemoteTaskError` subclass named like the
original; for builtin exception types it also derives from the builtin, so ``except ValueError``
catches a remote ``ValueError``. Nothing is ever unpickled or imported from the message.
"""

from __future__ import annotations

import builtins
import functools
import json
import traceback
from typing import Any

from .errors import RemoteTaskError


def _plain_arg(arg: Any) -> Any:
    """``arg`` itself when JSON can carry it (as kombu's ``ensure_serializable`` keeps it), else its repr."""
    if isinstance(arg, str | int | float | bool | type(None)):
        return arg
    try:
        json.dumps(arg)
    except (TypeError, ValueError, RecursionError):
        return repr(arg)
    return arg


def encode_exception(exc: BaseException) -> dict[str, Any]:
    """Celery's exception dict for ``exc``; arguments that cannot be serialized become their repr."""
    args = [_plain_arg(arg) for arg in exc.args]
    return {"exc_type": type(exc).__name__, "exc_message": args, "exc_module": type(exc).__module__}


def format_traceback(exc: BaseException) -> str:
    """The traceback text sent with a failure."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


@functools.lru_cache(maxsize=256)
def _remote_class(exc_type: str, exc_module: str) -> type[RemoteTaskError]:
    builtin = getattr(builtins, exc_type, None) if exc_module in ("builtins", "exceptions", "") else None
    bases: tuple[type, ...] = (RemoteTaskError,)
    if isinstance(builtin, type) and issubclass(builtin, Exception) and builtin is not Exception:
        bases = (RemoteTaskError, builtin)
    attrs = {"exc_type": exc_type, "exc_module": exc_module, "__module__": exc_module or "amqtask.remote"}
    for candidate in (bases, (RemoteTaskError,)):
        try:
            return type(exc_type, candidate, attrs)
        except (TypeError, ValueError):
            # TypeError: a builtin with an incompatible C layout; ValueError: a name no class can have
            # (NUL or surrogate characters).
            continue
    return RemoteTaskError


def decode_exception(value: Any, remote_traceback: str | None) -> RemoteTaskError:
    """Rebuild the caller-side exception from a FAILURE result."""
    if not isinstance(value, dict) or not isinstance(value.get("exc_type"), str):
        return RemoteTaskError(repr(value), remote_traceback=remote_traceback)
    exc_type = value["exc_type"]
    module = value.get("exc_module") if isinstance(value.get("exc_module"), str) else ""
    message = value.get("exc_message")
    args = tuple(message) if isinstance(message, list | tuple) else (message,)
    cls = _remote_class(exc_type, module or "")
    try:
        exc = cls.__new__(cls)
        RemoteTaskError.__init__(exc, *args, remote_traceback=remote_traceback)
    except Exception:
        # Builtins whose constructor insists on its own arguments (UnicodeDecodeError wants 5, SyntaxError
        # a location tuple, MemoryError and ExceptionGroup refuse this __new__): keep the name only.
        cls = _remote_class(exc_type, "amqtask.remote")
        exc = cls.__new__(cls)
        RemoteTaskError.__init__(exc, *args, remote_traceback=remote_traceback)
        exc.exc_module = module or ""
    return exc
