"""Finding the modules that define tasks: settings ``imports``/``include`` and ``app.autodiscover_tasks()``.

A worker runs a task only if its module was imported. Like Celery's, discovery is lazy: the app module
only records what to import, and :meth:`TaskDiscovery.run` imports it when a worker starts (by then
Django, if used, is set up, or is set up then). A module that is missing is an error that names it; one that fails to
import raises its own error.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .app import App


class TaskDiscovery:
    """What one app imports to register its tasks."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._requests: list[tuple[list[str] | None, str]] = []

    def add(self, packages: list[str] | None, related_name: str) -> None:
        """Remember to import ``<package>.<related_name>`` of ``packages`` (None: Django's installed apps)."""
        self._requests.append((packages, related_name))

    def run(self) -> None:
        """Import every configured module; packages without a ``related_name`` module are skipped.

        A process naming a Django project (``DJANGO_SETTINGS_MODULE``) sets Django up first, if nothing
        has yet (``amqtask -A proj worker``, not ``manage.py``): task modules import models.
        """
        if os.environ.get("DJANGO_SETTINGS_MODULE"):
            _set_up_django()
        for name in (*self.app.conf.imports, *self.app.conf.include):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name != name:
                    raise
                raise ConfigurationError(f"imports/include: no module named {name!r}") from None
        for packages, related_name in self._requests:
            for package in _installed_django_apps() if packages is None else packages:
                module = f"{package}.{related_name}"
                if importlib.util.find_spec(package) is not None and _has_submodule(module):
                    importlib.import_module(module)


def _has_submodule(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _set_up_django() -> None:
    try:
        from .contrib.django import set_up
    except ImportError:  # Django is not installed: the variable is somebody else's business
        return
    set_up()


def _installed_django_apps() -> list[str]:
    try:
        from .contrib.django import installed_app_packages
    except ImportError as exc:  # Django is not installed
        raise ConfigurationError(
            f"autodiscover_tasks() without packages reads Django's installed apps, but Django is missing ({exc}); "
            "pass packages=[...] or install amqtask[django]"
        ) from None
    return installed_app_packages()
