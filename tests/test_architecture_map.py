"""docs/architecture.md lists every module under amqtask/, once, and nothing that is not one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "amqtask"
MAP = ROOT / "docs" / "architecture.md"


def _modules_on_disk() -> set[str]:
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}


def _modules_in_map() -> list[str]:
    text = MAP.read_text(encoding="utf-8")
    table = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([\w/]+\.py)` \|", table, flags=re.MULTILINE)


def test_every_module_has_one_line_in_the_architecture_map() -> None:
    listed = _modules_in_map()
    on_disk = _modules_on_disk()
    assert len(listed) == len(set(listed)), f"listed twice: {sorted(m for m in listed if listed.count(m) > 1)}"
    assert sorted(on_disk - set(listed)) == [], "modules missing from docs/architecture.md (add one line each)"
    assert sorted(set(listed) - on_disk) == [], "docs/architecture.md lists modules that no longer exist"
