"""The optimizer: AdamW after gradient clipping, with warmup and decay.

    make_optimizer          clip_by_global_norm (max_grad_norm) -> AdamW
                            (weight decay on matrices only), its learning rate
                            from `learning_rate_schedule`; with `lr_ratio_b`
                            (LoRA+) the LoRA B factors get their own AdamW at
                            that multiple of the learning rate
    learning_rate_schedule  linear warmup from 0, then linear / cosine decay to
                            0, or constant
    global_norm             the L2 norm of a whole tree of arrays, shared by the
                            clipping and the step's grad_norm / update_norm

The settings come from the recipe's [train] table (`jaxlora.train.TrainConfig`),
read through the few fields `OptimSettings` names.
"""

from __future__ import annotations

from typing import Literal, Protocol

import jax
import jax.numpy as jnp
import optax


class OptimSettings(Protocol):
    """The optimizer's fields of the recipe's [train] table (`TrainConfig`)."""

    learning_rate: float
    schedule: Literal["linear", "cosine", "constant"]
    warmup_ratio: float
    weight_decay: float
    adam_b1: float
    adam_b2: float
    adam_eps: float
    max_grad_norm: float
    lr_ratio_b: float | None


def learning_rate_schedule(cfg: OptimSettings, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then linear/cosine decay to 0, or constant."""
    warmup = int(round(cfg.warmup_ratio * steps))
    decay = max(steps - warmup, 1)
    peak = cfg.learning_rate
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, 0.0, decay)
    else:
        after = optax.cosine_decay_schedule(peak, decay)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


# Leaves under this many elements are summed as one vector by `global_norm`.
SMALL_LEAF = 1 << 20


def global_norm(tree, *, join_small: bool = True) -> jax.Array:
    """The L2 norm of all the leaves of `tree` together, summed in float32.

    With `join_small`, the leaves under `SMALL_LEAF` elements (LoRA factors,
    biases, norm scales, a head) are joined into one vector first: summed
    each on its own, every leaf is a reduction kernel of its own on a GPU
    (about 100 a step for bert-base LoRA), and XLA fuses the join into the
    reduction, so nothing is copied (measured: bench/NOTES.md v11). Sharded
    leaves (FSDP-sharded trainable weights) are summed each where it lies:
    joining them would gather them first."""
    small, parts = [], []
    for x in jax.tree.leaves(tree):
        x = x.astype(jnp.float32)
        if join_small and x.size < SMALL_LEAF:
            small.append(x.ravel())
        else:
            parts.append(jnp.sum(jnp.square(x)))
    if small:
        parts.append(jnp.sum(jnp.square(jnp.concatenate(small))))
    return jnp.sqrt(sum(parts, jnp.zeros((), jnp.float32)))


def clip_by_global_norm(max_norm: float, *, join_small: bool = True
                        ) -> optax.GradientTransformation:
    """optax's `clip_by_global_norm` (updates scaled by max_norm / norm where
    the norm exceeds max_norm) over `global_norm`, which the step's
    `grad_norm` metric shares."""

    def update(updates, state, params=None):
        norm = global_norm(updates, join_small=join_small)
        keep = norm < max_norm
        return jax.tree.map(
            lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm),
            updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def joins_small_leaves(placement) -> bool:
    """Whether the step's norms join small leaves: not where the trainable
    weights are sharded over a mesh (see `global_norm`)."""
    return placement is None or not placement.shard_trainable


def lora_plus_group(path, leaf) -> str:
    """LoRA+'s group of one trainable leaf (at pytree `path`, `jax.tree_util`
    keys), as PEFT's `create_loraplus_optimizer` (and the LoRA+ authors' code)
    groups them: "b", at the ratio times the learning rate, for the LoRA B
    factors and every vector (DoRA's magnitudes, a head's bias); "rest" for A
    factors and a head's kernel."""
    lora_b = any(getattr(key, "key", None) == "lora_b" for key in path)
    return "b" if lora_b or leaf.ndim == 1 else "rest"


def lora_plus_groups(params):
    """LoRA+'s partition of the trainable tree (`lora_plus_group`)."""
    return jax.tree_util.tree_map_with_path(lora_plus_group, params)


def _adamw(cfg: OptimSettings, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    """AdamW at `learning_rate`, weight decay on matrices only (not biases/norms)."""
    return optax.adamw(learning_rate, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                       weight_decay=cfg.weight_decay,
                       mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))


def make_optimizer(cfg: OptimSettings, steps: int, placement=None
                   ) -> optax.GradientTransformation:
    """Gradient clipping then AdamW; weight decay only on matrices (not biases/norms).
    With `cfg.lr_ratio_b` (LoRA+, Hayou et al. 2024) the parameters are
    partitioned (`optax.multi_transform`): the LoRA B factors follow the same
    schedule at `lr_ratio_b` times the learning rate, everything else the
    learning rate itself; unset, there is no partition. `placement`: the
    mesh the step runs on, if any (it decides how the global norm is
    summed, see `global_norm`)."""
    schedule = learning_rate_schedule(cfg, steps)
    if cfg.lr_ratio_b is None:
        adamw = _adamw(cfg, schedule)
    else:
        ratio = cfg.lr_ratio_b
        adamw = optax.multi_transform(
            {"rest": _adamw(cfg, schedule),
             "b": _adamw(cfg, lambda count: ratio * schedule(count))}, lora_plus_groups)
    if cfg.max_grad_norm == 0:
        return adamw
    return optax.chain(clip_by_global_norm(cfg.max_grad_norm,
                                           join_small=joins_small_leaves(placement)), adamw)
