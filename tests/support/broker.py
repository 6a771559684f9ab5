"""The test suite's RabbitMQ: a thin wrapper around deploy/rabbitmq.sh.

The script does the work (and is what CI and developers run by hand); this module only
calls it, so a broker started by hand and one started by a test session are the same
broker. ``start`` is idempotent: sessions share a running broker and isolate themselves
with a vhost each (``add_vhost``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

DEPLOY_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq.sh"


class BrokerError(RuntimeError):
    """deploy/rabbitmq.sh failed; the message carries its stderr."""


class TestBroker:
    """A broker (or cluster) started, or found running, through deploy/rabbitmq.sh."""

    __test__ = False  # a helper, not a test class

    def __init__(self, name: str | None = None, nodes: int = 1, tls: str | None = None) -> None:
        self._name = name
        self.nodes = nodes
        self.tls = tls
        self.urls: list[str] = []
        self.amqps_url: str | None = None
        self.requested_version = ""
        self._target: list[str] = []

    def start(self, version: str) -> None:
        """Start the broker unless it runs already; return once every node accepts AMQP."""
        self._target = ["--name", self._name] if self._name else ["--version", version]
        tls = ["--tls", self.tls] if self.tls else []
        out = self._run("start", "--version", version, "--nodes", str(self.nodes), *tls, *self._target)
        self.urls = out.splitlines()[-1].split(",")
        self.requested_version = version
        if self.tls:
            found = re.search(r"amqps://[^\s',]+", self._state())
            self.amqps_url = found.group(0) if found else None

    def _state(self) -> str:
        name = self._name or f"amqtask-{self.requested_version.replace('.', '')}"
        path = Path("/var/tmp/amqtask-rabbitmq") / name / "state"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """Stop every node and delete the broker's data."""
        self._run("stop", *self._target)

    @property
    def url(self) -> str:
        """The first node's URL, for the default vhost "/"."""
        return self.vhost_url("")

    def vhost_url(self, vhost: str, node: int = 0) -> str:
        """A node's URL for ``vhost``, percent-encoded ("/" becomes %2F)."""
        if not self.urls:
            raise BrokerError("the broker has not been started")
        return self.urls[node] + quote(vhost, safe="")

    def ctl(self, *args: str, node: int = 0) -> str:
        """Run ``rabbitmqctl ARGS`` against one node and return its stdout."""
        return self._run("ctl", *self._target, "--node", str(node), "--", *args)

    def add_vhost(self, vhost: str) -> str:
        """Create a vhost where guest has full permissions; return its URL."""
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return self.vhost_url(vhost)

    def delete_vhost(self, vhost: str) -> None:
        self.ctl("delete_vhost", vhost)

    def stop_node(self, i: int = 0) -> None:
        """Stop one node, keeping its data (broker-restart tests)."""
        self._run("stop-node", *self._target, "--node", str(i))

    def start_node(self, i: int = 0) -> None:
        """Start a node stopped by ``stop_node`` and wait until it accepts AMQP again."""
        self._run("start-node", *self._target, "--node", str(i))

    @functools.cached_property
    def version(self) -> str:
        """The server's own version string, e.g. "3.10.8" (not the one asked for)."""
        status = json.loads(self.ctl("status", "--formatter", "json"))
        return str(status["rabbitmq_version"])

    @property
    def version_info(self) -> tuple[int, ...]:
        """``version`` as numbers, e.g. (3, 10, 8)."""
        return tuple(int(part) for part in re.findall(r"\d+", self.version)[:3])

    def _run(self, *args: str) -> str:
        if not self._target:
            raise BrokerError("the broker has not been started")
        proc = subprocess.run(
            ["bash", str(DEPLOY_SCRIPT), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BrokerError(f"deploy/rabbitmq.sh {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr}")
        return proc.stdout


@contextlib.contextmanager
def cluster(version: str, name: str, nodes: int, vhost: str) -> Iterator[TestBroker]:
    """A cluster of its own with ``vhost``, stopped and deleted on exit; skips if the machine cannot run one."""
    import pytest

    broker = TestBroker(name=f"{name}-{version.replace('.', '')}-{os.getpid()}", nodes=nodes)
    try:
        broker.start(version)
    except BrokerError as exc:  # the machine cannot run a cluster: nothing amqtask can fix
        pytest.skip(f"cannot start a {nodes}-node RabbitMQ {version} cluster here: {exc}")
    try:
        broker.add_vhost(vhost)
        yield broker
    finally:
        broker.stop()
