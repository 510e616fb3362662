"""`runner predict RUN_DIR TEXT ...`: a label and every class's probability
per text, from a classification run's model (`-` reads texts from stdin)."""

from __future__ import annotations

import json

import numpy as np
from rich.table import Table

from jaxlora.data import Split, tokenize_batch
from jaxlora.errors import UserError
from jaxlora.evaluate import build_eval_step
from runner import libraries
from runner.build import OpenedRun, open_run
from runner.terminal import note_unfinished, read_texts


def main(args, console, stop) -> int:
    texts = read_texts(args.texts)
    libraries.set_up()
    opened = open_run(args.run_dir)
    if opened.recipe.model.task != "classification":
        raise UserError(f"{args.run_dir}: `runner predict` labels texts with a classification "
                        f"run; this one is {opened.recipe.model.task}: use `runner generate`")
    note_unfinished(opened)
    rows = predict(opened, texts)
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        console.print(predictions_table(rows, list(opened.recipe.data.labels)))
    return 0


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
