"""MkDocs hook: pages generated from the code at build time, so they cannot drift from it.

* ``reference/settings.md``: every setting of ``amqtask.settings.SPECS`` (name, type, default, variable, help).
* ``reference/cli.md``: every command and sub-command of the ``amqtask`` CLI, as click prints its help.
* ``design/*.md``: the design write-ups, which live in module docstrings (:data:`DESIGN_NOTES`).
* Any page under ``docs/`` that ``nav`` does not list is appended to its "User guide" section, so
  adding ``docs/<topic>.md`` puts it on the site without editing ``mkdocs.yml``.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files

ROOT = Path(__file__).resolve().parents[2]

#: Generated page → the module whose docstring is the write-up.
DESIGN_NOTES = {
    "design/chords.md": "amqtask.chords",
    "design/delays.md": "amqtask.delays",
    "design/beat-state.md": "amqtask.beat.state",
    "design/beat-leader.md": "amqtask.beat.leader",
}


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def rst_to_markdown(text: str) -> str:
    """The reST found in our docstrings as Markdown: roles (``:class:`~a.B```) and literals become code spans."""
    text = re.sub(r":[a-z]+:`(~?)([^`]+)`", _role, text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    return text.replace("`\\ ", "`")


def import_from_tree(module_name: str) -> Any:
    """Import from this checkout (MkDocs restores ``sys.path`` after loading a hook, so add it on use)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(module_name)


def docstring_page(module_name: str) -> str:
    module = import_from_tree(module_name)
    doc = module.__doc__ or ""
    title, _, body = doc.strip().partition("\n")
    path = module_name.replace(".", "/") + ".py"
    return f"# {rst_to_markdown(title)}\n\n*The docstring of `{path}`.*\n\n{rst_to_markdown(body.strip())}\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(name: str, value: Any) -> str:
    if name == "worker_concurrency":
        return "the number of CPUs"  # computed on the machine that imports amqtask
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ", ".join(f"`{item}`" for item in value)
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def settings_page() -> str:
    """Every setting, from the one place they are declared (``amqtask.settings.SPECS``)."""
    settings = import_from_tree("amqtask.settings")
    lines = [
        "# Settings",
        "",
        "*Generated from `amqtask/settings.py` when the site is built.*",
        "",
        "Settings are keyword arguments of `App(...)`, attributes of `app.conf`, a module, object or dict",
        'given to `app.config_from_object(...)` (`namespace="CELERY"` reads Django-style `CELERY_BROKER_URL`),',
        f"or environment variables `{settings.ENV_PREFIX}<NAME>`; `{settings.ENV_PREFIX}<NAME>_FILE` reads the",
        "value from a file (for secrets). An unknown setting or a value of the wrong type raises",
        "`ConfigurationError` naming it (the command line prints it in one line and exits 2).",
        "",
        "| setting | type | default | environment variable | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, spec in settings.SPECS.items():
        variable = f"`{settings.ENV_PREFIX}{name.upper()}`"
        cells = [f"`{name}`", _cell(spec.kind), _cell(_default(name, spec.default)), variable, _cell(spec.help)]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _command_sections(command: Any, path: list[str], parent: Any) -> list[str]:
    import click

    ctx = click.Context(command, info_name=path[-1], parent=parent)
    title = " ".join(path)
    sections = [f"## `{title}`", "", "```text", command.get_help(ctx), "```", ""]
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            sections += _command_sections(command.commands[name], [*path, name], ctx)
    return sections


def cli_page() -> str:
    """Every command of the ``amqtask`` CLI with the help click prints for it."""
    main = import_from_tree("amqtask.cli").main
    lines = [
        "# Command line",
        "",
        "*Generated from the click commands in `amqtask/cli.py` and `amqtask/commands/` when the site is built:*",
        "*this is what `amqtask COMMAND --help` prints.*",
        "",
        "Exit codes everywhere: 0 ok, 1 task failed or timed out, 2 usage or configuration error, 3 broker",
        "problem. `-A/--app` names the module holding the `App`; it goes before or after the command, or in",
        "`AMQTASK_APP`. Commands that need only the broker (`call`, `purge`, `dlq`, `inspect`, `control`) run",
        "without it, with the settings from `AMQTASK_*`.",
        "",
        "## Shell completion",
        "",
        "`amqtask` completes commands, options and choices in bash, zsh and fish (click's completion). Add",
        "the line for your shell to its start-up file (fish: run it once):",
        "",
        "```console",
        '$ eval "$(_AMQTASK_COMPLETE=bash_source amqtask)"       # ~/.bashrc',
        '$ eval "$(_AMQTASK_COMPLETE=zsh_source amqtask)"        # ~/.zshrc',
        "$ _AMQTASK_COMPLETE=fish_source amqtask > ~/.config/fish/completions/amqtask.fish",
        "```",
        "",
    ]
    return "\n".join(lines + _command_sections(main, ["amqtask"], None))


def generated_pages() -> dict[str, str]:
    """Every generated page: its path under docs/ and its Markdown."""
    pages = {"reference/settings.md": settings_page(), "reference/cli.md": cli_page()}
    pages.update({page: docstring_page(module) for page, module in DESIGN_NOTES.items()})
    return pages


def on_files(files: Files, config: MkDocsConfig) -> Files:
    from mkdocs.structure.files import File

    for src_uri, content in generated_pages().items():
        files.append(File.generated(config, src_uri, content=content))
    return files


#: The nav section that receives pages added under docs/ without a nav entry.
GUIDE = "User guide"


def _listed(nav: Any) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, list):
        return set().union(*(_listed(item) for item in nav)) if nav else set()
    if isinstance(nav, dict):
        return set().union(*(_listed(value) for value in nav.values()))
    return set()


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Add the pages ``nav`` does not list to its "User guide" section (created if missing)."""
    nav = config.nav
    if not nav:
        return config
    listed = _listed(nav) | set(generated_pages())
    docs = Path(config.docs_dir)
    pages = (p.relative_to(docs).as_posix() for p in docs.rglob("*.md") if "hooks" not in p.parts)
    missing = sorted(page for page in pages if page not in listed)
    if missing:
        guide = next((item[GUIDE] for item in nav if isinstance(item, dict) and GUIDE in item), None)
        if guide is None:
            guide = []
            nav.insert(min(3, len(nav)), {GUIDE: guide})
        guide.extend(missing)
    return config
