"""Benchmark figures as Markdown tables, the form ``docs/performance.md`` quotes them in."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["markdown_table"]

_SEPARATORS = {"l": "---|", "r": "---:|"}


def markdown_table(header: str, align: str, rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table: the header row, the alignment row, then one line per row.

    ``header`` is the column titles joined by ``" | "``; ``align`` has one letter per column,
    ``l`` (left) or ``r`` (right, for figures); each row has one cell per column, written with
    ``str``.

    Raises
    ------
    ValueError
        ``align`` is not one ``l`` or ``r`` per column.
    """
    columns = header.split(" | ")
    if len(align) != len(columns) or set(align) - set(_SEPARATORS):
        raise ValueError(f"align {align!r} must be one 'l' or 'r' per column ({len(columns)} columns)")
    lines = [f"| {header} |", "|" + "".join(_SEPARATORS[a] for a in align)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
