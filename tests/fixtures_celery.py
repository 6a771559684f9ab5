"""Loader for the Celery 5.7 wire fixtures (``shared/fixtures/celery-v2/*.json``, beside the repo).

The directory is ``<repo>/../shared/fixtures/celery-v2``, or ``$AMQTASK_TEST_FIXTURES_DIR``. When it is
missing, the tests that use it FAIL (CI always has it): a placeholder parameter stands in for the
files, so parametrization never comes out empty (which pytest would report as a skip).
"""

from __future__ import annotations

import base64
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from amqtask.protocol import WireMessage

ENV_VAR = "AMQTASK_TEST_FIXTURES_DIR"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "celery-v2"
MISSING = "<celery-v2 fixtures directory missing>"

Record = dict[str, Any]


def fixtures_dir() -> Path:
    """The fixtures directory; fails the calling test when it does not exist."""
    override = os.environ.get(ENV_VAR)
    path = Path(override) if override else DEFAULT_DIR
    if not path.is_dir():
        hint = f"set {ENV_VAR} to their directory; these tests must not be skipped"
        pytest.fail(f"Celery fixtures not found at {path} ({hint})", pytrace=False)
    return path


def fixture_names(*patterns: str) -> list[str]:
    """Sorted file names matching the glob patterns, or ``[MISSING]`` when there are none.

    Meant for ``pytest.mark.parametrize`` at import time, so it does not fail itself: the test
    that receives ``MISSING`` fails when it calls :func:`load`.
    """
    override = os.environ.get(ENV_VAR)
    path = Path(override) if override else DEFAULT_DIR
    names = sorted({p.name for pattern in patterns for p in path.glob(pattern)}) if path.is_dir() else []
    return names or [MISSING]


@cache
def _load(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load(name: str) -> dict[str, Any]:
    """The parsed fixture file ``name`` (a fresh copy each call, so tests may mutate it)."""
    path = fixtures_dir() / name
    if name == MISSING or not path.is_file():
        pytest.fail(f"Celery fixture {name!r} not found in {fixtures_dir()}", pytrace=False)
    return json.loads(json.dumps(_load(str(path))))


def record_body(record: Record) -> bytes:
    """The raw body bytes of a captured record (``body_b64``)."""
    return base64.b64decode(record["body_b64"])


def wire_from_record(record: Record) -> WireMessage:
    """A :class:`WireMessage` built from a captured record: raw body, its properties and headers."""
    props = record["properties"]
    return WireMessage(
        body=record_body(record),
        content_type=props.get("content_type"),
        content_encoding=props.get("content_encoding"),
        headers=dict(props.get("headers") or {}),
        delivery_mode=props.get("delivery_mode"),
        priority=props.get("priority"),
        correlation_id=props.get("correlation_id"),
        reply_to=props.get("reply_to"),
        expiration=props.get("expiration"),
    )


def published_task_record(published: dict[str, Any]) -> Record:
    """A ``published_task`` entry of a result fixture in the layout of a captured record.

    It stores the decoded body only; the bytes are re-made with ``json.dumps`` (what the fixture
    scripts published, and what its tap copy shows byte for byte).
    """
    return {
        "properties": published["properties"],
        "body_b64": base64.b64encode(json.dumps(published["body"]).encode()).decode(),
        "body_decoded": published["body"],
        "body_decoded_as": "json",
    }


def task_records(data: dict[str, Any]) -> list[Record]:
    """Every task message of a fixture: ``messages`` of task/canvas files, and in result files the
    ``published_task`` plus every ``task_messages_seen_on_tap``."""
    records: list[Record] = list(data.get("messages") or [])
    if "published_task" in data:
        records.append(published_task_record(data["published_task"]))
    records.extend(data.get("task_messages_seen_on_tap") or [])
    return records


def reply_records(data: dict[str, Any]) -> list[Record]:
    """Every rpc reply of a result fixture."""
    return list(data.get("replies") or [])
