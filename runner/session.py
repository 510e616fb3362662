"""A run in progress: what `runner run` holds once the recipe's model and data
are built and its run folder is open, and what it does with them (steps 4
and 5): evaluate the base model, train with checkpoints, evaluate the
fine-tuned model, write the report.

    Built     what steps 1-3 made of the recipe, before any file is written
    Session   a run in progress: the recipe, the run folder and its manifest,
              the model parts, the data, the placement, the console, and the
              train state this session starts from

Training's side effects are `jaxlora.train.Hooks`: a metrics line (and
TensorBoard events) per record, a checkpoint every `train.checkpoint_every`
steps, an evaluation every `eval.every_steps`, and the stop check of
SIGTERM / Ctrl-C. With several processes process 0 writes the run folder's
files for all of them, and a write that fails there stops every process
(`jaxlora.runtime.agree_check`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from jaxlora import runtime
from jaxlora.checkpoint import Checkpointer
from jaxlora.data import PreparedData
from jaxlora.answers import judge
from jaxlora.evaluate import Bar, build_eval_step, evaluate, greedy_answers
from jaxlora.generate import stop_ids
from jaxlora.tasks import STEP_LOSSES, majority_baseline
from jaxlora.train import Hook, Hooks, TrainResult, TrainState, fit
from runner import manifest as manifests
from runner import run_folder, xla_cache
from runner.build import ModelParts
from runner.recipe import Recipe
from runner.report import scalars, write_report
from runner.signals import StopSignals
from runner.tensorboard import EventLog
from runner.terminal import progress_bars


def answers_judged(recipe: Recipe) -> bool:
    """Whether an evaluation greedy-answers the first eval prompts and judges
    the answers (causal-lm prompt/response pairs or conversations)."""
    return (recipe.model.task == "causal-lm" and recipe.data.answered
            and bool(recipe.eval.exact_match_examples))


def judged_answers(recipe: Recipe, graphdef, weights: tuple, prompts, tokenizer,
                   model_dir: Path, placement=None) -> dict:
    """Exact match of the greedy answers to the eval `prompts` (a Split: the
    first eval examples, held whole), and with data.labels the scores of the
    labels they name (`jaxlora.answers.judge`). `weights`: (trainable, frozen)."""
    trainable, frozen = weights
    completions, references = greedy_answers(
        graphdef, trainable, frozen, prompts,
        stops=stop_ids(tokenizer, model_dir, chat=recipe.data.chat),
        pad_id=tokenizer.pad_token_id or 0, batch_size=recipe.eval.batch_size,
        placement=placement)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return judge([decode(c) for c in completions], [decode(r) for r in references],
                 recipe.data.labels)


@dataclass(frozen=True)
class Built:
    """What steps 1-3 made of the recipe, before any file of the run is written."""

    placement: runtime.Placement
    base: Path  # the folder relative sources are read from
    model_dir: Path
    parts: ModelParts
    fingerprint: str  # of the base model's files, computed by process 0 for all
    tokenizer: Any
    data: PreparedData
    data_record: dict  # the data's statistics, as the manifest records them
    shares: np.ndarray  # every process's (train, eval) example counts


@dataclass
class Session:
    """A run in progress (see the module docstring)."""

    recipe: Recipe
    recipe_path: Path
    console: Console
    stop: StopSignals
    built: Built
    run_dir: Path
    manifest: dict
    state: TrainState  # where this session's training starts: step 0 or a checkpoint
    evals: dict  # what the stopped run evaluated already ({} for a new run)
    cache: xla_cache.Snapshot  # the compilation cache as the session began
    frozen: Any = field(init=False)  # the frozen weights, placed on the mesh
    _files: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        parts, placement = self.built.parts, self.built.placement
        self.eval_step = build_eval_step(parts.graphdef, self.recipe.model.task, placement)
        self.frozen = placement.put(parts.frozen, True)  # FSDP-sharded over the mesh when fsdp > 1
        # this session's share of the run's timings (`record_timings`)
        self._clock = {"started": time.monotonic(), "eval": 0.0, "compile": 0.0}
        self._earlier = dict(self.manifest.get("timings") or {})

    @property
    def baseline(self) -> dict | None:
        """A classifier's majority-class baseline on the eval rows (see
        `jaxlora.tasks.majority_baseline`); None for a causal LM."""
        record = self.built.data_record
        if self.recipe.model.task != "classification" or not record.get("label_counts"):
            return None
        return majority_baseline(record["label_counts"]["train"], record["label_counts"]["eval"],
                                 record["label_names"])

    def record_timings(self) -> None:
        """The manifest's `timings`: wall, compile and eval seconds summed over
        every session of the run (this one up to now), and the train seconds
        of them all (which training counts itself, from the checkpoint on)."""
        clock, earlier = self._clock, self._earlier
        mine = {"wall_seconds": time.monotonic() - clock["started"],
                "compile_seconds": clock["compile"], "eval_seconds": clock["eval"]}
        timings = {"sessions": int(earlier.get("sessions", 0)) + 1, **{
            key: round(float(earlier.get(key, 0.0)) + value, 3) for key, value in mine.items()}}
        trained = self.manifest.get("train", {}).get("train_seconds",
                                                     earlier.get("train_seconds"))
        if trained is not None:
            timings["train_seconds"] = round(float(trained), 3)
        self.manifest["timings"] = timings

    # -- the files written while training ------------------------------------------

    @contextlib.contextmanager
    def open_files(self) -> Iterator[None]:
        """metrics.jsonl (and the TensorBoard events), the progress bars and the
        checkpoints, for steps 4 and 5."""
        with contextlib.ExitStack() as files:
            def open_logs() -> None:  # process 0's files: one it cannot open stops every process
                path = self.run_dir / run_folder.METRICS
                self._files["log"] = files.enter_context(path.open("a", encoding="utf-8"))
                if self.recipe.output.tensorboard:
                    self._files["events"] = EventLog(
                        self.run_dir, resumed_from=self.state.step if self.state.step else None)
                    files.callback(self._files["events"].close)
            runtime.agree_check(open_logs)
            if "log" not in self._files:  # the other processes
                self._files["log"] = files.enter_context(Path(os.devnull).open("a",
                                                                               encoding="utf-8"))
            self._files["progress"] = files.enter_context(progress_bars(self.console))
            self._files["checkpoints"] = files.enter_context(Checkpointer(
                self.run_dir / run_folder.CHECKPOINTS, keep=self.recipe.train.keep_checkpoints))
            try:
                yield
            finally:
                self._files.clear()

    def _write_line(self, record: dict) -> None:
        log = self._files["log"]
        log.write(json.dumps(record) + "\n")
        log.flush()

    def log(self, record: dict) -> None:
        """A train metrics record: a line of metrics.jsonl (and TensorBoard)."""
        def log_it() -> None:
            self._write_line(record)
            if "events" in self._files:
                self._files["events"].train(record)
        runtime.agree_check(log_it)  # a failed write stops every process

    def log_evaluation(self, step: int, metrics: dict) -> None:
        """An evaluation during training: a line of metrics.jsonl (and TensorBoard)."""
        def log_it() -> None:
            self._write_line({"step": step, "eval": scalars(metrics)})
            if "events" in self._files:
                self._files["events"].eval(step, metrics)
        runtime.agree_check(log_it)  # a failed write stops every process

    # -- steps 4 and 5 -----------------------------------------------------------------

    def evaluate(self, trainable, description: str, *, during_training: bool = False) -> dict:
        """The task's metrics of one model on the eval split; for prompt/response
        data also the exact match of greedy completions of its first prompts,
        except `during_training` (the periodic evaluations: loss curve points,
        their progress bar removed)."""
        began = time.monotonic()
        try:
            return self._evaluate(trainable, description, during_training)
        finally:
            self._clock["eval"] += time.monotonic() - began

    def _evaluate(self, trainable, description: str, during_training: bool) -> dict:
        recipe, data, built = self.recipe, self.built.data, self.built
        metrics = evaluate(self.eval_step, trainable, self.frozen, data.eval,
                           batch_size=recipe.eval.batch_size,
                           label_names=list(recipe.data.labels or []),
                           bar=Bar(self._files["progress"], description,
                                   keep=not during_training))
        if answers_judged(recipe) and not during_training:
            metrics.update(judged_answers(recipe, built.parts.graphdef, (trainable, self.frozen),
                                          data.prompts, built.tokenizer, built.model_dir,
                                          built.placement))
        return metrics

    def evaluate_before(self) -> dict | None:
        """Step 5 on the base model (the adapters as they start), unless the
        stopped run did it already or the recipe says not to; written to
        eval.json at once."""
        before = self.evals.get("before")
        # process 0's copy (`evals`) decides whether it is due (every process's
        # work): on a network filesystem another host may not see the file yet
        done = runtime.agree_text("yes" if before is not None else "no") == "yes"
        if not self.recipe.eval.before or done:
            return before
        placement = self.built.placement
        # the trainable weights as `adapt` made them, with which the model is the
        # base model: B zero (DoRA's magnitudes at their norms), or PiSSA's
        # factors over their residuals (zeroing B there would leave the residuals)
        base = placement.put(self.built.parts.trainable, placement.shard_trainable)
        before = self.evaluate(base, "eval before")

        def log_before() -> None:
            run_folder.write_json(self.run_dir / "eval.json",
                                  {"before": before, "baseline": self.baseline})
            if "events" in self._files:
                self._files["events"].eval(0, before)
        runtime.agree_check(log_before)
        return before

    def train(self) -> TrainResult:
        """Step 4: fine-tune from `state`, checkpoints and evaluations on the way;
        `Interrupted` where a signal stopped it."""
        recipe = self.recipe
        checkpoints = self._files["checkpoints"]
        extra = {"recipe_hash": self.manifest["recipe_hash"],
                 "fingerprint": self.manifest["model"]["fingerprint"]}

        def evaluate_during(step: int, trainable) -> None:
            self.log_evaluation(step, self.evaluate(trainable, f"eval at step {step}",
                                                    during_training=True))

        def save(state: TrainState) -> None:  # a stop during a write waits for its end
            with self.stop.guarded():
                checkpoints.save(state, extra)

        hooks = Hooks(log=self.log,
                      checkpoint=Hook(save, every=recipe.train.checkpoint_every),
                      evaluate=Hook(evaluate_during, every=recipe.eval.every_steps),
                      stop=self.stop.at_step_boundary, progress=self._files["progress"])
        with self.stop.deferred():
            result = fit(self.built.parts.graphdef, self.state, self.frozen,
                         self.built.data.train, recipe.train, STEP_LOSSES[recipe.model.task],
                         hooks=hooks, placement=self.built.placement)
        self.manifest["train"] = manifests.training_record(
            self.manifest["train"], result, runtime.peak_memory(), xla_cache.record(self.cache))
        if result.history:  # a session that trained nothing keeps no timings of its own
            self._clock["compile"] = result.compile_seconds
        self.record_timings()
        # during training, or (one process) just as it ended
        if result.stopped or (self.stop.requested() and not self.stop.joined):
            raise self.stop.interrupted()  # joined: maybe another's notice, as a SIGTERM
        # on disk before "eval after": a run stopped there and resumed keeps them
        runtime.agree_check(lambda: manifests.write(self.run_dir, self.manifest))
        return result

    def evaluate_after(self, result: TrainResult) -> dict:
        """Step 5 on the fine-tuned model."""
        after = self.evaluate(result.trainable, "eval after")
        if "events" in self._files:
            self._files["events"].eval(result.steps, after)
        return after

    def finish(self, result: TrainResult, before: dict | None, after: dict) -> None:
        """eval.json, the report and the finished manifest, written last."""
        train = self.manifest["train"]
        peak = runtime.peak_memory()  # "eval after" included
        if peak["peak_memory_mb"] > train["peak_memory_mb"]:
            train.update(peak)
        # what one device held, measured on the placed arrays (runner plan estimates it)
        self.manifest.setdefault("runtime", {})["per_device_bytes"] = {
            "frozen": runtime.device_bytes(self.frozen),
            "trainable": runtime.device_bytes(result.trainable),
            "optimizer": runtime.device_bytes(result.opt_state)}
        self.manifest["status"] = "finished"
        self.record_timings()
        evals = {"before": before, "after": after, "baseline": self.baseline}

        def write() -> None:  # process 0's writes; a failed one stops every process
            run_folder.write_json(self.run_dir / "eval.json", evals)
            write_report(self.run_dir, self.manifest, evals, self.console)
            # last: a run whose report could not be written is not "finished" on
            # disk, so `runner run RUN_DIR` goes on to write it
            manifests.write(self.run_dir, self.manifest)
        with self.stop.guarded():  # the finished run's files, all of them or none
            runtime.agree_check(write)

    # -- when it fails ---------------------------------------------------------------

    def mark(self, status: str, record: dict, *, if_possible: bool = False) -> None:
        """Mark the run `status` in its manifest with `record` (process 0 writes
        it); `if_possible`: where the disk takes no more, leave it as it was
        (a run that still says "running" is resumed like a failed one)."""
        manifests.mark(self.manifest, status, record)
        self.record_timings()
        if not runtime.primary():
            return
        try:
            manifests.write(self.run_dir, self.manifest)
        except OSError:
            if not if_possible:
                raise
