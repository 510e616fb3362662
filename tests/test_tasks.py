"""Classification loss and metrics."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.tasks import classification_loss, classification_metrics


def test_metrics_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1])
    preds = np.array([0, 0, 1, 0, 1, 0])
    m = classification_metrics(preds, labels, ["neg", "pos"])
    # neg: tp 3, predicted 4, actual 4 -> p .75 r .75 f1 .75 ; pos: tp 1, pred 2, act 2 -> .5
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["neg"]["f1"] == pytest.approx(0.75)
    assert m["per_class"]["pos"]["f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(0.625)
    assert m["confusion"] == [[3, 1], [1, 1]]
    assert m["examples"] == 6


def test_metrics_class_never_predicted():
    m = classification_metrics(np.zeros(4, int), np.array([0, 0, 1, 1]), ["a", "b"])
    assert m["per_class"]["b"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((2 * 0.5 * 1.0 / 1.5) / 2)


def test_macro_f1_leaves_out_a_class_neither_present_nor_predicted():
    """As scikit-learn's f1_score(average="macro"): "c" is absent from a small
    eval set and never predicted, so it cannot be measured; "b" is present
    and never predicted, so it counts as 0."""
    m = classification_metrics(np.zeros(4, int), np.array([0, 0, 1, 1]), ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((2 * 0.5 * 1.0 / 1.5) / 2)
    assert classification_metrics(np.zeros(0, int), np.zeros(0, int), ["a", "b"])["macro_f1"] == 0.0


def test_loss_ignores_padding_rows():
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    batch = {"labels": jnp.array([0, 1, 1]), "weights": jnp.array([1.0, 1.0, 0.0])}
    loss, count = classification_loss(logits, batch)
    expected = float(np.log1p(np.exp(-2.0)))  # both real rows: -log softmax = log(1+e^-2)
    assert float(count) == 2.0
    assert float(loss) == pytest.approx(expected, rel=1e-6)
