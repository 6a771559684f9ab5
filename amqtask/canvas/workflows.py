"""The composites (chain, group, chord), signatures read back from their wire dicts, and the worker's
side of a canvas: the follow-ups it applies from a message's ``embed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import MessageError, MisuseError
from ..results import AsyncResult, GroupResult
from .signature import (
    _CALLBACKS,
    _DELAYS,
    _S,
    INHERITED,
    WIRE_KEYS,
    Send,
    Signature,
    _check_options,
    _Context,
    _earliest,
    _give,
    _listed,
    _pick,
    new_id,
)

if TYPE_CHECKING:
    from ..app import App


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
