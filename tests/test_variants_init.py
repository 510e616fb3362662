"""LoRA variants of initialisation and optimisation (issue 26): LoRA+
(`train.lr_ratio_b`) and PiSSA (`adapter.init = "pissa"`), against their
definitions and PEFT's own code, through training, resuming and export."""

import jax
import numpy as np
import optax
import pytest

from jaxlora.lora import LoraConfig, adapt
from jaxlora.models import bert, load_model
from jaxlora.optim import is_lora_b, make_optimizer
from jaxlora.tasks import classification_step_loss
from jaxlora.train import TrainConfig, build_train_step
from test_cli import TINY_RECIPE, _tweets_csv
from test_cli import runner_here as _runner
from test_train import _toy_split


def _bytes(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _adam_moments(opt_state) -> dict[str, list[bytes]]:
    """Adam's first and second moments of every trainable leaf, in the
    trainable tree's order, however the optimizer partitions them: a
    partitioned state holds each leaf's moment in one group, and a masked
    placeholder (`optax.MaskedNode`, no leaves) in the other."""
    moments = {}
    for name in ("mu", "nu"):
        groups = [jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
                  for _, tree in optax.tree_utils.tree_get_all_with_path(opt_state, name)]
        moments[name] = [next(np.asarray(x).tobytes() for x in found
                              if not isinstance(x, optax.MaskedNode)) for found in zip(*groups)]
    return moments


# -- LoRA+ -----------------------------------------------------------------------


def _lora_plus_steps(folder, ratio, steps: int):
    """`steps` steps of the tiny BERT classifier (LoRA on query/value) with
    lr_ratio_b = `ratio`: the state before and after."""
    model = load_model(folder, task="classification", num_labels=2, attention="xla",
                       seed=0).model
    graphdef, trainable, frozen, _ = adapt(
        model, LoraConfig(rank=4, targets=["query", "value"]), bert.LORA_TARGETS,
        jax.random.key(1))
    cfg = TrainConfig(learning_rate=1e-3, schedule="constant", warmup_ratio=0.0,
                      weight_decay=0.0, lr_ratio_b=ratio)
    tx = make_optimizer(cfg, 10)
    step = build_train_step(graphdef, tx, classification_step_loss)
    start = jax.tree.map(np.array, trainable)
    opt_state = tx.init(trainable)
    for i, batch in enumerate(_toy_split(n=8 * steps).batches(8, shuffle=True, seed=0, epoch=0)):
        trainable, opt_state, _ = step(trainable, frozen, opt_state, batch, jax.random.key(i))
    return start, trainable, opt_state


def test_lora_plus_with_ratio_one_is_plain_lora_bit_for_bit(tiny_bert_dir):
    """The partition itself changes nothing: with ratio 1 three steps give the
    same weights and the same Adam moments, bit for bit; unset, the optimizer
    state has no partition at all (today's step)."""
    _, plain, plain_state = _lora_plus_steps(tiny_bert_dir, None, 3)
    _, ones, ones_state = _lora_plus_steps(tiny_bert_dir, 1.0, 3)
    assert _bytes(plain) == _bytes(ones)
    assert _adam_moments(plain_state) == _adam_moments(ones_state)
    assert len(_adam_moments(plain_state)["mu"]) == len(jax.tree.leaves(plain))
    assert "PartitionState" not in str(jax.tree.structure(plain_state))
    assert "PartitionState" in str(jax.tree.structure(ones_state))


def test_lora_plus_moves_b_sixteen_times_as_far_on_the_first_step(tiny_bert_dir):
    """On the first step Adam's update is lr * g / (|g| + eps), linear in lr.
    B starts at zero but its gradient does not (it is (x A)^T dL/dy, A being
    random); A's gradient is zero there (x^T dL/dy B^T with B = 0), and the
    head's is not. So with ratio 16 B moves exactly 16 times as far (16 is a
    power of two: the products are exact) and everything else as far as with
    ratio 1."""
    start, one, _ = _lora_plus_steps(tiny_bert_dir, 1.0, 1)
    _, sixteen, _ = _lora_plus_steps(tiny_bert_dir, 16.0, 1)
    flat = jax.tree_util.tree_flatten_with_path
    b_moves = 0
    for (path, before), ratio1, ratio16 in zip(flat(start)[0], jax.tree.leaves(one),
                                                jax.tree.leaves(sixteen)):
        step1, step16 = np.asarray(ratio1) - before, np.asarray(ratio16) - before
        if is_lora_b(path):
            assert np.abs(step1).min() > 0  # every B entry had a gradient
            np.testing.assert_allclose(step16, 16 * step1, rtol=1e-6, atol=0)
            b_moves += 1
        else:
            np.testing.assert_array_equal(step16, step1)
    assert b_moves == 2 * 2  # query and value in both blocks


def test_lora_plus_is_refused_with_full_fine_tuning(tmp_path, tiny_bert_dir):
    (tmp_path / "full.toml").write_text(TINY_RECIPE.replace(
        'method = "lora"\nrank = 4\ntargets = ["query", "value"]\n', 'method = "full"\n'))
    done = _runner("run", "full.toml", "--set", "train.lr_ratio_b=16", cwd=tmp_path)
    assert done.returncode == 2
    assert "train.lr_ratio_b" in done.stderr and 'method "full"' in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()
