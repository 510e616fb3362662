"""`runner recipes [FOLDER]`: the recipes of a folder with their task, method,
base model and description; a file that does not validate is listed with its
first problem."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from jaxlora.errors import UserError
from runner.recipe import load_recipe


def main(args, console, stop) -> int:
    console.print(recipes_table(args.folder))
    return 0


def recipes_table(folder: Path | None) -> Table:
    """The table of FOLDER's recipes (default: ./recipes, else the project's own)."""
    if folder is None:
        here = Path("recipes")
        folder = here if here.is_dir() else Path(__file__).resolve().parents[2] / "recipes"
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder of recipes")
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise UserError(f"{folder}: no .toml recipes in it")
    table = Table(title=f"recipes in {folder}")
    table.add_column("recipe", no_wrap=True)  # a file name is never cut
    for column in ("task", "method", "model", "description"):
        table.add_column(column, overflow="fold")
    for path in files:
        try:
            r = load_recipe(path)
        except UserError as e:
            table.add_row(path.name, "-", "-", "-",
                          f"[red]invalid:[/] {escape(str(e).splitlines()[0])}")
            continue
        table.add_row(path.name, r.model.task, r.adapter.method, r.model.source,
                      escape(r.description))
    return table
