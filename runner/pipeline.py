"""The pipeline: a recipe in, a run folder out, in the order of the five steps.

    resolve sources -> build data -> load model -> adapt -> evaluate before
      -> train -> evaluate after -> save and report
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import jax
from flax import nnx
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from jaxlora import sources
from jaxlora.data import prepare
from jaxlora.errors import UserError
from jaxlora.evaluate import build_eval_step, evaluate
from jaxlora.lora import adapt, count_params, without_adapters
from jaxlora.models import load_model
from jaxlora.models.layers import resolve_attention
from jaxlora.quant import bits_per_parameter, footprint
from jaxlora.tasks import classification_step_loss
from jaxlora.train import fit
from runner import report
from runner.recipe import Recipe, canonical, recipe_hash, to_toml


def run(recipe: Recipe, recipe_path: Path, console: Console) -> Path:
    """Run a validated recipe end to end; returns the run folder."""
    base_dir = recipe_path.resolve().parent
    model_dir = sources.resolve(recipe.model.source, "model", base_dir)
    loaded = load_pretrained(recipe, model_dir)
    data = prepare(recipe.data, load_tokenizer(model_dir), base_dir=base_dir)
    base_params = count_params(nnx.state(loaded.model))  # before 4-bit packing
    key = jax.random.key(recipe.train.seed)
    graphdef, trainable, frozen, adapted = adapt(
        loaded.model, recipe.adapter, loaded.lora_targets,
        jax.random.fold_in(key, 2))
    # Bad input has been caught by now: only then is a run folder made.
    run_dir = report.new_run_dir(Path(recipe.output.dir), recipe.name)
    report.write_atomic(run_dir / "recipe.toml", to_toml(recipe))
    manifest = {"status": "running", "recipe_hash": recipe_hash(recipe),
                "recipe_file": str(recipe_path), "recipe": canonical(recipe),
                "environment": report.environment()}
    manifest["model"] = {"source": str(model_dir), "fingerprint": loaded.fingerprint,
                         "trainable_params": count_params(trainable),
                         "total_params": base_params + count_params(
                             nnx.state(loaded.model, nnx.LoRAParam)),
                         "adapted_layers": adapted, "ignored_keys": loaded.ignored_keys,
                         **footprint(frozen),
                         "bits_per_quantized_param": bits_per_parameter(
                             loaded.model.linear_layers())}
    manifest["data"] = stats = _stats(data.stats)
    report.write_json(run_dir / "manifest.json", manifest)
    console.print(f"run folder: [bold]{run_dir}[/]")
    console.print(f"data: {stats['train_size']} train / {stats['eval_size']} eval examples; "
                  f"trainable parameters: {manifest['model']['trainable_params']:,}")

    eval_step = build_eval_step(graphdef)
    labels = list(recipe.data.labels)
    with _progress(console) as progress:
        before = None
        if recipe.eval.before:
            before = evaluate(eval_step, without_adapters(trainable), frozen, data.eval,
                              batch_size=recipe.eval.batch_size, label_names=labels,
                              progress=progress, description="eval before")
        with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as log:
            result = fit(graphdef, trainable, frozen, data.train, recipe.train, classification_step_loss,
                         on_log=lambda r: (log.write(json.dumps(r) + "\n"), log.flush()),
                         progress=progress)
        after = evaluate(eval_step, result.trainable, frozen, data.eval,
                         batch_size=recipe.eval.batch_size, label_names=labels,
                         progress=progress, description="eval after")

    manifest["train"] = {"steps": result.steps, "compile_seconds": result.compile_seconds,
                         "train_seconds": result.train_seconds,
                         "median_step_ms": result.median_step_ms, **report.peak_memory()}
    manifest["status"] = "finished"
    report.write_json(run_dir / "eval.json", {"before": before, "after": after})
    report.write_json(run_dir / "manifest.json", manifest)
    report.write_atomic(run_dir / "report.md",
                        report.markdown_report(manifest, before, after, stats))
    console.print(report.comparison_table(before, after,
                                          f"{recipe.name}: {after['examples']} eval examples"))
    console.print(f"train {result.train_seconds:.0f} s ({result.steps} steps); "
                  f"report: {run_dir / 'report.md'}")
    return run_dir


def load_tokenizer(model_dir: Path):
    """The model folder's fast tokenizer (never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), use_fast=True,
                                             trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: cannot load a tokenizer from the model folder: "
                        f"{str(e).splitlines()[0]}") from None


def load_pretrained(recipe: Recipe, model_dir: Path):
    """The base model with a fresh head; refuses a max_length beyond its positions."""
    param_dtype, compute_dtype = recipe.model.dtypes()
    loaded = load_model(model_dir, task=recipe.model.task, num_labels=len(recipe.data.labels),
                        param_dtype=param_dtype, compute_dtype=compute_dtype,
                        attention=resolve_attention(recipe.model.attention, compute_dtype),
                        seed=recipe.train.seed)
    limit = loaded.config.max_position_embeddings
    if recipe.data.max_length > limit:
        raise UserError(f"data.max_length: {recipe.data.max_length} is more than the "
                        f"{limit} positions the model {recipe.model.source} has")
    return loaded


def _stats(stats) -> dict:
    return json.loads(json.dumps(asdict(stats), default=str))


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    transient=False)

