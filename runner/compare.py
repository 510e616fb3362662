"""`runner compare`: finished runs side by side, read from their folders only
(manifest.json and eval.json), so it also works on runs made elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from jaxlora.errors import UserError
from runner import report

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
        try:
            files[name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read it as JSON ({e})") from None
        if not isinstance(files[name], dict):
            raise UserError(f"{path}: expected a JSON object")
    manifest, evals = files["manifest.json"], files["eval.json"]
    if manifest.get("status") != "finished":
        raise UserError(f"{run_dir}: the run did not finish (status "
                        f"{manifest.get('status')!r})")
    report.check_after(run_dir, evals)
    report.check(run_dir / "manifest.json", manifest, MANIFEST_FIELDS)
    report.check(run_dir / "eval.json", evals, report.eval_fields(evals))
    return {"dir": run_dir, "manifest": manifest, "eval": evals}


# What the table reads of the manifest (runner.report.check): the figures may
# be missing or null (a run made by an older version), never of another kind.
_OPTIONAL_NUMBER = (("number", "null"), True)
MANIFEST_FIELDS = [(("recipe", "name"), ("string",)),
                   (("recipe", "adapter", "method"), ("string",))]
MANIFEST_FIELDS += [(("model", key), *_OPTIONAL_NUMBER)
                    for key in ("trainable_params", "frozen_bytes", "bits_per_quantized_param")]
MANIFEST_FIELDS += [(("train", key), *_OPTIONAL_NUMBER)
                    for key in ("peak_memory_mb", "median_step_ms", "train_seconds")]


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
