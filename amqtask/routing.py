"""Where a task message goes: queue definitions (``task_queues``) and routing rules (``task_routes``).

Precedence, highest first: options of the call (``apply_async(queue=...)``), options of the task
(``@app.task(queue=...)``), ``task_routes``, then ``task_default_queue``. The first of these that names
a queue or an exchange decides the whole route; a queue named without an exchange is reached the way
its definition says. A queue not in ``task_queues`` is a durable classic queue on the default exchange
(what Celery creates for an unknown queue name).
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigurationError
from .settings import Settings
from .topology import QueueSpec, check_name

RouteRule = Mapping[str, Any] | Callable[..., Any]
_ROUTE_KEYS = ("queue", "exchange", "routing_key")
_QUEUE_FIELDS = {f.name for f in fields(QueueSpec)}


@dataclass(frozen=True)
class Route:
    """The resolved destination of one message."""

    exchange: str
    routing_key: str
    queue: QueueSpec | None


def _queue_spec(name: str, options: Any) -> QueueSpec:
    if isinstance(options, QueueSpec):
        return options
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigurationError(f"task_queues[{name!r}] must be a dict of queue options, got {options!r}")
    unknown = set(options) - _QUEUE_FIELDS
    if unknown:
        raise ConfigurationError(f"task_queues[{name!r}]: unknown option(s) {sorted(unknown)}")
    values = dict(options)
    values.setdefault("name", name)
    if isinstance(values.get("binding_keys"), str):
        values["binding_keys"] = (values["binding_keys"],)
    elif "binding_keys" in values:
        values["binding_keys"] = tuple(values["binding_keys"])
    return QueueSpec(**values)


def parse_queues(value: Any) -> dict[str, QueueSpec]:
    """``task_queues`` as a dict name -> spec; accepts a dict, or a list of specs or dicts with ``name``."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {name: _queue_spec(name, opts) for name, opts in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, str):
        specs: dict[str, QueueSpec] = {}
        for item in value:
            name = item.name if isinstance(item, QueueSpec) else (item or {}).get("name")
            if not isinstance(name, str):
                raise ConfigurationError(f"task_queues: every queue needs a name, got {item!r}")
            specs[name] = _queue_spec(name, item)
        return specs
    raise ConfigurationError(f"task_queues must be a dict or a list, got {type(value).__name__}")


#: A compiled ``task_routes`` rule: ``(name, args, kwargs, call options) -> route or None``.
CompiledRule = Callable[[str, tuple[Any, ...], dict[str, Any], Mapping[str, Any]], Any]


def _compile_rules(value: Any) -> list[CompiledRule]:
    if value is None:
        return []
    rules = value if isinstance(value, list | tuple) else [value]
    compiled = []
    for rule in rules:
        if callable(rule):
            compiled.append(_function_rule(rule))
        elif isinstance(rule, Mapping):
            compiled.append(_mapping_rule(rule))
        else:
            raise ConfigurationError(f"task_routes: a rule must be a dict or a function, got {rule!r}")
    return compiled


def _function_rule(fn: Callable[..., Any]) -> CompiledRule:
    """Call a routing function with the arguments it takes, decided once from its signature.

    ``fn(name)``, ``fn(name, args, kwargs)``, or Celery's ``fn(name, args, kwargs, options, task=None,
    **kw)``. Deciding up front, rather than retrying on ``TypeError``, keeps a ``TypeError`` raised
    inside the function from being mistaken for a signature mismatch.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature (some builtins): the documented form
        count = 3
    else:
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
        count = 4 if varargs else max(1, min(len(positional), 4))

    def call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: Mapping[str, Any]) -> Any:
        return fn(*(name, args, kwargs, options)[:count])

    return call


def _mapping_rule(rule: Mapping[str, Any]) -> CompiledRule:
    exact = {k: v for k, v in rule.items() if not any(c in k for c in "*?[")}
    patterns = [(re.compile(fnmatch.translate(k)), v) for k, v in rule.items() if k not in exact]

    def match(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: Mapping[str, Any]) -> Any:
        if name in exact:
            return exact[name]
        for pattern, route in patterns:
            if pattern.match(name):
                return route
        return None

    return match


def _as_options(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {"queue": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigurationError(f"{where}: a route must be a queue name or a dict, got {value!r}")


class Router:
    """Resolves routes for one app; built from its settings (rebuilt when they change)."""

    def __init__(self, settings: Settings) -> None:
        self.default_queue = settings.task_default_queue
        self.default_exchange = settings.task_default_exchange or ""
        self.queues = parse_queues(settings.task_queues)
        self.rules = _compile_rules(settings.task_routes)

    def queue(self, name: str) -> QueueSpec:
        """The definition of queue ``name``: configured, or a plain durable classic queue."""
        spec = self.queues.get(name)
        if spec is not None:
            return spec
        if name == self.default_queue and self.default_exchange:
            return QueueSpec(name, exchange=self.default_exchange, routing_key=name)
        return QueueSpec(name)

    def from_rules(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Options the first matching ``task_routes`` rule gives ``name`` (empty when none matches)."""
        for rule in self.rules:
            found = rule(name, args, kwargs, options or {})
            if found is not None:
                return _as_options(found, f"task_routes for {name!r}")
        return {}

    def route(
        self,
        name: str,
        call: Mapping[str, Any],
        task: Mapping[str, Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Route:
        """Resolve the destination of a message for task ``name`` (see the module doc for precedence)."""
        for level in (call, task, lambda: self.from_rules(name, args, kwargs or {}, call)):
            options = level() if callable(level) else level
            if any(options.get(key) is not None for key in _ROUTE_KEYS):
                return self._resolve(options)
        return self._resolve({"queue": self.default_queue})

    def _resolve(self, options: Mapping[str, Any]) -> Route:
        queue_name = options.get("queue")
        spec = self.queue(queue_name) if queue_name else None
        exchange = options.get("exchange")
        routing_key = options.get("routing_key")
        if exchange is not None:
            check_name("exchange", exchange)
        if routing_key is not None:
            check_name("routing key", routing_key)
        if exchange is None:
            if spec is None:
                if not routing_key:
                    raise ConfigurationError(f"route {dict(options)!r} names no queue, exchange or routing key")
                # Only a routing key: the default exchange delivers to the queue of that name.
                return Route("", routing_key, self.queue(routing_key))
            if routing_key is None or spec.exchange_type == "direct":
                # On the default or a direct exchange the key *is* the queue's binding: another key
                # would miss the queue (Celery behaves the same way).
                return Route(spec.publish_exchange, spec.publish_routing_key, spec)
            return Route(spec.publish_exchange, routing_key, spec)
        if routing_key is None:
            routing_key = spec.publish_routing_key if spec and spec.exchange == exchange else (queue_name or "")
        return Route(exchange, routing_key, spec)

    def all_queues(self, names: Iterable[str] | None = None) -> list[QueueSpec]:
        """Specs of the named queues, or of every configured queue plus the default queue."""
        if names is None:
            names = [self.default_queue, *self.queues]
        return [self.queue(n) for n in dict.fromkeys(names)]
