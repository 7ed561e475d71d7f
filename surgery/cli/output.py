"""What the CLI prints: rich tables on stdout, JSON for machines, a step progress bar on stderr."""
from __future__ import annotations

import contextlib
import io
import json
import sys
from typing import Any, Callable, Iterator

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def emit_json(data: Any) -> None:
    """Print `data` as indented JSON on stdout (no colour, no markup)."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def table(headers: list[str], rows: list[list[str]], right: tuple[str, ...] | list[str] = (),
          ascii_only: bool = False) -> Table:
    """A rich table of plain-text cells (never read as markup: `linear[int8]` stays as written)."""
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


@contextlib.contextmanager
def step_progress(steps: list[str]) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr over named steps; the block calls the function it gets at the start of each."""
    progress = Progress(SpinnerColumn(), TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True))
    task = progress.add_task(steps[0], total=len(steps))
    started = 0

    def step() -> None:
        nonlocal started
        if started:
            progress.advance(task)
        progress.update(task, description=steps[min(started, len(steps) - 1)])
        started += 1

    with progress:
        yield step
        progress.update(task, completed=len(steps), description="done")
