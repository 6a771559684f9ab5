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
:mod:`~amqtask.canvas.signature` holds :class:`Signature` and the sending; :mod:`~amqtask.canvas.workflows`
the composites, signatures read back from wire dicts, and a worker's follow-ups.

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

from .signature import INHERITED, Send, Signature, new_id, prepare, publish
from .workflows import chain, chord, chord_size, follow_up, group, signature, task_signatures

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
