"""`runner validate RECIPE [--set FIELD=VALUE] [--full]`: check a recipe and
print a short summary of it (what a run would do, in lines that fit an
80-column terminal); `--full` prints the resolved recipe as TOML and, for
every field, where its value comes from."""

from __future__ import annotations

import os

from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from runner.recipe import Recipe, load_with_provenance, provenance_rows, to_toml
from runner.report import method_label

WIDTH = 80  # a summary line is cut to fit a terminal of this width


def main(args, console, stop) -> int:
    recipe, provenance = load_with_provenance(args.recipe, args.set)
    if args.full:
        console.print(Syntax(to_toml(recipe), "toml", theme="ansi_dark"))
        table = Table(title="where each value comes from")
        for column in ("field", "value", "from"):
            table.add_column(column, overflow="fold")
        for row in provenance_rows(recipe, provenance):
            table.add_row(*map(escape, row))
        console.print(table)
    else:
        for line in summary(recipe, provenance, str(args.recipe)):
            console.print(_fit(line), markup=False, highlight=False, soft_wrap=True)
        console.print("(runner validate --full: every field, and where it came from)",
                      markup=False, highlight=False, style="dim")
    console.print(f"[green]{escape(str(args.recipe))}: valid[/]", highlight=False,
                  soft_wrap=True)
    return 0


def summary(recipe: Recipe, provenance: dict[str, str], path: str) -> list[str]:
    """What the recipe at `path` will do, one short line per step, and where
    it came from (the files of its `extends` chain, the fields given by --set)."""
    data, adapter, train, ev = recipe.data, recipe.adapter, recipe.train, recipe.eval
    held_out = (f"eval on split {data.eval_split!r}" if data.eval_split is not None
                else f"{data.eval_size} rows held out for eval")
    labels = (f"labels {', '.join(data.labels)}; " if data.labels else
              "labels inferred from the data; " if recipe.model.task == "classification" else "")
    if adapter.method == "full":
        method = "full: every weight trained"
    else:
        targets = adapter.targets or "the family's default"
        shown = targets if isinstance(targets, str) else ", ".join(targets)
        quant = f" over {adapter.quant.type} weights" if adapter.method == "qlora" else ""
        method = (f"{method_label(adapter.model_dump())}{quant}: rank {adapter.rank}, "
                  f"alpha {adapter.alpha:g}, targets {shown}")
    steps = f", at most {train.max_steps} steps" if train.max_steps else ""
    files = list(dict.fromkeys(_short(s) for s in (path, *provenance.values()) if s != "--set"))
    given = [field for field, s in provenance.items() if s == "--set"]
    lines = [
        f"{recipe.name}: {recipe.description}" if recipe.description else recipe.name,
        f"  model    {recipe.model.source} ({recipe.model.task})",
        f"  data     {data.source}",
        f"           {labels}{held_out}; max_length {data.max_length}",
        f"  adapter  {method}",
        f"  train    {train.epochs} epoch(s){steps}, batch {train.batch_size}, "
        f"learning rate {train.learning_rate:g} ({train.schedule}), seed {train.seed}",
        f"  eval     {'before and after' if ev.before else 'after only'}, "
        f"batch {ev.batch_size}" + (f", every {ev.every_steps} steps" if ev.every_steps else ""),
        f"  output   {recipe.output.dir}/{recipe.name}/<timestamp>/",
    ]
    if files:
        lines.append(f"  files    {', '.join(files)}")  # the recipe, then its parents
    if given:
        lines.append(f"  --set    {', '.join(given)}")
    return lines


def _short(path: str) -> str:
    """A file's path relative to the working directory, when that is shorter."""
    relative = os.path.relpath(path)
    return relative if len(relative) < len(path) else path


def _fit(line: str) -> str:
    """The line cut to WIDTH characters, an ellipsis saying so."""
    return line if len(line) <= WIDTH else line[:WIDTH - 1] + "…"
