"""The pipeline: a recipe in, a run folder out, in the order of the five steps.

    resolve sources -> load model -> build data -> adapt -> evaluate before
      -> train (checkpoints) -> evaluate after -> save and report

A run can stop and go on. `runner run RECIPE` resumes the newest run of that
recipe when it did not finish and holds a checkpoint (`resume_target`), after
checking that nothing it depends on changed: the recipe (hash), the base model
(fingerprint) and the data (sizes and label counts). SIGTERM or Ctrl-C during
training writes a checkpoint at the next step boundary and raises
`Interrupted`; a resumed run then replays nothing it had done: it reuses the
"before" evaluation, keeps the metrics lines up to the checkpoint and goes on
from the checkpoint's step with the same batches and dropout keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal

import jax
import numpy as np
from flax import nnx
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from jaxlora import runtime, sources
from jaxlora.checkpoint import Checkpointer, CheckpointWriteError
from jaxlora.data import ORDER, prepare
from jaxlora.errors import UserError
from jaxlora.evaluate import build_eval_step, evaluate, exact_match
from jaxlora.lora import adapt, count_params, without_adapters
from jaxlora.models import load_model
from jaxlora.models.weights import Place
from jaxlora.models.layers import resolve_attention, set_remat
from jaxlora.quant import bits_per_parameter, footprint
from jaxlora.tasks import STEP_LOSSES
from jaxlora.train import Diverged, fit, init_state, plan, step_batch
from runner import report, xla_cache
from runner.recipe import Recipe, canonical, recipe_hash, to_toml
from runner.runs import (CHECKPOINTS, base_dir, checkpoint_steps, is_run_dir, lock_run,
                         newest_run, read_json, read_manifest, require_checkpoint,
                         require_same_data, require_same_recipe)
from runner.signals import Interrupted, StopSignals
from runner.tensorboard import EventLog

Mode = Literal["auto", "fresh", "resume"]


def resume_target(recipe: Recipe, mode: Mode) -> Path | None:
    """The run folder `runner run` goes on with, or None for a new run.

    auto: the newest run of this recipe, if it did not finish and holds a
    checkpoint. resume: the same, and an error when there is none. fresh: None.
    """
    if mode == "fresh":
        return None
    newest = newest_run(Path(recipe.output.dir), recipe.name)
    if newest is not None and checkpoint_steps(newest):
        if read_json(newest / "manifest.json").get("status") != "finished":
            return newest
    if mode == "resume":
        where = Path(recipe.output.dir) / recipe.name
        raise UserError(f"--resume: no unfinished run with a checkpoint to resume: the newest "
                        f"run under {where} is {newest or 'missing'}"
                        + (" and it finished" if newest and checkpoint_steps(newest) else ""))
    return None


def check_resumable(run_dir: Path, recipe: Recipe) -> tuple[dict, list[str]]:
    """The manifest of `run_dir` and the recipe's changes of device layout, if
    `recipe` may go on there; a UserError otherwise."""
    manifest = read_manifest(run_dir)
    if manifest.get("status") == "finished":
        raise UserError(f"{run_dir}: the run finished; nothing to resume (`runner run RECIPE "
                        "--fresh` starts a new run)")
    require_checkpoint(run_dir, "nothing to resume from: the run stopped before its first "
                                "one; start a new run with --fresh")
    if manifest.get("data", {}).get("order") != ORDER:  # a run made by an earlier jaxlora
        raise UserError(f"{run_dir}: made by an earlier jaxlora, which ordered the batches "
                        "otherwise: resumed, it would repeat some examples of its epoch and "
                        "skip others; pass --fresh to train it anew")
    layout = require_same_recipe(
        run_dir, manifest, recipe, "resuming needs the same recipe (only [runtime], the device "
                                   "layout, may change): undo the change, or pass --fresh to "
                                   "start a new run")
    return manifest, layout


def runtime_record(placement: runtime.Placement, shares: np.ndarray) -> dict:
    """The manifest's record of the devices this session runs on; with several
    processes also how many train and eval examples each one read (`shares`:
    every process's (train, eval) counts)."""
    record = {"processes": jax.process_count(), "mesh": dict(placement.mesh.shape),
              "devices": placement.devices}
    if len(shares) > 1:
        record["examples_per_process"] = {"train": [int(n) for n in shares[:, 0]],
                                          "eval": [int(n) for n in shares[:, 1]]}
    return record


def recipe_base(recipe_path: Path) -> Path:
    """The folder a recipe's relative sources are read from: its own, except for
    the resolved recipe.toml of a run folder, whose sources stay where that run
    found them (so `runner run RUN_DIR/recipe.toml --fresh` runs it again)."""
    folder = recipe_path.resolve().parent
    if is_run_dir(folder):
        return base_dir(read_manifest(folder), folder)
    return folder


def check_fingerprint(model_dir: Path, found: str, manifest: dict, run_dir: Path) -> None:
    """Refuse a base model whose files (fingerprint `found`, computed by
    process 0 and shared with the others) differ from the ones the run trained on."""
    expected = manifest.get("model", {}).get("fingerprint")
    if expected and found != expected:
        raise UserError(f"{model_dir}: the base model's files differ from the ones run "
                        f"{run_dir} was trained on (fingerprint {found[:16]} here, "
                        f"{expected[:16]} in its manifest); its adapters only fit that model")


def run(recipe: Recipe, recipe_path: Path, console: Console, *, mode: Mode = "auto",
        run_dir: Path | None = None, stop: StopSignals | None = None) -> Path:
    """Run a validated recipe end to end (or go on with `run_dir`); returns the run folder.

    `stop` is the caller's installed `StopSignals` (the CLI's); without one,
    signals keep their default behaviour.
    """
    stop = stop or StopSignals()  # not installed: never requested
    runtime.initialize(recipe.runtime)  # several processes: join them before any device use
    agreement = runtime.agreed_stop(stop.requested)
    if agreement is not None:  # a process that stopped alone would leave the others waiting
        stop.join_processes(agreement.at_boundary, agreement.notify)
    if not report.primary():  # process 0 speaks for all of them
        console = Console(quiet=True)
    with contextlib.ExitStack() as held:  # the run folder's lock, released however we leave
        # process 0 picks the run folder to go on with (or none) and locks it, for
        # every process: a folder in use stops them all, not process 0 alone
        target = runtime.agree_path(lambda: _locked(held, run_dir or resume_target(recipe, mode)))
        return _run(recipe, recipe_path, console, target, stop, held)


def placement_for(recipe: Recipe) -> runtime.Placement:
    """The run's mesh and layout (`runner run` and `runner plan` alike); a
    UserError naming the field for a batch the mesh does not divide."""
    placement = runtime.make_placement(recipe.runtime,
                                       full_fine_tuning=recipe.adapter.method == "full")
    placement.check_batch("train.batch_size", recipe.train.batch_size)
    placement.check_batch("eval.batch_size", recipe.eval.batch_size)
    return placement


def _locked(held: contextlib.ExitStack, run_dir: Path | None) -> Path | None:
    """`run_dir`, its lock held (by the calling process, process 0) until `held` closes."""
    if run_dir is not None:
        held.enter_context(lock_run(run_dir))
    return run_dir


def _run(recipe: Recipe, recipe_path: Path, console: Console, run_dir: Path | None,
         stop: StopSignals, held: contextlib.ExitStack) -> Path:
    cache = jax.config.jax_compilation_cache_dir
    cached = xla_cache.entries(Path(cache) if cache else None)
    placement = placement_for(recipe)
    primary = report.primary()
    old, layout = check_resumable(run_dir, recipe) if run_dir is not None else (None, [])
    # What a stopped run evaluated already (process 0 reads it for all, before
    # anything in the folder changes: a damaged eval.json refuses the resume as is)
    evals: dict = {}
    if old:
        evals_path = run_dir / "eval.json"
        runtime.agree_check(lambda: evals.update(read_json(evals_path))
                            if evals_path.is_file() else None)
    base = base_dir(old, run_dir) if old else recipe_base(recipe_path)
    model_dir = sources.resolve(recipe.model.source, "model", base)
    # Each base weight goes straight into its sharding: a process copies only
    # its own devices' slices out of the checkpoint.
    loaded = load_pretrained(recipe, model_dir, place=placement.place_weight)
    set_remat(loaded.model, recipe.train.remat)
    # Hashing reads every byte of the checkpoint: process 0 does it for all.
    model_fingerprint = runtime.agree_text(loaded.fingerprint if primary else None)
    if old:
        check_fingerprint(model_dir, model_fingerprint, old, run_dir)
    tokenizer = load_tokenizer(model_dir)
    # Each process reads and tokenizes only the examples of its own batch rows;
    # bad data in one process's share stops them all.
    prompts = recipe.eval.exact_match_examples if recipe.data.pairs else 0
    data = prepare(recipe.data, tokenizer, task=recipe.model.task, base_dir=base,
                   train_hosting=placement.hosting(step_batch(recipe.train)),
                   eval_hosting=placement.hosting(recipe.eval.batch_size), prompts=prompts)
    shares = runtime.gather(np.array([data.train.held, data.eval.held]))
    stats = data_stats(data.stats)
    if old:  # process 0's view of the data for all: a hub dataset's path is a host's own
        runtime.agree_check(lambda: require_same_data(
            run_dir, old, stats, "resuming needs the same data: restore it, or pass --fresh"))
    base_params = count_params(nnx.state(loaded.model))  # before 4-bit packing
    key = jax.random.key(recipe.train.seed)
    graphdef, trainable, frozen, adapted = adapt(
        loaded.model, recipe.adapter, loaded.lora_targets, jax.random.fold_in(key, 2),
        sharding=placement.frozen_sharding)
    state = init_state(trainable, recipe.train, data.train)
    steps, _ = plan(recipe.train, data.train)
    resumed = None
    if old:
        shard = placement.shard_trainable
        with Checkpointer(run_dir / CHECKPOINTS) as checkpointer:
            # an array spread over the processes comes back straight into its shards
            resumed, _ = checkpointer.restore(state, shardings=dataclasses.replace(
                state, trainable=placement.shardings(state.trainable, shard),
                opt_state=placement.shardings(state.opt_state, shard),
                dropout_key=placement.replicated()))
        manifest = old
        # each session's devices: the top-level records are the first session's
        # environment and the current layout
        manifest["runtime"] = runtime_record(placement, shares)
        resumed_entry = {"from_step": resumed.step, "at": _now(),
                         "runtime": dict(manifest["runtime"])}  # a copy: the run adds to its own
        environment = report.environment()
        if environment != manifest.get("environment"):
            resumed_entry["environment"] = environment
        if layout:  # the run goes on under another device layout: its recipe says so now
            resumed_entry["layout_changes"] = layout
            manifest["recipe"], manifest["recipe_hash"] = canonical(recipe), recipe_hash(recipe)
            console.print(f"layout changed: {'; '.join(layout)}")
        manifest.setdefault("resumed", []).append(resumed_entry)
        # process 0 reads and rewrites it for all: a damaged line or a failed
        # write stops every process
        _writing_starts(run_dir, lambda: _keep_metrics_until(run_dir / "metrics.jsonl",
                                                             resumed.step))
        console.print(f"resuming [bold]{run_dir}[/] from its checkpoint at step "
                      f"{resumed.step} of {steps}")
    else:
        # Bad input has been caught by now: only then is a run folder made.
        run_dir = runtime.agree_path(
            lambda: report.new_run_dir(Path(recipe.output.dir), recipe.name), new=True)
        runtime.agree_path(lambda: _locked(held, run_dir))
        _writing_starts(run_dir, lambda: report.write_atomic(run_dir / "recipe.toml",
                                                             to_toml(recipe)))
        manifest = {"status": "running", "recipe_hash": recipe_hash(recipe),
                    "recipe_file": str(recipe_path.resolve()), "base_dir": str(base),
                    "recipe": canonical(recipe), "environment": report.environment(),
                    "runtime": runtime_record(placement, shares)}
        manifest["model"] = {"source": str(model_dir), "fingerprint": model_fingerprint,
                             "trainable_params": count_params(trainable),
                             "total_params": base_params + count_params(
                                 nnx.state(loaded.model, nnx.LoRAParam)),
                             "adapted_layers": adapted, "ignored_keys": loaded.ignored_keys,
                             **footprint(frozen),
                             "bits_per_quantized_param": bits_per_parameter(
                                 loaded.model.linear_layers())}
        manifest["data"] = stats
        console.print(f"run folder: [bold]{run_dir}[/]")
    manifest["status"] = "running"
    manifest["train"] = {**manifest.get("train", {}), "total_steps": steps}
    _writing_starts(run_dir, lambda: report.write_json(run_dir / "manifest.json", manifest))
    if resumed:  # after the manifest: recipe.toml is the recipe the run goes on with
        _writing_starts(run_dir, lambda: report.write_atomic(run_dir / "recipe.toml",
                                                             to_toml(recipe)))
    console.print(f"data: {stats['train_size']} train / {stats['eval_size']} eval examples; "
                  f"trainable parameters: {manifest['model']['trainable_params']:,}")
    skipped = attention_dropout_skipped(recipe, loaded.config)
    if skipped:
        console.print(f"attention: cuDNN's fused kernel, which has no dropout: the model's "
                      f"attention dropout ({skipped:g}) is not applied; model.attention = "
                      '"xla" applies it')
    try:
        return _train_and_evaluate(recipe, console, stop, run_dir, manifest, graphdef, frozen,
                                   data, state, resumed, evals, tokenizer,
                                   getattr(loaded.model, "position_limit", None),
                                   (cache, cached), placement)
    except Diverged as e:
        steps = checkpoint_steps(run_dir)
        manifest["status"] = "diverged"
        manifest["diverged"] = {"step": e.step, "what": e.what, "at": _now(),
                                "checkpoint_step": steps[-1] if steps else None}
        report.write_json(run_dir / "manifest.json", manifest)
        kept = (f"the last good checkpoint, step {steps[-1]}, is the latest in "
                f"{run_dir / CHECKPOINTS}" if steps else "no checkpoint was written before it")
        before = _before_loss(run_dir)
        hint = (f"the base model's eval loss was already {before} before training: check the "
                f"weights of model.source" if before is not None and not math.isfinite(before)
                else "try a lower train.learning_rate, or max_grad_norm")
        raise UserError(f"train: {e} ({hint}); {kept}") from None
    except CheckpointWriteError as e:
        kept = (f"the previous checkpoint, step {e.kept}, is intact and the latest"
                if e.kept is not None else "no earlier checkpoint exists")
        _note_failure(run_dir, manifest, {"step": e.step, "reason": e.reason, "at": _now(),
                                          "checkpoint_step": e.kept})
        raise UserError(f"checkpoint: {e}; {kept}. Free space in {run_dir.parent}, then "
                        f"`runner run {run_dir}` goes on from it") from None
    except OSError as e:  # a full disk or a quota while writing the run folder's files
        steps = checkpoint_steps(run_dir)
        _note_failure(run_dir, manifest, {"reason": e.strerror, "at": _now(),
                                          "checkpoint_step": steps[-1] if steps else None})
        then = (f"the checkpoint of step {steps[-1]} is intact. Free space, then "
                f"`runner run {run_dir}` goes on" if steps else
                "no checkpoint was written yet. Free space, then run the same command again")
        raise UserError(f"{e.filename or run_dir}: cannot write: {e.strerror}; {then}") from None
    except Interrupted as e:
        if manifest["status"] == "finished":  # the signal came as the run was ending
            raise Interrupted(e.signum, f"interrupted by {e.name} after the run finished; "
                              f"everything is in {run_dir}") from None
        manifest["status"] = "interrupted"
        manifest["interrupted"] = {"signal": e.name, "at": _now(),
                                   "checkpoint_step": (checkpoint_steps(run_dir) or [None])[-1]}
        report.write_json(run_dir / "manifest.json", manifest)
        raise Interrupted(e.signum, _interrupted_message(e, run_dir, recipe_path)) from None


def _writing_starts(run_dir: Path, write: Callable[[], None]) -> None:
    """One of the writes (process 0's) that open a run or a session: a full disk
    or a quota there is a message naming the file, on every process, and what
    the folder held stays (each file is replaced whole or not at all)."""
    try:
        runtime.agree_check(write)
    except OSError as e:
        raise UserError(f"{e.filename or run_dir}: cannot write: {e.strerror}; nothing was "
                        "trained in this session. Free space, then run the same command "
                        "again") from None


def _train_and_evaluate(recipe, console, stop, run_dir, manifest, graphdef, frozen, data, state,
                        resumed, evals, tokenizer, position_limit, cache, placement) -> Path:
    task = recipe.model.task
    eval_step = build_eval_step(graphdef, task, placement)
    frozen = placement.put(frozen, True)  # FSDP-sharded over the mesh when fsdp > 1
    evals_path = run_dir / "eval.json"
    # process 0's copy (`evals`) decides whether "eval before" (every process's
    # work) is due: on a network filesystem another host may not see the file yet
    have_before = runtime.agree_text("yes" if evals.get("before") is not None else "no") == "yes"
    extra = {"recipe_hash": manifest["recipe_hash"],
             "fingerprint": manifest["model"]["fingerprint"]}
    events, log = None, None
    with contextlib.ExitStack() as open_files:
        def open_logs() -> None:  # process 0's files: one it cannot open stops every process
            nonlocal events, log
            log = open_files.enter_context((run_dir / "metrics.jsonl").open("a", encoding="utf-8"))
            if recipe.output.tensorboard:
                events = EventLog(run_dir, resumed_from=resumed.step if resumed else None)
                open_files.callback(events.close)
        runtime.agree_check(open_logs)
        if log is None:  # the other processes
            log = open_files.enter_context(Path(os.devnull).open("a", encoding="utf-8"))
        progress = open_files.enter_context(_progress(console))
        ckpt = open_files.enter_context(
            Checkpointer(run_dir / CHECKPOINTS, keep=recipe.train.keep_checkpoints))

        def write(record: dict) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()

        def on_log(record: dict) -> None:
            def log_it() -> None:
                write(record)
                if events is not None:
                    events.train(record)
            runtime.agree_check(log_it)  # a failed write stops every process

        def on_evaluate(step: int, trainable) -> None:
            metrics = _evaluate(recipe, eval_step, graphdef, trainable, frozen, data,
                                progress, f"eval at step {step}", tokenizer, position_limit,
                                placement, during_training=True)

            def log_it() -> None:
                write({"step": step, "eval": report.scalars(metrics)})
                if events is not None:
                    events.eval(step, metrics)
            runtime.agree_check(log_it)  # a failed write stops every process

        before = evals.get("before")
        if recipe.eval.before and not have_before:
            before = _evaluate(recipe, eval_step, graphdef,
                               placement.put(without_adapters(state.trainable),
                                             placement.shard_trainable),
                               frozen, data, progress, "eval before", tokenizer, position_limit,
                               placement)
            def log_before() -> None:
                report.write_json(evals_path, {"before": before})
                if events is not None:
                    events.eval(0, before)
            runtime.agree_check(log_before)
        with stop.deferred():
            result = fit(graphdef, state.trainable, frozen, data.train, recipe.train,
                         STEP_LOSSES[task], resume=resumed or state, on_log=on_log,
                         on_checkpoint=lambda s: ckpt.save(s, extra),
                         checkpoint_every=recipe.train.checkpoint_every,
                         on_evaluate=on_evaluate, evaluate_every=recipe.eval.every_steps,
                         should_stop=stop.at_step_boundary, progress=progress,
                         placement=placement)
        manifest["train"] = _training_figures(manifest["train"], result, cache)
        # during training, or (one process) just as it ended
        if result.stopped or (stop.requested() and not stop.joined):
            raise Interrupted(stop.signum or signal.SIGTERM)  # joined: a notice from another
        # on disk before "eval after": a run stopped there and resumed keeps them
        runtime.agree_check(lambda: report.write_json(run_dir / "manifest.json", manifest))
        after = _evaluate(recipe, eval_step, graphdef, result.trainable, frozen, data,
                          progress, "eval after", tokenizer, position_limit, placement)
        if events is not None:
            events.eval(result.steps, after)

    peak = report.peak_memory()  # "eval after" included
    if peak["peak_memory_mb"] > manifest["train"]["peak_memory_mb"]:
        manifest["train"].update(peak)
    # what one device held, measured on the placed arrays (runner plan estimates it)
    manifest.setdefault("runtime", {})["per_device_bytes"] = {
        "frozen": runtime.device_bytes(frozen),
        "trainable": runtime.device_bytes(result.trainable),
        "optimizer": runtime.device_bytes(result.opt_state)}
    manifest["status"] = "finished"

    def finish() -> None:  # process 0's writes; a failed one stops every process
        report.write_json(run_dir / "eval.json", {"before": before, "after": after})
        report.write_report(run_dir, manifest, before, after, console)
        # last: a run whose report could not be written is not "finished" on
        # disk, so `runner run RUN_DIR` goes on to write it
        report.write_json(run_dir / "manifest.json", manifest)
    runtime.agree_check(finish)
    return run_dir


def _before_loss(run_dir: Path) -> float | None:
    """The eval loss of the base model, when the run evaluated it."""
    path = run_dir / "eval.json"
    before = (read_json(path).get("before") if path.is_file() else None) or {}
    return before.get("loss")


def _training_figures(earlier: dict, result, cache: tuple) -> dict:
    """The manifest's `train` record once a session has trained. A session that
    trained nothing (resumed after the last step, stopped during "eval after")
    keeps the timings of the one that did; peak memory is the highest of every
    session."""
    figures = {"steps": result.steps, "total_steps": earlier["total_steps"],
               "compile_seconds": result.compile_seconds, "train_seconds": result.train_seconds,
               "median_step_ms": result.median_step_ms, **report.peak_memory(),
               # the persistent compilation cache (runner.xla_cache): no entry
               # added means every compiled function came from it
               "compilation_cache": {"dir": cache[0], "entries_added": (
                   xla_cache.entries(Path(cache[0])) - cache[1] if cache[0] else None)}}
    timings = ("compile_seconds", "train_seconds", "median_step_ms")
    if not result.history:
        figures.update({key: earlier[key] for key in timings if key in earlier})
    if earlier.get("peak_memory_mb", 0) > figures["peak_memory_mb"]:
        figures.update({key: earlier[key] for key in ("peak_memory_mb", "peak_memory_kind")})
    return figures


def _evaluate(recipe, eval_step, graphdef, trainable, frozen, data, progress, description,
              tokenizer, position_limit, placement, *, during_training: bool = False) -> dict:
    """The task's metrics of one model on the eval split; for prompt/response
    data also the exact match of greedy completions of its first prompts, except
    `during_training` (the periodic evaluations: loss curve points, their
    progress bar removed)."""
    task = recipe.model.task
    metrics = evaluate(eval_step, trainable, frozen, data.eval,
                       batch_size=recipe.eval.batch_size,
                       label_names=list(recipe.data.labels or []), progress=progress,
                       description=description, task=task, placement=placement,
                       keep_bar=not during_training)
    if task == "causal-lm" and recipe.data.pairs and recipe.eval.exact_match_examples \
            and not during_training:
        metrics.update(exact_match(graphdef, trainable, frozen, data.prompts,
                                   examples=recipe.eval.exact_match_examples,
                                   eos_id=tokenizer.eos_token_id,
                                   pad_id=tokenizer.pad_token_id or 0,
                                   batch_size=recipe.eval.batch_size,
                                   position_limit=position_limit, placement=placement))
    return metrics


def _note_failure(run_dir: Path, manifest: dict, failure: dict) -> None:
    """Mark the run failed in its manifest, if the disk still takes that much
    (a failed run with a checkpoint is resumed like an interrupted one)."""
    manifest["status"] = "failed"
    manifest["failed"] = failure
    try:
        report.write_json(run_dir / "manifest.json", manifest)
    except OSError:
        pass  # the manifest still says "running": resumable all the same


def _interrupted_message(e: Interrupted, run_dir: Path, recipe_path: Path) -> str:
    steps = checkpoint_steps(run_dir)
    if not steps:
        return (f"interrupted by {e.name} before the first checkpoint; `runner run "
                f"{recipe_path}` starts again")
    return (f"interrupted by {e.name}: checkpoint at step {steps[-1]} saved in "
            f"{run_dir / CHECKPOINTS / str(steps[-1])}; to go on: `runner run {run_dir}`, or "
            f"`runner run {recipe_path}` (without --fresh)")


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop metrics lines past the checkpoint (and a last line cut by a kill):
    the resumed run writes them again, identically. Any other unreadable line
    is damage, refused before anything is written (the lines are the run's
    record up to the checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = report.metrics_record(line)
        except ValueError as e:
            if number == len(lines):
                break  # cut short by a kill
            raise UserError(f"{path}: line {number} is not a metrics record ({e}); "
                            "restore the file, or remove that line, then run again") from None
        if record["step"] > step:
            break
        kept.append(line.decode("utf-8") + "\n")
    report.write_atomic(path, "".join(kept))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load_tokenizer(model_dir: Path):
    """The model folder's fast tokenizer (never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), use_fast=True,
                                             trust_remote_code=False)
    except Interrupted:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed tokenizer file fails in many ways
        # (a list for tokenizer_config.json, a vocab.txt that is not UTF-8, a
        # tokenizer.json without a key: AttributeError, tokenizers' Exception, KeyError)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if not isinstance(e, (OSError, ValueError)):
            detail = f"{type(e).__name__} {detail}".strip()
        raise UserError(f"{model_dir}: cannot load a tokenizer from the model folder: "
                        f"{detail}") from None


def load_pretrained(recipe: Recipe, model_dir: Path, place: Place | None = None):
    """The base model with a fresh head; refuses a max_length beyond its positions.
    `place` puts each base weight on its devices (`jaxlora.models.weights.Place`)."""
    param_dtype, compute_dtype = recipe.model.dtypes()
    labels = recipe.data.labels
    loaded = load_model(model_dir, task=recipe.model.task,
                        num_labels=len(labels) if labels else None,
                        param_dtype=param_dtype, compute_dtype=compute_dtype,
                        attention=resolve_attention(recipe.model.attention, compute_dtype),
                        seed=recipe.train.seed, place=place)
    limit = loaded.config.max_position_embeddings
    if recipe.data.max_length > limit:
        raise UserError(f"data.max_length: {recipe.data.max_length} is more than the "
                        f"{limit} positions the model {recipe.model.source} has")
    return loaded


def attention_dropout_skipped(recipe: Recipe, config) -> float:
    """The model's dropout on attention probabilities where the fused cuDNN
    kernel, which has none, runs attention in training; 0.0 elsewhere."""
    _, compute_dtype = recipe.model.dtypes()
    if resolve_attention(recipe.model.attention, compute_dtype) != "cudnn":
        return 0.0
    return float(config.attention_dropout)


def data_stats(stats) -> dict:
    """`DataStats` as the plain JSON the manifest records (and resume compares)."""
    return json.loads(json.dumps(asdict(stats), default=str))


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    transient=False)

