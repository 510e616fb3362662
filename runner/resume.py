"""Whether a run may go on, and which: the checks `runner run` makes before it
resumes a stopped run, and `open_run` before it rebuilds a run's model.

A run goes on only with everything it depends on unchanged: the recipe (its
hash; the device layout and `train.remat` may change, `RESUMABLE`), the
base model (the fingerprint of its files) and the data (sizes and label
counts), and only from a complete checkpoint. `runner run RECIPE` with a
changed recipe does not resume the recipe's unfinished run: it is a new run
(`resume_target`); `--resume` and `runner run RUN_DIR` refuse the change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from jaxlora.data import ORDER
from jaxlora.errors import UserError
from runner import manifest as manifests
from runner import run_folder
from runner.recipe import Recipe, canonical, recipe_hash

Mode = Literal["auto", "fresh", "resume"]

# What a run may change when it resumes: how it runs, not what it computes. The
# device layout (a mesh of another shape, more hosts) and `train.remat` (what
# the backward pass recomputes, a memory knob): the same numbers either way,
# up to float32 rounding. A run that no longer fits its new devices can go on
# with `remat = "full"` instead of starting again.
RESUMABLE = ("runtime", "train.remat")  # a table, or one field
RESUMABLE_WORDS = "runtime.* (the device layout) and train.remat"
# Defaults that changed without changing what they do: a run recorded with the
# old one goes on under the new (data.encoding "utf-8" became "auto", which
# reads UTF-8 the same way).
SAME_MEANING = (("data.encoding", "utf-8", "auto"),)  # a tuple: changes hold lists


def resume_target(recipe: Recipe, mode: Mode,
                  say: Callable[[str], None] = lambda line: None) -> Path | None:
    """The run folder `runner run` goes on with, or None for a new run.

    auto: the runs of this recipe's name are looked at newest first, those
    made with another recipe (the fields `RESUMABLE` allows aside) passed
    over: the newest made with this recipe decides; it goes on if it did not
    finish and holds a checkpoint, else this is a new run. When no unfinished
    run goes on and a newer one was passed over, `say` tells which and why, in
    one line. resume: the newest unfinished run with a checkpoint (one of this
    recipe first), and an error when there is none (a changed recipe is
    refused later, field by field). fresh: None.
    """
    if mode == "fresh":
        return None
    runs = run_folder.runs_of(Path(recipe.output.dir), recipe.name)
    passed_over: tuple[Path, int, list[str]] | None = None  # the newest unfinished other
    for run in reversed(runs):
        steps = run_folder.checkpoint_steps(run)
        recorded = _recorded(run, steps, newest=run == runs[-1])
        if recorded is None:
            continue  # a manifest that cannot be read: not this recipe's concern
        others = recipe_differences(recorded, recipe)[1]
        finished = recorded.get("status") == "finished"
        if not others:
            if steps and not finished:
                return run
            break  # the newest run of this recipe finished (or has no checkpoint)
        if steps and not finished and passed_over is None:
            passed_over = (run, steps[-1], others)
    if mode == "resume":
        if passed_over is not None:
            return passed_over[0]  # refused field by field by `check_resumable`
        where = Path(recipe.output.dir) / recipe.name
        raise UserError(f"--resume: no unfinished run with a checkpoint to resume under {where}")
    if passed_over is not None:
        run, step, others = passed_over
        say(f"not resuming the unfinished run {run} (checkpoint at step {step}): its recipe "
            f"differs ({'; '.join(others)}); this is a new run (`runner run {run}` goes on "
            "with that one)")
    return None


def _recorded(run: Path, steps: list[int], newest: bool) -> dict | None:
    """The run's manifest, or None where it cannot be read: an older run's, or
    a finished one's (the newest unfinished run's damage is reported, as it
    would be when it is resumed)."""
    try:
        return manifests.read_manifest(run)
    except UserError:
        if not newest or not steps:
            return None
        if run_folder.read_json(run / "manifest.json").get("status") == "finished":
            return None
        raise


@dataclass(frozen=True)
class StoppedRun:
    """A run that `runner run` may go on with, checked: its folder, manifest,
    the device-layout changes of the recipe it goes on with, and the folder
    its sources were resolved from."""

    run_dir: Path
    manifest: dict
    layout_changes: list[str]

    @property
    def base(self) -> Path:
        return manifests.source_folder(self.manifest, self.run_dir)


def check_resumable(run_dir: Path, recipe: Recipe) -> StoppedRun:
    """`run_dir` as a `StoppedRun`, if `recipe` may go on there; a UserError
    otherwise."""
    manifest = manifests.read_manifest(run_dir)
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
    return StoppedRun(run_dir, manifest, layout)


def recipe_changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(field, old, new) for every leaf that differs between two canonical recipes."""
    changes = []
    for key in sorted(set(old) | set(new)):
        where = f"{prefix}{key}"
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += recipe_changes(a, b, f"{where}.")
        elif a != b:
            changes.append((where, a, b))
    return changes


def as_read_now(recorded: dict) -> dict:
    """A run's recorded recipe as this version reads it: fields added since it
    was made take their defaults (a recipe that no longer validates is
    compared as recorded)."""
    try:
        return canonical(Recipe.model_validate(recorded))
    except (ValidationError, TypeError):
        return recorded


def may_change_on_resume(field: str) -> bool:
    """Whether the recipe field `field` (dotted) may differ when a run resumes."""
    return any(field == f or field.startswith(f"{f}.") for f in RESUMABLE)


def recipe_differences(manifest: dict, recipe: Recipe) -> tuple[list[str], list[str]]:
    """How `recipe` differs from the run's recorded one, as "field: old -> new":
    (the changes `may_change_on_resume` allows, the others)."""
    if manifest.get("recipe_hash") == recipe_hash(recipe):
        return [], []
    # fields added since the run was made are compared at their defaults
    changes = [change for change in recipe_changes(as_read_now(manifest.get("recipe", {})),
                                                   canonical(recipe))
               if change not in SAME_MEANING]
    layout, others = [], []
    for field, old, new in changes:
        (layout if may_change_on_resume(field) else others).append(f"{field}: {old!r} -> {new!r}")
    return layout, others


def require_same_recipe(run_dir: Path, manifest: dict, recipe: Recipe, advice: str) -> list[str]:
    """Refuse a recipe that differs from the run's, naming each changed field,
    except where `may_change_on_resume` allows: returns those changes."""
    layout, others = recipe_differences(manifest, recipe)
    if others:
        raise UserError(f"{run_dir}: the recipe differs from the one this run was made with "
                        f"({'; '.join(others)}); {advice}")
    return layout


def require_checkpoint(run_dir: Path, advice: str) -> list[int]:
    """The run's checkpoint steps; a UserError if it has none."""
    steps = run_folder.checkpoint_steps(run_dir)
    if not steps:
        raise UserError(f"{run_dir}: no checkpoint in {run_folder.CHECKPOINTS}/ ({advice})")
    return steps


def require_same_data(run_dir: Path, manifest: dict, stats: dict, advice: str,
                      ignore: tuple[str, ...] = ()) -> None:
    """Refuse data whose statistics (path, sizes, label counts, ...) differ from
    the ones the run recorded, naming what differs (`ignore`: keys that do not
    matter to the caller)."""
    recorded = manifest.get("data")
    # keys the run did not record (made by an older version) are not compared;
    # nor how its labels were found (the recipe's labels, compared with it, say what)
    ignore = (*ignore, "labels_inferred")
    changed = ", ".join(k for k in sorted(recorded or {})
                        if k not in ignore and recorded[k] != stats.get(k))
    if changed:
        raise UserError(f"{stats.get('source')}: the data differ from what run {run_dir} "
                        f"recorded ({changed}); {advice}")


def check_fingerprint(model_dir: Path, found: str, manifest: dict, run_dir: Path) -> None:
    """Refuse a base model whose files (fingerprint `found`) differ from the
    ones the run trained on."""
    expected = manifest.get("model", {}).get("fingerprint")
    if expected and found != expected:
        raise UserError(f"{model_dir}: the base model's files differ from the ones run "
                        f"{run_dir} was trained on (fingerprint {found[:16]} here, "
                        f"{expected[:16]} in its manifest); its adapters only fit that model")
