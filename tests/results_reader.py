"""A separate process that reads amqp results by id: ``python results_reader.py URL STREAM ACTION ID``.

ACTION is ``get`` (wait for the outcome), ``peek`` (read state without waiting), ``known`` (read state and
whether the id is known at all) or ``group`` (restore a saved group and get its values). Settings come from
``AMQTASK_*`` variables too (e.g. ``AMQTASK_RESULT_STREAM_LOOKBACK_S``). Prints one JSON line per read; each
read is made twice, to show reading never consumes.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from amqtask import App, AsyncResult, GroupResult


def describe(result: AsyncResult[Any]) -> dict[str, Any]:
    value = result.result
    shown = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else value
    return {"id": result.id, "state": result.state, "result": shown}


def main() -> None:
    url, stream, action, task_id = sys.argv[1:5]
    app = App("reader", broker=url, result_backend="amqp", result_stream=stream)
    for _ in range(2):
        if action == "group":
            group = GroupResult.restore(task_id, app=app)
            print(json.dumps(None if group is None else group.get(timeout=30)), flush=True)
            continue
        result: AsyncResult[Any] = AsyncResult(task_id, app=app)
        if action == "get":
            result.get(timeout=30, propagate=False)
        if action == "known":
            print(json.dumps({"id": task_id, "state": result.state, "known": result.known}), flush=True)
            continue
        print(json.dumps(describe(result)), flush=True)
    app.close()


if __name__ == "__main__":
    main()
