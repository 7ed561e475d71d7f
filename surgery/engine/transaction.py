"""What makes every pass all-or-nothing and one-at-a-time: a journal of undo steps, attachment names, and a lock
per model.

A pass records how to undo each change just before it makes it (so a change that fails half-way is undone too);
if anything raises, the journal runs the undo steps in reverse and the model is left exactly as it was. Passes
on one model run one at a time: each holds the model's lock (a re-entrant lock kept beside the model, not on it,
so `copy.deepcopy` and pickling of the model are unaffected).
"""
from __future__ import annotations

import contextlib
import contextvars
import re
import threading
import weakref
from typing import Callable, Iterator

from torch import nn

from surgery.errors import LedgerError

NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
"""An attachment name: a letter or `_`, then letters, digits, `_` or `-`, at most 64 characters in all."""

_RESERVED = frozenset(n for n in dir(nn.ModuleDict()) if NAME_PATTERN.fullmatch(n))
"""Names torch's ModuleDict already uses for its own attributes (`train`, `float`, `keys`, ...): a Host keeps its
branches in a ModuleDict by attachment name, so these cannot name an attachment."""


def check_name(name: object, what: str = "attachment name") -> str:
    """`name` if it is a valid attachment name, else a LedgerError that says the rule."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise LedgerError(f"{what} {name!r} is not valid: use 1 to 64 letters, digits, '_' or '-', starting with a "
                          "letter or '_' (no dots, slashes or spaces)")
    if name in _RESERVED:
        raise LedgerError(f"{what} {name!r} is not valid: torch's ModuleDict uses it for its own attribute "
                          f"(reserved: {', '.join(sorted(n for n in _RESERVED if not n.startswith('_'))[:12])}, ...)")
    return name


class Journal:
    """Undo steps of one pass, run in reverse by `rollback`. Record a step *before* making the change it undoes,
    and make it harmless if the change did not happen (or happened only in part)."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def record(self, what: str, undo: Callable[[], None]) -> None:
        self._steps.append((what, undo))

    def __len__(self) -> int:
        return len(self._steps)

    def rollback(self, error: BaseException) -> None:
        """Run every undo step in reverse. One that fails does not stop the others; its failure is added to
        `error` as a note (the model may then differ from what it was: the note says where)."""
        steps, self._steps = self._steps, []
        for what, undo in reversed(steps):
            try:
                undo()
            except Exception as failure:  # keep undoing: every other step still puts its part back
                note = f"surgery: undoing '{what}' after this error failed too ({type(failure).__name__}: {failure}); " \
                       "the model may not be exactly as it was"
                if hasattr(error, "add_note"):
                    error.add_note(note)

    def commit(self) -> None:
        self._steps = []


_CURRENT: contextvars.ContextVar[Journal | None] = contextvars.ContextVar("surgery_journal", default=None)


@contextlib.contextmanager
def transaction() -> Iterator[Journal]:
    """A journal that is rolled back if the block raises, and forgotten if it completes. Inside the block it is
    also `current_journal()`."""
    journal = Journal()
    token = _CURRENT.set(journal)
    try:
        yield journal
    except BaseException as err:
        journal.rollback(err)
        raise
    finally:
        _CURRENT.reset(token)
    journal.commit()


def current_journal() -> Journal:
    """The journal of the pass in progress in this thread."""
    journal = _CURRENT.get()
    if journal is None:
        raise RuntimeError("surgery: a model change was attempted outside a pass's transaction")
    return journal


_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises surgery's passes on `model` (the unwrapped model). A pass that calls
    other passes (detach unmerges, bake merges and detaches, load attaches) takes it again in the same thread."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


TRACE_LOCK = threading.RLock()
"""Serialises the graph analysis (`torch.export` is not safe to run in two threads at once, even on two models)."""
