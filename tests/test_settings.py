"""Settings: defaults, validation that names the setting, ``AMQTASK_*`` environment variables, and loading
from dicts, modules, objects and Celery-style ``CELERY_`` namespaces."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from amqtask import App
from amqtask.errors import ConfigurationError
from amqtask.settings import SPECS, Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``AMQTASK_*`` variable of the calling shell reaches ``App()``."""
    for key in list(os.environ):
        if key.startswith("AMQTASK_"):
            monkeypatch.delenv(key)


# ---------------------------------------------------------------------------------------------- defaults


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("broker_url", ("amqp://guest:guest@localhost:5672//",)),
        ("task_default_queue", "default"),
        ("task_default_exchange", ""),
        ("task_serializer", "msgpack"),
        ("result_serializer", None),
        ("accept_content", ("msgpack", "json")),
        ("task_ignore_result", False),
        ("task_create_missing_queues", True),
        ("result_persistent", True),
        ("result_expires_s", 86400),
        ("message_max_bytes", 16 * 1024 * 1024),
        ("message_max_depth", 64),
        ("worker_prefetch_multiplier", 4),
        ("task_max_retries", 3),
        ("task_default_retry_delay", 180.0),
        ("timezone", "UTC"),
        ("task_queues", None),
        ("task_routes", None),
    ],
)
def test_defaults(name: str, expected: Any) -> None:
    assert getattr(Settings(), name) == expected


def test_worker_concurrency_defaults_to_the_cpu_count() -> None:
    assert Settings().worker_concurrency == (os.cpu_count() or 1)


def test_as_dict_lists_every_setting() -> None:
    conf = Settings(task_default_queue="celery")
    values = conf.as_dict()
    assert set(values) == set(SPECS)
    assert values["task_default_queue"] == "celery"


def test_keyword_values_are_normalized() -> None:
    conf = Settings(broker_url="amqp://h1//", accept_content=["json"], task_ignore_result="yes")
    assert conf.broker_url == ("amqp://h1//",)
    assert conf.accept_content == ("json",)
    assert conf.task_ignore_result is True


# ------------------------------------------------------------------------------------------ unknown names


def test_unknown_setting_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(brokr_url="amqp://localhost//")
    assert "'brokr_url'" in str(info.value)
    assert "did you mean 'broker_url'?" in str(info.value)


def test_unknown_setting_without_a_close_name_has_no_suggestion() -> None:
    with pytest.raises(ConfigurationError, match="unknown setting 'zzz'") as info:
        Settings(zzz=1)
    assert "did you mean" not in str(info.value)


def test_assigning_an_unknown_attribute_raises() -> None:
    conf = Settings()
    with pytest.raises(ConfigurationError, match=r"task_serialiser.*did you mean 'task_serializer'"):
        conf.task_serialiser = "json"
    with pytest.raises(ConfigurationError, match="worker_concurency"):
        conf.update({"worker_concurency": 2})


def test_reading_an_unknown_attribute_suggests_the_close_one() -> None:
    with pytest.raises(AttributeError, match="did you mean 'broker_url'"):
        Settings().brokr_url  # noqa: B018


# ----------------------------------------------------------------------------------------- wrong values


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("worker_concurrency", "many"),
        ("worker_concurrency", 0),
        ("worker_concurrency", True),
        ("worker_concurrency", 1.5),
        ("broker_heartbeat_s", -1),
        ("message_max_bytes", None),
        ("task_serializer", "pickle"),
        ("result_serializer", "yaml"),
        ("task_ignore_result", "maybe"),
        ("task_ignore_result", 1),
        ("broker_url", "redis://localhost:6379/0"),
        ("broker_url", 5),
        ("broker_url", []),
        ("accept_content", 5),
        ("task_default_queue", ""),
        ("task_default_queue", 5),
        ("beat_schedule", "[1, 2]"),
        ("broker_ssl_options", "not json"),
        ("publish_timeout_s", "soon"),
    ],
)
def test_wrong_values_name_the_setting(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"'{name}'"):
        Settings(**{name: value})


@pytest.mark.parametrize(
    "value",
    [
        "redis://user:s3cret@localhost:6379/0",
        "amqp://user:s3cret@host1//,",
        ["amqp://user:s3cret@host1//", 5],
        ["amqp://user:s3cret@host1//", ""],
    ],
    ids=["other-scheme", "trailing-comma", "non-string-item", "empty-item"],
)
def test_broker_url_errors_never_show_the_password(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="broker_url") as info:
        Settings(broker_url=value)
    assert "s3cret" not in str(info.value)


# ---------------------------------------------------------------------------------------- environment


def test_broker_url_from_env() -> None:
    conf = Settings()
    conf.from_env({"AMQTASK_BROKER_URL": "amqps://u:p@rabbit.example:5671/vh"})
    assert conf.broker_url == ("amqps://u:p@rabbit.example:5671/vh",)


def test_comma_separated_broker_urls_from_env() -> None:
    conf = Settings()
    conf.from_env({"AMQTASK_BROKER_URL": "amqp://u:p@node1//, amqp://u:p@node2//,amqps://u:p@node3//"})
    assert conf.broker_url == ("amqp://u:p@node1//", "amqp://u:p@node2//", "amqps://u:p@node3//")


def test_env_values_are_converted_to_the_settings_types() -> None:
    conf = Settings()
    conf.from_env(
        {
            "AMQTASK_WORKER_CONCURRENCY": "8",
            "AMQTASK_TASK_IGNORE_RESULT": "true",
            "AMQTASK_RESULT_PERSISTENT": "0",
            "AMQTASK_PUBLISH_TIMEOUT_S": "2.5",
            "AMQTASK_ACCEPT_CONTENT": "json, msgpack",
            "AMQTASK_BROKER_SSL_OPTIONS": '{"cafile": "/etc/ca.pem"}',
            "AMQTASK_TASK_DEFAULT_QUEUE": "celery",
        }
    )
    assert conf.worker_concurrency == 8
    assert conf.task_ignore_result is True
    assert conf.result_persistent is False
    assert conf.publish_timeout_s == 2.5
    assert conf.accept_content == ("json", "msgpack")
    assert conf.broker_ssl_options == {"cafile": "/etc/ca.pem"}
    assert conf.task_default_queue == "celery"


def test_other_env_vars_are_ignored() -> None:
    conf = Settings()
    conf.from_env({"PATH": "/bin", "CELERY_BROKER_URL": "amqp://other//", "BROKER_URL": "amqp://x//"})
    assert conf.broker_url == Settings().broker_url


def test_unknown_env_var_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings().from_env({"AMQTASK_BROKR_URL": "amqp://localhost//"})
    assert "AMQTASK_BROKR_URL" in str(info.value)
    assert "did you mean 'broker_url'?" in str(info.value)


def test_wrong_env_value_names_the_setting() -> None:
    with pytest.raises(ConfigurationError, match="'worker_concurrency'"):
        Settings().from_env({"AMQTASK_WORKER_CONCURRENCY": "lots"})


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch, clean_env: None) -> None:
    monkeypatch.setenv("AMQTASK_TASK_DEFAULT_QUEUE", "from-os-environ")
    conf = Settings()
    conf.from_env()
    assert conf.task_default_queue == "from-os-environ"


def test_a_setting_can_come_from_a_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "broker_url"
    secret.write_text("amqps://u:p@rabbit.example//\n")
    conf = Settings()
    conf.from_env({"AMQTASK_BROKER_URL_FILE": str(secret)})
    assert conf.broker_url == ("amqps://u:p@rabbit.example//",)
    with pytest.raises(ConfigurationError, match="AMQTASK_BROKER_URL_FILE"):
        conf.from_env({"AMQTASK_BROKER_URL_FILE": str(tmp_path / "missing")})


# ---------------------------------------------------------------------------------------- from_object


def test_from_object_with_a_dict() -> None:
    conf = Settings()
    conf.from_object({"broker_url": "amqp://h//", "task_default_queue": "celery"})
    assert (conf.broker_url, conf.task_default_queue) == (("amqp://h//",), "celery")


def test_from_object_with_a_dict_refuses_unknown_keys() -> None:
    with pytest.raises(ConfigurationError, match=r"'task_default_queu'.*did you mean 'task_default_queue'"):
        Settings().from_object({"task_default_queu": "celery"})


def test_from_object_with_a_module_path(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("amqtask_test_settings_module")
    module.broker_url = "amqp://from-module//"  # type: ignore[attr-defined]
    module.worker_concurrency = 3  # type: ignore[attr-defined]
    module.helper = "not a setting, ignored"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    conf = Settings()
    conf.from_object(module.__name__)
    assert conf.broker_url == ("amqp://from-module//",)
    assert conf.worker_concurrency == 3


def test_from_object_with_a_missing_module_path_raises() -> None:
    with pytest.raises(ImportError):
        Settings().from_object("amqtask_test_no_such_settings_module")


def test_from_object_with_an_object() -> None:
    class Config:
        broker_url = "amqp://from-object//"
        task_serializer = "json"
        DEBUG = True
        other = "ignored"

    conf = Settings()
    conf.from_object(Config)
    assert conf.broker_url == ("amqp://from-object//",)
    assert conf.task_serializer == "json"


def test_from_object_validates_values() -> None:
    class Config:
        task_serializer = "pickle"

    with pytest.raises(ConfigurationError, match="'task_serializer'"):
        Settings().from_object(Config)


@pytest.mark.parametrize("as_object", [False, True], ids=["dict", "object"])
def test_from_object_with_the_celery_namespace(as_object: bool) -> None:
    values = {
        "CELERY_BROKER_URL": "amqp://celery-style//",
        "CELERY_TASK_DEFAULT_QUEUE": "celery",
        "CELERY_TASK_SERIALIZER": "json",
        "DEBUG": True,
        "broker_url": "amqp://not-in-the-namespace//",
    }
    source: Any = type("DjangoSettings", (), values) if as_object else values
    conf = Settings()
    conf.from_object(source, namespace="CELERY")
    assert conf.broker_url == ("amqp://celery-style//",)
    assert conf.task_default_queue == "celery"
    assert conf.task_serializer == "json"


def test_celery_namespace_names_an_unknown_key() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings().from_object({"CELERY_BROKR_URL": "amqp://h//"}, namespace="CELERY")
    assert "CELERY_BROKR_URL" in str(info.value)
    assert "did you mean 'broker_url'?" in str(info.value)


# --------------------------------------------------------------------------------------------------- App


def test_app_refuses_an_unknown_setting(clean_env: None) -> None:
    with pytest.raises(ConfigurationError, match="unknown setting 'unknown'"):
        App("t", unknown=1)


def test_app_suggests_the_close_setting(clean_env: None) -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'task_default_queue'"):
        App("t", task_defualt_queue="celery")


def test_app_refuses_a_wrong_value(clean_env: None) -> None:
    with pytest.raises(ConfigurationError, match="'broker_url'"):
        App("t", broker="redis://localhost//")
