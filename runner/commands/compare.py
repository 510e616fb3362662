"""`runner compare RUN_DIR ...`: finished runs side by side, read from their
folders only (manifest.json and eval.json), so it also works on runs made
elsewhere. A run that has not finished is skipped with one line saying so
(`runner compare runs/x/*` while one still trains); a damaged folder is
refused. The table fits the terminal: runs as rows where that fits, else
runs as columns, a few at a time. `--markdown` prints the same as a
Markdown table instead (one line per run, to paste anywhere)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from jaxlora.errors import UserError
from runner import manifest as manifests
from runner import run_folder
from runner.report import baseline_of, method_label


def main(args, console, stop) -> int:
    runs, skipped = [], []
    for path in args.runs:
        run = read_run(path)
        if "skipped" in run:
            skipped.append(run["skipped"])
        else:
            runs.append(run)
    errors = Console(stderr=True, soft_wrap=True, highlight=False)
    if not runs:
        raise UserError("no finished run to compare: " + "; ".join(skipped))
    for line in skipped:
        errors.print(f"skipped {line}")
    if getattr(args, "markdown", False):
        print(markdown(runs))  # plain: rich would wrap it at the terminal width
        return 0
    for part in tables(runs, console.width):
        console.print(part)
    return 0


COLUMNS = ["run", "method", "trainable params", "frozen MiB", "bits / quantized param",
           "peak memory MiB", "median step ms", "train s", "accuracy majority",
           "accuracy before -> after", "macro-F1 majority", "macro-F1 before -> after"]


def read_run(run_dir: Path) -> dict:
    """The manifest and evaluation of one finished run; {"skipped": why} for a
    run that has not finished; a clear error for what is not a run folder."""
    if not (run_dir / "manifest.json").is_file():
        raise UserError(f"{run_dir}: no manifest.json; not a run folder "
                        "(runs/<name>/<timestamp>/ after `runner run`)")
    manifest = run_folder.read_json(run_dir / "manifest.json")
    if manifest.get("status") != "finished":
        return {"skipped": f"{run_dir}: the run did not finish (status "
                           f"{manifest.get('status')!r})"}
    if not (run_dir / "eval.json").is_file():
        raise UserError(f"{run_dir}: no eval.json, though manifest.json says the run finished")
    evals = run_folder.read_json(run_dir / "eval.json")
    manifests.check_after(run_dir, evals)
    run_folder.check(run_dir / "manifest.json", manifest, manifests.fields(manifests.TO_COMPARE))
    run_folder.check(run_dir / "eval.json", evals, manifests.eval_fields(evals))
    return {"dir": run_dir, "manifest": manifest, "eval": evals,
            "baseline": baseline_of(manifest, evals)}


def _before_after(evals: dict, key: str) -> str:
    """`before -> after` of one metric; '-' where the run's task has no such metric
    (accuracy of a causal-lm run)."""
    after = evals["after"].get(key)
    if after is None:
        return "-"
    before = (evals.get("before") or {}).get(key)
    return (f"{before:.3f} -> " if before is not None else "- -> ") + f"{after:.3f}"


def _num(value, fmt: str) -> str:
    """A figure, or '-' where a run (e.g. one made by an older version) lacks it."""
    return "-" if value is None else format(value, fmt)


def rows(runs: list[dict]) -> list[list[str]]:
    """One row of figures per run, in the order of `columns`."""
    out = []
    for run in runs:
        m = run["manifest"]
        model, train = m.get("model", {}), m.get("train", {})
        frozen = model.get("frozen_bytes")
        baseline = run["baseline"] or {}
        out.append([
            f"{m['recipe']['name']}/{run['dir'].name}",
            method_label(m["recipe"]["adapter"]),
            _num(model.get("trainable_params"), ","),
            _num(None if frozen is None else frozen / 2**20, ".1f"),
            _num(model.get("bits_per_quantized_param"), ".3f"),
            _num(train.get("peak_memory_mb"), ".0f"),
            _num(train.get("median_step_ms"), ".0f"),
            _num(train.get("train_seconds"), ".0f"),
            _num(baseline.get("accuracy"), ".3f"),
            _before_after(run["eval"], "accuracy"),
            _num(baseline.get("macro_f1"), ".3f"),
            _before_after(run["eval"], "macro_f1"),
        ] + ([_before_after(run["eval"], "perplexity"), _before_after(run["eval"], "exact_match")]
             if _any_causal_lm(runs) else []))
    return out


def _any_causal_lm(runs: list[dict]) -> bool:
    return any("perplexity" in run["eval"]["after"] for run in runs)


def columns(runs: list[dict]) -> list[str]:
    """COLUMNS, and perplexity and exact match when a causal-lm run is compared
    (whose baseline is its base model: the "before" of each figure)."""
    extra = ["perplexity before -> after", "exact match before -> after"]
    return COLUMNS + (extra if _any_causal_lm(runs) else [])


def table(runs: list[dict]) -> Table:
    """Runs as rows, figures as columns."""
    t = Table(title="runs side by side")
    for i, column in enumerate(columns(runs)):
        t.add_column(column, justify="left" if i < 2 else "right")
    for row in rows(runs):
        t.add_row(*row)
    return t


def transposed(runs: list[dict], names: list[str], cells: list[list[str]],
               title: str | None = "runs side by side") -> Table:
    """Figures as rows, runs as columns (for a narrow terminal)."""
    t = Table(title=title)
    t.add_column("")
    for i, _ in enumerate(runs):
        t.add_column(cells[i][0], justify="right")
    for j, name in enumerate(names[1:], 1):
        t.add_row(name, *(row[j] for row in cells))
    return t


def tables(runs: list[dict], width: int) -> list[Table]:
    """The table(s) to show in `width` columns: the wide one where it fits
    whole, else the transposed one over as many runs at a time as fit."""
    wide = table(runs)
    if _width(wide) <= width:
        return [wide]
    names, cells = columns(runs), rows(runs)
    per = len(runs)
    while per > 1 and _width(transposed(runs[:per], names, cells[:per])) > width:
        per -= 1
    return [transposed(runs[i:i + per], names, cells[i:i + per],
                       "runs side by side" if i == 0 else None)
            for i in range(0, len(runs), per)]


def _width(t: Table) -> int:
    """The columns `t` takes with no cell wrapped."""
    console = Console(width=10_000)
    return console.measure(t).maximum


def markdown(runs: list[dict]) -> str:
    names = columns(runs)
    lines = ["| " + " | ".join(names) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(names) - 2)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(runs)]
    return "\n".join(lines)
