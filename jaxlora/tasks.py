"""What a task computes from a model's output: the training loss (inside the
jit'd step) and the evaluation metrics (on the host, from gathered predictions).

Batches are fixed-shape; padding examples carry weight 0 and count nowhere, so
each real example counts exactly once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def classification_loss(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over the real examples; returns (loss, number of examples)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["labels"])
    weights = batch["weights"]
    count = weights.sum()
    return (ce * weights).sum() / jnp.maximum(count, 1.0), count


def classification_step_loss(model, batch: dict,
                             rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The train step's objective for a classifier: forward (dropout when `rng`
    is given) and `classification_loss`."""
    logits = model(batch["input_ids"], batch["attention_mask"], rng=rng)
    return classification_loss(logits, batch)


def causal_lm_token_losses(logits: jax.Array, batch: dict,
                           shifted: bool = False) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy at every position and where it counts: position
    t predicts token t + 1, which must be real, a target (`loss_mask`) and in a
    real example. Both (batch, seq - 1). `shifted`: `logits` already covers
    positions 0 .. seq - 2 only (the train step computes no logits for the last
    position, which predicts nothing: a (batch, vocab) slice less to compute,
    copy and differentiate)."""
    targets = batch["input_ids"][:, 1:]
    if not shifted:
        logits = logits[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    counts = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).astype(jnp.float32)
    if "segment_ids" in batch:  # packed: the first token of an example is not a target
        segments = batch["segment_ids"]
        counts = counts * (segments[:, 1:] == segments[:, :-1])
    return nll, counts * batch["weights"][:, None]


def causal_lm_loss(logits: jax.Array, batch: dict,
                   shifted: bool = False) -> tuple[jax.Array, jax.Array]:
    """Token-weighted mean next-token loss; returns (loss, number of target tokens)."""
    nll, counts = causal_lm_token_losses(logits, batch, shifted)
    total = counts.sum()
    return (nll * counts).sum() / jnp.maximum(total, 1.0), total


def causal_lm_step_loss(model, batch: dict,
                        rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The train step's objective for a causal LM (packed batches carry
    segment ids and positions)."""
    packed = {k: batch[k] for k in ("segment_ids", "positions") if k in batch}
    hidden = model.hidden(batch["input_ids"], batch["attention_mask"], rng=rng, **packed)
    return causal_lm_loss(model.logits(hidden[:, :-1]), batch, shifted=True)


STEP_LOSSES = {"classification": classification_step_loss, "causal-lm": causal_lm_step_loss}


def classification_metrics(predictions: np.ndarray, labels: np.ndarray,
                           label_names: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1 from class ids.

    Macro-F1 averages the per-class F1 with equal weight, so on imbalanced data
    (70% negative tweets) it is the honest figure. It averages over the classes
    present in the labels or the predictions, as scikit-learn's `f1_score`
    (average="macro", zero_division=0) does: a class present but never
    predicted counts as F1 = 0; a class neither present nor predicted (a small
    eval set) cannot be measured and is left out, its per-class figures 0.
    A prediction of -1 (a text answer that named no label, `jaxlora.answers`)
    is wrong for its example and no class's prediction; the confusion matrix
    then has a last column for them.
    """
    n = len(label_names)
    unnamed = bool((predictions < 0).any())  # judged text answers that named no label
    confusion = np.zeros((n, n + 1 if unnamed else n), np.int64)
    np.add.at(confusion, (labels, np.where(predictions < 0, n, predictions)), 1)
    tp = np.diag(confusion[:, :n]).astype(np.float64)
    predicted = confusion[:, :n].sum(0)
    actual = confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(n), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n), where=denom > 0)
    seen = (predicted + actual) > 0
    return {
        "examples": int(confusion.sum()),
        "accuracy": float(tp.sum() / max(confusion.sum(), 1)),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(actual[i])}
                      for i, name in enumerate(label_names)},
        "confusion": confusion.tolist(),
    }


def majority_baseline(train_counts: dict[str, int], eval_counts: dict[str, int],
                      label_names: list[str]) -> dict | None:
    """What always answering the most frequent label of the training rows
    scores on the eval rows (`*_counts`: rows per label name; a tie goes to
    the label listed first): the figure a classifier must beat before its
    accuracy means anything (on 70% negative tweets, 0.70). Accuracy,
    macro-F1 and per-class F1 as `classification_metrics` computes them, and
    the label; None without training or eval rows."""
    names = list(label_names)
    train = np.array([train_counts.get(name, 0) for name in names], np.int64)
    eval_ = np.array([eval_counts.get(name, 0) for name in names], np.int64)
    if not names or train.sum() == 0 or eval_.sum() == 0:
        return None
    majority = int(np.argmax(train))
    actual = np.repeat(np.arange(len(names)), eval_)
    scores = classification_metrics(np.full(len(actual), majority), actual, names)
    return {"label": names[majority], "accuracy": scores["accuracy"],
            "macro_f1": scores["macro_f1"],
            "per_class": {name: {"f1": s["f1"]} for name, s in scores["per_class"].items()}}
