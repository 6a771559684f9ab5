"""celery-node (the Node.js Celery client and worker) for the interoperability tests, installed with npm once.

It goes into the repository's ignored ``.cache/node``. Several test processes (xdist) may ask at once: a
file lock lets one install while the others wait, since two npm installs into one prefix trip over
each other.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path

CELERY_NODE_VERSION = "0.5.9"
PREFIX = Path(__file__).resolve().parents[2] / ".cache" / "node"


def celery_node_modules() -> Path:
    """The ``node_modules`` folder holding celery-node (for ``NODE_PATH``), installed if needed."""
    npm = shutil.which("npm")
    assert npm is not None and shutil.which("node"), "Node.js (node and npm) is needed for the celery-node tests"
    PREFIX.mkdir(parents=True, exist_ok=True)
    installed = PREFIX / "node_modules" / "celery-node" / "package.json"
    with (PREFIX / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed.exists() or json.loads(installed.read_text())["version"] != CELERY_NODE_VERSION:
            done = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(PREFIX),
                 f"celery-node@{CELERY_NODE_VERSION}"],
                capture_output=True, text=True, timeout=300, check=False, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert done.returncode == 0, f"npm install celery-node failed:\n{done.stdout}\n{done.stderr}"
    return PREFIX / "node_modules"
