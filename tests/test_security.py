"""Security promises: TLS with verification, no credentials in output, signed messages, no pickle."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from support.broker import BrokerError, TestBroker
from support.faults import consumer_count, spawn_worker, stop
from support.workers import get_raw, running_worker, wait_for

from amqtask import App, BrokerConnectionError
from amqtask.signing import SigningMiddleware

TESTS = Path(__file__).resolve().parent


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for DNS:localhost, and a client certificate, made for this test run."""
    return _make_certificates(tmp_path_factory.mktemp("certs"))


def _make_certificates(d: Path) -> Path:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=amqtask-test-ca",
             "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca.pem"))  # fmt: skip
    for name, extension in (("server", "subjectAltName=DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}-key.pem"),
                 "-out", str(d / f"{name}.csr"))  # fmt: skip
        (d / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
                 str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2", "-extfile", str(d / f"{name}.ext"),
                 "-out", str(d / f"{name}.pem"))  # fmt: skip
    return d


@pytest.fixture(scope="module")
def tls_broker(certificates: Path, pytestconfig: pytest.Config) -> Iterator[TestBroker]:
    """A TLS broker serving this process's certificates. Named after the process: under a shared name,
    another test process (an xdist worker, a parallel run) reused a broker made with its own CA, and
    verification failed ("self-signed certificate in certificate chain"), or stopped it mid-test."""
    version = pytestconfig.getoption("--rabbitmq")
    broker = TestBroker(name=_tls_broker_name(version), tls=str(certificates))
    broker.start(version)
    yield broker
    broker.stop()


def _tls_broker_name(version: str) -> str:
    return f"amqtask-tls-{version.replace('.', '')}-{os.getpid()}"


@pytest.mark.broker
def test_a_running_tls_broker_is_reused_only_with_the_certificates_it_serves(
    tls_broker: TestBroker, certificates: Path, tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    """deploy/rabbitmq.sh refuses to hand out a TLS broker made with another CA: a client trusting that
    CA could not verify it (the flaky CERTIFICATE_VERIFY_FAILED of parallel test processes)."""
    version = pytestconfig.getoption("--rabbitmq")
    other = TestBroker(name=_tls_broker_name(version), tls=str(_make_certificates(tmp_path)))
    with pytest.raises(BrokerError, match="serves other TLS certificates than"):
        other.start(version)
    same = TestBroker(name=_tls_broker_name(version), tls=str(certificates))
    same.start(version)
    assert same.amqps_url == tls_broker.amqps_url


def _tls_app(broker: TestBroker, certificates: Path, host: str, **ssl: object) -> App:
    assert broker.amqps_url, "the TLS broker reported no amqps URL"
    url = broker.amqps_url.replace("localhost", host)
    return App("tls", broker=url, broker_ssl_options={"cafile": str(certificates / "ca.pem"), **ssl},
               broker_connect_timeout_s=5, publish_timeout_s=5)  # fmt: skip


@pytest.mark.broker
def test_tls_with_ca_verification_and_a_client_certificate(tls_broker: TestBroker, certificates: Path) -> None:
    app = _tls_app(tls_broker, certificates, "localhost", certfile=str(certificates / "client.pem"),
                   keyfile=str(certificates / "client-key.pem"))  # fmt: skip

    @app.task(name="sec.echo")
    def echo(x: str) -> str:
        return x

    async def scenario() -> None:
        async with running_worker(app):
            assert await (await echo.adelay("over tls")).aget(timeout=10) == "over tls"

    asyncio.run(scenario())


@pytest.mark.broker
def test_tls_hostname_is_verified_by_default(tls_broker: TestBroker, certificates: Path) -> None:
    # The certificate names DNS:localhost only; reaching it as 127.0.0.1 must fail verification.
    app = _tls_app(tls_broker, certificates, "127.0.0.1")

    async def scenario() -> None:
        with pytest.raises(BrokerConnectionError, match=r"CERTIFICATE_VERIFY_FAILED|hostname|IP address mismatch"):
            await app.runtime().broker.connection(timeout=3)
        await app.aclose()

    asyncio.run(scenario())


#: Passwords with every character that ends a URL part, raw; each piece of four characters or more
#: is distinctive, so a parser quoting a fragment of a broken URL ("invalid port 'Kw7p'") is caught too.
RAW_PASSWORDS = ("Sup3rS3cretPlain", "Zq9x/Kw7p?Rt4m#Vb2n", "Hj6c@Lm3d/Np8f?Qs5g#Tu1w@")


def _forbidden(password: str) -> set[str]:
    """The password, its percent-encoded form, and each distinctive piece of it."""
    return {password, quote(password, safe=""), *re.findall(r"[^/?#@:]{4,}", password)}


def _run_cli(*args: str, url: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A real ``python -m amqtask ARGS`` command against ``url``, with the tests' task modules importable."""
    environment = {
        **os.environ,
        "AMQTASK_BROKER_URL": url,
        "AMQTASK_BROKER_CONNECT_TIMEOUT_S": "0.5",
        "AMQTASK_PUBLISH_TIMEOUT_S": "2",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
        **(env or {}),
    }
    command = [sys.executable, "-m", "amqtask", *args]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=60)


def _worker_log_until(url: str, cwd: Path, wanted: str) -> str:
    """A real worker at DEBUG, stopped (SIGTERM) once its output shows ``wanted`` (or it exits)."""
    log_path = cwd / f"worker-{uuid.uuid4().hex[:6]}.log"
    worker = spawn_worker(url, log_path, "-l", "debug", env={"AMQTASK_BROKER_CONNECT_TIMEOUT_S": "0.5"})
    try:
        wait_for(lambda: wanted in log_path.read_text(errors="replace") or worker.poll() is not None, 30, wanted)
    finally:
        stop(worker)
    return log_path.read_text(errors="replace")


@pytest.mark.parametrize("password", RAW_PASSWORDS)
def test_failing_worker_and_cli_logs_at_debug_never_show_the_password(password: str, tmp_path: Path) -> None:
    # Port 1 is closed: the connection fails, as it would with a wrong password or a down broker.
    url = f"amqp://app:{password}@127.0.0.1:1//"
    call = _run_cli("call", "-A", "fault_tasks", "fault.echo", "--args", '["x"]', "-l", "debug", url=url, cwd=tmp_path)
    check = _run_cli("check", "-A", "fault_tasks", "-t", "1", url=url, cwd=tmp_path)
    assert call.returncode != 0 and check.returncode != 0
    worker = _worker_log_until(url, tmp_path, "cannot connect")
    outputs = {"call": call.stdout + call.stderr, "check": check.stdout + check.stderr, "worker": worker}
    for name, output in outputs.items():
        leaked = [secret for secret in _forbidden(password) if secret.lower() in output.lower()]
        assert not leaked, f"{name} showed {leaked}:\n{output[-2000:]}"
        assert "app:***@127.0.0.1:1" in output, f"{name} does not name the broker it tried:\n{output[-2000:]}"


@pytest.fixture
def secret_user(rabbitmq: TestBroker, broker_vhost: str, unique: str) -> Iterator[tuple[str, str]]:
    """A broker user whose password holds "/", "?", "#" and "@", with rights on the test vhost."""
    user, password = f"sec-{unique}", "Zq9x/Kw7p?Rt4m#Vb2n@Yc5e"
    rabbitmq.ctl("add_user", user, password)
    rabbitmq.ctl("set_permissions", "-p", broker_vhost, user, ".*", ".*", ".*")
    yield user, password
    rabbitmq.ctl("delete_user", user)


@pytest.mark.broker
def test_working_worker_and_cli_logs_at_debug_never_show_the_password(
    secret_user: tuple[str, str], broker_url: str, unique: str, tmp_path: Path
) -> None:
    user, password = secret_user
    url = broker_url.replace("guest:guest@", f"{user}:{quote(password, safe='')}@", 1)
    assert url != broker_url
    queue = f"q-{unique}"
    environment = {"AMQTASK_TASK_DEFAULT_QUEUE": queue}
    log_path = tmp_path / "worker.log"
    worker = spawn_worker(url, log_path, "-l", "debug", env=environment)
    try:
        wait_for(lambda: asyncio.run(consumer_count(broker_url, queue)) or worker.poll() is not None, 30, "a consumer")
        call = _run_cli("call", "-A", "fault_tasks", "fault.echo", "--args", '["secret-run"]', "--wait", "-l",
                        "debug", url=url, cwd=tmp_path, env=environment)  # fmt: skip
        check = _run_cli("check", "-A", "fault_tasks", url=url, cwd=tmp_path, env=environment)
    finally:
        status = stop(worker)
    worker_log = log_path.read_text(errors="replace")
    assert status == 0, worker_log
    assert call.returncode == 0 and call.stdout.strip() == '"secret-run"', call.stdout + call.stderr
    assert check.returncode == 0 and "ok" in check.stdout, check.stdout + check.stderr
    assert "DEBUG" in worker_log and "DEBUG" in call.stderr, "the logs were not captured at DEBUG"
    for name, output in {"call": call.stdout + call.stderr, "check": check.stdout + check.stderr,
                         "worker": worker_log}.items():  # fmt: skip
        leaked = [secret for secret in _forbidden(password) if secret.lower() in output.lower()]
        assert not leaked, f"{name} showed {leaked}:\n{output[-2000:]}"


def test_credentials_can_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "url"
    secret.write_text("amqp://svc:from-file@broker.internal:5672/prod\n")
    monkeypatch.setenv("AMQTASK_BROKER_URL_FILE", str(secret))
    assert App("f").conf.broker_url == ("amqp://svc:from-file@broker.internal:5672/prod",)


@pytest.mark.broker
def test_signed_messages_run_and_unsigned_or_forged_ones_are_dead_lettered(broker_url: str, unique: str) -> None:
    queue = f"q-{unique}"
    producer = App("signer", broker=broker_url, task_default_queue=queue, signing_keys=["new-key", "old-key"])
    worker_app = App("verifier", broker=broker_url, task_default_queue=queue, signing_keys=["new-key", "old-key"])
    unsigned = App("anonymous", broker=broker_url, task_default_queue=queue)
    forger = App("forger", broker=broker_url, task_default_queue=queue, signing_keys=["guessed-key"])
    previous = App("previous", broker=broker_url, task_default_queue=queue, signing_keys=["old-key"])
    assert all(any(isinstance(m, SigningMiddleware) for m in app.middleware) for app in (producer, worker_app))

    @worker_app.task(name="sec.add")
    def add(x: int, y: int) -> int:
        return x + y

    async def scenario() -> None:
        async with running_worker(worker_app):
            assert await (await producer.asend_task("sec.add", (1, 2))).aget(timeout=10) == 3
            # Rotation: a message signed with the old key still verifies while the key is listed.
            assert await (await previous.asend_task("sec.add", (2, 2))).aget(timeout=10) == 4
            for sender, reason in ((unsigned, "unsigned"), (forger, "bad signature")):
                await sender.asend_task("sec.add", (5, 5), ignore_result=True)
                dead = await get_raw(broker_url, f"{queue}.dlq")
                assert dead.headers["x-amqtask-reason"] == "rejected"
                assert reason in dead.headers["x-amqtask-detail"]
            for app in (producer, unsigned, forger, previous):
                await app.aclose()

    asyncio.run(scenario())


def _imported_modules(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
            # importlib.import_module("pickle") / __import__("pickle")
            name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value))
    return found


#: Modules that unpickle (or run arbitrary code from data) when they load.
UNSAFE = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "jsonpickle", "yaml"}


def test_no_module_of_the_package_imports_a_pickle_or_code_loading_library() -> None:
    package = TESTS.parent / "amqtask"
    modules = sorted(package.rglob("*.py"))
    assert len(modules) > 30, "the package was not found"
    offenders = {
        str(path.relative_to(package)): unsafe
        for path in modules
        if (unsafe := {m for m in _imported_modules(ast.parse(path.read_text())) if m.split(".")[0] in UNSAFE})
    }
    assert offenders == {}


def test_the_import_check_sees_every_way_of_importing() -> None:
    source = (
        "import pickle\nfrom yaml import load\nimport importlib\nimportlib.import_module('dill')\n__import__('marshal')"
    )
    assert {m.split(".")[0] for m in _imported_modules(ast.parse(source))} >= {"pickle", "yaml", "dill", "marshal"}
