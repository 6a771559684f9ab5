"""The app behind the gateway tests: ``amqtask serve -A gateway_app`` builds it from the environment
(``GATEWAY_BROKER_URL``, ``GATEWAY_QUEUE``, ``GATEWAY_STREAM``, ``GATEWAY_TOKENS_FILE``); the tests build
the same app for their worker with :func:`create_app`.
"""

from __future__ import annotations

import os
from typing import Any

from amqtask import App


def create_app(url: str, queue: str, stream: str, tokens_file: str | None = None) -> App:
    app = App("gateway", broker=url, task_default_queue=queue, result_backend="amqp", result_stream=stream,
              gateway_tokens_file=tokens_file, gateway_max_body_bytes=64 * 1024, task_track_started=True,
              gateway_max_wait_s=2)  # fmt: skip

    @app.task(name="gw.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="gw.fail")
    def fail(message: str) -> None:
        raise ValueError(message)

    @app.task(name="gw.progress", bind=True)
    def progress(self: Any, steps: int) -> int:
        for step in range(steps):
            self.update_state(state="PROGRESS", meta={"step": step})
        return steps

    return app


app = None
if "GATEWAY_BROKER_URL" in os.environ:
    env = os.environ
    app = create_app(
        env["GATEWAY_BROKER_URL"], env["GATEWAY_QUEUE"], env["GATEWAY_STREAM"], env.get("GATEWAY_TOKENS_FILE")
    )
