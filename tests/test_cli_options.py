"""The command line's habits, without a broker: where -A goes, help texts, exit codes, a dead broker.

Every command here runs as a user runs it (``python -m amqtask`` in a subprocess) unless it only needs
click's parser. The dead broker is a local port nobody listens on: the connection is refused at once,
so only the command's own bound can make it wait.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from support.workers import TESTS_DIR

from amqtask import __version__
from amqtask.cli import main

PASSWORD = "hunter2"


def amqtask(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AMQTASK_") or k.startswith("AMQTASK_TEST")}
    environment.update(env or {})
    environment["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent), str(cwd or "")])
    return subprocess.Popen([sys.executable, "-m", "amqtask", *args], env=environment, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def finished(process: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.fixture
def dead_broker_url() -> str:
    """An AMQP URL on a local port that was free a moment ago: connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"amqp://guest:{PASSWORD}@127.0.0.1:{port}//"


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


ALL_COMMANDS = [(), *_commands(main)]


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda path: " ".join(path) or "amqtask")
def test_help_of_every_command_exits_0_without_an_app_or_broker(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"], env={"AMQTASK_APP": None, "AMQTASK_BROKER_URL": None})
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")


def test_the_command_tree_is_the_documented_one() -> None:
    # Guards the help test above against walking an empty tree.
    names = {" ".join(path) for path in ALL_COMMANDS}
    assert {"worker", "call", "purge", "beat list", "dlq list", "inspect ping", "topology verify", "check"} <= names


def test_worker_help_ends_with_examples() -> None:
    output = CliRunner().invoke(main, ["worker", "--help"]).output
    assert "Examples:" in output
    assert output.rstrip().splitlines()[-1].lstrip().startswith("amqtask worker -A proj --burst")


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output == f"amqtask, version {__version__}\n"


def test_a_celery_pool_name_for_P_is_explained() -> None:
    result = CliRunner().invoke(main, ["worker", "-A", "core_tasks", "-P", "prefork"])
    assert result.exit_code == 2
    assert "amqtask's -P is a process count" in result.output and "-P N" in result.output
    assert CliRunner().invoke(main, ["worker", "-P", "0"]).exit_code == 2


def test_the_app_is_taken_after_the_command_before_it_or_from_AMQTASK_APP(dead_broker_url: str) -> None:
    # `check` loads the app, then meets the dead broker: exit 3 proves the app was found, exit 2 that it was not.
    env = {"AMQTASK_BROKER_URL": dead_broker_url}
    runs = {
        "after": amqtask("check", "-A", "core_tasks", "-t", "0.5", env=env),
        "before": amqtask("-A", "core_tasks", "check", "-t", "0.5", env=env),
        "env": amqtask("check", "-t", "0.5", env={**env, "AMQTASK_APP": "core_tasks"}),
        "after wins": amqtask("-A", "no_such_module", "check", "-A", "core_tasks", "-t", "0.5", env=env),
        "none": amqtask("check", "-t", "0.5", env=env),
    }
    outcomes = {name: finished(process) for name, process in runs.items()}
    for name in ("after", "before", "env", "after wins"):
        assert outcomes[name][0] == 3, (name, outcomes[name])
    code, _, err = outcomes["none"]
    assert code == 2 and err == (
        "error: no app given: use -A/--app MODULE[:ATTR] (before or after the command) or set AMQTASK_APP\n"
    )


def test_beat_list_takes_the_app_after_list_too(dead_broker_url: str) -> None:
    code, out, err = finished(amqtask("beat", "list", "-A", "core_tasks", env={"AMQTASK_BROKER_URL": dead_broker_url,
                                      "AMQTASK_BROKER_CONNECT_TIMEOUT_S": "0.3"}))  # fmt: skip
    assert code == 0, err
    assert out.startswith("state unavailable")


CONFIG_ERRORS = {
    "unknown setting in App()": ("from amqtask import App\napp = App('x', worker_concurency=4)\n", {},
                                 "worker_concurrency"),
    "syntax error": ("from amqtask import App\napp = App('x'\n", {}, "syntax error in"),
    "unknown AMQTASK_ variable": ("from amqtask import App\napp = App('x')\n", {"AMQTASK_WORKR_CONCURRENCY": "2"},
                                  "AMQTASK_WORKR_CONCURRENCY"),
    "no App in the module": ("x = 1\n", {}, "no amqtask App in module"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_a_configuration_error_while_loading_the_app_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    source, env, named = CONFIG_ERRORS[case]
    (tmp_path / "badapp.py").write_text(source)
    code, _, err = finished(amqtask("worker", "-A", "badapp", env=env, cwd=tmp_path))
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and named in err, err


def test_an_unknown_AMQTASK_variable_is_exit_2_without_an_app_too() -> None:
    code, _, err = finished(amqtask("dlq", "list", "default", env={"AMQTASK_BROKER_ULR": "amqp://localhost//"}))
    assert code == 2 and err.startswith("error: configuration: environment variable AMQTASK_BROKER_ULR"), err


#: Every command that talks to the broker once, without an app: each must give up within its --timeout.
DEAD_BROKER_COMMANDS = {
    "call": ["call", "core.add", "--args", "[1, 2]"],
    "call --wait": ["call", "core.add", "--wait"],
    "inspect ping": ["inspect", "ping", "-A", "core_tasks"],
    "inspect stats (no app)": ["inspect", "stats"],
    "control revoke": ["control", "revoke", "some-id"],
    "dlq list": ["dlq", "list", "default"],
    "dlq purge": ["dlq", "purge", "default", "--yes"],
    "purge": ["purge", "default", "--yes"],
    "topology apply": ["topology", "apply", "-A", "core_tasks"],
    "topology verify": ["topology", "verify", "-A", "core_tasks"],
}
BOUND_S = 1.0
#: Interpreter start-up and imports on a busy CI machine, on top of the bound; before, this took 30 s.
STARTUP_ALLOWANCE_S = 10.0


@pytest.mark.parametrize("name", list(DEAD_BROKER_COMMANDS))
def test_a_dead_broker_fails_the_command_within_its_timeout_in_one_line_exit_3(name: str, dead_broker_url: str) -> None:
    started = time.monotonic()
    process = amqtask(
        *DEAD_BROKER_COMMANDS[name], "--timeout", str(BOUND_S), env={"AMQTASK_BROKER_URL": dead_broker_url}
    )
    code, out, err = finished(process)
    elapsed = time.monotonic() - started
    assert code == 3, err
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: BrokerConnectionError: no connection to the broker"), err
    assert dead_broker_url.replace(PASSWORD, "***") in err and PASSWORD not in err, err
    assert "is RabbitMQ running" in err, err
    assert elapsed < BOUND_S + STARTUP_ALLOWANCE_S


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--queue", "bad!name"], "queue name 'bad!name' holds '!'"),
        (["--exchange", "amq.direct", "--routing-key", "k" * 300], "routing key 'kkkk"),
        (["--exchange", "no*", "--routing-key", "k"], "exchange name 'no*' holds '*'"),
    ],
    ids=["queue", "routing-key", "exchange"],
)
def test_a_name_the_broker_cannot_take_is_exit_2_before_connecting(
    options: list[str], message: str, dead_broker_url: str
) -> None:
    """The name is checked before anything is sent: against a dead broker the answer is still exit 2."""
    process = amqtask("call", "core.add", *options, "--timeout", "5", env={"AMQTASK_BROKER_URL": dead_broker_url})
    code, out, err = finished(process)
    assert (code, out) == (2, ""), err
    assert err.startswith("error: ConfigurationError: ") and message in err and len(err.splitlines()) == 1, err
