"""Plain-text tables for reports (no dependency; the CLI renders the same rows with rich)."""
from __future__ import annotations


def render(headers: list[str], rows: list[list[str]], footer: str = "") -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    if footer:
        out.append(footer)
    return "\n".join(out)
