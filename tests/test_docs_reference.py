"""The reference pages of the documentation site are generated from the code and cover all of it.

``mkdocs build --strict`` (``tox -e docs``) renders them; these tests check, without MkDocs, that the
generator (docs/hooks/generate.py) lists every setting with its type and every command.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import click

from amqtask.cli import main
from amqtask.settings import ENV_PREFIX, SPECS

HOOK = Path(__file__).resolve().parent.parent / "docs" / "hooks" / "generate.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generate", HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_is_in_the_settings_reference_with_its_type_and_variable() -> None:
    page = _generator().settings_page()
    rows = {line.split("|")[1].strip(" `"): line for line in page.splitlines() if line.startswith("| `")}
    assert set(rows) == set(SPECS)
    for name, spec in SPECS.items():
        assert f"`{ENV_PREFIX}{name.upper()}`" in rows[name]
        assert spec.help.split()[0] in rows[name]


def test_every_validator_says_what_it_accepts() -> None:
    # A new kind of setting needs @_kind("...") on its validator, or the reference says "any value".
    vague = sorted(name for name, spec in SPECS.items() if spec.kind == "any value")
    assert vague == []


def _paths(group: click.Group, path: tuple[str, ...] = ("amqtask",)) -> list[str]:
    found = [" ".join(path)]
    for name, command in group.commands.items():
        found += _paths(command, (*path, name)) if isinstance(command, click.Group) else [" ".join((*path, name))]
    return found


def test_every_command_is_in_the_cli_reference() -> None:
    page = _generator().cli_page()
    sections = {line[len("## `") : -1] for line in page.splitlines() if line.startswith("## `")}
    assert set(_paths(main)) == sections
    assert "_AMQTASK_COMPLETE=bash_source amqtask" in page
