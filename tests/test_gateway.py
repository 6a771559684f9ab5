"""The HTTP gateway end to end: ``amqtask serve`` (real uvicorn) in a subprocess, a real worker, a real HTTP client.

Covers issue 15's acceptance: enqueue over HTTP, a worker runs it, the result read over HTTP (also by
long poll); a failure's error; revoke; bad names, bad JSON, oversize bodies and wrong tokens each get their
status; the token is never echoed; and the generated OpenAPI document property-tested with schemathesis.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from support.workers import REPO_DIR, TESTS_DIR, wait_for, worker_thread

from amqtask import App

pytestmark = [pytest.mark.broker, pytest.mark.ecosystem]
TOKEN = "s3cret-t0ken-for-tests"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def setup(broker_url: str, unique: str, tmp_path: Path) -> Iterator[tuple[App, str]]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# gateway tokens\n{TOKEN}\n")
    queue, stream, port = f"gw-{unique}", f"results-{unique}", free_port()
    path = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "GATEWAY_BROKER_URL": broker_url, "GATEWAY_QUEUE": queue, "GATEWAY_STREAM": stream,
           "GATEWAY_TOKENS_FILE": str(tokens), "PYTHONPATH": path}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "amqtask", "serve", "-A", "gateway_app", "--bind",
                               f"127.0.0.1:{port}", "-l", "warning"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    from gateway_app import create_app

    app = create_app(broker_url, queue, stream)
    try:
        wait_for(lambda: _up(base, server), 30, "the gateway to listen")
        with worker_thread(app, concurrency=2):
            yield app, base
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode(errors="replace")
        assert TOKEN not in output
        app.close()


def _up(base: str, server: subprocess.Popen[bytes]) -> bool:
    assert server.poll() is None, server.communicate()[0].decode(errors="replace")
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def outcome(http: httpx.Client, task_id: str) -> dict[str, Any]:
    """The task's state once ready: long polls of the gateway (its test app allows 2 s each), for up to 60 s."""
    for _ in range(30):
        state: dict[str, Any] = http.get(f"/tasks/{task_id}", params={"wait": 2}).json()
        if state["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
            return state
    raise AssertionError(f"task {task_id} not ready within 60 s: {state}")


def client(base: str, token: str | None = TOKEN) -> httpx.Client:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base, headers=headers, timeout=30)


def test_send_run_and_read_over_http(setup: tuple[App, str]) -> None:
    app, base = setup
    with client(base) as http:
        queue = app.conf.task_default_queue
        sent = http.post("/tasks/gw.add", json={"args": [2, 3], "options": {"priority": 3, "queue": queue}})
        assert sent.status_code == 202 and sent.headers["location"] == f"/tasks/{sent.json()['id']}"
        task_id = sent.json()["id"]
        done = outcome(http, task_id)
        assert done == {"id": task_id, "state": "SUCCESS", "result": 5, "meta": None}
        assert http.get(f"/tasks/{task_id}").json() == done  # reading never consumes
        failed = http.post("/tasks/gw.fail", json={"kwargs": {"message": "bad input"}}).json()["id"]
        error = outcome(http, failed)
        assert error["state"] == "FAILURE" and error["error"]["type"] == "ValueError"
        assert error["error"]["message"] == "bad input" and "ValueError" in error["error"]["traceback"]
        unknown = http.get("/tasks/no-such-task")
        assert unknown.status_code == 404 and "no such task known" in unknown.json()["error"]
        queued = http.post("/tasks/gw.add", json={"args": [1, 1], "options": {"countdown": 3600}}).json()["id"]
        waiting = http.get(f"/tasks/{queued}")  # sent, not started: known, so PENDING rather than 404
        assert waiting.status_code == 200 and waiting.json()["state"] == "PENDING"
        assert http.delete(f"/tasks/{queued}").status_code == 202
    script = REPO_DIR / "examples" / "gateway_client.sh"  # the curl client of the docs
    done = subprocess.run(["sh", str(script), "gw.add", "[20, 22]"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GATEWAY": base, "TOKEN": TOKEN, "WAIT": "2"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == 42


def test_revoke_over_http(setup: tuple[App, str]) -> None:
    _, base = setup
    with client(base) as http:
        task_id = http.post("/tasks/gw.add", json={"args": [1, 1], "options": {"countdown": 2}}).json()["id"]
        revoked = http.delete(f"/tasks/{task_id}")
        assert revoked.status_code == 202 and revoked.json() == {"id": task_id, "revoked": True}
        assert outcome(http, task_id)["state"] == "REVOKED"


def test_refusals_have_the_right_status_and_never_echo_the_token(setup: tuple[App, str]) -> None:
    _, base = setup
    with client(base) as http:
        assert http.post("/tasks/os.system", json={"args": ["id"]}).status_code == 404
        bad_json = http.post("/tasks/gw.add", content=b'{"args": [1,', headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and "error" in bad_json.json()
        deep = http.post("/tasks/gw.add", content=b'{"args": ' + b"[" * 100 + b"]" * 100 + b"}")
        assert deep.status_code == 400
        oversize = http.post("/tasks/gw.add", content=b'{"args": ["' + b"x" * 70_000 + b'"]}')
        assert oversize.status_code == 413
        assert http.post("/tasks/gw.add", json={"args": {}}).status_code == 422
        for queue in ("amq.rabbitmq.reply-to", "other-apps-queue", "\u0019"):  # only the app's own queues
            assert http.post("/tasks/gw.add", json={"options": {"queue": queue}}).status_code == 422
        assert http.post("/tasks/gw.add", json={"options": {"countdown": 10**12}}).status_code == 422
        assert http.get("/tasks/x", params={"wait": "soon"}).status_code == 422
        assert http.put("/tasks/x").status_code == 405
    for token in (None, "wrong-token", TOKEN + "x"):
        with client(base, token) as http:
            denied = http.post("/tasks/gw.add", json={"args": [1, 2]})
            assert denied.status_code == 401 and denied.json() == {"error": "a valid bearer token is required"}
            assert http.get("/tasks/x").status_code == 401 and http.delete("/tasks/x").status_code == 401
    with client(base, None) as http:
        assert http.get("/health").json() == {"status": "ok", "broker": True}
        document = http.get("/openapi.json").json()
        assert TOKEN not in json.dumps(document)
        assert document["paths"]["/tasks/{name}"]["post"]["parameters"][0]["schema"]["enum"] == [
            "gw.add", "gw.fail", "gw.progress"]  # fmt: skip


# schemathesis draws with the `random` module inside its strategies, which hypothesis flags (not our code).
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
def test_openapi_document_holds_against_the_running_gateway(setup: tuple[App, str]) -> None:
    """schemathesis generates requests from the document; every answer must be documented and valid."""
    # object_authorization is imported up front: schemathesis imports it lazily deep inside a check, where
    # pytest's import hook overflows the stack.
    import schemathesis
    import schemathesis.specs.openapi.object_authorization
    from schemathesis.checks import positive_data_acceptance

    _, base = setup

    @schemathesis.auth(refresh_interval=None)
    class Bearer:
        def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
            return TOKEN

        def set(self, case: schemathesis.Case, data: str, context: schemathesis.AuthContext) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            # Not positive_data_acceptance: an eta more than ~8.5 years away is refused (422; the delay levels
            # cannot hold it) and OpenAPI cannot bound a date-time. Everything else in the document is exact.
            case.call_and_validate(timeout=30, excluded_checks=[positive_data_acceptance])

        check()
