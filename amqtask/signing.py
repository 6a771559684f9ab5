"""Optional message signing: HMAC-SHA256 over what a task message means, checked by workers.

With ``signing_keys`` set, producers (``delay``, beat, canvas follow-ups) add an
``x-amqtask-signature`` header, and workers dead-letter messages that are unsigned or whose
signature matches none of the keys. The signature covers the body, the content type, the task name
and the task id: what decides which code runs with which arguments. Headers a worker legitimately
changes on the way (``retries``, ``eta`` when it retries) are not covered, so retries and DLQ replays
keep their signature. Key rotation: put the new key first (it signs) and keep the old one after it
(it still verifies) until every old message is gone, then drop it. Signing proves a message came from
a holder of a key; it does not hide the message (use TLS) or prevent replays of a signed message.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from .errors import Reject
from .middleware import Middleware
from .protocol import TaskMessage, WireMessage

if TYPE_CHECKING:
    from .app import App
    from .worker.worker import Worker

SIGNATURE_HEADER = "x-amqtask-signature"


def sign(key: str, wire: WireMessage) -> str:
    """The signature of ``wire`` under ``key`` (hex)."""
    headers = wire.headers
    covered = b"\n".join(
        str(part).encode("utf-8") for part in (wire.content_type or "", headers.get("task", ""), headers.get("id", ""))
    )
    return hmac.new(key.encode("utf-8"), covered + b"\n" + wire.body, hashlib.sha256).hexdigest()


def verify(keys: tuple[str, ...], wire: WireMessage) -> bool:
    """Whether ``wire`` carries a signature made with one of ``keys``."""
    given = wire.headers.get(SIGNATURE_HEADER)
    if isinstance(given, bytes):
        given = given.decode("ascii", errors="replace")
    if not isinstance(given, str):
        return False
    return any(hmac.compare_digest(sign(key, wire), given) for key in keys)


class SigningMiddleware(Middleware):
    """Signs outgoing task messages and rejects unsigned or forged ones, when ``signing_keys`` is set."""

    async def before_publish(self, app: App, message: TaskMessage, wire: WireMessage) -> None:
        keys = app.conf.signing_keys
        if keys:
            wire.headers[SIGNATURE_HEADER] = sign(keys[0], wire)

    async def before_process(self, worker: Worker, message: TaskMessage, wire: WireMessage) -> None:
        keys = worker.app.conf.signing_keys
        if not keys:
            return
        if SIGNATURE_HEADER not in wire.headers:
            raise Reject("unsigned message (this worker requires signed messages: signing_keys is set)")
        if not verify(keys, wire):
            raise Reject("bad signature: signed with none of this worker's signing_keys, or altered")
