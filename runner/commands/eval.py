"""`runner eval RUN_DIR [--data SOURCE] [--split NAME]`: a finished run's model
evaluated again, on the recipe's held-out set or on every labelled row of
other data. The model is rebuilt from the base checkpoint and the run's
latest checkpoint (`runner.build.open_run`); the result is printed and
written to RUN_DIR/evals/<UTC timestamp>.json (eval.json is never touched).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jaxlora import runtime
from jaxlora.data import prepare, prepare_eval
from jaxlora.errors import UserError
from jaxlora.evaluate import build_eval_step, evaluate
from runner import libraries, run_folder
from runner import manifest as manifests
from runner.build import OpenedRun, open_run
from runner.report import comparison_rows
from runner.resume import require_same_data
from runner.terminal import note_unfinished


def main(args, console, stop) -> int:
    libraries.set_up()
    opened = open_run(args.run_dir)
    note_unfinished(opened)
    if args.batch_size is not None and not 0 < args.batch_size <= 65536:
        raise UserError(f"--batch-size: must be from 1 to 65536, as eval.batch_size "
                        f"(got {args.batch_size})")
    eval_run(opened, console, data=args.data, split=args.split, batch_size=args.batch_size)
    return 0


def eval_run(opened: OpenedRun, console: Console, *, data: str | None = None,
             split: str | None = None, batch_size: int | None = None) -> dict:
    """Evaluate the run's trained model; prints a table, writes evals/<stamp>.json."""
    recipe = opened.recipe
    if data is None:
        prepared = prepare(recipe.data, opened.tokenizer, task=recipe.model.task,
                           base_dir=manifests.source_folder(opened.manifest, opened.run_dir))
        # how the training examples were batched does not change the held-out set
        require_same_data(opened.run_dir, opened.manifest, manifests.data_record(prepared.stats),
                          "the held-out set would not be the run's; pass --data to evaluate "
                          "on other data", ignore=("packed_rows", "order"))
        examples = prepared.eval
        read = {"source": opened.manifest.get("data", {}).get("source", recipe.data.source),
                "split": "the recipe's eval split", "rows": len(examples)}
    elif recipe.model.task != "classification":
        raise UserError(f"--data: evaluating a {recipe.model.task} run on other data is not "
                        "supported yet; without --data it uses the recipe's eval split")
    else:
        examples, read = prepare_eval(recipe.data, opened.tokenizer, data, split=split,
                                      base_dir=Path.cwd())
    metrics = evaluate(build_eval_step(opened.graphdef, recipe.model.task), opened.trainable,
                       opened.frozen, examples, batch_size=batch_size or recipe.eval.batch_size,
                       label_names=list(recipe.data.labels or []))
    result = {"run": str(opened.run_dir), "checkpoint_step": opened.step, "data": read,
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "metrics": metrics}
    folder = opened.run_dir / "evals"
    try:
        folder.mkdir(exist_ok=True)
        path = run_folder.fresh_file(folder, ".json")
        if runtime.primary():  # one file, whatever the processes
            run_folder.write_json(path, result)
    except OSError as e:
        raise UserError(f"{folder}: cannot write the evaluation: {e.strerror}") from None
    table = Table(title=f"{recipe.name} at step {opened.step}: {metrics['examples']} examples "
                        f"of {read['source']} ({read['split']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, _, value, _ in comparison_rows(None, metrics):
        table.add_row(metric, value)
    console.print(table)
    if read.get("dropped"):
        console.print(f"rows with labels outside {list(recipe.data.labels)} were left out: "
                      + ", ".join(f"{k}: {v}" for k, v in read["dropped"].items()))
    console.print(f"written to {path}")
    return result
