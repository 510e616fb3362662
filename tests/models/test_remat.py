"""train.remat: recomputing a layer in the backward pass changes what is kept
in memory, never the numbers. Gradients of LoRA adapters (with dropout) under
each policy equal the ones without remat, for an encoder and a decoder, the
compiled step really holds a checkpoint per layer, and each policy keeps what
it says for the backward pass (full < dots-saveable < none), in every model."""

import contextlib
import io

import jax
import jax.ad_checkpoint
import numpy as np
import pytest
from flax import nnx

from jaxlora.lora import LoraConfig, adapt
from jaxlora.models import load_model
from jaxlora.models.layers import set_remat
from jaxlora.tasks import STEP_LOSSES

from tiny_models import tiny_decoder_dir


def _loss(model_dir, task, policy, batch):
    loaded = load_model(model_dir, task=task, num_labels=2 if task == "classification" else None,
                        attention="xla", seed=0)
    set_remat(loaded.model, policy)
    graphdef, trainable, frozen, _ = adapt(
        loaded.model, LoraConfig(rank=4, targets="all-linear", dropout=0.1),
        loaded.lora_targets, jax.random.key(1))

    def loss(params):
        return STEP_LOSSES[task](nnx.merge(graphdef, params, frozen), batch,
                                 jax.random.key(7))[0]

    return loss, trainable


def _gradients(model_dir, task, policy, batch):
    loss, trainable = _loss(model_dir, task, policy, batch)
    return jax.jit(jax.grad(loss))(trainable), str(jax.make_jaxpr(jax.grad(loss))(trainable))


def _batch(task):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 200, (4, 12)).astype(np.int32)
    mask = np.ones((4, 12), np.int32)
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "weights": np.ones(4, np.float32)}
    if task == "classification":
        batch["labels"] = np.array([0, 1, 1, 0], np.int32)
    else:
        batch["loss_mask"] = mask
    return batch


ITEM_BYTES = {"f64": 8, "i64": 8, "u64": 8, "f32": 4, "i32": 4, "u32": 4, "bf16": 2,
              "f16": 2, "i16": 2, "u16": 2, "i8": 1, "u8": 1, "bool": 1}


def _residual_bytes(loss, trainable) -> int:
    """Bytes of the arrays the backward pass keeps (JAX's own listing)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(loss, trainable)
    total = 0
    for line in out.getvalue().splitlines():
        dtype, _, rest = line.partition("[")
        dims = [int(d) for d in rest.split("]")[0].split(",") if d.strip()]
        total += int(np.prod(dims)) * ITEM_BYTES.get(dtype.strip(), 8)  # a key: 8
    return total


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama-gqa-rope3"])
def test_each_policy_keeps_less_than_the_one_before(name, tmp_path, tiny_bert_dir):
    task = "classification" if name == "bert" else "causal-lm"
    model_dir = tiny_bert_dir if name == "bert" else tiny_decoder_dir(tmp_path, name)
    kept = {policy: _residual_bytes(*_loss(model_dir, task, policy, _batch(task)))
            for policy in ("none", "dots-saveable", "full")}
    # a policy wired to the wrong rule (or to none) would tie with its neighbour
    assert kept["full"] < kept["dots-saveable"] < kept["none"], kept


@pytest.mark.parametrize("name", ["bert", "llama-gqa-rope3"])
def test_remat_policies_give_the_same_gradients(name, tmp_path, tiny_bert_dir):
    task = "classification" if name == "bert" else "causal-lm"
    model_dir = tiny_bert_dir if name == "bert" else tiny_decoder_dir(tmp_path, name)
    batch = _batch(task)
    reference, plain = _gradients(model_dir, task, "none", batch)
    assert "checkpoint" not in plain and "remat" not in plain
    # the policies share one code path (layers.stack_layers); each model wires it
    # in its own layer loop: the encoder checks one policy, the decoder both
    for policy in ("full",) if name == "bert" else ("full", "dots-saveable"):
        grads, jaxpr = _gradients(model_dir, task, policy, batch)
        assert jaxpr.count("checkpoint") + jaxpr.count("remat") >= 2, policy  # one per layer
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
