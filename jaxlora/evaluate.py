"""Evaluation: one jit'd eval step, used before and after fine-tuning alike.

The "before" figure is the base model with the fresh task head and adapters
disabled (`jaxlora.lora.without_adapters`), the "after" figure the trained
weights; both go through the same compiled function, so any difference comes
from the weights alone. Eval batches are fixed-shape; the last one is padded
and its padding rows carry weight 0, so every example counts exactly once.
"""

from __future__ import annotations

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
    # causal-lm prompt/response data: greedy-complete this many eval prompts and
    # count exact matches with the reference responses (0: skip)
    exact_match_examples: int = Field(32, ge=0, le=100000)


def build_eval_step(graphdef: nnx.GraphDef, task: str = "classification", placement=None):
    """jit'd (trainable, frozen, batch) -> per-example outputs, no dropout:
    classification (logits, loss, labels, weights); causal-lm (summed
    target-token loss, target tokens, labels, weights). With a `placement`
    (jaxlora.runtime) the outputs come back replicated, so every process reads
    every row's, those another process fed included; give it to `evaluate` too."""

    def step(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = model(batch["input_ids"], batch["attention_mask"]).astype("float32")
        if task == "causal-lm":
            nll, counts = causal_lm_token_losses(logits, batch)
            return (nll * counts).sum(-1), counts.sum(-1), batch["labels"], batch["weights"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return logits, loss, batch["labels"], batch["weights"]

    if placement is None:
        return jit(step)
    return jit(placement.gathering(step), out_shardings=placement.replicated())


def evaluate(eval_step, trainable, frozen, split, *, batch_size: int, label_names: list[str],
             progress=None, description: str = "eval", task: str = "classification",
             keep_bar: bool = True, placement=None) -> dict:
    """Classification: accuracy, macro-F1, per-class scores and mean loss.
    Causal-lm: token-weighted loss and perplexity over the target tokens."""
    bar = (progress.add_task(description, total=split.num_batches(batch_size))
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
        if bar is not None:
            progress.advance(bar)

    pending = None
    for batch in split.batches(batch_size, shuffle=False):
        device_batch = batch if placement is None else placement.put_batch(batch)
        dispatched = eval_step(trainable, frozen, device_batch)
        if pending is not None:
            collect(pending)
        pending = dispatched
    if pending is not None:
        collect(pending)
    if bar is not None and not keep_bar:
        progress.remove_task(bar)
    if task == "causal-lm":
        tokens = float(np.concatenate(labels).sum())
        loss = float(np.concatenate(losses).sum()) / max(tokens, 1.0)
        return {"examples": int(sum(len(x) for x in losses)), "tokens": int(tokens),
                "loss": loss, "perplexity": float(np.exp(min(loss, 700.0)))}
    metrics = classification_metrics(np.concatenate(predictions), np.concatenate(labels),
                                     label_names)
    metrics["loss"] = float(np.concatenate(losses).mean())
    return metrics


def exact_match(graphdef: nnx.GraphDef, trainable, frozen, split, *, examples: int,
                eos_id: int | None, pad_id: int = 0, batch_size: int = 32,
                position_limit: int | None = None, placement=None) -> dict:
    """Share of the first `examples` eval prompts whose greedy completion equals
    the reference response token for token (through EOS; a reference cut by
    max_length is compared over its length). Prompts go `batch_size` at a time;
    with a `placement` (weights on a mesh, maybe over several processes) every
    process decodes the same prompts together (see `generate`)."""
    from jaxlora.generate import GenerateConfig, generate

    prompts, references = [], []
    for row in range(min(examples, len(split))):
        real = split.attention_mask[row] > 0
        ids, targets = split.input_ids[row][real], split.loss_mask[row][real]
        first = int(np.argmax(targets > 0))
        prompts.append(ids[:first].tolist())
        references.append(ids[first:].tolist())
    if not prompts:
        return {"exact_match": None, "exact_match_examples": 0}
    cfg = GenerateConfig(max_new_tokens=max(len(r) for r in references))
    completions = []
    for begin in range(0, len(prompts), batch_size):
        completions += generate(graphdef, trainable, frozen, prompts[begin:begin + batch_size],
                                cfg, eos_id=eos_id, pad_id=pad_id,
                                position_limit=position_limit, placement=placement)
    hits = sum(c[:len(r)] == r and (len(c) == len(r) or r[-1] != eos_id)
               for c, r in zip(completions, references))
    return {"exact_match": hits / len(prompts), "exact_match_examples": len(prompts)}
