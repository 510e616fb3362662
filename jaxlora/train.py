"""Supervised fine-tuning: one compiled train step, and a small loop around it.

The step is a pure function

    step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics)

jitted once with `trainable` and `opt_state` donated (updated in place on
accelerators). Frozen weights are an *argument*, never a closure constant:
constants would be baked into the executable (slow compiles, doubled memory).
Batches have fixed shapes, so the step compiles once per shape (once, or
once per length bucket: see `jaxlora.data`). The loop does only
host-side bookkeeping between steps and reads metrics back every `log_every`
steps; dispatch runs up to `RUN_AHEAD` steps ahead of the device, enough to
keep it busy and little enough that a stop request (SIGTERM) is acted on
within a couple of steps. What the loop does besides training (metrics
records, checkpoints, periodic evaluations, the stop check, a progress bar)
comes in as `Hooks`. The optimizer and its schedule: `jaxlora.optim`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field

from jaxlora.optim import global_norm, joins_small_leaves, learning_rate_schedule, make_optimizer
from jaxlora.runtime import jit, to_host

# Steps dispatched ahead of the one the device is computing (see `fit`).
RUN_AHEAD = 2

LossFn = Callable[[nnx.Module, dict, jax.Array | None], tuple[jax.Array, jax.Array]]


class TrainConfig(BaseModel):
    """The recipe's [train] table: optimisation of the trainable weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(1, ge=1, le=1000)  # passes over the training split
    max_steps: int | None = Field(None, gt=0)  # stop after this many steps (None: epochs decide)
    batch_size: int = Field(32, gt=0, le=65536)  # examples per forward/backward pass
    # micro-batches of batch_size per optimizer step: the step sees batch_size *
    # grad_accum examples, and its loss is normalised by the target tokens (or
    # examples) of all of them, exactly as one batch of that size
    grad_accum: int = Field(1, ge=1, le=4096)
    # what each transformer layer keeps for the backward pass: none (all activations),
    # full (recompute the layer), dots-saveable (keep matmul outputs, recompute the rest)
    remat: Literal["none", "full", "dots-saveable"] = "none"
    learning_rate: float = Field(5e-4, gt=0, le=1.0)  # peak AdamW learning rate
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay after warmup
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0)  # share of steps spent warming up from 0
    weight_decay: float = Field(0.0, ge=0.0, lt=1.0)  # decoupled AdamW decay on matrices only
    adam_b1: float = Field(0.9, gt=0.0, lt=1.0)  # AdamW first-moment decay
    adam_b2: float = Field(0.999, gt=0.0, lt=1.0)  # AdamW second-moment decay
    adam_eps: float = Field(1e-8, gt=0.0)  # AdamW denominator epsilon
    max_grad_norm: float = Field(1.0, ge=0.0)  # clip the global gradient norm to this (0: off)
    # LoRA+: the LoRA B factors (and vectors, as PEFT's LoRA+) learn at this multiple
    # of learning_rate, the rest at learning_rate, same schedule (unset: one for all)
    lr_ratio_b: float | None = Field(None, gt=0, le=1e4)
    # seeds the head, the adapters, dropout and the data order
    seed: int = Field(0, ge=0, le=2**32 - 1)
    log_every: int = Field(10, gt=0)  # steps between metric records
    checkpoint_every: int = Field(100, ge=0)  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = Field(2, ge=1, le=1000)  # the newest N checkpoints are kept


def step_batch(cfg: TrainConfig) -> int:
    """Examples per optimizer step: `grad_accum` micro-batches of `batch_size`."""
    return cfg.batch_size * cfg.grad_accum


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Number of optimizer steps the run takes."""
    steps = cfg.epochs * steps_per_epoch
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def build_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_fn: LossFn,
                     grad_accum: int = 1, placement=None, trainable=None):
    """The jit'd step over (trainable, frozen, opt_state, batch, rng); see the module doc.

    With `grad_accum` > 1 the batch is cut into that many equal micro-batches
    (a `lax.scan`, one forward/backward pass each, so activations are held for
    one micro-batch at a time). Each contributes the gradient of its *summed*
    loss (mean x count); the sum over micro-batches is divided once by the
    total count. That is the gradient of the whole batch's loss, normalised by
    all its target tokens, not a mean of per-micro-batch means (which would
    weigh a token of a short micro-batch more). The sum is kept in float32
    whatever the weights' dtype. Micro-batch i draws dropout
    from fold_in(rng, i). Micro-batch i holds rows i, i + grad_accum, ... of
    the batch, so that each device's block of rows (the batch is sharded by
    rows on a mesh) feeds every micro-batch equally.

    With a `placement` (`jaxlora.runtime.Placement`; `trainable`: the tree the
    step will be called with, arrays or shapes) the step runs on its mesh: the
    model reads each weight gathered whole where it uses it (FSDP), and the
    updated state comes out in the run's shardings; the step's code is the
    same. `rng` may be a key or its raw data (what can be placed on a mesh).
    """
    out_shardings = None
    join_small = joins_small_leaves(placement)
    if placement is not None:
        shard = placement.shard_trainable
        out_shardings = (placement.shardings(trainable, shard),
                         placement.shardings(jax.eval_shape(tx.init, trainable), shard),
                         placement.replicated())
        loss_fn = placement.gathering(loss_fn)

    def gradients(trainable, frozen, batch, rng):
        if grad_accum == 1:
            def objective(params):
                return loss_fn(nnx.merge(graphdef, params, frozen), batch, rng)

            return jax.value_and_grad(objective, has_aux=True)(trainable)

        def summed(params, micro, key):
            loss, count = loss_fn(nnx.merge(graphdef, params, frozen), micro, key)
            return loss * count, count

        def one(carry, xs):
            grads, total, count = carry
            micro, i = xs
            key = None if rng is None else jax.random.fold_in(rng, i)
            (s, c), g = jax.value_and_grad(summed, has_aux=True)(trainable, micro, key)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, total + s, count + c), None

        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum,
                                                 *x.shape[1:]).swapaxes(0, 1), batch)
        # summed in float32 whatever the weights' dtype (bfloat16 full fine-tuning)
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), trainable)
        start = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, total, count), _ = jax.lax.scan(one, start, (micro, jnp.arange(grad_accum)))
        scale = 1.0 / jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, trainable)
        return (total * scale, count), grads

    def step(trainable, frozen, opt_state, batch, rng):
        if rng is not None and not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.wrap_key_data(rng)
        (loss, count), grads = gradients(trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        # `count` weighs the loss when averaging over steps (examples, or target
        # tokens for a causal LM); `examples` is what throughput counts.
        metrics = {"loss": loss, "count": count, "examples": batch["weights"].sum(),
                   "grad_norm": global_norm(grads, join_small=join_small),
                   "update_norm": global_norm(updates, join_small=join_small)}
        return trainable, opt_state, metrics

    return TrainStep(step, out_shardings)


class TrainStep:
    """The jit'd train step. Called with nnx States it flattens them on every
    call; `on_leaves` gives the same step over flat lists of arrays, which is
    what `fit` runs.

    Why both: an nnx State flattens and unflattens through Python (each
    Variable is a pytree node of its own) before the step can even launch,
    the bound on small models whatever the device; lists of arrays flatten
    in C++ (measured: bench/NOTES.md v5).
    """

    def __init__(self, step: Callable, out_shardings=None):
        self.step = step
        self.out_shardings = out_shardings
        self.jitted = jit(step, donate_argnums=(0, 2), out_shardings=out_shardings)

    def __call__(self, trainable, frozen, opt_state, batch, rng):
        return self.jitted(trainable, frozen, opt_state, batch, rng)

    def lower(self, *args):
        return self.jitted.lower(*args)

    def on_leaves(self, trainable, frozen, opt_state) -> LeafStep:
        """The step over the leaves of states shaped as these (see `LeafStep`)."""
        return LeafStep(self, trainable, frozen, opt_state)


class LeafStep:
    """`TrainStep` over flat lists of arrays:
    `step(trainable_leaves, frozen_leaves, opt_leaves, batch, rng) ->
    (trainable_leaves, opt_leaves, metrics)`; `leaves(tree)` and
    `trainable(leaves)` / `opt_state(leaves)` convert. The states are rebuilt
    inside the compiled function, where it costs nothing."""

    def __init__(self, train_step: TrainStep, trainable, frozen, opt_state):
        self.defs = tuple(jax.tree.structure(x) for x in (trainable, frozen, opt_state))
        trainable_def, frozen_def, opt_def = self.defs

        def step(t, f, o, batch, rng):
            t, o, metrics = train_step.step(jax.tree.unflatten(trainable_def, t),
                                            jax.tree.unflatten(frozen_def, f),
                                            jax.tree.unflatten(opt_def, o), batch, rng)
            return jax.tree.leaves(t), jax.tree.leaves(o), metrics

        shardings = train_step.out_shardings
        if shardings is not None:
            shardings = (jax.tree.leaves(shardings[0]), jax.tree.leaves(shardings[1]),
                         shardings[2])
        self.jitted = jit(step, donate_argnums=(0, 2), out_shardings=shardings)

    def __call__(self, trainable: list, frozen: list, opt_state: list, batch, rng):
        return self.jitted(trainable, frozen, opt_state, batch, rng)

    def lower(self, *args):
        return self.jitted.lower(*args)

    @staticmethod
    def leaves(tree) -> list:
        return jax.tree.leaves(tree)

    def trainable(self, leaves: list):
        return jax.tree.unflatten(self.defs[0], leaves)

    def opt_state(self, leaves: list):
        return jax.tree.unflatten(self.defs[2], leaves)


@dataclass
class TrainState:
    """Everything a run needs to go on exactly where it stopped, frozen weights
    aside: what `jaxlora.checkpoint` saves and restores.

    The data position is `step` itself: batch order is a pure function of
    (seed, epoch), so step -> (epoch, batch in epoch) is exact. `pending` holds
    the per-step metrics since the last metrics record, so a record that spans
    an interruption averages the same steps as an uninterrupted run's.
    """

    trainable: Any
    opt_state: Any
    dropout_key: jax.Array  # raw key data (uint32); step s uses fold_in(key, s)
    step: int = 0  # optimizer steps taken
    pending: list[dict] = field(default_factory=list)  # metrics of steps not yet recorded
    tokens: int = 0  # padded tokens in those steps (for throughput)
    seconds: float = 0.0  # training wall time so far, over every session


def init_state(trainable, cfg: TrainConfig, train_split) -> TrainState:
    """The state before the first step: fresh optimizer state, step 0."""
    tx = make_optimizer(cfg, step_counts(cfg, train_split)[0])
    dropout_key = jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), 1))
    return TrainState(trainable=trainable, opt_state=tx.init(trainable), dropout_key=dropout_key)


def step_counts(cfg: TrainConfig, train_split) -> tuple[int, int]:
    """(total optimizer steps, batches per epoch) for `train_split`."""
    per_epoch = train_split.num_batches(step_batch(cfg))
    return total_steps(cfg, per_epoch), per_epoch


@dataclass
class TrainResult:
    """What a `fit` hands back: the state it reached and how this session went."""

    state: TrainState
    steps: int  # the step reached (== the run's total unless stopped)
    stopped: bool = False  # ended early because `hooks.stop` said so
    history: list[dict] = field(default_factory=list)  # this session's metrics records
    compile_seconds: float = 0.0
    train_seconds: float = 0.0  # over every session of the run
    median_step_ms: float = 0.0

    @property
    def trainable(self):
        return self.state.trainable

    @property
    def opt_state(self):
        return self.state.opt_state


@dataclass(frozen=True)
class Hook:
    """A side effect of the loop, as levanter's `trainer.add_hook(fn, every=N)`:
    `fn` is called after every `every`-th step (0: never on that schedule)."""

    fn: Callable[..., None]
    every: int = 0


@dataclass(frozen=True)
class Hooks:
    """What `fit` does between steps besides training; each one is optional.

    log         fn(record): every metrics record, each `cfg.log_every` steps
                and after the last step
    checkpoint  fn(state): every `every` steps, after the last step, and
                where the session stops early
    evaluate    fn(step, trainable): every `every` steps before the last; its
                time counts neither as training time nor in a step's time
    stop        asked after each step: True ends the session there (after a
                checkpoint), the result marked `stopped`
    progress    a rich Progress whose "train" bar advances with the steps
    """

    log: Callable[[dict], None] | None = None
    checkpoint: Hook | None = None
    evaluate: Hook | None = None
    stop: Callable[[], bool] | None = None
    progress: Any = None

    def due(self, hook: Hook | None, step: int) -> bool:
        """Whether `hook` is scheduled after `step`."""
        return hook is not None and bool(hook.every) and step % hook.every == 0


def fit(graphdef: nnx.GraphDef, start, frozen, train_split, cfg: TrainConfig,
        loss_fn: LossFn, *, hooks: Hooks = Hooks(), placement=None) -> TrainResult:
    """Train on `train_split` for `cfg.epochs` (or `cfg.max_steps`).

    `start` is the trainable weights to train from step 0, or a `TrainState`
    to go on from where it stopped. `train_split` provides
    `num_batches(batch_size)` and `batches(batch_size, shuffle=, seed=,
    epoch=, start=)`. `hooks` does the rest between steps (see `Hooks`);
    `placement` (a `jaxlora.runtime.Placement`) puts the state, the frozen
    weights and every batch on its device mesh.
    """
    steps, per_epoch = step_counts(cfg, train_split)
    schedule = learning_rate_schedule(cfg, steps)
    state = start if isinstance(start, TrainState) else init_state(start, cfg, train_split)
    trainable, opt_state = state.trainable, state.opt_state
    put_batch = lambda batch: batch  # noqa: E731
    if placement is not None:
        shard = placement.shard_trainable
        trainable, opt_state = placement.put(trainable, shard), placement.put(opt_state, shard)
        frozen = placement.put(frozen, True)
        put_batch = placement.put_batch
    step_fn = build_train_step(graphdef, make_optimizer(cfg, steps, placement), loss_fn,
                               cfg.grad_accum, placement, trainable
                               ).on_leaves(trainable, frozen, opt_state)
    # The loop holds flat lists of arrays (see `TrainStep`); states are rebuilt
    # for checkpoints, evaluations and the result.
    trainable, frozen, opt_state = (step_fn.leaves(x) for x in (trainable, frozen, opt_state))

    def step_key(key, step):  # step s draws its dropout from fold_in(key, s)
        return jax.random.key_data(jax.random.fold_in(key, step))

    if placement is not None:  # computed on the mesh, replicated, without waiting
        step_key = jax.jit(step_key, out_shardings=placement.replicated())
    if state.step > steps:
        raise ValueError(f"the saved state is at step {state.step}, past the run's {steps}")
    dropout_key = jax.random.wrap_key_data(jnp.asarray(state.dropout_key))
    progress = hooks.progress
    task = (progress.add_task("train", total=steps, completed=state.step)
            if progress is not None else None)
    step = state.step
    pending, tokens = list(state.pending), state.tokens
    # Steps of the first interval that an earlier session ran (and timed): the
    # throughput of that interval is this session's steps over this session's time.
    carried, carried_tokens = len(pending), tokens
    result = TrainResult(state=state, steps=step)
    session_start = compile_start = mark = time.perf_counter()
    first = True

    def snapshot() -> TrainState:
        host = [{k: float(v) for k, v in m.items()} for m in to_host(pending)]
        _check_finite(host, step)
        return TrainState(trainable=step_fn.trainable(trainable),
                          opt_state=step_fn.opt_state(opt_state), dropout_key=state.dropout_key,
                          step=step, pending=host, tokens=tokens,
                          seconds=state.seconds + time.perf_counter() - session_start)

    for epoch in range(step // per_epoch, math.ceil(steps / per_epoch)):
        skip = step - epoch * per_epoch  # > 0 only when resuming mid-epoch
        for batch in train_split.batches(step_batch(cfg), shuffle=True, seed=cfg.seed,
                                         epoch=epoch, start=skip):
            if step == steps:
                break
            rng = step_key(dropout_key, step)
            trainable, opt_state, metrics = step_fn(trainable, frozen, opt_state,
                                                    put_batch(batch), rng)
            pending.append(metrics)
            tokens += batch["input_ids"].size
            step += 1
            if len(pending) > RUN_AHEAD:
                # Let dispatch run at most RUN_AHEAD steps ahead of the device: the
                # device stays fed, and a stop request is seen within that many steps.
                jax.block_until_ready(pending[-RUN_AHEAD - 1]["loss"])
            if first:  # the first call compiles the step
                jax.block_until_ready(metrics)
                result.compile_seconds = time.perf_counter() - compile_start
                first = False
            if step % cfg.log_every == 0 or step == steps:
                pending = to_host(pending)
                _check_finite(pending, step)
                now = time.perf_counter()
                record = _record(pending, step, epoch, float(schedule(step - 1)), now - mark,
                                 tokens - carried_tokens, timed=len(pending) - carried)
                result.history.append(record)
                if hooks.log:
                    hooks.log(record)
                if task is not None:
                    progress.update(task, completed=step,
                                    description=f"train  loss {record['loss']:.4f}  "
                                                f"{record['examples_per_s']:.0f} ex/s")
                pending, mark, tokens, carried, carried_tokens = [], now, 0, 0, 0
            if hooks.due(hooks.evaluate, step) and step < steps:
                began = time.perf_counter()
                hooks.evaluate.fn(step, step_fn.trainable(trainable))
                # Evaluation time is neither training time nor part of a step's time.
                spent = time.perf_counter() - began
                mark, session_start = mark + spent, session_start + spent
            stop = hooks.stop is not None and hooks.stop() and step < steps
            due = step == steps or hooks.due(hooks.checkpoint, step)
            if hooks.checkpoint is not None and (due or stop):
                hooks.checkpoint.fn(snapshot())
            if stop:
                result.stopped = True
                break
        if result.stopped or step == steps:
            break
    result.state = snapshot()
    result.train_seconds = result.state.seconds
    # The first interval holds the compilation: leave it out when there are others.
    intervals = [r["step_ms"] for r in result.history]
    result.median_step_ms = statistics.median(intervals[1:] or intervals) if intervals else 0.0
    result.steps = step
    return result


class Diverged(Exception):
    """The loss or the gradient became NaN or infinite at `step` (1-based): the
    weights after that step are unusable, so nothing from it is saved."""

    def __init__(self, step: int, what: str, value: float):
        super().__init__(f"the {what} became {value} at step {step}")
        self.step, self.what, self.value = step, what, value


def _check_finite(metrics: list[dict], last_step: int) -> None:
    """Raise `Diverged` for the first of these consecutive steps (ending at
    `last_step`) whose loss or gradient norm is not finite."""
    first = last_step - len(metrics) + 1
    for i, m in enumerate(metrics):
        for key, what in (("loss", "loss"), ("grad_norm", "gradient norm")):
            value = float(m[key])
            if not math.isfinite(value):
                raise Diverged(first + i, what, value)


def _record(metrics: list[dict], step: int, epoch: int, lr: float, seconds: float,
            tokens: int, timed: int) -> dict:
    """One metrics.jsonl line: means over the steps since the last record, and
    throughput of the last `timed` of them, those that ran in `seconds` (with
    `tokens` padded tokens: what was computed)."""
    examples = sum(float(m["examples"]) for m in metrics[len(metrics) - timed:])
    counts = [float(m.get("count", m["examples"])) for m in metrics]
    loss = sum(float(m["loss"]) * c for m, c in zip(metrics, counts)) / max(sum(counts), 1.0)
    record = {"step": step, "epoch": epoch, "loss": loss, "learning_rate": lr,
              "grad_norm": float(metrics[-1]["grad_norm"]),
              "update_norm": float(metrics[-1]["update_norm"]),
              "step_ms": seconds * 1e3 / timed, "examples_per_s": examples / seconds,
              "tokens_per_s": tokens / seconds}
    return record
