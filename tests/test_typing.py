"""Tasks are generic over their parameters and result: mypy accepts right calls and rejects wrong ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).resolve().parent / "type_checks" / "cases.py"


def test_task_calls_are_type_checked() -> None:
    # --warn-unused-ignores turns every "type: ignore" on a line mypy accepts into an error, so the
    # wrong calls in the cases file must really be rejected, and assert_type pins the result types.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--warn-unused-ignores", "--python-version", "3.11", str(CASES)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
