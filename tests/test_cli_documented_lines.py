"""Every ``amqtask …`` command line shown to users parses with the real CLI, so docs and deploy files cannot drift.

Collected from the README and docs/ (code blocks and inline code), deploy/ (compose, Kubernetes,
systemd, the Dockerfile, scripts) and examples/ (docstrings and comments), then parsed by click exactly
as ``amqtask`` would parse them, down to the last sub-command, without running anything.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from amqtask.cli import main

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = "|".join(sorted(main.commands))
#: ``amqtask <subcommand> …`` at the start of a shell line: after env assignments or a path (``.venv/bin/``).
SHELL_LINE = re.compile(
    rf"^\s*(?:\$\s+)?(?:[A-Z_]+=\S*\s+)*(?:\S*/)?(amqtask\s+(?:-\S+\s+\S+\s+)?(?:{SUBCOMMANDS})\b.*)$"
)
#: Inline code: ```amqtask …``` in reST docstrings, `amqtask …` in Markdown and comments.
INLINE = re.compile(rf"(`{{1,2}})((?:[A-Z_]+=\S*\s+)*amqtask\s+(?:-\S+\s+\S+\s+)?(?:{SUBCOMMANDS})\b[^`]*)\1")
#: Exec-form arrays: ["amqtask", "worker", …] in compose, Kubernetes and Dockerfile CMD.
ARRAY = re.compile(r'\[\s*"amqtask"\s*,[^\]]*\]')


def sources() -> list[Path]:
    found = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for folder in ("deploy", "examples"):
        found += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return found


def _words(line: str) -> list[str]:
    line = re.split(r"\s(?:&&|\|\||;|\|)\s|\s&$", line.strip())[0]  # the amqtask command of a shell line
    words = shlex.split(line, comments=True)
    while words and "=" in words[0] and not words[0].startswith("-"):
        words.pop(0)  # AMQTASK_APP=proj amqtask …
    return words[1:]


def command_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number, argv after 'amqtask')`` for each command line in ``path``."""
    markdown = path.suffix == ".md"
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if markdown and line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        for array in ARRAY.findall(line):
            yield number, json.loads(array)[1:]
        spans = INLINE.findall(line)
        for _, span in spans:
            yield number, _words(span)
        if (fenced or not markdown) and not spans and not ARRAY.search(line):
            match = SHELL_LINE.match(line.replace("\\", " "))
            if match:
                yield number, _words(match.group(1))


def parse(argv: list[str]) -> None:
    """Parse ``amqtask argv`` with click down to the last sub-command (raises click's usage errors).

    Command names alone (``amqtask dlq replay`` in a sentence) only have to exist: prose names commands
    without the arguments a real line needs.
    """
    command: click.Command = main
    ctx = main.make_context("amqtask", list(argv))
    while isinstance(command, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            return
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        if not rest:
            return  # a command named in prose
        command, ctx = sub, sub.make_context(name, rest, parent=ctx)


ALL_LINES = [(path, number, argv) for path in sources() for number, argv in command_lines(path)]


@pytest.mark.parametrize(
    ("path", "number", "argv"),
    ALL_LINES,
    ids=[f"{path.relative_to(ROOT)}:{number}" for path, number, _ in ALL_LINES],
)
def test_the_command_line_parses(path: Path, number: int, argv: list[str]) -> None:
    try:
        parse(argv)
    except click.exceptions.Exit:
        pass  # --help, --version
    except click.ClickException as exc:
        pytest.fail(f"{path.relative_to(ROOT)}:{number}: `amqtask {shlex.join(argv)}`: {exc.format_message()}")


def test_the_deploy_files_and_examples_are_all_checked() -> None:
    found = {str(path.relative_to(ROOT)) for path, _, _ in ALL_LINES}
    expected = {
        "README.md",
        "deploy/docker/compose.yaml",
        "deploy/docker/Dockerfile",
        "deploy/kubernetes-worker.yaml",
        "deploy/systemd/amqtask-worker.service",
        "deploy/demo.sh",
        "examples/beat_tasks.py",
        "examples/retries.py",
        "examples/routing.py",
    }
    assert expected <= found, sorted(expected - found)


def test_a_wrong_line_is_caught() -> None:
    with pytest.raises(click.UsageError):
        parse(["worker", "-A", "tasks", "--concurency", "8"])
    with pytest.raises(click.UsageError):
        parse(["beat", "-A", "tasks", "lst"])
    with pytest.raises(click.UsageError):
        parse(["dlq", "list", "orders", "--limit", "many"])
