"""What the CLI prints: rich tables on stdout, JSON for machines, progress bars on stderr (a terminal only).
rich is imported only where a table is printed."""
from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.table import Table


def emit_json(data: Any) -> None:
    """Print `data` as indented JSON on stdout (no colour, no markup)."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def table(headers: list[str], rows: list[list[str]], right: tuple[str, ...] | list[str] = (),
          ascii_only: bool = False) -> Table:
    """A rich table of plain-text cells (never read as markup: `linear[int8]` stays as written)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    out = Table(box=box.ASCII2 if ascii_only else box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                header_style="bold")
    for header in headers:
        out.add_column(header, justify="right" if header in right else "left")
    for row in rows:
        out.add_row(*(Text(cell) for cell in row))
    return out


def emit_table(headers: list[str], rows: list[list[str]], notes: list[str] = (), right: list[str] = ()) -> None:
    """Print a table and its notes on stdout. On a terminal rich fits it to the width; into a pipe or file it is
    printed at its natural width, without colour and without trailing spaces."""
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False)
    unicode = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") in ("utf8", "utf16", "utf32")
    renderables = [table(headers, rows, right, ascii_only=not unicode), *(Text(note) for note in notes)]
    if console.is_terminal:
        for item in renderables:
            console.print(item)
        return
    buffer = io.StringIO()
    wide = Console(file=buffer, width=100_000, highlight=False, color_system=None)
    for item in renderables:
        wide.print(item)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))


class TerminalBar:
    """A `surgery.core.progress.Reporter` drawing the running task on one line of a terminal: its description
    (after those of the tasks it runs inside), a bar, done/total units and the seconds since it started. A
    finished outermost task keeps its line. Redrawn at most every `interval` seconds, with no thread."""

    def __init__(self, stream: TextIO, width: int = 24, interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self.stream, self.width, self.interval, self.clock = stream, width, interval, clock
        self.tasks: list[list[Any]] = []  # [description, unit, done, total, started]
        self.drawn = -float("inf")

    def start(self, description: str, total: int, unit: str) -> None:
        self.tasks.append([description, unit, 0, total, self.clock()])
        self._draw(force=True)

    def update(self, done: int, total: int) -> None:
        self.tasks[-1][2:4] = done, total
        self._draw(force=done >= total)

    def finish(self) -> None:
        self._draw(force=True)
        self.tasks.pop()
        if self.tasks:
            self._draw(force=True)
        else:
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        """The line for the running task."""
        _, unit, done, total, started = self.tasks[-1]
        label = " > ".join(t[0] for t in self.tasks)
        filled = self.width * min(done, total) // total if total > 0 else 0
        count = f"{done}/{total} {unit}".rstrip() if total > 0 else f"{done} {unit}".rstrip()
        return f"{label:<24} [{'#' * filled}{'.' * (self.width - filled)}] {count}  {self.clock() - started:.1f}s"

    def _draw(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.drawn < self.interval:
            return
        self.drawn = now
        self.stream.write("\r" + self.line() + "\x1b[K")
        self.stream.flush()


def terminal_bar(quiet: bool, stream: TextIO | None = None) -> TerminalBar | None:
    """A progress bar on `stream` (default stderr) if it is a terminal and not `quiet`, else None (silent)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return TerminalBar(stream) if not quiet and isatty is not None and isatty() else None
