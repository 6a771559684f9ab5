"""Canvas: signatures and the workflows built from them (chain, group, chord), and their wire form.

A :class:`Signature` is a task call not made yet: a task name, partial arguments and call options.
:class:`chain` runs signatures one after another, each getting its parent's result as first argument;
:class:`group` runs them in parallel; :class:`chord` runs a group, then a body with the list of the
group's results in group order. ``a | b`` chains; a group followed by anything becomes a chord.

The wire form is Celery 5.7's (``shared/fixtures/celery-v2``). A signature is the dict ``{task, args,
kwargs, options, subtask_type, immutable}`` (its :class:`~collections.abc.Mapping` view). Only a chain's
first task is published; the rest travels in ``embed.chain``, reversed (the next step last), each step
with its pre-assigned ``task_id`` and the caller's ``reply_to`` so the caller gets every step's result.
A group is one message per member with headers ``group`` and ``group_index``. Chord members carry the
body in ``embed.chord``; amqtask adds ``chord_size`` to that body (a key Celery's own backends read),
because amqtask completes chords in the broker (:mod:`amqtask.chords`), not in a result store.

Sending a canvas takes two steps, the same in the caller and in a worker applying a follow-up found in
``embed`` (:mod:`amqtask.middleware.canvas`): *freezing* assigns every id and builds the result
handles; *planning* (``_sends``) yields the messages to publish now, as :class:`Send`.

Options given to a composite reach its parts as defaults (a part's own options win):

========================  ===============  ================  ======================
option                    chain            group             chord
========================  ===============  ================  ======================
queue, priority, ... [1]  every step       every member      header members, body
countdown, eta            first step       every member      header members
task_id                   last step        the group's id    body
link                      last step        every member      body
link_error                every step       every member      body
========================  ===============  ================  ======================

[1] :data:`INHERITED`. Celery gives chain options to the first step only; amqtask routes a whole
chain sent with ``apply_async(queue=...)`` to that queue.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from . import serializers
from .errors import ConfigurationError, MessageError, MisuseError
from .group_result import GroupResult
from .result import AsyncResult
from .task import CALL_OPTIONS

if TYPE_CHECKING:
    from .app import App, Runtime

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
        from .app import current_app

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


class _Composite(Signature):
    """Common ground of chain, group and chord: structure in ``kwargs``, partial args prepended to parts."""

    def _merged(self, args: Iterable[Any], kwargs: Mapping[str, Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if kwargs:
            raise MisuseError(f"{self.subtask_type}: pass keyword arguments when sending, not to clone()")
        return (self.args if self.immutable else (*args, *self.args)), self.kwargs

    def _partial(self, args: list[Any]) -> list[Any]:
        return list(self.args) if self.immutable else [*args, *self.args]

    def __call__(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """Send it (as Celery's composites do), with the arguments given to its first tasks."""
        return self.apply_async(args, kwargs)

    def _with_parts(self: _S, **structure: Any) -> _S:
        twin = self._copy()
        twin.kwargs.update(structure)
        return twin


def _chain_steps(sig: Signature) -> list[Signature]:
    """``sig``'s steps when it is a chain without options of its own (so ``a | b | c`` stays flat)."""
    if isinstance(sig, chain) and not sig.options and not sig.args:
        return sig.tasks
    return [sig]


def _signatures(items: tuple[Any, ...], app: App | None) -> list[Signature]:
    """Signatures from ``items``, or from the one iterable (list, generator) given instead."""
    if len(items) == 1 and isinstance(items[0], Iterable) and not isinstance(items[0], Mapping | str):
        items = tuple(items[0])
    return [signature(item, app) for item in items]


def _app_of(sigs: Iterable[Signature]) -> App | None:
    return next((sig._app for sig in sigs if sig._app is not None), None)


class chain(_Composite):
    """Signatures run one after another, each with its parent's result prepended: ``chain(a, b, c)``.

    Sending it returns the last step's result; ``.parent`` leads back to the earlier steps.
    """

    subtask_type = "chain"

    def __init__(self, *tasks: Any, app: App | None = None, **options: Any) -> None:
        _check_options(options)
        steps = _signatures(tasks, app)
        super().__init__("celery.chain", (), {"tasks": steps}, options=options, app=app or _app_of(steps))

    @property
    def tasks(self) -> list[Signature]:
        """The steps."""
        return list(self.kwargs["tasks"])

    def __repr__(self) -> str:
        return " | ".join(repr(step) for step in self.tasks)

    def _steps(self) -> list[Signature]:
        """The steps with the chain's options given out, nested chains inlined, group + step made chords."""
        steps: list[Signature] = []
        last = len(self.tasks) - 1
        for index, step in enumerate(self.tasks):
            given = _pick(self.options, {*INHERITED, "link_error"})
            if index == 0:
                given.update(_pick(self.options, _DELAYS))
            if index == last:
                given.update(_pick(self.options, {"task_id", "link"}))
            step = _give(step, given)
            steps.extend(step._steps() if isinstance(step, chain) else [step])
        upgraded: list[Signature] = []
        for step in steps:
            if upgraded and type(upgraded[-1]) is group:
                upgraded[-1] = chord(upgraded[-1], step, app=self._app)
            else:
                upgraded.append(step)
        return upgraded

    def _freeze(self, ctx: _Context) -> tuple[Signature, AsyncResult[Any]]:
        frozen: list[Signature] = []
        results: list[AsyncResult[Any]] = []
        for step in self._steps():
            step, result = step._freeze(ctx)
            if results:
                _earliest(result).parent = results[-1]
            frozen.append(step)
            results.append(result)
        if not frozen:
            raise MisuseError("cannot send an empty chain")
        twin = chain(*frozen, app=self._app)
        twin.args, twin.immutable = self.args, self.immutable
        return twin, results[-1]

    def _sends(self, args: list[Any], kwargs: dict[str, Any], extra: dict[str, Any]) -> list[Send]:
        first, *later = self.tasks
        rest = [step.to_dict() for step in reversed(later)]
        return first._continued(rest)._sends(self._partial(args), kwargs, extra)

    def _with_tail(self, keep: bool = False, **options: Any) -> chain:
        *steps, last = self.tasks
        return self._with_parts(tasks=[*steps, last._with_tail(keep, **options)])

    def _continued(self, rest: list[dict[str, Any]]) -> Signature:
        return self._with_parts(tasks=[*self.tasks, *(signature(step, self._app) for step in reversed(rest))])

    def _parts(self) -> list[Signature]:
        return self.tasks


class group(_Composite):
    """Signatures run in parallel: ``group(add.s(i, i) for i in range(10))``; sending returns a GroupResult."""

    subtask_type = "group"

    def __init__(self, *tasks: Any, app: App | None = None, **options: Any) -> None:
        _check_options(options)
        members = _signatures(tasks, app)
        super().__init__("celery.group", (), {"tasks": members}, options=options, app=app or _app_of(members))

    @property
    def tasks(self) -> list[Signature]:
        """The members."""
        return list(self.kwargs["tasks"])

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(member) for member in self.tasks)}])"

    def __or__(self, other: Signature) -> Signature:
        if isinstance(other, Signature) and other.subtask_type is None:
            return chord(self, other, app=self._app or other._app)
        return super().__or__(other)

    def apply_async(
        self, args: Iterable[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> GroupResult:
        """Send every member; the GroupResult holds their results in order."""
        return _group_result(super().apply_async(args, kwargs, **options))

    async def aapply_async(
        self, args: Iterable[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> GroupResult:
        """:meth:`apply_async` for async code."""
        return _group_result(await super().aapply_async(args, kwargs, **options))

    def __call__(self, *args: Any, **kwargs: Any) -> GroupResult:
        """Send every member, with these arguments given to each."""
        return self.apply_async(args, kwargs)

    def _members(self) -> list[Signature]:
        """The members with the group's options given out and nested groups inlined."""
        given = _pick(self.options, {*INHERITED, *_DELAYS, *_CALLBACKS})
        members: list[Signature] = []
        for member in self.tasks:
            member = _give(member, given)
            members.extend(member._members() if type(member) is group else [member])
        return members

    def _freeze(self, ctx: _Context) -> tuple[Signature, AsyncResult[Any]]:
        group_id = self.options.get("task_id") or new_id()
        frozen: list[Signature] = []
        results: list[AsyncResult[Any]] = []
        for index, member in enumerate(self._members()):
            member, result = member._freeze(ctx)
            frozen.append(member._with_tail(group_index=index))
            results.append(result)
        twin = group(*frozen, app=self._app, task_id=group_id)
        twin.args, twin.immutable = self.args, self.immutable
        return twin, GroupResult(group_id, results, ctx.app)

    def _sends(self, args: list[Any], kwargs: dict[str, Any], extra: dict[str, Any]) -> list[Send]:
        return self._member_sends(args, kwargs, extra)

    def _member_sends(
        self, args: list[Any], kwargs: dict[str, Any], extra: dict[str, Any], **membership: Any
    ) -> list[Send]:
        group_id, partial = self.options["task_id"], self._partial(args)
        return [
            send
            for index, member in enumerate(self.tasks)
            for send in member._with_tail(group_id=group_id, group_index=index, **membership)._sends(
                partial, kwargs, extra
            )
        ]

    def _with_tail(self, keep: bool = False, **options: Any) -> group:
        raise MisuseError("a chain inside a group or chord cannot end with a group; end it with a task")

    def _continued(self, rest: list[dict[str, Any]]) -> Signature:
        # A group followed by more steps is a chord whose body is the next step.
        if not rest:
            return self
        return chord(self, signature(rest[-1], self._app), app=self._app)._continued(rest[:-1])

    def _parts(self) -> list[Signature]:
        return self.tasks


def _group_result(result: AsyncResult[Any]) -> GroupResult:
    assert isinstance(result, GroupResult)
    return result


class chord(_Composite):
    """A group whose results, in group order, go to a body: ``chord(header, body)`` or ``chord(header)(body)``.

    Sending it returns the body's result; its ``.parent`` is the header's GroupResult. A failed header
    task fails the chord: the body does not run and its result raises that task's exception.
    """

    subtask_type = "chord"

    def __init__(self, header: Any, body: Any = None, *, app: App | None = None, **options: Any) -> None:
        _check_options(options)
        found = _signatures((header,), app)
        head = found[0] if len(found) == 1 and type(found[0]) is group else group(*found, app=app)
        tail = signature(body, app) if body is not None else None
        parts = [head, *([tail] if tail is not None else [])]
        super().__init__("celery.chord", (), {"kwargs": {}, "header": head, "body": tail}, options=options,
                         app=app or _app_of(parts))  # fmt: skip

    @property
    def header(self) -> group:
        """The group that runs first."""
        head: group = self.kwargs["header"]
        return head

    @property
    def body(self) -> Signature | None:
        """The signature that gets the header's results."""
        tail: Signature | None = self.kwargs["body"]
        return tail

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def __call__(self, *body: Any, **options: Any) -> AsyncResult[Any]:
        """Send the chord, with ``body`` when the chord was made without one (Celery's ``chord(h)(body)``)."""
        if len(body) > 1:
            raise MisuseError("chord(header)(body): give one body signature")
        sig = self._with_parts(body=signature(body[0], self._app)) if body else self
        return sig.apply_async(**options)

    def _freeze(self, ctx: _Context) -> tuple[Signature, AsyncResult[Any]]:
        if self.body is None:
            raise MisuseError("a chord needs a body: chord(header, body) or chord(header)(body)")
        header, group_result = _give(self.header, _pick(self.options, {*INHERITED, *_DELAYS}))._freeze(ctx)
        body, result = _give(self.body, _pick(self.options, {*INHERITED, "task_id", *_CALLBACKS}))._freeze(ctx)
        _earliest(result).parent = group_result
        twin = chord(header, body, app=self._app)
        twin.args, twin.immutable = self.args, self.immutable
        return twin, result

    def _sends(self, args: list[Any], kwargs: dict[str, Any], extra: dict[str, Any]) -> list[Send]:
        assert self.body is not None, "frozen chords have a body"
        # The body names the chord's group, as Celery's does (unless it belongs to an outer group).
        body = self.body._with_tail(keep=True, group_id=self.header.options["task_id"])
        size = len(self.header.tasks)
        if not size:
            return body._sends([[]], {}, extra)
        embedded = {**body.to_dict(), "chord_size": size}
        return self.header._member_sends(self._partial(args), kwargs, extra, chord=embedded)

    def _with_tail(self, keep: bool = False, **options: Any) -> chord:
        assert self.body is not None, "frozen chords have a body"
        return self._with_parts(body=self.body._with_tail(keep, **options))

    def _continued(self, rest: list[dict[str, Any]]) -> Signature:
        assert self.body is not None, "frozen chords have a body"
        return self._with_parts(body=self.body._continued(rest))

    def _parts(self) -> list[Signature]:
        return [*self.header.tasks, *([self.body] if self.body is not None else [])]


_KINDS: dict[str | None, type[Signature]] = {None: Signature, "chain": chain, "group": group, "chord": chord}


def signature(value: Signature | Mapping[str, Any], app: App | None = None) -> Signature:
    """A :class:`Signature` from its wire dict (a Signature is returned as it is)."""
    if isinstance(value, Signature):
        return value
    if not isinstance(value, Mapping):
        raise MessageError(f"a signature must be a dict, got {type(value).__name__}")
    task, args = value.get("task"), value.get("args") or ()
    kwargs, options = value.get("kwargs") or {}, value.get("options") or {}
    kind = _KINDS.get(value.get("subtask_type"))
    if not isinstance(task, str) or not isinstance(args, list | tuple) or kind is None:
        raise MessageError(f"malformed signature: {str(dict(value))[:200]}")
    if not isinstance(kwargs, Mapping) or not isinstance(options, Mapping):
        raise MessageError(f"malformed signature of {task!r}: kwargs and options must be dicts")
    sig: Signature
    if kind is chain or kind is group:
        sig = kind(*_listed(kwargs.get("tasks")), app=app)
    elif kind is chord:
        sig = chord(kwargs.get("header") or [], kwargs.get("body"), app=app)
    else:
        sig = Signature(task, (), kwargs, app=app)
    sig.args, sig.options = tuple(args), dict(options)
    sig.immutable = bool(value.get("immutable"))
    sig.extra = {key: item for key, item in value.items() if key not in WIRE_KEYS}
    return sig


# ---------------------------------------------------------------------------------------------- sending


def prepare(
    sig: Signature, args: Iterable[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
) -> tuple[list[Send], AsyncResult[Any]]:
    """What ``sig.apply_async(args, kwargs, **options)`` publishes, and the result it returns; sends nothing."""
    app = sig.app
    frozen, result = (sig.clone(**options) if options else sig)._freeze(_Context(app, app.reply_queue))
    return frozen._sends(list(args or ()), dict(kwargs or {}), {}), result


def follow_up(
    app: App,
    value: Signature | Mapping[str, Any],
    args: list[Any],
    *,
    reply_to: str | None,
    parent_id: str,
    root_id: str | None,
    rest: list[dict[str, Any]] | None = None,
    serializer: str | None = None,
) -> list[Send]:
    """The messages a worker publishes to apply a signature found in ``embed``, with ``args`` prepended.

    Steps frozen by the caller keep their ids and ``reply_to``; anything not frozen (a ``link``
    callback) gets a new id and the finished task's ``reply_to``. ``rest`` is the remaining chain.
    ``serializer``, the encoding of the message that triggered the follow-up, is kept unless a step
    names its own: the caller may accept no other encoding in the step's reply (a Celery client).
    """
    sig = signature(value, app)
    frozen, _ = (_give(sig, {"serializer": serializer}) if serializer else sig)._freeze(_Context(app, reply_to))
    if rest is not None:
        frozen = frozen._continued(rest)
    return frozen._sends(args, {}, {"parent_id": parent_id, "root_id": root_id})


def task_signatures(value: Signature | Mapping[str, Any]) -> Iterator[Signature]:
    """Every task inside ``value`` that would report a result: steps, members, bodies, continuations."""
    sig = signature(value)
    if sig.subtask_type is None:
        yield sig
        for step in _listed(sig.options.get("chain")):
            yield from task_signatures(step)
    for part in sig._parts():
        yield from task_signatures(part)


def chord_size(body: Mapping[str, Any]) -> int:
    """The number of header tasks a chord body (``embed.chord``) waits for."""
    size = body.get("chord_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise MessageError(
            "embed.chord has no chord_size: this chord was not sent by amqtask (a Celery client's chord needs "
            "its own result backend)"
        )
    return size


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


__all__ = [
    "INHERITED",
    "Send",
    "Signature",
    "chain",
    "chord",
    "chord_size",
    "follow_up",
    "group",
    "new_id",
    "prepare",
    "publish",
    "signature",
    "task_signatures",
]
