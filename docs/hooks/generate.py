"""MkDocs hook: pages generated from the code at build time, so they cannot drift from it.

* ``design/*.md``: the design write-ups, which live in module docstrings (:data:`DESIGN_NOTES`).
* Any page under ``docs/`` that ``nav`` does not list is appended to the nav's last section, so a
  helper adding ``docs/<topic>.md`` gets it on the site without editing ``mkdocs.yml``.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

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


def generated_pages() -> dict[str, str]:
    """Every generated page: its path under docs/ and its Markdown."""
    return {page: docstring_page(module) for page, module in DESIGN_NOTES.items()}


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for src_uri, content in generated_pages().items():
        files.append(File.generated(config, src_uri, content=content))
    return files


def _listed(nav: Any) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, list):
        return set().union(*(_listed(item) for item in nav)) if nav else set()
    if isinstance(nav, dict):
        return set().union(*(_listed(value) for value in nav.values()))
    return set()


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    nav = config.nav
    if not nav:
        return config
    listed = _listed(nav) | set(generated_pages())
    docs = Path(config.docs_dir)
    pages = (p.relative_to(docs).as_posix() for p in docs.rglob("*.md") if "hooks" not in p.parts)
    missing = sorted(page for page in pages if page not in listed)
    if missing:
        last = nav[-1]
        section = next(iter(last.values())) if isinstance(last, dict) else None
        target = section if isinstance(section, list) else nav
        target.extend(missing)
    return config
