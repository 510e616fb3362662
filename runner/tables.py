"""Tables of figures, one row per run (or per point of a sweep), for the
terminal and for Markdown files. In the terminal a table is shown whole
where it fits the width, else transposed (figures as rows, runs as columns)
over as many runs at a time as fit; in Markdown it is one line per run.
`runner compare` and `runner sweep` show theirs this way.

`names` are the column names, `cells` one list of texts per row (the first
cell names the row), and the first `left` columns are left-aligned (names
and settings), the others right-aligned (figures)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def wide(title: str | None, names: list[str], cells: list[list[str]], left: int = 2) -> Table:
    """Rows as rows, figures as columns."""
    t = Table(title=title)
    for i, name in enumerate(names):
        t.add_column(name, justify="left" if i < left else "right")
    for row in cells:
        t.add_row(*row)
    return t


def transposed(title: str | None, names: list[str], cells: list[list[str]]) -> Table:
    """Figures as rows, rows as columns (for a narrow terminal)."""
    t = Table(title=title)
    t.add_column("")
    for row in cells:
        t.add_column(row[0], justify="right")
    for j, name in enumerate(names[1:], 1):
        t.add_row(name, *(row[j] for row in cells))
    return t


def fitted(title: str, names: list[str], cells: list[list[str]], width: int,
           left: int = 2) -> list[Table]:
    """The table(s) to show in `width` columns: the wide one where it fits
    whole, else the transposed one over as many rows at a time as fit (the
    title on the first)."""
    whole = wide(title, names, cells, left)
    if _width(whole) <= width:
        return [whole]
    per = len(cells)
    while per > 1 and _width(transposed(title, names, cells[:per])) > width:
        per -= 1
    return [transposed(title if i == 0 else None, names, cells[i:i + per])
            for i in range(0, len(cells), per)]


def _width(t: Table) -> int:
    """The columns `t` takes with no cell wrapped."""
    console = Console(width=10_000)
    return console.measure(t).maximum


def markdown(names: list[str], cells: list[list[str]], left: int = 2) -> str:
    """The table in Markdown, one line per row."""
    lines = ["| " + " | ".join(names) + " |",
             "|" + "|".join(["---"] * left + ["---:"] * (len(names) - left)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)
