"""What a gateway request may carry: bounded JSON bodies and the checked shape of ``POST /tasks/{name}``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from .. import serializers
from ..errors import MessageError, SerializationError

ACCEPT_JSON = frozenset({"json"})
#: ``options`` a caller may give, each with the check it must pass.
OPTIONS = ("countdown", "eta", "expires", "priority", "queue")


class HTTPError(Exception):
    """A request the gateway refuses: the status code and a message safe to show the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class SendRequest:
    """A checked ``POST /tasks/{name}`` body."""

    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]


async def read_json(request: Request, max_bytes: int, max_depth: int) -> Any:
    """The JSON body, refused with 413 past ``max_bytes`` (read no further) and 400 when malformed or too deep."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPError(413, f"request body over the limit of {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise HTTPError(413, f"request body over the limit of {max_bytes} bytes")
    if not body:
        return {}
    try:
        return serializers.decode(bytes(body), serializers.JSON_CONTENT_TYPE, ACCEPT_JSON,
                                  serializers.DecodeLimits(max_bytes, max_depth))  # fmt: skip
    except (SerializationError, MessageError) as exc:
        raise HTTPError(400, f"request body is not acceptable JSON: {exc}") from None


def parse_send(payload: Any, queues: Collection[str]) -> SendRequest:
    """Check the shape of a send request (``queue`` one of ``queues``); 422 names the first field that is wrong."""
    if not isinstance(payload, dict):
        raise HTTPError(422, "request body must be a JSON object")
    unknown = set(payload) - {"args", "kwargs", "options"}
    if unknown:
        raise HTTPError(422, f"unknown field(s) {sorted(unknown)}; expected args, kwargs, options")
    args, kwargs, options = payload.get("args", []), payload.get("kwargs", {}), payload.get("options", {})
    if not isinstance(args, list):
        raise HTTPError(422, "args must be an array")
    if not isinstance(kwargs, dict):
        raise HTTPError(422, "kwargs must be an object")
    if not isinstance(options, dict):
        raise HTTPError(422, "options must be an object")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise HTTPError(422, f"unknown option(s) {sorted(unknown)}; expected {', '.join(OPTIONS)}")
    checked = {key: _option(key, value) for key, value in options.items()}
    if "queue" in checked and checked["queue"] not in queues:
        # Not any name: the gateway would declare a missing queue (task_create_missing_queues) for anyone.
        raise HTTPError(422, f"queue must be one of the app's queues: {', '.join(sorted(queues))}")
    return SendRequest(args, kwargs, checked)


def _option(key: str, value: Any) -> Any:
    if key == "countdown":
        return _seconds(key, value, allow_negative=False)
    if key in ("eta", "expires") and isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise HTTPError(422, f"{key} must be an ISO 8601 date-time or seconds") from None
        moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
        if abs((moment - dt.datetime.now(dt.timezone.utc)).total_seconds()) > MAX_DELAY_S:
            raise HTTPError(422, f"{key} must be within {MAX_DELAY_S} seconds of now")
        return moment
    if key == "expires":
        return _seconds(key, value, allow_negative=True)
    if key == "priority":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise HTTPError(422, "priority must be an integer from 0 to 255")
        return value
    if key == "queue":
        if not isinstance(value, str):
            raise HTTPError(422, "queue must be a string")
        return value
    raise HTTPError(422, f"{key} must be an ISO 8601 date-time")


def _seconds(key: str, value: Any, *, allow_negative: bool) -> float:
    # Bounded to what the broker's delay levels can hold (about 8.5 years), so nothing reaches a worker as a
    # delay it cannot route.
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise HTTPError(422, f"{key} must be a number of seconds")
    if not (allow_negative or value >= 0) or abs(value) > MAX_DELAY_S:
        raise HTTPError(422, f"{key} must be between {0 if not allow_negative else -MAX_DELAY_S} and {MAX_DELAY_S}")
    return float(value)


MAX_DELAY_S = 2**28 - 1

__all__ = ["HTTPError", "SendRequest", "parse_send", "read_json"]
