"""``amqtask top``: a full-screen live view of workers, queues and tasks (needs ``amqtask[top]``)."""

from __future__ import annotations

import contextlib

import click

from .shared import app_option, fail, load_app, run


@click.command("top")
@app_option
def command(app_spec: str | None) -> None:
    """Watch workers, queues and the slowest and failing tasks, refreshed every second (workers need -E)."""
    try:
        import rich  # noqa: F401  # the extra's one library, checked before anything is drawn
    except ImportError:
        fail("amqtask top draws with rich: pip install 'amqtask[top]' (or rich)")
    from ..monitoring import top_screen

    app = load_app(app_spec)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how one leaves the view
        run(app, lambda: top_screen.run(app), quiet=True)
