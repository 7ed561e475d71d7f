"""Progress of long steps. The engine counts real work (sites read, sites merged, tensors gathered or filled)
through `task`; whoever runs it decides whether that is shown, by installing a reporter with `reporting` (the
CLI draws a bar on a terminal). With no reporter, which is the default, counting costs one call per step."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol


class Reporter(Protocol):
    """Shows tasks: `start` a task, `update` its count and total, `finish` it (tasks may nest)."""

    def start(self, description: str, total: int, unit: str) -> None: ...

    def update(self, done: int, total: int) -> None: ...

    def finish(self) -> None: ...


class Task:
    """A counter handed to the engine's loops: `advance(n)` after each n units of work, `set_total` once the
    number of units is known."""

    __slots__ = ("_reporter", "done", "total")

    def __init__(self, total: int, reporter: Reporter | None):
        self.done, self.total, self._reporter = 0, total, reporter

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._reporter is not None:
            self._reporter.update(self.done, self.total)

    def set_total(self, total: int) -> None:
        self.total = total
        if self._reporter is not None:
            self._reporter.update(self.done, total)


_REPORTER: Reporter | None = None


@contextlib.contextmanager
def task(description: str, total: int = 0, unit: str = "") -> Iterator[Task]:
    """A counted task for the installed reporter (if any): `with task("merging", n, "sites") as t: ... t.advance()`."""
    reporter = _REPORTER
    if reporter is not None:
        reporter.start(description, total, unit)
    try:
        yield Task(total, reporter)
    finally:
        if reporter is not None:
            reporter.finish()


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Install `reporter` for the tasks started inside the block (None: none shown)."""
    global _REPORTER
    previous, _REPORTER = _REPORTER, reporter
    try:
        yield
    finally:
        _REPORTER = previous
