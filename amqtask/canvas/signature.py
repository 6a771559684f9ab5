"""Signatures: a task call not made yet, its wire dict, and how a canvas is frozen, planned and published.

The composites built on :class:`Signature` (chain, group, chord) are in :mod:`amqtask.canvas.workflows`.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .. import serializers
from ..errors import ConfigurationError
from ..results import AsyncResult
from ..task import CALL_OPTIONS

if TYPE_CHECKING:
    from ..app import App, Runtime

_S = TypeVar("_S", bound="Signature")

#: The keys of a signature's wire dict (amqtask adds ``chord_size`` to a chord's body).
WIRE_KEYS = ("task", "args", "kwargs", "options", "subtask_type", "immutable")
#: Options a composite hands to all its parts as defaults.
INHERITED = frozenset(
    {"queue", "exchange", "routing_key", "priority", "serializer", "expires", "time_limit", "soft_time_limit",
     "headers", "ignore_result"}
)  # fmt: skip
_DELAYS = frozenset({"countdown", "eta"})
_CALLBACKS = ("link", "link_error")
#: Publishes of one canvas in flight at once: enough to pipeline confirms, bounded for huge groups.
MAX_IN_FLIGHT = 256


def new_id() -> str:
    """A fresh task or group id."""
    return str(uuid.uuid4())


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _plain(value: Any) -> Any:
    """``value`` with every signature inside turned into its wire dict."""
    if isinstance(value, Signature):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _pick(options: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    wanted = set(keys)
    return {key: value for key, value in options.items() if key in wanted and value is not None}


def _check_options(options: Mapping[str, Any]) -> None:
    unknown = set(options) - CALL_OPTIONS
    if unknown:
        raise ConfigurationError(f"unknown call option(s) {sorted(unknown)}; known: {sorted(CALL_OPTIONS)}")


def _give(sig: _S, options: Mapping[str, Any]) -> _S:
    """A copy of ``sig`` with the options it does not set itself; callback lists are extended."""
    if not options:
        return sig
    twin = sig._copy()
    for key, value in options.items():
        if key in _CALLBACKS:
            twin.options[key] = [*_listed(twin.options.get(key)), *_listed(value)]
        elif twin.options.get(key) is None:
            twin.options[key] = value
    return twin


def _earliest(result: AsyncResult[Any]) -> AsyncResult[Any]:
    while result.parent is not None:
        result = result.parent
    return result


@dataclass(frozen=True)
class _Context:
    """What freezing needs: the app the results belong to and the reply queue of the steps."""

    app: App
    reply_to: str | None


@dataclass
class Send:
    """One task message a canvas publishes now: the arguments of :meth:`App.build_message`."""

    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]

    @property
    def id(self) -> str:
        """The pre-assigned task id."""
        return str(self.options["task_id"])


class Signature(Mapping[str, Any]):
    """A task call not made yet: name, partial arguments and options; its mapping view is the wire dict.

    ``add.s(2)`` is partial: in a chain it is called with the parent's result first, ``add(result, 2)``.
    ``add.si(2, 3)`` is immutable and ignores it. Calling a signature runs the task here and now;
    ``delay`` / ``apply_async`` (``adelay`` / ``aapply_async`` in async code) send it.
    """

    #: None for a task; ``"chain"``, ``"group"`` or ``"chord"`` for the composites.
    subtask_type: str | None = None

    def __init__(
        self,
        task: str,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        options: Mapping[str, Any] | None = None,
        immutable: bool = False,
        app: App | None = None,
    ) -> None:
        self.task = task
        self.args = tuple(args)
        self.kwargs: dict[str, Any] = dict(kwargs or {})
        self.options: dict[str, Any] = dict(options or {})
        self.immutable = immutable
        #: Wire keys beyond the six (``chord_size``), kept so a signature travels on unchanged.
        self.extra: dict[str, Any] = {}
        self._app = app

    # ------------------------------------------------------------------------------------------ wire form
    def to_dict(self) -> dict[str, Any]:
        """The wire dict, nested signatures included."""
        wire = {
            "task": self.task,
            "args": list(self.args),
            "kwargs": _plain(self.kwargs),
            "options": _plain(self.options),
            "subtask_type": self.subtask_type,
            "immutable": self.immutable,
        }
        wire.update(self.extra)
        return wire

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(WIRE_KEYS) + len(self.extra)

    def __repr__(self) -> str:
        shown = [repr(arg) for arg in self.args] + [f"{key}={value!r}" for key, value in self.kwargs.items()]
        return f"{'%' if self.immutable else ''}{self.task}({', '.join(shown)})"

    # ------------------------------------------------------------------------------------------ building
    @property
    def app(self) -> App:
        """The app that sends this signature (the current app unless one was given)."""
        from ..app import current_app

        return self._app if self._app is not None else current_app()

    @property
    def name(self) -> str:
        """The task name."""
        return self.task

    @property
    def id(self) -> str | None:
        """The pre-assigned task id (set by :meth:`freeze` or ``set(task_id=...)``)."""
        value = self.options.get("task_id")
        return str(value) if value is not None else None

    def _copy(self: _S) -> _S:
        twin = copy.copy(self)
        twin.options, twin.kwargs, twin.extra = dict(self.options), dict(self.kwargs), dict(self.extra)
        return twin

    def _merged(self, args: Iterable[Any], kwargs: Mapping[str, Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.immutable:
            return self.args, dict(self.kwargs)
        return (*args, *self.args), {**self.kwargs, **(kwargs or {})}

    def clone(self: _S, args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any) -> _S:
        """A copy with ``args`` prepended and ``kwargs`` merged (ignored when immutable) and ``options`` set."""
        _check_options(options)
        twin = self._copy()
        twin.args, twin.kwargs = twin._merged(args, kwargs)
        twin.options.update(options)
        return twin

    def set(self: _S, immutable: bool | None = None, **options: Any) -> _S:
        """Set call options (``queue``, ``countdown``, ``priority``, ...) in place; returns the signature."""
        _check_options(options)
        if immutable is not None:
            self.immutable = immutable
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        """Make the signature ignore (or take) its parent's result."""
        self.immutable = immutable

    def link(self, callback: Signature) -> Signature:
        """Run ``callback`` with this task's result prepended when it succeeds; returns ``callback``."""
        self.options["link"] = [*_listed(self.options.get("link")), callback]
        return callback

    def link_error(self, errback: Signature) -> Signature:
        """Run ``errback`` with this task's id prepended when it finally fails; returns ``errback``."""
        self.options["link_error"] = [*_listed(self.options.get("link_error")), errback]
        return errback

    def __or__(self, other: Signature) -> Signature:
        # A late import: chain is a Signature subclass, so its module imports this one.
        from .workflows import _chain_steps, chain

        if not isinstance(other, Signature):
            return NotImplemented
        return chain(*_chain_steps(self), *_chain_steps(other), app=self._app or other._app)

    # ------------------------------------------------------------------------------------------ calling
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task in this process with the partial arguments merged; no message is sent."""
        merged_args, merged_kwargs = self._merged(args, kwargs)
        return self.app.get_task(self.task)(*merged_args, **merged_kwargs)

    def freeze(self) -> AsyncResult[Any]:
        """Assign the ids now (kept by later sends) and return the result handle the send will return."""
        app = self.app
        frozen, result = self._freeze(_Context(app, app.reply_queue))
        self.__dict__.update(frozen.__dict__)
        return result

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """Send with these arguments merged in; returns once the broker confirmed every message."""
        return self.apply_async(args, kwargs)

    async def adelay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """:meth:`delay` for async code."""
        return await self.aapply_async(args, kwargs)

    def apply_async(
        self, args: Iterable[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        """Send with extra arguments and options (which override the signature's own)."""
        return self.app.portal.run(self.aapply_async(args, kwargs, **options))

    async def aapply_async(
        self, args: Iterable[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        """:meth:`apply_async` for async code."""
        sends, result = prepare(self, args, kwargs, **options)
        await publish(self.app, self.app.runtime(), sends, from_client=True)
        return result

    # ------------------------------------------------------------------------------------------ planning
    def _freeze(self, ctx: _Context) -> tuple[Signature, AsyncResult[Any]]:
        """A copy with every id assigned, and the result handle."""
        twin = self._copy()
        if not twin.options.get("task_id"):
            twin.options["task_id"] = new_id()
        if ctx.reply_to and not twin.options.get("reply_to"):
            twin.options["reply_to"] = ctx.reply_to
        return twin, AsyncResult(twin.options["task_id"], ctx.app, task_name=self.task)

    def _sends(self, args: list[Any], kwargs: dict[str, Any], extra: dict[str, Any]) -> list[Send]:
        """The messages that apply this (frozen) signature now; ``extra`` holds parent and root ids."""
        merged_args, merged_kwargs = self._merged(args, kwargs)
        return [Send(self.task, list(merged_args), merged_kwargs, {**self.options, **extra})]

    def _with_tail(self: _S, keep: bool = False, **options: Any) -> _S:
        """A copy whose last task (the one whose result is this signature's) has ``options`` set."""
        twin = self._copy()
        for key, value in options.items():
            if not (keep and twin.options.get(key) is not None):
                twin.options[key] = value
        return twin

    def _continued(self, rest: list[dict[str, Any]]) -> Signature:
        """A copy followed by ``rest``, chain steps in wire order (the next one last)."""
        twin = self._copy()
        twin.options["chain"] = [*rest, *_listed(twin.options.get("chain"))]
        return twin

    def _parts(self) -> list[Signature]:
        return []


def prepare(
    sig: Signature, args: Iterable[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
) -> tuple[list[Send], AsyncResult[Any]]:
    """What ``sig.apply_async(args, kwargs, **options)`` publishes, and the result it returns; sends nothing."""
    app = sig.app
    frozen, result = (sig.clone(**options) if options else sig)._freeze(_Context(app, app.reply_queue))
    return frozen._sends(list(args or ()), dict(kwargs or {}), {}), result


async def publish(app: App, runtime: Runtime, sends: list[Send], *, from_client: bool) -> None:
    """Build and publish ``sends`` concurrently (their confirms pipeline), raising the first error.

    From a client an unknown option is an error and the reply queue is started first. In a worker,
    options a foreign peer put into a signature that amqtask does not know are dropped.
    """
    built = []
    for send in sends:
        if from_client:
            _check_options(send.options)
        options = {key: value for key, value in send.options.items() if key in CALL_OPTIONS}
        message, route, codec_name = app.build_message(
            send.task, send.args, send.kwargs, app.tasks.get(send.task), options
        )
        built.append((message, route, serializers.codec(codec_name)))
    if from_client and any(not message.ignore_result for message, _, _ in built):
        await runtime.results.ensure_started(app.conf.publish_timeout_s)
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def publish_one(item: tuple[Any, Any, serializers.Codec]) -> None:
        async with slots:
            await app.publish_task(runtime, *item)

    outcomes = await asyncio.gather(*(publish_one(item) for item in built), return_exceptions=True)
    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    if errors:
        raise errors[0]
