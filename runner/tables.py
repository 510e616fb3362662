"""Tables of figures, one row per run (or per point of a sweep), for the
terminal and for Markdown files. In the terminal a table is shown whole
where it fits the width, else transposed (figures as rows, runs as columns)
over as many runs at a time as fit; in Markdown it is one line per run.
`runner compare` and `runner sweep` show theirs this way.

`names` are the column names, `cells` one list of texts per row (the first
cell names the row), and the first `left` columns are left-aligned (names
and settings), the others right-aligned (figures). Texts are shown as they
are: never read as rich markup (a point named `[INST] {prompt} [/INST]`),
and in Markdown a `|` is escaped and a line break is a space."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text


def wide(title: str | None, names: list[str], cells: list[list[str]], left: int = 2) -> Table:
    """Rows as rows, figures as columns."""
    t = Table(title=_plain(title))
    for i, name in enumerate(names):
        t.add_column(Text(name), justify="left" if i < left else "right")
    for row in cells:
        t.add_row(*map(Text, row))
    return t


def transposed(title: str | None, names: list[str], cells: list[list[str]]) -> Table:
    """Figures as rows, rows as columns (for a narrow terminal)."""
    t = Table(title=_plain(title))
    t.add_column("")
    for row in cells:
        t.add_column(Text(row[0]), justify="right")
    for j, name in enumerate(names[1:], 1):
        t.add_row(Text(name), *(Text(row[j]) for row in cells))
    return t


def _plain(title: str | None) -> Text | None:
    return None if title is None else Text(title, style="table.title")


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
    line = lambda texts: "| " + " | ".join(map(_markdown_cell, texts)) + " |"  # noqa: E731
    lines = [line(names), "|" + "|".join(["---"] * left + ["---:"] * (len(names) - left)) + "|"]
    lines += [line(row) for row in cells]
    return "\n".join(lines)


def _markdown_cell(text: str) -> str:
    """A cell's text that stays one cell of one Markdown table line."""
    return " ".join(text.replace("\\", "\\\\").replace("|", "\\|").splitlines())
