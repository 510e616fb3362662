"""Checkpoints: what a preempted run needs to go on exactly, and nothing more.

    RUN_DIR/checkpoints/          an orbax `CheckpointManager`, the last `keep` kept
      <step>/state/               trainable weights, optimizer state and dropout key,
                                  one array per leaf, named by its pytree path
      <step>/meta/                JSON: step, metrics not yet recorded, tokens, train
                                  seconds so far, a sha256 of the arrays, and what
                                  the caller adds (recipe hash, base-model fingerprint)

Several processes (a pod): an array sharded over several hosts (full fine-tuning,
or `shard_adapters`, with `fsdp` > 1) goes to orbax as the global array it is,
and each host writes its own shards, so no host ever holds the whole of it; its
share of the sha256 is a checksum of its bits that XLA computes where the
shards live (`_checksums`; the same on any layout, and on the host). Restored
with a `sharding`, such an array comes back straight into its shards. Every
other array goes through the host, whole.

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
import math
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


def _leaves(state: TrainState) -> tuple[dict[str, Any], Any]:
    """{pytree path: array} for the arrays of `state`, and the treedef to rebuild it."""
    tree = {"trainable": state.trainable, "opt_state": state.opt_state,
            "dropout_key": state.dropout_key}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    if len(set(names)) != len(names):
        raise ValueError("two leaves of the train state have the same path name")
    return dict(zip(names, (leaf for _, leaf in leaves))), treedef


def _spread(sharding) -> bool:
    """Whether an array laid out by `sharding` is spread over several processes:
    no process holds it whole."""
    return not sharding.is_fully_addressable and not sharding.is_fully_replicated


def _is_spread(x) -> bool:
    return isinstance(x, jax.Array) and _spread(x.sharding)


def _flatten(state: TrainState) -> tuple[dict[str, Any], Any]:
    """`_leaves`, as what is saved: host copies (the device buffers are donated to
    the next step), except the arrays spread over several processes, which stay
    as they are (each process writes its own shards)."""
    arrays, treedef = _leaves(state)
    host = to_host({k: v for k, v in arrays.items() if not _is_spread(v)})
    return {k: host.get(k, v) for k, v in arrays.items()}, treedef


def _shapes(arrays: dict[str, Any]) -> dict[str, str]:
    """{leaf name: "float32[384, 8]"}: what a checkpoint must hold to fit a run."""
    return {name: f"{np.dtype(a.dtype)}{list(a.shape)}" for name, a in sorted(arrays.items())}


# _checksums: each position salts its element's hash differently
_MIX = np.uint32(0x9E3779B1)


def _bits(x, xp):
    """The bits of `x` as uint32 (`xp`: numpy or jax.numpy)."""
    width = np.dtype(x.dtype).itemsize
    if width > 4:
        raise ValueError(f"no checksum for {x.dtype}")
    as_uint = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32}[width]
    bits = (x.view(as_uint) if xp is np else jax.lax.bitcast_convert_type(x, as_uint))
    return bits.astype(xp.uint32)


def _position(shape, xp):
    """Each element's row-major position as uint32; on devices built per
    dimension (no reshape, so a sharded array stays as it is laid out)."""
    if xp is np:
        return np.arange(math.prod(shape), dtype=np.uint32).reshape(shape)
    index = xp.zeros(shape, xp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(xp.uint32, shape, axis) * xp.uint32(stride)
        stride *= shape[axis]
    return index


def _mix(h, xp):
    """murmur3's 32-bit finalizer: every input bit moves about half the output
    bits, so no change of an element's bits cancels out in a sum."""
    h = h ^ (h >> xp.uint32(16))
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> xp.uint32(13))
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> xp.uint32(16))


def _sums(x, xp):
    """Two sums over the elements of mix(bits, position, seed), modulo 2**32."""
    bits, position = _bits(x, xp), _position(x.shape, xp)
    salted = position * _MIX
    return tuple(xp.sum(_mix(_mix(bits ^ xp.uint32(seed), xp) ^ salted, xp), dtype=xp.uint32)
                 for seed in (0x2545F491, 0x68E31DA4))


@jax.jit
def _device_sums(arrays: list) -> list:
    # one compiled function for all of a state's spread arrays, not one each
    return [_sums(x, jax.numpy) for x in arrays]


def _checksums(arrays: list) -> list[str]:
    """Two 32-bit sums over the elements of each array, each element's bits and
    position hashed together first (`_sums`): computed by XLA where a
    (sharded) jax.Array lives and by numpy on the host, to the same value on
    any layout (integer sums modulo 2**32 do not depend on order)."""
    on_devices = [x for x in arrays if isinstance(x, jax.Array)]
    device_sums = iter(to_host(_device_sums(on_devices)) if on_devices else ())
    with np.errstate(over="ignore"):
        sums = [next(device_sums) if isinstance(x, jax.Array)
                else _sums(np.ascontiguousarray(x), np) for x in arrays]
    return ["%08x%08x" % tuple(int(v) for v in pair) for pair in sums]


def _digest(arrays: dict[str, Any], meta: dict) -> str:
    """sha256 over the arrays and the meta that positions them (step, pending
    metrics, tokens), so neither can change unnoticed. The arrays the meta
    lists as `checksummed` (saved spread over processes) enter by `_checksums`,
    the others by their bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps([meta.get("step"), meta.get("pending"), meta.get("tokens")],
                             sort_keys=True).encode())
    names = sorted(k for k in meta.get("checksummed", ()) if k in arrays)
    checksums = dict(zip(names, _checksums([arrays[k] for k in names])))
    for name in sorted(arrays):
        a = arrays[name]
        if name in checksums:
            digest.update(f"{name}\0{np.dtype(a.dtype).str}\0{tuple(a.shape)}\0".encode())
            digest.update(checksums[name].encode())
        else:  # as checkpoints always were: a scalar enters as shape (1,)
            h = np.ascontiguousarray(a if isinstance(a, np.ndarray) else to_host(a))
            digest.update(f"{name}\0{h.dtype.str}\0{h.shape}\0".encode())
            digest.update(h.tobytes())
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
                "seconds": state.seconds, "leaves": _shapes(arrays), **(extra or {})}
        spread = sorted(k for k, v in arrays.items() if _is_spread(v))
        if spread:
            meta["checksummed"] = spread
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

    def restore(self, template: TrainState, step: int | None = None, *,
                shardings: TrainState | None = None) -> tuple[TrainState, dict]:
        """The state saved at `step` (default: the latest) shaped like `template`,
        and its meta. Arrays come back as host numpy arrays, except where
        `shardings` (`template` with a `jax.sharding.Sharding` for each array)
        spreads one over several processes: that one comes back straight into
        its shards, each process reading only its own."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"{self.directory}: no checkpoint")
        where = self.directory / str(step)
        target, treedef = _leaves(template)
        places = _leaves(shardings)[0] if shardings is not None else {}
        saved = self.read_meta(step).get("leaves")
        expected = _shapes(target)
        if saved != expected:
            names = set(saved or {}) ^ set(expected)
            what = (f"leaves only on one side: {', '.join(sorted(names)[:3])}" if names else
                    "; ".join(f"{k} is {saved[k]} there, {expected[k]} here"
                              for k in expected if saved[k] != expected[k])[:300])
            raise UserError(f"{where}: the checkpoint holds other weights than this run trains "
                            f"({what})")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore({k: _restore_as(v, places.get(k))
                                                 for k, v in target.items()}),
                META: ocp.args.JsonRestore()}))
            arrays, meta = dict(restored[STATE]), dict(restored[META])
        except Exception as e:  # noqa: BLE001 - see read_meta
            raise _corrupt(where, e) from None
        if _shapes(arrays) != expected:
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


def _restore_as(like, sharding):
    """What orbax restores a leaf into: its shards where `sharding` spreads it
    over several processes, else a host array."""
    if sharding is not None and _spread(sharding):
        return jax.ShapeDtypeStruct(np.shape(like), like.dtype, sharding=sharding)
    return np.zeros(np.shape(like), like.dtype)


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

