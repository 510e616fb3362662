"""`runner validate RECIPE [--set FIELD=VALUE]`: check a recipe and print it
resolved, with where each value comes from."""

from __future__ import annotations

from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from runner.recipe import load_with_provenance, provenance_rows, to_toml


def main(args, console, stop) -> int:
    recipe, provenance = load_with_provenance(args.recipe, args.set)
    console.print(Syntax(to_toml(recipe), "toml", theme="ansi_dark"))
    table = Table(title="where each value comes from")
    for column in ("field", "value", "from"):
        table.add_column(column, overflow="fold")
    for row in provenance_rows(recipe, provenance):
        table.add_row(*map(escape, row))
    console.print(table)
    console.print(f"[green]{args.recipe}: valid[/]")
    return 0
