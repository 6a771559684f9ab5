"""The gateway's OpenAPI 3.0 document, generated from the app: the task names it accepts are an enum."""

from __future__ import annotations

from typing import Any

from ..app import App
from .requests import MAX_DELAY_S

_ERROR = {"description": "refused", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(description: str, schema: str) -> dict[str, Any]:
    reference = {"$ref": f"#/components/schemas/{schema}"}
    return {"description": description, "content": {"application/json": {"schema": reference}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _ERROR for code in codes}


def _schemas(queues: list[str]) -> dict[str, Any]:
    seconds = {"type": "number", "minimum": -MAX_DELAY_S, "maximum": MAX_DELAY_S}
    when = {"oneOf": [seconds, {"type": "string", "format": "date-time"}]}
    return {
        "SendTask": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "args": {"type": "array", "items": {}},
                "kwargs": {"type": "object", "additionalProperties": {}},
                "options": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "countdown": {"type": "number", "minimum": 0, "maximum": MAX_DELAY_S},
                        "eta": {"type": "string", "format": "date-time"},
                        "expires": when,
                        "priority": {"type": "integer", "minimum": 0, "maximum": 255},
                        "queue": {"type": "string", "enum": queues},
                    },
                },
            },
        },
        "TaskCreated": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
        "TaskState": {
            "type": "object",
            "required": ["id", "state"],
            "properties": {
                "id": {"type": "string"},
                "state": {
                    "type": "string",
                    "description": "PENDING, STARTED, PROGRESS (or another custom state), "
                    "RETRY, SUCCESS, FAILURE or REVOKED",
                },
                "result": {"nullable": True, "description": "the return value (SUCCESS)"},
                "meta": {"nullable": True, "description": "what update_state reported (custom states)"},
                "error": {
                    "type": "object",
                    "required": ["type", "message"],
                    "properties": {
                        "type": {"type": "string"},
                        "message": {"type": "string"},
                        "traceback": {"type": "string", "nullable": True},
                    },
                },
            },
        },
        "Revoked": {
            "type": "object",
            "required": ["id", "revoked"],
            "properties": {"id": {"type": "string"}, "revoked": {"type": "boolean"}},
        },
        "Health": {
            "type": "object",
            "required": ["status", "broker"],
            "properties": {"status": {"type": "string"}, "broker": {"type": "boolean"}},
        },
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    }


def queue_names(app: App) -> list[str]:
    """The queues a gateway caller may name: the app's configured ones and its default."""
    return sorted(spec.name for spec in app.router.all_queues())


def document(app: App) -> dict[str, Any]:
    """The OpenAPI document for ``app``'s gateway."""
    names = sorted(app.conf.gateway_allow if app.conf.gateway_allow is not None else app.tasks)
    task_id = {
        "name": "task_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    }
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": names or [""]}}
    most_s = app.conf.gateway_max_wait_s
    wait = {
        "name": "wait",
        "in": "query",
        "required": False,
        "schema": {"type": "number", "minimum": 0, "maximum": most_s},
    }
    secured: list[dict[str, list[str]]] = (
        [{"bearer": []}] if app.conf.gateway_tokens or app.conf.gateway_tokens_file else []
    )
    return {
        "openapi": "3.0.3",
        "info": {"title": f"amqtask gateway ({app.main})", "version": "1"},
        "components": {
            "schemas": _schemas(queue_names(app)),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": secured,
        "paths": {
            "/tasks/{name}": {
                "post": {
                    "summary": "Send a task; answered once the broker confirmed it",
                    "parameters": [name],
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SendTask"}}},
                    },
                    "responses": {"202": _json("sent", "TaskCreated"), **_errors(400, 401, 404, 413, 422, 503)},
                }
            },
            "/tasks/{task_id}": {
                "get": {
                    "summary": "A task's state and result (wait: long-poll up to that many seconds; 404: unknown id)",
                    "parameters": [task_id, wait],
                    "responses": {"200": _json("the latest state", "TaskState"), **_errors(401, 404, 422, 501)},
                },
                "delete": {
                    "summary": "Revoke a task",
                    "parameters": [task_id],
                    "responses": {"202": _json("revoked", "Revoked"), **_errors(401, 404, 422, 503)},
                },
            },
            "/health": {
                "get": {
                    "summary": "Whether the gateway reaches the broker",
                    "security": [],
                    "responses": {"200": _json("ok", "Health"), "503": _json("no broker", "Health")},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "the OpenAPI document"}},
                }
            },
        },
    }


__all__ = ["document"]
