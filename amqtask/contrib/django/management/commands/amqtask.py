"""``python manage.py amqtask worker|beat|inspect|...``: amqtask's command line with Django set up.

The arguments go to the ``amqtask`` command unchanged. Without ``-A``, the app is the one named by the
``AMQTASK_APP`` setting (e.g. ``"proj.amqtask:app"``).
"""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from .....cli import main


class Command(BaseCommand):
    help = "Run an amqtask command (worker, beat, inspect, topology, ...) with Django configured."

    def run_from_argv(self, argv: list[str]) -> None:
        """Hand the arguments after ``amqtask`` to amqtask's command line (Django has parsed nothing)."""
        args = list(argv[2:])
        app = getattr(settings, "AMQTASK_APP", None)
        if app and args and not {"-A", "--app"} & set(args) and not any(a.startswith("--app=") for a in args):
            args += ["-A", str(app)]
        main.main(args=args, prog_name=f"{os.path.basename(argv[0])} amqtask")

    def handle(self, *args: Any, **options: Any) -> None:  # pragma: no cover - run_from_argv does the work
        main.main(args=list(args), prog_name="amqtask")
