"""The train step and loop: one compilation per shape, the schedule, and a loss
that goes down on a learnable toy task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlora.data import Split
from jaxlora.lora import LoraConfig, adapt
from jaxlora.models import bert, load_model
from jaxlora.tasks import classification_step_loss
from jaxlora.optim import learning_rate_schedule
from jaxlora.train import Hook, Hooks, TrainConfig, build_train_step, fit


def _adapted(folder):
    model = load_model(folder, task="classification", num_labels=2, attention="xla", seed=0).model
    return adapt(model, LoraConfig(rank=4, targets=["query", "value"]), bert.LORA_TARGETS,
                 jax.random.key(1))[:3]


def _toy_split(n=64, t=12, seed=0) -> Split:
    """Rows of label 1 are made of tokens 2000-2009, rows of label 0 of 3000-3009:
    learnable from the tokens by any encoder."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int32)
    ids = (np.where(labels[:, None] == 1, 2000, 3000)
           + rng.integers(0, 10, (n, t))).astype(np.int32)
    ids[:, 0] = 101  # [CLS]
    return Split(input_ids=ids, attention_mask=np.ones((n, t), np.int32), labels=labels)


def test_five_steps_compile_once(tiny_bert_dir):
    graphdef, trainable, frozen = _adapted(tiny_bert_dir)
    traces = []

    def loss(model, batch, rng):
        traces.append(1)  # runs only while jax traces the step
        return classification_step_loss(model, batch, rng)

    tx = optax.adamw(1e-3)
    step = build_train_step(graphdef, tx, loss)
    opt_state = tx.init(trainable)
    start = jax.tree.map(jnp.copy, (trainable, opt_state))
    split = _toy_split(n=40)
    batches = list(split.batches(8, shuffle=True, seed=0, epoch=0))
    assert len(batches) == 5
    for i, batch in enumerate(batches):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch,
                                             jax.random.key(i))
    jax.block_until_ready(metrics)
    assert len(traces) == 1
    assert step.jitted._cache_size() == 1

    # The same step over lists of leaves (what `fit` runs): same numbers, and
    # the states it rebuilds have the structure of the ones it was made from.
    leaf_step = step.on_leaves(*start[:1], frozen, start[1])
    t, f, o = (leaf_step.leaves(x) for x in (start[0], frozen, start[1]))
    for i, batch in enumerate(batches):
        t, o, leaf_metrics = leaf_step(t, f, o, batch, jax.random.key(i))
    assert len(traces) == 2 and leaf_step.jitted._cache_size() == 1
    assert float(leaf_metrics["loss"]) == float(metrics["loss"])
    assert jax.tree.structure(leaf_step.trainable(t)) == jax.tree.structure(trainable)
    assert jax.tree.structure(leaf_step.opt_state(o)) == jax.tree.structure(opt_state)
    for ours, theirs in zip(t + o, jax.tree.leaves((trainable, opt_state))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_schedule_warmup_then_linear_decay():
    cfg = TrainConfig(learning_rate=1e-3, warmup_ratio=0.1, schedule="linear")
    lr = learning_rate_schedule(cfg, 100)
    assert float(lr(0)) == 0.0
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(55)) == pytest.approx(0.5e-3)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-12)
    cosine = learning_rate_schedule(cfg.model_copy(update={"schedule": "cosine"}), 100)
    assert float(cosine(55)) == pytest.approx(0.5e-3, rel=1e-3)


def test_fit_lowers_the_loss_and_logs(tiny_bert_dir):
    graphdef, trainable, frozen = _adapted(tiny_bert_dir)
    split = _toy_split()
    cfg = TrainConfig(epochs=6, batch_size=16, learning_rate=1e-2, warmup_ratio=0.0,
                      log_every=4, seed=0)
    records = []
    result = fit(graphdef, trainable, frozen, split, cfg, classification_step_loss,
                 hooks=Hooks(log=records.append))
    assert result.steps == 24 and [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
    assert records[-1]["loss"] < records[0]["loss"] * 0.85
    assert all(np.isfinite(r["grad_norm"]) for r in records)
    assert result.median_step_ms > 0 and result.compile_seconds > 0


def test_throughput_after_a_stop_counts_only_the_steps_this_session_timed(tiny_bert_dir,
                                                                          monkeypatch):
    """A session stopped after step 1 of a 4-step logging interval hands that
    step on; the resumed session's first record averages the loss over all four
    but measures throughput over the three it ran itself, in its own time."""
    import types

    from jaxlora import train

    graphdef, trainable, frozen = _adapted(tiny_bert_dir)
    cfg = TrainConfig(epochs=1, batch_size=16, log_every=4, seed=0)
    stopped = fit(graphdef, trainable, frozen, _toy_split(), cfg, classification_step_loss,
                  hooks=Hooks(stop=lambda: True))
    assert stopped.stopped and stopped.steps == 1 and len(stopped.state.pending) == 1
    ticks = []  # a clock that moves one second each time it is read

    def perf_counter():
        ticks.append(float(len(ticks)))
        return ticks[-1]

    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=perf_counter))
    records, seconds = [], []

    def on_log(record):
        records.append(record)
        seconds.append(ticks[-1] - ticks[0])  # the record's clock reading, from the start

    fit(graphdef, stopped.state, frozen, _toy_split(), cfg, classification_step_loss,
        hooks=Hooks(log=on_log))
    assert [r["step"] for r in records] == [4]
    assert records[0]["step_ms"] == pytest.approx(seconds[0] * 1e3 / 3)
    assert records[0]["examples_per_s"] == pytest.approx(3 * 16 / seconds[0])
    assert records[0]["tokens_per_s"] == pytest.approx(3 * 16 * 12 / seconds[0])


def test_max_steps_caps_the_run(tiny_bert_dir):
    graphdef, trainable, frozen = _adapted(tiny_bert_dir)
    cfg = TrainConfig(epochs=3, max_steps=5, batch_size=16, log_every=100)
    result = fit(graphdef, trainable, frozen, _toy_split(), cfg, classification_step_loss)
    assert result.steps == 5 and result.history[-1]["step"] == 5


def test_a_nan_loss_stops_training_and_saves_nothing_after_it(tiny_bert_dir, tmp_path):
    """A batch holding token 999 makes the loss NaN; training stops naming that
    step, and the checkpoints end before it (the last good one stays latest)."""
    import jax.numpy as jnp

    from jaxlora.checkpoint import Checkpointer
    from jaxlora.train import Diverged

    graphdef, trainable, frozen = _adapted(tiny_bert_dir)
    split = _toy_split(n=40)
    split.input_ids[:, 1] = 100 + np.arange(40)  # a token naming each row
    cfg = TrainConfig(epochs=2, batch_size=8, log_every=3, seed=0)
    order = [b["input_ids"] for e in range(2)
             for b in split.batches(8, shuffle=True, seed=0, epoch=e)]
    poisoned = 4  # the 4th step's batch (its rows come back in epoch 2, after the stop)
    marker = order[poisoned - 1][0, 1]
    split.input_ids[split.input_ids[:, 1] == marker, 1] = 999  # that batch's first row only

    def loss(model, batch, rng):
        value, count = classification_step_loss(model, batch, rng)
        return jnp.where(jnp.any(batch["input_ids"] == 999), jnp.nan, value), count

    with Checkpointer(tmp_path / "c") as ckpt:
        with pytest.raises(Diverged) as stopped:
            fit(graphdef, trainable, frozen, split, cfg, loss,
                hooks=Hooks(checkpoint=Hook(ckpt.save, every=1)))
        assert ckpt.steps() == [2, 3]  # keep 2: the last good one is the latest
    assert stopped.value.step == poisoned and "loss became nan at step 4" in str(stopped.value)


def _lm_batch(n=8, t=10, seed=0) -> dict:
    """Causal-LM rows whose target-token counts differ a lot from row to row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 90, (n, t)).astype(np.int32)
    lengths = np.array([t, 3, t, 4, 2, t, 5, t])[:n]
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    targets = mask.copy()
    targets[:, :2] = 0  # a two-token prompt
    weights = np.ones(n, np.float32)
    weights[-1] = 0.0  # a padding row, as the last batch of a split has
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": targets, "weights": weights}


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_grad_accum_is_the_whole_batch_normalised_by_all_its_tokens(tmp_path, tiny_bert_dir,
                                                                    task):
    """grad_accum=4 over micro-batches of B/4 takes the same step as one batch
    of B: the summed loss over all micro-batches divided by all their target
    tokens, not the mean of the micro-batches' means."""
    from jaxlora.tasks import STEP_LOSSES

    if task == "causal-lm":
        from tiny_models import tiny_decoder_dir

        loaded = load_model(tiny_decoder_dir(tmp_path, "llama-gqa-rope3"), task="causal-lm",
                            attention="xla", seed=0)
        graphdef, trainable, frozen = adapt(loaded.model, LoraConfig(rank=4, targets="all-linear"),
                                            loaded.lora_targets, jax.random.key(1))[:3]
        batch = _lm_batch()
    else:
        graphdef, trainable, frozen = _adapted(tiny_bert_dir)
        batch = next(iter(_toy_split(n=8).batches(8, shuffle=False)))
    tx = optax.sgd(1.0)  # the update is minus the gradient: compared directly
    loss_fn = STEP_LOSSES[task]
    whole = build_train_step(graphdef, tx, loss_fn)
    accum = build_train_step(graphdef, tx, loss_fn, grad_accum=4)
    copy = lambda tree: jax.tree.map(lambda x: np.array(x), tree)  # noqa: E731 - donated
    one, _, m1 = whole(copy(trainable), frozen, tx.init(trainable), batch, None)
    four, _, m4 = accum(copy(trainable), frozen, tx.init(trainable), batch, None)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    assert float(m4["count"]) == float(m1["count"])
    if task == "causal-lm":
        # the mean of the micro-batches' means is another number
        means = [float(loss_fn(nnx.merge(graphdef, trainable, frozen),
                               {k: v[i:i + 2] for k, v in batch.items()}, None)[0])
                 for i in range(0, 8, 2)]
        assert abs(np.mean(means) - float(m1["loss"])) > 1e-3


def test_grad_accum_sums_bfloat16_gradients_in_float32():
    """Four micro-batches whose gradients are 1 and three times 2^-8 (a weight
    in bfloat16, as full fine-tuning in bfloat16 has): summed in bfloat16, each
    1 + 2^-8 rounds back to 1 and the small ones are lost; summed in float32,
    the step is the bfloat16 rounding of the exact mean."""
    class Scale(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((1,), jnp.bfloat16))

    def loss_fn(model, batch, rng):
        return (model.w[...] * batch["x"]).mean(), jnp.float32(batch["x"].shape[0])

    graphdef, trainable, frozen = nnx.split(Scale(), nnx.Param, ...)
    x = np.array([[1.0], [2.0 ** -8], [2.0 ** -8], [2.0 ** -8]])
    batch = {"x": jnp.asarray(x, jnp.bfloat16), "weights": jnp.ones(4, jnp.float32)}
    tx = optax.sgd(1.0)  # the update is minus the gradient
    step = build_train_step(graphdef, tx, loss_fn, grad_accum=4)
    after, _, _ = step(trainable, frozen, tx.init(trainable), batch, None)
    exact = jnp.asarray(-x.mean(), jnp.bfloat16)
    assert after["w"][...].dtype == jnp.bfloat16
    assert float(after["w"][...][0]) == float(exact) != -0.25  # 0.25: the bfloat16 sum


def test_fit_with_grad_accum_takes_the_same_steps(tiny_bert_dir):
    graphdef, trainable, frozen = _adapted(tiny_bert_dir)
    split = _toy_split(n=48)
    results = []
    for batch_size, grad_accum in ((16, 1), (4, 4)):
        cfg = TrainConfig(batch_size=batch_size, grad_accum=grad_accum, learning_rate=1e-2,
                          log_every=1, epochs=2)
        copy = jax.tree.map(lambda x: np.array(x), trainable)
        # no dropout: micro-batch i draws its masks from fold_in(rng, i), another stream
        results.append(fit(graphdef, copy, frozen, split, cfg,
                           lambda model, batch, rng: classification_step_loss(model, batch, None)))
    assert results[0].steps == results[1].steps == 6
    np.testing.assert_allclose([r["loss"] for r in results[0].history],
                               [r["loss"] for r in results[1].history], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[0].trainable), jax.tree.leaves(results[1].trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_cpu_steps_compile_with_jaxloras_xla_options(tiny_bert_dir, monkeypatch):
    """On the CPU the train and eval steps compile without YNNPACK fusions
    (`runtime.CPU_COMPILER_OPTIONS`, bench/NOTES.md v7), to the same numbers as
    XLA's defaults; a user's own XLA_FLAGS setting of the option wins."""
    from jaxlora import runtime
    from jaxlora.evaluate import build_eval_step

    assert jax.default_backend() == "cpu"
    runtime.compiler_options.cache_clear()
    assert runtime.compiler_options() == runtime.CPU_COMPILER_OPTIONS
    graphdef, trainable, frozen = _adapted(tiny_bert_dir)
    tx = optax.adamw(1e-3)
    step = build_train_step(graphdef, tx, classification_step_loss)
    batch = next(_toy_split(n=8).batches(8, shuffle=False, seed=0, epoch=0))
    args = (trainable, frozen, tx.init(trainable), batch, jax.random.key(0))
    ours = step.lower(*args).compile()
    defaults = jax.jit(step.step).lower(*args).compile()
    assert "__ynn_fusion" in defaults.as_text()  # what the option turns off
    assert "__ynn_fusion" not in ours.as_text()
    assert "__ynn_fusion" not in build_eval_step(graphdef).lower(
        trainable, frozen, batch).compile().as_text()
    copy = lambda: jax.tree.map(jnp.copy, args)  # noqa: E731 (the step donates)
    t1, _, m1 = ours(*copy())
    t2, _, m2 = defaults(*copy())
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    runtime.compiler_options.cache_clear()
    try:
        assert runtime.compiler_options() is None
    finally:
        monkeypatch.undo()
        runtime.compiler_options.cache_clear()


def _tree(seed=0):
    """LoRA-like small leaves, one float32 and one bfloat16 larger leaf."""
    rng = np.random.default_rng(seed)
    tree = {f"layer{i}": {"a": rng.normal(size=(32, 4)), "b": rng.normal(size=(4, 32))}
            for i in range(12)}
    tree["head"] = rng.normal(size=(32, 2))
    tree["big"] = rng.normal(size=(64, 64))
    tree["big16"] = rng.normal(size=(64, 64))
    tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    tree["big16"] = tree["big16"].astype(jnp.bfloat16)
    return tree


@pytest.mark.parametrize("join_small", [True, False])
def test_the_global_norm_is_every_leaf_together(monkeypatch, join_small):
    """global_norm is the L2 norm of all leaves (float64 reference); with
    join_small, the small leaves take one reduction together, not one each
    (the big ones still one each), which is what saves a GPU step ~100 kernels."""
    from jaxlora import optim

    monkeypatch.setattr(optim, "SMALL_LEAF", 1000)  # "big" and "big16" are over it
    tree = _tree()
    expected = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                           for x in jax.tree.leaves(tree)))
    norm = optim.global_norm(tree, join_small=join_small)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(float(norm), expected, rtol=1e-6)
    reductions = jax.jit(lambda t: optim.global_norm(t, join_small=join_small)).lower(
        tree).as_text().count("stablehlo.reduce(")
    assert reductions == (1 + 2 if join_small else len(jax.tree.leaves(tree)))


@pytest.mark.parametrize("scale", [0.01, 10.0])  # below and above max_grad_norm
def test_clipping_is_optaxs(scale):
    """The optimizer's clipping over global_norm updates exactly as optax's
    clip_by_global_norm before AdamW, whether the norm is under max_grad_norm
    or over it."""
    from jaxlora.optim import make_optimizer

    cfg = TrainConfig(learning_rate=1e-3, warmup_ratio=0.0, schedule="constant",
                      max_grad_norm=1.0, weight_decay=0.01)
    params = _tree(1)
    grads = jax.tree.map(lambda x: x * scale, _tree(2))
    ours = make_optimizer(cfg, 10)
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1e-3, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=0.01,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    got, _ = ours.update(grads, ours.init(params), params)
    want, _ = reference.update(grads, reference.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-5, atol=1e-8)
