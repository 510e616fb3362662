"""Checkpoints: what a preempted run needs to go on exactly, and nothing more.

    RUN_DIR/checkpoints/          an orbax `CheckpointManager`, the last `keep` kept
      <step>/state/               trainable weights, optimizer state and dropout key,
                                  one array per leaf, named by its pytree path
      <step>/meta/                JSON: step, metrics not yet recorded, tokens, train
                                  seconds so far, a sha256 of the arrays, and what
                                  the caller adds (recipe hash, base-model fingerprint)

Frozen base weights are never saved: they are the base checkpoint's, and the
caller checks its fingerprint before resuming. Orbax writes each step into a
temporary folder and renames it into place when complete, so a process killed
mid-write leaves the previous checkpoint as it was; the leftover temporary
folder is ignored. A save that fails (a full disk, a quota) raises
`CheckpointWriteError` and leaves the earlier checkpoints as they were, the
newest of them still the latest. A checkpoint that is there but unreadable, or whose arrays
do not hash to what was written, is refused naming its folder, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlora.errors import UserError
from jaxlora.runtime import to_host
from jaxlora.train import TrainState

STATE, META = "state", "meta"


def _flatten(state: TrainState) -> tuple[dict[str, np.ndarray], Any]:
    """{pytree path: host array} for the arrays of `state`, and the treedef to rebuild it."""
    tree = {"trainable": state.trainable, "opt_state": state.opt_state,
            "dropout_key": state.dropout_key}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    if len(set(names)) != len(names):
        raise ValueError("two leaves of the train state have the same path name")
    # Host copies (the device buffers are donated to the next step), gathered from
    # every process where an array is spread over several: all hold the same.
    host = to_host([leaf for _, leaf in leaves])
    return dict(zip(names, host)), treedef


def _layout(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """{leaf name: "float32[384, 8]"}: what a checkpoint must hold to fit a run."""
    return {name: f"{a.dtype}{list(a.shape)}" for name, a in sorted(arrays.items())}


def _digest(arrays: dict[str, np.ndarray], meta: dict) -> str:
    """sha256 over the arrays and the meta that positions them (step, pending
    metrics, tokens), so neither can change unnoticed."""
    digest = hashlib.sha256()
    digest.update(json.dumps([meta.get("step"), meta.get("pending"), meta.get("tokens")],
                             sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


class Checkpointer:
    """Saves and restores `TrainState`s under `directory` (see the module docstring)."""

    def __init__(self, directory: Path, *, keep: int = 2, read_only: bool = False):
        """`read_only` for readers (eval, predict, export): they never delete a
        checkpoint or a half-written one that a training process may be writing."""
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory)
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, max_to_keep=None, save_interval_steps=0,
                cleanup_tmp_directories=False, enable_async_checkpointing=False)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                # Written before training goes on: a save must be complete before a
                # signal handler reports "checkpoint saved", and LoRA state is small.
                enable_async_checkpointing=False)
        try:
            self._manager = ocp.CheckpointManager(self.directory.absolute(), options=options)
        except (OSError, ValueError) as e:
            raise UserError(f"{self.directory}: cannot open the checkpoints: {e}") from None

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, state: TrainState, extra: dict | None = None) -> Path:
        """Write `state` as checkpoint `state.step`; returns its folder."""
        ocp = self._ocp
        arrays, _ = _flatten(state)
        meta = {"step": state.step, "pending": state.pending, "tokens": state.tokens,
                "seconds": state.seconds, "leaves": _layout(arrays), **(extra or {})}
        meta["sha256"] = _digest(arrays, meta)
        try:
            self._manager.save(state.step, args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(arrays), META: ocp.args.JsonSave(meta)}),
                force=True)
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - tensorstore reports OS errors as ValueError
            raise CheckpointWriteError(self.directory / str(state.step), state.step,
                                       _write_failure(e), self.latest_step()) from None
        return self.directory / str(state.step)

    def read_meta(self, step: int) -> dict:
        """The JSON part of checkpoint `step` alone (cheap)."""
        ocp = self._ocp
        where = self.directory / str(step)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
            return dict(restored[META])
        except Exception as e:  # orbax raises many kinds; all mean "unusable"
            raise _corrupt(where, e) from None

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """The state saved at `step` (default: the latest) shaped like `template`,
        and its meta. Arrays come back as host numpy arrays."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"{self.directory}: no checkpoint")
        where = self.directory / str(step)
        target, treedef = _flatten(template)
        saved = self.read_meta(step).get("leaves")
        expected = _layout(target)
        if saved != expected:
            names = set(saved or {}) ^ set(expected)
            what = (f"leaves only on one side: {', '.join(sorted(names)[:3])}" if names else
                    "; ".join(f"{k} is {saved[k]} there, {expected[k]} here"
                              for k in expected if saved[k] != expected[k])[:300])
            raise UserError(f"{where}: the checkpoint holds other weights than this run trains "
                            f"({what})")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(
                    {k: np.zeros(v.shape, v.dtype) for k, v in target.items()}),
                META: ocp.args.JsonRestore()}))
            arrays, meta = dict(restored[STATE]), dict(restored[META])
        except Exception as e:  # noqa: BLE001 - see read_meta
            raise _corrupt(where, e) from None
        if _layout(arrays) != expected:
            raise _corrupt(where, ValueError("the arrays read back differ in shape or dtype"))
        if _digest(arrays, meta) != meta.get("sha256") or meta.get("step") != step:
            raise UserError(f"{where}: the checkpoint does not match the checksum written "
                            "with it (corrupted on disk); delete that folder to resume from "
                            "an earlier checkpoint, if any")
        leaves = [arrays[name] for name in target]  # `target` is in treedef order
        tree = jax.tree_util.tree_unflatten(treedef, leaves)
        try:
            state = TrainState(trainable=tree["trainable"], opt_state=tree["opt_state"],
                               dropout_key=tree["dropout_key"], step=int(meta["step"]),
                               pending=[dict(m) for m in meta["pending"]],
                               tokens=int(meta["tokens"]), seconds=float(meta["seconds"]))
        except (KeyError, TypeError, ValueError) as e:
            raise _corrupt(where, e) from None
        return state, meta

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CheckpointWriteError(Exception):
    """Checkpoint `step` could not be written to `where` (`reason`, e.g. "No
    space left on device"); `kept` is the newest complete checkpoint, untouched."""

    def __init__(self, where: Path, step: int, reason: str, kept: int | None):
        super().__init__(f"cannot write the checkpoint of step {step} to {where}: {reason}")
        self.where, self.step, self.reason, self.kept = where, step, reason, kept


def _write_failure(error: Exception) -> str:
    """The operating system's reason for a failed write, where the error names
    one ("No space left on device"), else the error's first line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
        return os.strerror(int(code.group(1)))
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def _corrupt(where: Path, error: Exception) -> UserError:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(f"{where}: the checkpoint is unreadable ({detail[:300]}); delete that "
                     "folder to resume from an earlier checkpoint, if any")

