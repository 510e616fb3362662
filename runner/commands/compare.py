"""`runner compare RUN_DIR ...`: finished runs side by side, read from their
folders only (manifest.json and eval.json), so it also works on runs made
elsewhere: a rich table, then the same as Markdown."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from jaxlora.errors import UserError
from runner import manifest as manifests
from runner import run_folder


def main(args, console, stop) -> int:
    runs = [read_run(path) for path in args.runs]
    console.print(table(runs))
    print(markdown(runs))  # plain: rich would wrap it at the terminal width
    return 0


COLUMNS = ["run", "method", "trainable params", "frozen MiB", "bits / quantized param",
           "peak memory MiB", "median step ms", "train s", "accuracy before -> after",
           "macro-F1 before -> after"]


def read_run(run_dir: Path) -> dict:
    """The manifest and evaluation of one finished run; a clear error otherwise."""
    files = {}
    for name in ("manifest.json", "eval.json"):
        path = run_dir / name
        if not path.is_file():
            raise UserError(f"{run_dir}: no {name}; not a finished run folder "
                            "(runs/<name>/<timestamp>/ after `runner run`)")
        files[name] = run_folder.read_json(path)
    manifest, evals = files["manifest.json"], files["eval.json"]
    if manifest.get("status") != "finished":
        raise UserError(f"{run_dir}: the run did not finish (status "
                        f"{manifest.get('status')!r})")
    manifests.check_after(run_dir, evals)
    run_folder.check(run_dir / "manifest.json", manifest, manifests.fields(manifests.TO_COMPARE))
    run_folder.check(run_dir / "eval.json", evals, manifests.eval_fields(evals))
    return {"dir": run_dir, "manifest": manifest, "eval": evals}


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
    out = []
    for run in runs:
        m = run["manifest"]
        model, train = m.get("model", {}), m.get("train", {})
        frozen = model.get("frozen_bytes")
        out.append([
            f"{m['recipe']['name']}/{run['dir'].name}",
            m["recipe"]["adapter"]["method"],
            _num(model.get("trainable_params"), ","),
            _num(None if frozen is None else frozen / 2**20, ".1f"),
            _num(model.get("bits_per_quantized_param"), ".3f"),
            _num(train.get("peak_memory_mb"), ".0f"),
            _num(train.get("median_step_ms"), ".0f"),
            _num(train.get("train_seconds"), ".0f"),
            _before_after(run["eval"], "accuracy"),
            _before_after(run["eval"], "macro_f1"),
        ] + ([_before_after(run["eval"], "perplexity"), _before_after(run["eval"], "exact_match")]
             if _any_causal_lm(runs) else []))
    return out


def _any_causal_lm(runs: list[dict]) -> bool:
    return any("perplexity" in run["eval"]["after"] for run in runs)


def columns(runs: list[dict]) -> list[str]:
    """COLUMNS, and perplexity and exact match when a causal-lm run is compared."""
    extra = ["perplexity before -> after", "exact match before -> after"]
    return COLUMNS + (extra if _any_causal_lm(runs) else [])


def table(runs: list[dict]) -> Table:
    t = Table(title="runs side by side")
    for i, column in enumerate(columns(runs)):
        t.add_column(column, justify="left" if i < 2 else "right")
    for row in rows(runs):
        t.add_row(*row)
    return t


def markdown(runs: list[dict]) -> str:
    names = columns(runs)
    lines = ["| " + " | ".join(names) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(names) - 2)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(runs)]
    return "\n".join(lines)
