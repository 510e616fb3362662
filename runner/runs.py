"""Run folders as things to find, check and reopen: which run a `runner run`
resumes, whether it may, and a finished (or stopped) run's model rebuilt from
its base checkpoint and its own latest checkpoint, for `eval`, `predict` and
`export`.

A run folder holds (see `runner.report`) recipe.toml, manifest.json,
metrics.jsonl, eval.json, report.md and checkpoints/<step>/.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxlora.errors import UserError

CHECKPOINTS = "checkpoints"
LOCK = ".lock"


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a UserError naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


# The shape of manifest.json that reading a run folder relies on (`read_manifest`;
# `runner.report.check`'s (keys, kinds, optional)): a hand-edited or damaged
# manifest is one message naming the key, not a traceback further on.
MANIFEST_SHAPE = [(("status",), ("string",), True),
                  (("recipe",), ("object",), True),
                  (("recipe_hash",), ("string",), True),
                  (("recipe_file",), ("string",), True),
                  (("base_dir",), ("string",), True),
                  (("model",), ("object",), True),
                  (("model", "source"), ("string",), True),
                  (("model", "fingerprint"), ("string", "null"), True),
                  (("data",), ("object",), True),
                  (("train",), ("object",), True),
                  (("train", "total_steps"), ("number", "null"), True),
                  (("runtime",), ("object",), True),
                  (("environment",), ("object",), True),
                  (("environment", "devices"), ("strings",), True),
                  (("resumed",), ("list",), True)]


def read_manifest(run_dir: Path) -> dict:
    """RUN_DIR/manifest.json, with the shape every reader of a run folder relies
    on (`MANIFEST_SHAPE`); a UserError naming the file and the key otherwise."""
    from runner.report import check

    path = Path(run_dir) / "manifest.json"
    manifest = read_json(path)
    check(path, manifest, MANIFEST_SHAPE)
    if not all(isinstance(entry, dict) for entry in manifest.get("resumed", [])):
        raise UserError(f"{path}: resumed: expected a list of objects")
    return manifest


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the complete checkpoints in the run folder (orbax renames a
    step's folder into place only once it is written)."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def lock_run(run_dir: Path):
    """Hold RUN_DIR/.lock (an advisory `flock`) for as long as the returned file
    stays open; the OS releases it when the process ends, however it ends. A
    UserError if another process holds it: two processes must never train in
    one run folder."""
    path = run_dir / LOCK
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot create the run folder's lock: {e.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{run_dir}: in use by {owner}; wait for it to end, or start a "
                        "new run with --fresh") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def newest_run(root: Path, name: str) -> Path | None:
    """The most recent run folder of recipe `name` under `root` (folder names
    are UTC timestamps, so they sort in time order)."""
    base = root / name
    if not base.is_dir():
        return None
    runs = sorted((p for p in base.iterdir() if is_run_dir(p)), key=stamp_order)
    return runs[-1] if runs else None


def stamp_order(path: Path) -> tuple[str, int]:
    """Sort key of names from `report.stamped_names`, in the order they were made:
    `20261126-050000-2` after `20261126-050000`, `-10` after `-2`; an extension
    (`.json`) does not count."""
    stamp, _, suffix = path.name.split(".")[0].partition("-")
    time, _, count = suffix.partition("-")
    return (f"{stamp}-{time}", int(count) if count.isdigit() else 0)


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


# What a run may change when it resumes: how it runs, not what it computes. The
# device layout (a mesh of another shape, more hosts) and `train.remat` (what
# the backward pass recomputes, a memory knob): the same numbers either way,
# up to float32 rounding. A run that no longer fits its new devices can go on
# with `remat = "full"` instead of starting again.
RESUMABLE = ("runtime", "train.remat")  # a table, or one field
RESUMABLE_WORDS = "runtime.* (the device layout) and train.remat"


def may_change_on_resume(field: str) -> bool:
    """Whether the recipe field `field` (dotted) may differ when a run resumes."""
    return any(field == f or field.startswith(f"{f}.") for f in RESUMABLE)


def require_same_recipe(run_dir: Path, manifest: dict, recipe, advice: str) -> list[str]:
    """Refuse a recipe that differs from the run's, naming each changed field,
    except where `may_change_on_resume` allows: returns those changes."""
    from runner.recipe import canonical, recipe_hash

    if manifest.get("recipe_hash") == recipe_hash(recipe):
        return []
    changes = recipe_changes(manifest.get("recipe", {}), canonical(recipe))
    layout, others = [], []
    for field, old, new in changes:
        (layout if may_change_on_resume(field) else others).append(f"{field}: {old!r} -> {new!r}")
    if others or not layout:
        raise UserError(f"{run_dir}: the recipe differs from the one this run was made with "
                        f"({'; '.join(others) or 'its hash differs'}); {advice}")
    return layout


def require_checkpoint(run_dir: Path, advice: str) -> list[int]:
    """The run's checkpoint steps; a UserError if it has none."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise UserError(f"{run_dir}: no checkpoint in {CHECKPOINTS}/ ({advice})")
    return steps


def require_same_data(run_dir: Path, manifest: dict, stats: dict, advice: str,
                      ignore: tuple[str, ...] = ()) -> None:
    """Refuse data whose statistics (path, sizes, label counts, ...) differ from
    the ones the run recorded, naming what differs (`ignore`: keys that do not
    matter to the caller)."""
    recorded = manifest.get("data")
    # keys the run did not record (made by an older version) are not compared
    changed = ", ".join(k for k in sorted(recorded or {})
                        if k not in ignore and recorded[k] != stats.get(k))
    if changed:
        raise UserError(f"{stats.get('source')}: the data differ from what run {run_dir} "
                        f"recorded ({changed}); {advice}")


def base_dir(manifest: dict, run_dir: Path) -> Path:
    """The folder the run's relative sources were resolved from (the recipe's)."""
    if manifest.get("base_dir"):
        return Path(manifest["base_dir"])
    recipe_file = manifest.get("recipe_file")
    return Path(recipe_file).resolve().parent if recipe_file else run_dir


@dataclass
class OpenedRun:
    """A run's model, rebuilt: base weights from the base checkpoint (checked
    against the manifest's fingerprint), trained weights from the latest
    checkpoint."""

    run_dir: Path
    recipe: Any  # runner.recipe.Recipe
    manifest: dict
    model_dir: Path
    loaded: Any  # jaxlora.models.weights.LoadedModel (model adapted in place)
    graphdef: Any
    trainable: Any
    frozen: Any
    step: int
    total_steps: int | None
    tokenizer: Any

    @property
    def finished(self) -> bool:
        return self.manifest.get("status") == "finished"

    def model(self):
        """The task model with the trained weights (an nnx module)."""
        from flax import nnx

        return nnx.merge(self.graphdef, self.trainable, self.frozen)


def open_run(run_dir: Path) -> OpenedRun:
    """Rebuild a run's trained model; a UserError for anything missing or changed."""
    import jax

    from jaxlora import sources
    from jaxlora.checkpoint import Checkpointer
    from jaxlora.lora import adapt
    from jaxlora.train import TrainState, make_optimizer
    from runner.pipeline import check_fingerprint, load_pretrained, load_tokenizer
    from runner.recipe import load_recipe

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: no manifest.json; not a run folder "
                        "(runs/<name>/<timestamp>/ after `runner run`)")
    manifest = read_manifest(run_dir)
    require_checkpoint(run_dir, "the run stopped before its first checkpoint, or was made "
                                "before checkpoints existed")
    recipe = load_recipe(run_dir / "recipe.toml")
    require_same_recipe(run_dir, manifest, recipe, "its recipe.toml was edited; restore it")
    model_dir = sources.resolve(recipe.model.source, "model", base_dir(manifest, run_dir))
    loaded = load_pretrained(recipe, model_dir)
    check_fingerprint(model_dir, loaded.fingerprint, manifest, run_dir)
    key = jax.random.key(recipe.train.seed)
    graphdef, trainable, frozen, _ = adapt(loaded.model, recipe.adapter, loaded.lora_targets,
                                           jax.random.fold_in(key, 2))
    template = TrainState(trainable=trainable,
                          opt_state=make_optimizer(recipe.train, 1).init(trainable),
                          dropout_key=jax.random.key_data(key))
    with Checkpointer(run_dir / CHECKPOINTS, read_only=True) as checkpointer:
        try:
            state, _ = checkpointer.restore(template)
        except UserError:
            # A run training in this folder may have just pruned the step we
            # began reading; the newest one is then complete.
            if checkpointer.latest_step() in checkpoint_steps(run_dir):
                raise  # still there: really unreadable
            with Checkpointer(run_dir / CHECKPOINTS, read_only=True) as again:
                state, _ = again.restore(template)
    return OpenedRun(run_dir=run_dir, recipe=recipe, manifest=manifest, model_dir=model_dir,
                     loaded=loaded, graphdef=graphdef, trainable=state.trainable, frozen=frozen,
                     step=state.step, total_steps=manifest.get("train", {}).get("total_steps"),
                     tokenizer=load_tokenizer(model_dir))
