"""Finding the modules that define tasks: settings ``imports``/``include`` and ``app.autodiscover_tasks()``.

A worker runs a task only if its module was imported. Like Celery's, discovery is lazy: the app module
only records what to import, and :meth:`TaskDiscovery.run` imports it when a worker starts, once
Django, if used, is set up (by ``manage.py``, or by this module). A module that is missing is an error
that names it; one that fails to import raises its own error.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from typing import TYPE_CHECKING

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("amqtask.discovery")


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
        settings_module = os.environ.get("DJANGO_SETTINGS_MODULE")
        if settings_module:
            _set_up_django(settings_module)
        for name in (*self.app.conf.imports, *self.app.conf.include):
            try:
                _import(name)
            except ModuleNotFoundError as exc:
                if exc.name != name:
                    raise
                raise ConfigurationError(f"imports/include: no module named {name!r}") from None
        for packages, related_name in self._requests:
            for package in _installed_django_apps() if packages is None else packages:
                module = f"{package}.{related_name}"
                if importlib.util.find_spec(package) is not None and _importable(module):
                    _import(module)


def _import(name: str) -> None:
    """Import a task module; one that needs Django while Django cannot be set up is a ConfigurationError."""
    try:
        importlib.import_module(name)
    except Exception as exc:
        settings_module = os.environ.get("DJANGO_SETTINGS_MODULE")
        if isinstance(exc, ModuleNotFoundError) and settings_module and exc.name == settings_module:
            problem = f"Django's settings module {settings_module!r} (DJANGO_SETTINGS_MODULE) cannot be imported"
        elif type(exc).__module__ == "django.core.exceptions":  # AppRegistryNotReady, ImproperlyConfigured
            problem = (f"{type(exc).__name__}: {exc} (Django is not set up: set DJANGO_SETTINGS_MODULE to the "
                       "project's settings, or start the worker with `python manage.py amqtask worker`)")  # fmt: skip
        else:
            raise
        raise ConfigurationError(f"importing {name}: {problem}") from exc


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _set_up_django(settings_module: str) -> None:
    try:
        from .contrib.django import set_up
    except ImportError:  # Django is not installed: the variable is somebody else's business
        return
    if not _importable(settings_module):
        # Likely left over in the environment by another project; a task that needs Django says so (_import).
        log.warning("DJANGO_SETTINGS_MODULE=%r names no module this process can import: Django is not set up",
                    settings_module)  # fmt: skip
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
