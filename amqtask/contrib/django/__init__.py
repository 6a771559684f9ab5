"""Django integration (``pip install amqtask[django]``; add ``"amqtask.contrib.django"`` to INSTALLED_APPS
for ``python manage.py amqtask ...``).

``App("proj", task_cls=DjangoTask)`` gives every task ``delay_on_commit``/``apply_async_on_commit``
(sent only when the current transaction commits, nothing on rollback) and closes the thread's stale
database connections before and after each synchronous task, in the thread that runs it, as Django
does around each request. ``app.config_from_object("django.conf:settings", namespace="CELERY")`` reads
a Celery project's settings as they are, and ``app.autodiscover_tasks()`` imports ``tasks.py`` of every
installed app when a worker starts.
"""

from __future__ import annotations

import functools
import os
from typing import Any, ParamSpec, TypeVar

try:
    import django
    from django.apps import apps as django_apps
    from django.db import close_old_connections, transaction
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("amqtask.contrib.django needs Django: pip install 'amqtask[django]'") from exc

from ...errors import ConfigurationError
from ...task import Task

P = ParamSpec("P")
R = TypeVar("R")


class DjangoTask(Task[P, R]):
    """A task that knows Django's transactions and database connections."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run the task; a synchronous one between two ``close_old_connections()`` in its own thread."""
        if self.is_async:
            return super().__call__(*args, **kwargs)
        close_old_connections()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            close_old_connections()

    def delay_on_commit(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """:meth:`delay` once the current transaction commits (at once outside a transaction)."""
        self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(
        self, args: tuple[Any, ...] | list[Any] | None = None, kwargs: dict[str, Any] | None = None, *,
        using: str | None = None, **options: Any,
    ) -> None:  # fmt: skip
        """:meth:`apply_async` once the transaction of database ``using`` commits; nothing on rollback.

        Returns nothing: the task id is not known to exist until the commit (pass ``task_id=`` to know it).
        """
        transaction.on_commit(functools.partial(self.apply_async, args, kwargs, **options), using=using)


def set_up() -> None:
    """Set Django up if nothing has yet, as Celery's Django fixup does for ``celery -A proj worker``: task
    modules import models, which need it, and a worker started outside ``manage.py`` has not done it."""
    if django_apps.ready:
        return
    try:
        django.setup()
    except Exception as exc:  # ImproperlyConfigured, or a settings module that cannot be imported
        raise ConfigurationError(
            f"Django could not be set up (DJANGO_SETTINGS_MODULE={os.environ.get('DJANGO_SETTINGS_MODULE')!r}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def installed_app_packages() -> list[str]:
    """The package of every installed Django app (Django must be set up)."""
    return [config.name for config in django_apps.get_app_configs()]


__all__ = ["DjangoTask", "installed_app_packages", "set_up"]
