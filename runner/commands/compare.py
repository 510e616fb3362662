"""`runner compare RUN_DIR ...`: finished runs side by side, read from their
folders only (manifest.json and eval.json), so it also works on runs made
elsewhere. A run that has not finished is skipped with one line saying so
(`runner compare runs/x/*` while one still trains); a damaged folder is
refused. The table fits the terminal: runs as rows where that fits, else
runs as columns, a few at a time. `--markdown` prints the same as a
Markdown table instead (one line per run, to paste anywhere).

A sweep folder (`runner sweep`), given alone, is compared as the sweep
compares it: sweep.md and sweep.png written again from its points' run
folders (points that have not finished left out with a line each), and its
table shown; with `--markdown` only the table goes to stdout (the lines
beside it and where sweep.md is go to stderr)."""

from __future__ import annotations

from rich.console import Console

from jaxlora.errors import UserError
from runner import sweep as sweeps
from runner import tables
from runner.report import method_label, read_run


def main(args, console, stop) -> int:
    if any(sweeps.is_sweep_dir(path) for path in args.runs):
        return _sweep(args, console)
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
        print(tables.markdown(columns(runs), rows(runs)))  # plain: rich would wrap it
        return 0
    for part in tables.fitted("runs side by side", columns(runs), rows(runs), console.width):
        console.print(part)
    return 0


def _sweep(args, console) -> int:
    """A sweep folder's sweep.md and sweep.png, written again, and its table."""
    if len(args.runs) > 1:
        raise UserError("a sweep folder is compared alone: give it without other folders "
                        "(its points are its runs)")
    folder, errors = args.runs[0], Console(stderr=True, soft_wrap=True)
    summary = sweeps.write_summary(folder, errors)
    if not summary.rows:
        raise UserError(f"{folder}: no finished point to compare: " + "; ".join(summary.skipped))
    if getattr(args, "markdown", False):  # the table alone on stdout, the rest beside it
        print(tables.markdown(summary.names, summary.cells, summary.left))
        sweeps.show(summary, folder, errors, table=False)
    else:
        sweeps.show(summary, folder, console)
    return 0


COLUMNS = ["run", "method", "trainable params", "frozen MiB", "bits / quantized param",
           "peak memory MiB", "median step ms", "train s", "accuracy majority",
           "accuracy before -> after", "macro-F1 majority", "macro-F1 before -> after"]


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


