"""`runner eval` and `runner predict`: a finished run's model, used again.

    runner eval RUN_DIR                       the recipe's held-out set again
    runner eval RUN_DIR --data FILE [--split] every labelled row of other data
    runner predict RUN_DIR "text" ...         a label and class probabilities per text

Both rebuild the model from the base checkpoint and the run's latest
checkpoint (`runner.runs.open_run`). `eval` writes its result to
RUN_DIR/evals/<UTC timestamp>.json and never touches eval.json.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from jaxlora.data import Split, prepare, prepare_eval, tokenize_batch
from jaxlora.evaluate import build_eval_step, evaluate
from jaxlora.errors import UserError
from runner import report
from runner.pipeline import data_stats
from jaxlora.lora import without_adapters
from runner.runs import OpenedRun, base_dir, require_same_data


def eval_run(opened: OpenedRun, console: Console, *, data: str | None = None,
             split: str | None = None, batch_size: int | None = None) -> dict:
    """Evaluate the run's trained model; prints a table, writes evals/<stamp>.json."""
    recipe = opened.recipe
    where = base_dir(opened.manifest, opened.run_dir)
    if data is None:
        prepared = prepare(recipe.data, opened.tokenizer, task=recipe.model.task,
                           base_dir=where)
        # how the training examples were batched does not change the held-out set
        require_same_data(opened.run_dir, opened.manifest, data_stats(prepared.stats),
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
    task = recipe.model.task
    metrics = evaluate(build_eval_step(opened.graphdef, task), opened.trainable, opened.frozen,
                       examples, batch_size=batch_size or recipe.eval.batch_size,
                       label_names=list(recipe.data.labels or []), task=task)
    result = {"run": str(opened.run_dir), "checkpoint_step": opened.step, "data": read,
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "metrics": metrics}
    folder = opened.run_dir / "evals"
    try:
        folder.mkdir(exist_ok=True)
        path = _fresh_path(folder)
        report.write_json(path, result)
    except OSError as e:
        raise UserError(f"{folder}: cannot write the evaluation: {e.strerror}") from None
    table = Table(title=f"{recipe.name} at step {opened.step}: {metrics['examples']} examples "
                        f"of {read['source']} ({read['split']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, _, value, _ in report.comparison_rows(None, metrics):
        table.add_row(metric, value)
    console.print(table)
    if read.get("dropped"):
        console.print(f"rows with labels outside {list(recipe.data.labels)} were left out: "
                      + ", ".join(f"{k}: {v}" for k, v in read["dropped"].items()))
    console.print(f"written to {path}")
    return result


def _fresh_path(folder: Path) -> Path:
    """A new evaluation file's path; `runs.stamp_order` lists them in the order written."""
    for name in report.stamped_names(".json"):
        path = folder / name
        if not path.exists():
            return path
    raise RuntimeError(f"no free file name in {folder}")


def predict(opened: OpenedRun, texts: list[str], *, batch_size: int | None = None
            ) -> list[dict]:
    """For each text: the predicted label and every class's probability."""
    recipe = opened.recipe
    labels = list(recipe.data.labels)
    max_length = recipe.data.max_length
    encoded = tokenize_batch({"text": texts}, tokenizer=opened.tokenizer, column="text",
                              max_length=max_length, pad_id=opened.tokenizer.pad_token_id or 0)
    # No buckets: batches keep the texts' order, padded to one shape (one compilation).
    split = Split(input_ids=np.asarray(encoded["input_ids"], np.int32),
                  attention_mask=np.asarray(encoded["attention_mask"], np.int32),
                  labels=np.zeros(len(texts), np.int32))
    eval_step = build_eval_step(opened.graphdef)
    size = batch_size or min(recipe.eval.batch_size, max(len(texts), 1))
    logits = np.concatenate([
        np.asarray(eval_step(opened.trainable, opened.frozen, batch)[0])[batch["weights"] > 0]
        for batch in split.batches(size, shuffle=False)])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return [{"text": text, "label": labels[int(p.argmax())],
             "probabilities": {name: float(p[j]) for j, name in enumerate(labels)},
             "truncated": bool(cut)}
            for text, p, cut in zip(texts, probs, encoded["truncated"])]


def predictions_table(rows: list[dict], labels: list[str]) -> Table:
    table = Table()
    table.add_column("text", overflow="fold")
    table.add_column("label")
    for name in labels:
        table.add_column(f"p({name})", justify="right")
    for row in rows:
        table.add_row(row["text"], row["label"],
                      *(f"{row['probabilities'][name]:.3f}" for name in labels))
    return table


def generate_texts(target: Path, prompts: list[str], cfg, console: Console, *,
                   raw: bool = False) -> list[dict]:
    """`runner generate`: completions from a causal-LM run's fine-tuned model
    (RUN_DIR) or from a recipe's base model (RECIPE, before fine-tuning: as the
    "before" evaluation sees it, 4-bit for qlora).

    The recipe's `data.template` is applied to each prompt when the run was
    trained on prompt/response pairs (as in training), unless `raw`.
    """
    from jaxlora import sources
    from jaxlora.generate import generate, stop_ids
    from jaxlora.lora import adapt
    from runner.pipeline import load_pretrained, load_tokenizer
    from runner.recipe import load_recipe
    from runner.runs import is_run_dir, open_run

    if target.is_dir():
        if not is_run_dir(target):
            raise UserError(f"{target}: not a run folder (no manifest.json) and not a recipe")
        recipe = load_recipe(target / "recipe.toml")
    else:
        recipe = load_recipe(target)
    if recipe.model.task != "causal-lm":
        raise UserError(f"{target}: generate needs a causal-lm model; this recipe's task is "
                        f"{recipe.model.task} (use `runner predict`)")
    if target.is_dir():
        opened = open_run(target)
        tokenizer, model_dir, model = opened.tokenizer, opened.model_dir, opened.loaded.model
        graphdef, trainable, frozen = opened.graphdef, opened.trainable, opened.frozen
        where = f"{target} at step {opened.step}"
    else:
        model_dir = sources.resolve(recipe.model.source, "model", target.resolve().parent)
        loaded = load_pretrained(recipe, model_dir)
        model = loaded.model
        graphdef, trainable, frozen, _ = adapt(model, recipe.adapter, loaded.lora_targets,
                                               jax.random.key(0))
        trainable = without_adapters(trainable)
        tokenizer = load_tokenizer(model_dir)
        where = f"the base model {recipe.model.source} (not fine-tuned)"
    shown = [p if raw or not recipe.data.pairs else recipe.data.template.replace("{prompt}", p)
             for p in prompts]
    ids = [tokenizer(text)["input_ids"] for text in shown]
    if any(not row for row in ids):
        raise UserError("--prompt: a prompt gave no tokens")
    stops = stop_ids(tokenizer, model_dir)
    new = generate(graphdef, trainable, frozen, ids, cfg, eos_id=stops,
                   pad_id=tokenizer.pad_token_id or 0,
                   position_limit=getattr(model, "position_limit", None))
    console.print(f"[dim]{where}; {'greedy' if cfg.temperature == 0 else 'sampled'}, "
                  f"up to {cfg.max_new_tokens} new tokens[/]", highlight=False)
    return [{"prompt": p, "completion": tokenizer.decode(tokens, skip_special_tokens=True),
             "tokens": len(tokens), "stopped_at_eos": bool(tokens) and tokens[-1] in stops}
            for p, tokens in zip(prompts, new)]
