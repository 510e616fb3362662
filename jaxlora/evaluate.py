"""Evaluation: one jit'd eval step, used before and after fine-tuning alike.

The "before" figure is the base model with the fresh task head and the
adapters as they start (B zero, or PiSSA's factors over their residuals: see
`jaxlora.lora`), the "after" figure the trained
weights; both go through the same compiled function, so any difference comes
from the weights alone. Eval batches are fixed-shape; the last one is padded
and its padding rows carry weight 0, so every example counts exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import optax
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field

from jaxlora.runtime import jit, to_host
from jaxlora.tasks import causal_lm_token_losses, classification_metrics


class EvalConfig(BaseModel):
    """The recipe's [eval] table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    before: bool = True  # also evaluate the base model before fine-tuning
    # also evaluate every this many training steps (0: before and after only); each
    # adds a point to the eval-loss curve (metrics.jsonl, loss.png, TensorBoard)
    every_steps: int = Field(0, ge=0, le=10_000_000)
    batch_size: int = Field(64, gt=0, le=65536)  # examples per eval step
    # causal-lm prompt/response pairs or conversations: greedy-answer this many eval
    # prompts and judge the answers against the references: exact match, and with
    # data.labels accuracy and F1 of the labels they name (0: skip)
    exact_match_examples: int = Field(32, ge=0, le=100000)


# Tokens a greedy answer may run past the longest reference answer.
ANSWER_SLACK = 16


class EvalStep:
    """The jit'd eval step of one model graph for one task, and the mesh it
    runs on (see `build_eval_step`)."""

    def __init__(self, fn, task: str, placement=None):
        self.fn, self.task, self.placement = fn, task, placement

    def __call__(self, trainable, frozen, batch):
        return self.fn(trainable, frozen, batch)

    def lower(self, *args):
        return self.fn.lower(*args)


def build_eval_step(graphdef: nnx.GraphDef, task: str = "classification",
                    placement=None) -> EvalStep:
    """jit'd (trainable, frozen, batch) -> per-example outputs, no dropout:
    classification (logits, loss, labels, weights); causal-lm (summed
    target-token loss, target tokens, labels, weights). With a `placement`
    (jaxlora.runtime) the outputs come back replicated, so every process reads
    every row's, those another process fed included."""

    def step(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = model(batch["input_ids"], batch["attention_mask"]).astype("float32")
        if task == "causal-lm":
            nll, counts = causal_lm_token_losses(logits, batch)
            return (nll * counts).sum(-1), counts.sum(-1), batch["labels"], batch["weights"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return logits, loss, batch["labels"], batch["weights"]

    if placement is None:
        return EvalStep(jit(step), task)
    return EvalStep(jit(placement.gathering(step), out_shardings=placement.replicated()), task,
                    placement)


@dataclass(frozen=True)
class Bar:
    """The progress bar of one evaluation: a rich Progress, the bar's
    description, and whether the bar stays once done."""

    progress: Any
    description: str = "eval"
    keep: bool = True


def evaluate(eval_step: EvalStep, trainable, frozen, split, *, batch_size: int,
             label_names: list[str] = (), bar: Bar | None = None) -> dict:
    """Classification: accuracy, macro-F1, per-class scores and mean loss.
    Causal-lm: token-weighted loss and perplexity over the target tokens."""
    task, placement = eval_step.task, eval_step.placement
    progress = bar.progress if bar is not None else None
    task_bar = (progress.add_task(bar.description, total=split.num_batches(batch_size))
                if progress is not None else None)
    predictions, labels, losses = [], [], []

    def collect(pending):
        # Read back one batch while the next is already queued on the device.
        # Labels and weights come from the device: a process holds only its rows.
        first, second, classes, weights = to_host(pending)
        real = weights > 0
        if task == "causal-lm":  # (summed loss, tokens) per example
            losses.append(first[real])
            labels.append(second[real])
        else:  # (logits, loss)
            predictions.append(np.argmax(first, -1)[real])
            labels.append(classes[real])
            losses.append(second[real])
        if task_bar is not None:
            progress.advance(task_bar)

    pending = None
    for batch in split.batches(batch_size, shuffle=False):
        device_batch = batch if placement is None else placement.put_batch(batch)
        dispatched = eval_step(trainable, frozen, device_batch)
        if pending is not None:
            collect(pending)
        pending = dispatched
    if pending is not None:
        collect(pending)
    if task_bar is not None and not bar.keep:
        progress.remove_task(task_bar)
    if task == "causal-lm":
        tokens = float(np.concatenate(labels).sum())
        loss = float(np.concatenate(losses).sum()) / max(tokens, 1.0)
        return {"examples": int(sum(len(x) for x in losses)), "tokens": int(tokens),
                "loss": loss, "perplexity": float(np.exp(min(loss, 700.0)))}
    metrics = classification_metrics(np.concatenate(predictions), np.concatenate(labels),
                                     list(label_names))
    metrics["loss"] = float(np.concatenate(losses).mean())
    return metrics


def greedy_answers(graphdef: nnx.GraphDef, trainable, frozen, split, *,
                   stops: list[int], pad_id: int = 0, batch_size: int = 32,
                   placement=None) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy completions of the prompts of `split` (the first eval examples,
    held whole by every process), and the reference answers: an example's
    last run of target tokens is its answer (a conversation's last assistant
    turn), the tokens before it its prompt (a text whose targets start at once
    has no prompt and is left out). Each
    completion runs to a stop id (`stops`), or `ANSWER_SLACK` tokens past the
    longest reference (an answer may say more than the reference: "This tweet
    is negative." against "negative").
    Prompts go `batch_size` at a time; with a `placement` (weights on a mesh,
    maybe over several processes) every process decodes the same prompts
    together (see `generate`)."""
    from jaxlora.generate import GenerateConfig, generate

    prompts, references = [], []
    for row in range(len(split)):
        real = split.attention_mask[row] > 0
        ids, targets = split.input_ids[row][real], split.loss_mask[row][real] > 0
        starts = np.flatnonzero(targets & ~np.concatenate([[False], targets[:-1]]))
        if not len(starts) or starts[-1] == 0:
            continue
        end = starts[-1] + int(np.argmin(np.append(targets[starts[-1]:], False)))
        prompts.append(ids[:starts[-1]].tolist())
        references.append(ids[starts[-1]:end].tolist())
    if not prompts:
        return [], []
    wanted = max(len(r) for r in references) + ANSWER_SLACK
    limit = getattr(nnx.merge(graphdef, trainable, frozen), "position_limit", None)
    completions = []
    for begin in range(0, len(prompts), batch_size):
        batch = prompts[begin:begin + batch_size]
        room = wanted if limit is None else min(wanted, limit - max(map(len, batch)))
        completions += generate(graphdef, trainable, frozen, batch,
                                GenerateConfig(max_new_tokens=max(room, 1)), eos_id=stops,
                                pad_id=pad_id, placement=placement)
    return completions, references
