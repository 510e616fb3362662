"""`runner eval RUN_DIR [--data SOURCE] [--split NAME]`: a finished run's model
evaluated again, on the recipe's held-out set or on every row of other data
(labelled rows for a classifier). The model is rebuilt from the base
checkpoint and the run's latest checkpoint (`runner.build.open_run`); the
result is printed and written to RUN_DIR/evals/<UTC timestamp>.json
(eval.json is never touched).

A classifier's result has the majority-class baseline beside it (the most
frequent label of the run's training rows, scored on these rows); a causal
LM's has the exact match of greedy answers (and the labels they name, where
the recipe has labels) for prompt/response pairs and conversations.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jaxlora import runtime
from jaxlora.data import prepare, prepare_eval
from jaxlora.data.files import detect_format, load, quiet_datasets
from jaxlora.errors import UserError
from jaxlora.evaluate import build_eval_step, evaluate
from jaxlora.sources import resolve
from jaxlora.tasks import majority_baseline
from runner import libraries, run_folder
from runner import manifest as manifests
from runner.build import OpenedRun, open_run
from runner.report import comparison_rows
from runner.resume import require_same_data
from runner.session import answers_judged, judged_answers
from runner.terminal import note_unfinished, print_path


def main(args, console, stop) -> int:
    libraries.set_up()
    opened = open_run(args.run_dir)
    note_unfinished(opened)
    if args.batch_size is not None and not 0 < args.batch_size <= 65536:
        raise UserError(f"--batch-size: must be from 1 to 65536, as eval.batch_size "
                        f"(got {args.batch_size})")
    eval_run(opened, console, data=args.data, split=args.split, batch_size=args.batch_size)
    return 0


def _held_out(opened: OpenedRun, prompts: int):
    """The recipe's held-out set, checked to be the run's: (eval Split, the
    prompts to answer, what was read)."""
    recipe = opened.recipe
    prepared = prepare(recipe.data, opened.tokenizer, task=recipe.model.task,
                       base_dir=manifests.source_folder(opened.manifest, opened.run_dir),
                       prompts=prompts)
    # how the training examples were batched does not change the held-out set
    require_same_data(opened.run_dir, opened.manifest, manifests.data_record(prepared.stats),
                      "the held-out set would not be the run's; pass --data to evaluate "
                      "on other data", ignore=("packed_rows", "order"))
    counts = opened.manifest.get("data", {}).get("label_counts", {})
    read = {"source": opened.manifest.get("data", {}).get("source", recipe.data.source),
            "split": "the recipe's eval split", "rows": len(prepared.eval),
            "label_counts": counts.get("eval", {})}
    return prepared.eval, prepared.prompts, read


def _other_text_data(opened: OpenedRun, source: str, split: str | None, prompts: int):
    """A causal LM's eval on every row of one split of other data, read as the
    recipe reads its own (columns, template or chat, labels, max_length)."""
    cfg = opened.recipe.data
    path = resolve(source, "dataset", Path.cwd())
    with quiet_datasets():
        names = list(load(path, detect_format(path, "auto"), cfg.encoding, None))
    name = split or ("test" if "test" in names else "train")
    if name not in names:
        raise UserError(f"{path}: no split {name!r}; splits: {', '.join(names)}")
    # the split is both "train" (one row, unused) and "eval": every row of it
    other = cfg.model_copy(update={
        "source": source, "format": "auto", "train_split": name, "eval_split": name,
        "eval_size": None, "max_train_examples": 1, "max_eval_examples": None,
        "packing": False})
    prepared = prepare(other, opened.tokenizer, task="causal-lm", base_dir=Path.cwd(),
                       prompts=prompts)
    read = {"source": str(path), "split": name, "rows": len(prepared.eval),
            "dropped": prepared.stats.dropped,
            "label_counts": prepared.stats.label_counts.get("eval", {})}
    return prepared.eval, prepared.prompts, read


def eval_run(opened: OpenedRun, console: Console, *, data: str | None = None,
             split: str | None = None, batch_size: int | None = None) -> dict:
    """Evaluate the run's trained model; prints a table, writes evals/<stamp>.json."""
    recipe = opened.recipe
    prompts = recipe.eval.exact_match_examples if answers_judged(recipe) else 0
    if data is None:
        examples, heads, read = _held_out(opened, prompts)
    elif recipe.model.task == "causal-lm":
        examples, heads, read = _other_text_data(opened, data, split, prompts)
    else:
        examples, read = prepare_eval(recipe.data, opened.tokenizer, data, split=split,
                                      base_dir=Path.cwd())
        heads = None
    metrics = evaluate(build_eval_step(opened.graphdef, recipe.model.task), opened.trainable,
                       opened.frozen, examples, batch_size=batch_size or recipe.eval.batch_size,
                       label_names=list(recipe.data.labels or []))
    if prompts:
        metrics.update(judged_answers(recipe, opened.graphdef, (opened.trainable, opened.frozen),
                                      heads, opened.tokenizer, opened.model_dir))
    result = {"run": str(opened.run_dir), "checkpoint_step": opened.step, "data": read,
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "metrics": metrics,
              "baseline": _baseline(opened, read)}
    path = _write(opened.run_dir / "evals", result)
    show(result, recipe, console)
    print_path(console, "written to", path)
    return result


def _baseline(opened: OpenedRun, read: dict) -> dict | None:
    """The majority class of the run's training rows, scored on these rows."""
    data = opened.manifest.get("data", {})
    if opened.recipe.model.task != "classification" or not data.get("label_counts"):
        return None
    return majority_baseline(data["label_counts"].get("train", {}),
                             read.get("label_counts") or {}, data.get("label_names", []))


def _write(folder: Path, result: dict) -> Path:
    try:
        folder.mkdir(exist_ok=True)
        path = run_folder.fresh_file(folder, ".json")
        if runtime.primary():  # one file, whatever the processes
            run_folder.write_json(path, result)
    except OSError as e:
        raise UserError(f"{folder}: cannot write the evaluation: {e.strerror}") from None
    return path


def show(result: dict, recipe, console: Console) -> None:
    """The result as a table (with the baseline column where there is one),
    the data it came from on a line of its own (a path is never cut), and the
    rows left out."""
    metrics, read, baseline = result["metrics"], result["data"], result.get("baseline")
    table = Table(title=f"{recipe.name} at step {result['checkpoint_step']}: "
                        f"{metrics['examples']} examples")
    table.add_column("metric")
    if baseline:
        table.add_column("majority", justify="right")
    table.add_column("value", justify="right")
    for metric, base, _, value, _ in comparison_rows(None, metrics, baseline):
        table.add_row(metric, *([base] if baseline else []), value)
    console.print(table)
    if baseline:
        console.print(f"majority: always answering {baseline['label']!r}, the most frequent "
                      "label of the training rows", highlight=False)
    print_path(console, f"data ({read['split']}):", read["source"])
    if read.get("dropped"):
        console.print(f"rows with labels outside {list(recipe.data.labels)} were left out: "
                      + ", ".join(f"{k}: {v}" for k, v in read["dropped"].items()))
