"""Security promises: TLS with verification, no credentials in output, signed messages, no pickle."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.broker import TestBroker
from support.workers import get_raw, running_worker

from amqtask import App, BrokerConnectionError
from amqtask.cli import main
from amqtask.signing import SigningMiddleware

TESTS = Path(__file__).resolve().parent


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for DNS:localhost, and a client certificate, made for this test run."""
    d = tmp_path_factory.mktemp("certs")
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
    version = pytestconfig.getoption("--rabbitmq")
    broker = TestBroker(name=f"amqtask-tls-{version.replace('.', '')}", tls=str(certificates))
    broker.start(version)
    yield broker
    broker.stop()


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


def test_cli_errors_never_show_the_password(tmp_path: Path) -> None:
    module = tmp_path / "secretapp.py"
    module.write_text(
        "from amqtask import App\n"
        "app = App('s', broker='amqp://guest:Sup3rS3cret@127.0.0.1:1//', broker_connect_timeout_s=0.2,"
        " publish_timeout_s=1)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "amqtask", "call", "-A", "secretapp", "x.y"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Sup3rS3cret" not in output
    assert "guest:***@127.0.0.1" in output


def test_credentials_can_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "url"
    secret.write_text("amqp://svc:from-file@broker.internal:5672/prod\n")
    monkeypatch.setenv("AMQTASK_BROKER_URL_FILE", str(secret))
    assert App("f").conf.broker_url == ("amqp://svc:from-file@broker.internal:5672/prod",)


def test_topology_apply_output_masks_credentials() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["call", "-A", "nonexistent_module_for_test", "x"])
    assert result.exit_code == 2 and "cannot import" in result.output


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


def test_no_pickle_anywhere_in_the_package() -> None:
    package = TESTS.parent / "amqtask"
    offenders = [
        p.name for p in package.rglob("*.py") if "import pickle" in p.read_text() or "pickle.loads" in p.read_text()
    ]
    assert offenders == []
