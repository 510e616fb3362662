"""`runner run RECIPE|RUN_DIR`: a recipe in, a run folder out, in the order of
the five steps.

    the sources -> 3. the base model -> 2. the data -> 1. the method (adapt)
      -> 5. evaluate before -> 4. train (checkpoints) -> 5. evaluate after
      -> the report

A run can stop and go on. `runner run RECIPE` resumes the newest run made with
the same recipe when it did not finish and holds a checkpoint
(`resume_target`; a changed recipe is a new run), after checking that
nothing else it depends on changed: the base model (fingerprint) and the data
(sizes and label counts). SIGTERM or Ctrl-C during training writes a
checkpoint at the next step boundary and raises `Interrupted` (a second one
raises it at once, or as the checkpoint being written ends); a resumed run
then replays nothing it had done: it reuses the "before" evaluation, keeps
the metrics lines up to the checkpoint and goes on from the checkpoint's step
with the same batches and dropout keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape

from jaxlora import runtime
from jaxlora.checkpoint import Checkpointer, CheckpointWriteError
from jaxlora.data import MAX_LISTED_VALUES, prepare
from jaxlora.errors import UserError
from jaxlora.generate import stop_ids
from jaxlora.train import Diverged, TrainState, init_state, step_batch, step_counts
from runner import build, libraries, run_folder, xla_cache
from runner import manifest as manifests
from runner.recipe import Recipe, canonical, load_recipe, parse_override, recipe_hash, to_toml
from runner.resume import (RESUMABLE_WORDS, Mode, StoppedRun, check_fingerprint,
                           check_resumable, may_change_on_resume, require_same_data,
                           resume_target)
from runner.session import Built, Session
from runner.signals import Interrupted, StopSignals


def main(args, console: Console, stop: StopSignals) -> int:
    """The command line's target: a recipe, or a run folder that goes on with
    its own recipe (only the fields `RESUMABLE` allows may be --set)."""
    target = args.target
    if target.is_dir():
        if not run_folder.is_run_dir(target):
            raise UserError(f"{target}: a folder without manifest.json; give a recipe "
                            ".toml file or a run folder (runs/<name>/<timestamp>/)")
        if args.fresh:
            raise UserError(f"{target}: --fresh starts a new run from a recipe file; give "
                            "the recipe instead of a run folder")
        for assignment in args.set:  # a run goes on with its own recipe
            if not may_change_on_resume(parse_override(assignment)[0]):
                raise UserError(f"--set {assignment}: a run folder resumes with its own "
                                f"recipe; only {RESUMABLE_WORDS} may change")
        recipe = load_recipe(target / "recipe.toml", args.set)
        run_dir, recipe_path = target, target / "recipe.toml"
    else:
        recipe, run_dir, recipe_path = load_recipe(target, args.set), None, target
    libraries.set_up()
    mode = "fresh" if args.fresh else "resume" if args.resume else "auto"
    run(recipe, recipe_path, console, mode=mode, run_dir=run_dir, stop=stop, sets=args.set)
    return 0


def run(recipe: Recipe, recipe_path: Path, console: Console, *, mode: Mode = "auto",
        run_dir: Path | None = None, stop: StopSignals | None = None,
        sets: list[str] = ()) -> Path:
    """Run a validated recipe end to end (or go on with `run_dir`); returns the
    run folder. `stop` is the caller's installed `StopSignals` (the CLI's);
    without one, signals keep their default behaviour. `sets`: the --set
    assignments given, which the stop message's command repeats."""
    stop = _joined(recipe, stop or StopSignals())
    if not runtime.primary():  # process 0 speaks for all of them
        console = Console(quiet=True)
    with contextlib.ExitStack() as held:  # the run folder's lock, released however we leave
        # process 0 picks the run folder to go on with (or none) and locks it, for
        # every process: a folder in use stops them all, not process 0 alone
        # labels inferred from the data (none given) become the recipe's: hashed,
        # recorded, compared on resume (so before the run to go on with is chosen)
        recipe, inferred = build.with_labels(recipe, build.base_folder(recipe_path))
        say = lambda line: console.print(escape(line), highlight=False)  # noqa: E731
        target = runtime.agree_path(
            lambda: _locked(held, run_dir or resume_target(recipe, mode, say)))
        held.enter_context(_says_how_to_go_on(target, _command(recipe_path, sets)))
        cache = xla_cache.snapshot()
        placement = build.placement_for(recipe)
        stopped = check_resumable(target, recipe) if target is not None else None
        evals = _evaluated(stopped)
        base = stopped.base if stopped else build.base_folder(recipe_path)
        model_dir = build.model_folder(recipe, base)
        # 3. the base model, each weight straight into its sharding
        loaded = build.load_pretrained(recipe, model_dir, placement, train=True)
        fingerprint = _fingerprint(loaded, model_dir, stopped)
        tokenizer = build.load_tokenizer(model_dir)
        if recipe.model.task == "causal-lm" and recipe.data.answered:  # what "eval" reads
            stop_ids(tokenizer, model_dir, chat=recipe.data.chat)  # refused before any write
        # 2. the data: each process reads and tokenizes its own batch rows' examples
        data, record, shares = _prepared_data(recipe, tokenizer, base, placement, stopped)
        if inferred:  # how, for the manifest (not compared on resume)
            record = {**record, "labels_inferred": inferred}
        # 1. the method (a stopped PiSSA run's residuals from the factors it kept)
        parts = build.adapt(recipe, loaded, placement,
                            run_dir=stopped.run_dir if stopped else None)
        built = Built(placement, base, model_dir, parts, fingerprint, tokenizer, data, record,
                      shares)
        fresh = init_state(parts.trainable, recipe.train, data.train)
        if stopped:  # its folder, its manifest, its latest checkpoint
            run_dir, manifest, state = _go_on(recipe, stopped, built, fresh, console)
        else:  # a new folder, made only now that bad input has been caught
            run_dir, manifest = _start(recipe, recipe_path, built, held, console)
            state = fresh
        session = Session(recipe, recipe_path, console, stop, built, run_dir, manifest, state,
                          evals, cache)
        _opened(session)
        # steps 5, 4, 5 and the report
        return _fine_tune_and_evaluate(session, _command(recipe_path, sets))


def _joined(recipe: Recipe, stop: StopSignals) -> StopSignals:
    """Several processes join before any device use, and stop together: a
    process that stopped alone would leave the others waiting."""
    runtime.initialize(recipe.runtime)
    agreement = runtime.agreed_stop(stop.requested)
    if agreement is not None:
        stop.join_processes(agreement.at_boundary, agreement.notify)
    return stop


@contextlib.contextmanager
def _says_how_to_go_on(run_dir: Path | None, again: str):
    """A stop of a stopped run going on, before its session began (loading,
    reading the checkpoint back): the stop says, as the session's stops do,
    the checkpoint kept and the commands that go on from it."""
    try:
        yield
    except Interrupted as e:
        if run_dir is None or not e.plain:
            raise  # a new run's, or a stop that says it already
        raise Interrupted(e.signum, _interrupted_message(e, run_dir, again)) from None


def _locked(held: contextlib.ExitStack, run_dir: Path | None) -> Path | None:
    """`run_dir`, its lock held (by the calling process, process 0) until `held` closes."""
    if run_dir is not None:
        held.enter_context(run_folder.lock_run(run_dir))
    return run_dir


def _evaluated(stopped: StoppedRun | None) -> dict:
    """What a stopped run evaluated already (process 0 reads it for all, before
    anything in the folder changes: a damaged eval.json refuses the resume as is)."""
    evals: dict = {}
    if stopped:
        path = stopped.run_dir / "eval.json"
        runtime.agree_check(lambda: evals.update(run_folder.read_json(path))
                            if path.is_file() else None)
    return evals


def _fingerprint(loaded, model_dir: Path, stopped: StoppedRun | None) -> str:
    """The base model's fingerprint: hashing reads every byte of the checkpoint,
    so process 0 does it for all; a stopped run's must match."""
    found = runtime.agree_text(loaded.fingerprint if runtime.primary() else None)
    if stopped:
        check_fingerprint(model_dir, found, stopped.manifest, stopped.run_dir)
    return found


def _prepared_data(recipe: Recipe, tokenizer, base: Path, placement: runtime.Placement,
                   stopped: StoppedRun | None) -> tuple:
    """Step 2: the data, its manifest record and every process's share; bad
    data in one process's share stops them all, and a stopped run's data must
    be the same."""
    prompts = recipe.eval.exact_match_examples if recipe.data.answered else 0
    data = prepare(recipe.data, tokenizer, task=recipe.model.task, base_dir=base,
                   train_hosting=placement.hosting(step_batch(recipe.train)),
                   eval_hosting=placement.hosting(recipe.eval.batch_size), prompts=prompts)
    shares = runtime.gather(np.array([data.train.held, data.eval.held]))
    record = manifests.data_record(data.stats)
    if stopped:  # process 0's view of the data for all: a hub dataset's path is a host's own
        runtime.agree_check(lambda: require_same_data(
            stopped.run_dir, stopped.manifest, record,
            "resuming needs the same data: restore it, or pass --fresh"))
    return data, record, shares


def _start(recipe: Recipe, recipe_path: Path, built: Built, held: contextlib.ExitStack,
           console: Console) -> tuple[Path, dict]:
    """A new run folder, locked, with its recipe.toml and manifest."""
    run_dir = runtime.agree_path(
        lambda: run_folder.new_run_dir(Path(recipe.output.dir), recipe.name), new=True)
    runtime.agree_path(lambda: _locked(held, run_dir))
    _write_before_training(run_dir, lambda: run_folder.write_atomic(run_dir / "recipe.toml",
                                                                    to_toml(recipe)))
    _write_before_training(run_dir, lambda: build.keep_start(run_dir, built.parts))
    manifest = manifests.begin(canonical(recipe), recipe_hash(recipe), recipe_path.resolve(),
                               built.base, manifests.runtime_record(built.placement, built.shares))
    manifest["model"] = built.parts.record(built.model_dir, built.fingerprint)
    manifest["data"] = built.data_record
    console.print(f"run folder: [bold]{run_dir}[/]")
    _write_manifest(recipe, run_dir, manifest, built)
    return run_dir, manifest


def _go_on(recipe: Recipe, stopped: StoppedRun, built: Built, fresh: TrainState,
           console: Console) -> tuple[Path, dict, TrainState]:
    """The stopped run's folder, its train state from the latest checkpoint (an
    array spread over the processes comes back straight into its shards), and
    its manifest with this session's entry."""
    run_dir, manifest, placement = stopped.run_dir, stopped.manifest, built.placement
    shard = placement.shard_trainable
    with Checkpointer(run_dir / run_folder.CHECKPOINTS) as checkpointer:
        state, _ = checkpointer.restore(fresh, shardings=dataclasses.replace(
            fresh, trainable=placement.shardings(fresh.trainable, shard),
            opt_state=placement.shardings(fresh.opt_state, shard),
            dropout_key=placement.replicated()))
    manifests.resumed(manifest, state.step, manifests.runtime_record(placement, built.shares),
                      stopped.layout_changes)
    if stopped.layout_changes:  # the run goes on under another device layout: its recipe says so
        manifest["recipe"], manifest["recipe_hash"] = canonical(recipe), recipe_hash(recipe)
        console.print(f"layout changed: {'; '.join(stopped.layout_changes)}")
    # process 0 reads and rewrites it for all: a damaged line or a failed write
    # stops every process
    _write_before_training(run_dir, lambda: run_folder.keep_metrics_until(
        run_dir / run_folder.METRICS, state.step))
    steps, _ = step_counts(recipe.train, built.data.train)
    console.print(f"resuming [bold]{run_dir}[/] from its checkpoint at step {state.step} of "
                  f"{steps}")
    _write_manifest(recipe, run_dir, manifest, built)
    # after the manifest: recipe.toml is the recipe the run goes on with
    _write_before_training(run_dir, lambda: run_folder.write_atomic(run_dir / "recipe.toml",
                                                                    to_toml(recipe)))
    return run_dir, manifest, state


def _write_manifest(recipe: Recipe, run_dir: Path, manifest: dict, built: Built) -> None:
    """The manifest of a session about to train: status running, its step count."""
    steps, _ = step_counts(recipe.train, built.data.train)
    manifest["status"] = "running"
    manifest["train"] = {**manifest.get("train", {}), "total_steps": steps}
    _write_before_training(run_dir, lambda: manifests.write(run_dir, manifest))


def _write_before_training(run_dir: Path, write: Callable[[], None]) -> None:
    """One of the writes (process 0's) that open a run or a session: a full disk
    or a quota there is a message naming the file, on every process, and what
    the folder held stays (each file is replaced whole or not at all)."""
    try:
        runtime.agree_check(write)
    except OSError as e:
        raise UserError(f"{e.filename or run_dir}: cannot write: {e.strerror}; nothing was "
                        "trained in this session. Free space, then run the same command "
                        "again") from None


def _opened(session: Session) -> None:
    """What the run starts with, in two lines (and a note where a setting is not applied)."""
    record = session.built.data_record
    long, empty = record.get("too_long") or {}, record.get("empty_texts") or {}
    dropped = ([f"{long['train']} train / {long['eval']} eval rows too long for max_length"]
               if any(long.values()) else [])
    dropped += [f"{', '.join(f'{n} {split}' for split, n in empty.items())} rows without "
                "text"] if empty else []
    dropped = f" ({'; '.join(dropped)}, dropped)" if dropped else ""
    session.console.print(f"data: {record['train_size']} train / {record['eval_size']} eval "
                          f"examples{dropped}; trainable parameters: "
                          f"{session.manifest['model']['trainable_params']:,}")
    if record.get("labels_inferred"):
        names = record["label_names"]
        shown = ", ".join(names[:MAX_LISTED_VALUES]) + (
            f", ... ({len(names)} in all)" if len(names) > MAX_LISTED_VALUES else "")
        session.console.print(f"labels: {shown} (inferred: {record['labels_inferred']})")
    skipped = build.attention_dropout_skipped(session.recipe,
                                              session.built.parts.loaded.config)
    if skipped:
        session.console.print(f"attention: cuDNN's fused kernel, which has no dropout: the "
                              f"model's attention dropout ({skipped:g}) is not applied; "
                              'model.attention = "xla" applies it')


def _command(recipe_path: Path, sets: list[str]) -> str:
    """`runner run RECIPE --set ...`: the command that runs the same recipe again."""
    return shlex.join(["runner", "run", str(recipe_path),
                       *(word for s in sets for word in ("--set", s))])


def _fine_tune_and_evaluate(session: Session, again: str) -> Path:
    """Steps 5, 4, 5 and the report; any failure on the way is
    one message, and the run folder keeps what lets it go on (`again`: the
    command that runs the recipe again, for the stop message)."""
    with _failures_reported(session, again):
        with session.open_files():
            before = session.evaluate_before()  # 5. the base model
            result = session.train()  # 4. fine-tune
            after = session.evaluate_after(result)  # 5. the fine-tuned model
        session.finish(result, before, after)
    return session.run_dir


@contextlib.contextmanager
def _failures_reported(session: Session, again: str) -> Iterator[None]:
    """Training's failures as one message each, with the run marked in its
    manifest: diverged, a checkpoint or a file that could not be written, a
    signal."""
    run_dir, manifest = session.run_dir, session.manifest
    try:
        yield
    except Diverged as e:
        steps = run_folder.checkpoint_steps(run_dir)
        session.mark("diverged", {"step": e.step, "what": e.what, "at": manifests.now(),
                                  "checkpoint_step": steps[-1] if steps else None})
        kept = (f"the last good checkpoint, step {steps[-1]}, is the latest in "
                f"{run_dir / run_folder.CHECKPOINTS}" if steps
                else "no checkpoint was written before it")
        before = _before_loss(run_dir)
        hint = (f"the base model's eval loss was already {before} before training: check the "
                f"weights of model.source" if before is not None and not math.isfinite(before)
                else "try a lower train.learning_rate, or max_grad_norm")
        raise UserError(f"train: {e} ({hint}); {kept}") from None
    except CheckpointWriteError as e:
        kept = (f"the previous checkpoint, step {e.kept}, is intact and the latest"
                if e.kept is not None else "no earlier checkpoint exists")
        session.mark("failed", {"step": e.step, "reason": e.reason, "at": manifests.now(),
                                "checkpoint_step": e.kept}, if_possible=True)
        raise UserError(f"checkpoint: {e}; {kept}. Free space in {run_dir.parent}, then "
                        f"`runner run {run_dir}` goes on from it") from None
    except OSError as e:  # a full disk or a quota while writing the run folder's files
        steps = run_folder.checkpoint_steps(run_dir)
        session.mark("failed", {"reason": e.strerror, "at": manifests.now(),
                                "checkpoint_step": steps[-1] if steps else None},
                     if_possible=True)
        then = (f"the checkpoint of step {steps[-1]} is intact. Free space, then "
                f"`runner run {run_dir}` goes on" if steps else
                "no checkpoint was written yet. Free space, then run the same command again")
        raise UserError(f"{e.filename or run_dir}: cannot write: {e.strerror}; {then}") from None
    except Interrupted as e:
        if manifest["status"] == "finished":  # the signal came as the run was ending
            raise Interrupted(e.signum, f"interrupted by {e.name} after the run finished; "
                              f"everything is in {run_dir}") from None
        steps = run_folder.checkpoint_steps(run_dir)
        session.mark("interrupted", {"signal": e.name, "at": manifests.now(),
                                     "checkpoint_step": (steps or [None])[-1]})
        raise Interrupted(e.signum, _interrupted_message(e, run_dir, again)) from None


def _before_loss(run_dir: Path) -> float | None:
    """The eval loss of the base model, when the run evaluated it."""
    path = run_dir / "eval.json"
    before = (run_folder.read_json(path).get("before") if path.is_file() else None) or {}
    return before.get("loss")


def _interrupted_message(e: Interrupted, run_dir: Path, again: str) -> str:
    """What a stop says: the checkpoint kept, and the commands that go on from
    it (`again`, the command with its --set flags, resumes as well)."""
    steps = run_folder.checkpoint_steps(run_dir)
    if not steps:
        return f"interrupted by {e.name} before the first checkpoint; `{again}` starts again"
    return (f"interrupted by {e.name}: checkpoint at step {steps[-1]} saved in "
            f"{run_dir / run_folder.CHECKPOINTS / str(steps[-1])}; to go on: `runner run "
            f"{shlex.quote(str(run_dir))}`, or `{again}` (without --fresh)")
