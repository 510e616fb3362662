"""`runner plan RECIPE`: what a run will hold on each device, before it runs.

It loads the base model and attaches the adapters as the run would, lays them
out on the recipe's mesh over the devices this process sees, and prints per
device: the frozen weights, the trainable weights, the optimizer state, and
the activations of one micro-batch. The weights and optimizer state are exact
(the shapes and shardings the run uses); the activations are XLA's own figure
where the backend reports it (the train step is compiled for the plan on
GPU/TPU), else an analytic estimate. It warns when the total passes the
device memory it can read.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from jaxlora import runtime
from jaxlora.optim import make_optimizer
from jaxlora.tasks import STEP_LOSSES
from jaxlora.train import build_train_step, step_batch
from runner import build, libraries
from runner.recipe import load_recipe
from runner.report import method_label


def main(args, console, stop) -> int:
    recipe = load_recipe(args.recipe, args.set)
    libraries.set_up()
    figures = memory_plan(recipe, args.recipe, console)
    if args.json and runtime.primary():
        print(json.dumps(figures))
    return 0


def build_as_run(recipe, recipe_path: Path):
    """The run's mesh and adapted model, as `runner run` builds them: (placement,
    model folder, `build.ModelParts`, the optimizer state as shapes)."""
    # As `runner run` does: on a pod every host plans, and the mesh spans them all.
    runtime.initialize(recipe.runtime)
    placement = build.placement_for(recipe)
    recipe = build.with_labels(recipe, build.base_folder(recipe_path))[0]  # the head's size
    model_dir = build.model_folder(recipe, build.base_folder(recipe_path))
    # each weight straight into its shard, as the run loads it: a model that fits
    # the devices only sharded can be planned too
    loaded = build.load_pretrained(recipe, model_dir, placement, train=True)
    parts = build.adapt(recipe, loaded, placement)
    opt_state = jax.eval_shape(make_optimizer(recipe.train, 1).init, parts.trainable)
    return placement, model_dir, parts, opt_state


# What a layer keeps for the backward pass, in activation elements per token,
# by remat policy (H hidden, I MLP inner, A heads x sequence length): the
# attention scores and probabilities (A each), the normed inputs, q/k/v, the
# attention output and its projection (about 10 H), the MLP's inner
# activations before and after the nonlinearity (2 I).
ACTIVATIONS = {
    "none": lambda h, i, a: 10 * h + 2 * i + 2 * a,
    "dots-saveable": lambda h, i, a: 6 * h + i + a,  # matmul outputs only
    "full": lambda h, i, a: h,  # the layer's input; one layer is recomputed at a time
}


def _config_value(config: dict, *names, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def activation_estimate(recipe, config: dict, devices: int) -> int:
    """Bytes of activations one device keeps for one micro-batch (analytic);
    `config` is the model's config.json, as a dict."""
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
    layers = _config_value(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _config_value(config, "num_attention_heads", "n_head")
    inner = _config_value(config, "intermediate_size", "n_inner", default=4 * hidden) \
        or 4 * hidden
    vocab = _config_value(config, "vocab_size", default=0)
    rows = max(recipe.train.batch_size // devices, 1)
    length = recipe.data.max_length
    _, compute = recipe.model.dtypes()
    per_token = ACTIVATIONS[recipe.train.remat](hidden, inner, heads * length)
    total = rows * length * per_token * layers * np.dtype(compute).itemsize
    if recipe.train.remat == "full":  # plus the one layer being recomputed
        total += rows * length * ACTIVATIONS["none"](hidden, inner, heads * length) \
            * np.dtype(compute).itemsize
    if recipe.model.task == "causal-lm":  # float32 logits and their gradient
        total += 2 * rows * length * vocab * 4
    return int(total)


def compiled_temporaries(recipe, graphdef, trainable, frozen, opt_state, placement) -> int | None:
    """XLA's temporary buffers of the compiled train step (activations and
    workspace), per device; None where the backend does not report them (CPU)."""
    if jax.default_backend() == "cpu":
        return None
    try:
        analysis = lowered_step(recipe, graphdef, trainable, frozen, opt_state,
                                placement).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - the plan falls back to the estimate
        return None
    return getattr(analysis, "temp_size_in_bytes", None) or None


def lowered_step(recipe, graphdef, trainable, frozen, opt_state, placement):
    """The run's train step, lowered for one batch of the recipe's shapes on
    `placement`'s mesh (the arrays as shapes only): what `fit` compiles."""
    shard = placement.shard_trainable
    step = build_train_step(graphdef, make_optimizer(recipe.train, 1, placement),
                            STEP_LOSSES[recipe.model.task], recipe.train.grad_accum, placement,
                            trainable)
    rows, length = step_batch(recipe.train), recipe.data.max_length
    batch = {"input_ids": (rows, length), "attention_mask": (rows, length), "labels": (rows,),
             "weights": (rows,)}
    if recipe.model.task == "causal-lm":
        batch["loss_mask"] = (rows, length)
        if recipe.data.packing:
            batch["segment_ids"] = batch["positions"] = (rows, length)

    def abstract(tree, shard):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            np.shape(x), x.dtype, sharding=placement.array_sharding(np.shape(x), shard)), tree)

    args = (abstract(trainable, shard), abstract(frozen, True), abstract(opt_state, shard),
            {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "weights" else np.int32,
                                     sharding=placement.batch_sharding(len(shape)))
             for k, shape in batch.items()},
            jax.ShapeDtypeStruct((2,), np.uint32, sharding=placement.replicated()))
    return step.lower(*args)


def memory_plan(recipe, recipe_path: Path, console: Console) -> dict:
    """Print the plan; returns its figures (bytes per device)."""
    placement, model_dir, parts, opt_state = build_as_run(recipe, recipe_path)
    graphdef, trainable, frozen = parts.graphdef, parts.trainable, parts.frozen
    if not runtime.primary():  # process 0 speaks for all of them
        console = Console(quiet=True)
    shard = placement.shard_trainable
    figures = {
        "frozen": runtime.per_device_bytes(frozen, placement, True),
        "trainable": runtime.per_device_bytes(trainable, placement, shard),
        "optimizer": runtime.per_device_bytes(opt_state, placement, shard),
    }
    compiled = compiled_temporaries(recipe, graphdef, trainable, frozen, opt_state, placement)
    figures["activations"] = compiled if compiled is not None else activation_estimate(
        recipe, parts.loaded.hf_config.to_dict(), placement.devices)
    figures["total"] = sum(figures.values())
    limit = runtime.device_memory()

    mesh = placement.mesh.shape
    console.print(f"[bold]{recipe.name}[/]: {method_label(recipe.adapter.model_dump())}, "
                  f"{len(parts.layers)} adapted layers; mesh data {mesh['data']} x fsdp "
                  f"{mesh['fsdp']} over {placement.devices} of the {jax.device_count()} "
                  f"{jax.default_backend()} devices seen ({jax.process_count()} process(es))")
    console.print(f"batch: {step_batch(recipe.train)} rows per step "
                  f"({recipe.train.batch_size} x grad_accum {recipe.train.grad_accum}), "
                  f"{max(recipe.train.batch_size // placement.devices, 1)} rows per device per "
                  f"micro-batch, {recipe.data.max_length} tokens; remat {recipe.train.remat}")
    table = Table(title="per device")
    table.add_column("what")
    table.add_column("MiB", justify="right")
    table.add_column("layout")
    layout = "sharded over fsdp" if mesh["fsdp"] > 1 else "whole"
    trainable_layout = layout if shard else "replicated"
    rows = [("frozen weights", figures["frozen"], layout),
            ("trainable weights", figures["trainable"], trainable_layout),
            ("optimizer state (AdamW)", figures["optimizer"], trainable_layout),
            ("activations, one micro-batch", figures["activations"],
             "compiled (XLA temporaries)" if compiled is not None else "estimate"),
            ("total", figures["total"], "")]
    for what, value, how in rows:
        table.add_row(what, f"{value / 2**20:,.1f}", how)
    console.print(table)
    if limit is None:
        console.print(f"device memory: not reported by the {jax.default_backend()} backend")
        return {**figures, "device_memory": limit}
    has = (f"the {limit / 2**30:.1f} GiB of host RAM each of the {len(jax.local_devices())} "
           "CPU device(s) may use" if jax.default_backend() == "cpu" else
           f"the {limit / 2**30:.1f} GiB each device has")
    if figures["total"] > 0.9 * limit:
        console.print(f"[bold yellow]warning:[/] about {figures['total'] / 2**30:.1f} GiB per "
                      f"device, more than 90% of {has}: it "
                      "will not fit. Try runtime.fsdp (shard the frozen weights), train.remat = "
                      "\"full\", a smaller train.batch_size with train.grad_accum, or qlora")
    else:
        console.print(f"fits: {figures['total'] / 2**30:.2f} GiB of {has}")
    return {**figures, "device_memory": limit}
