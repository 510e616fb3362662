"""`runner recipes [FOLDER]`: the recipes of a folder, one line each (fits an
80-column terminal): its name, what it needs (`offline`: installed packages
and local files; `network`: a model or data set from the Hugging Face hub;
`missing`: a local file that is not there yet), method and description. A file that does not validate is listed with its first problem."""

from __future__ import annotations

from pathlib import Path

from jaxlora.errors import UserError
from jaxlora.sources import where_from
from runner.recipe import SHIPPED, Recipe, load_recipe

WIDTH = 80  # each line is cut to fit a terminal this wide


def main(args, console, stop) -> int:
    folder = _folder(args.folder)
    console.print(f"recipes in {folder}", markup=False, highlight=False, soft_wrap=True)
    for line in recipe_lines(folder):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print("needs: offline = installed packages and local files; network = the "
                  "Hugging Face hub; missing = a local file not there yet. runner cp NAME "
                  "DEST copies a recipe to edit.", markup=False, highlight=False, style="dim")
    return 0


def _folder(folder: Path | None) -> Path:
    """FOLDER, by default ./recipes, else the shipped recipes."""
    if folder is None:
        here = Path("recipes")
        folder = here if here.is_dir() else SHIPPED
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder of recipes")
    return folder


def recipe_lines(folder: Path) -> list[str]:
    """A header, then one line per .toml file of FOLDER: name, needs, method,
    description, cut to WIDTH."""
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise UserError(f"{folder}: no .toml recipes in it")
    width = max(len(path.stem) for path in files)
    lines = []
    for path in files:
        try:
            recipe = load_recipe(path)
        except UserError as e:
            problem = str(e).splitlines()[0].removeprefix(f"{path}: ")
            lines.append(_fit(f"{path.stem:<{width}}  invalid: {problem}"))
            continue
        lines.append(_fit(f"{path.stem:<{width}}  {needs(recipe, path.parent):<7}  "
                          f"{recipe.adapter.method:<6}  {recipe.description}"))
    return [_fit(f"{'NAME':<{width}}  {'NEEDS':<7}  {'METHOD':<6}  DESCRIPTION"), *lines]


def needs(recipe: Recipe, folder: Path) -> str:
    """`network` when the model or the data comes from the hub, `missing` when
    a local one is not there, else `offline`."""
    found = {where_from(recipe.model.source, folder), where_from(recipe.data.source, folder)}
    return "network" if "hub" in found else ("missing" if "missing" in found else "offline")


def _fit(line: str) -> str:
    """The line cut to WIDTH characters, an ellipsis saying so."""
    return line.rstrip() if len(line) <= WIDTH else line[:WIDTH - 1] + "…"
