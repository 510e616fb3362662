"""The device mesh and the rules that place each array on it.

    mesh (data, fsdp)      the first data * fsdp devices, laid out as
                           jax.make_mesh does (`device_grid`)
    batches                rows sharded over both axes (every device computes a
                           different slice of the batch)
    frozen weights         sharded FSDP-style over `fsdp`: each array along its
                           largest dimension that `fsdp` divides (4-bit codes
                           and scales alike), else replicated
    trainable weights and  replicated for adapters (LoRA factors and head are
    optimizer state        small) unless `shard_adapters`; sharded like the
                           frozen weights for full fine-tuning

FSDP proper: inside a compiled step on a mesh with fsdp > 1 every weight the
model reads is gathered whole at the point of use (`whole`, under
`Placement.gathering`), so each device computes its own rows of the batch
with whole weights; gradients are summed over the devices, and a sharded
trainable weight keeps its shard. Left to itself, XLA's SPMD partitioner
keeps the weights split and moves the activations instead (the collectives
counted: bench/NOTES.md v9 and the README's pod section).
"""

from __future__ import annotations

import contextvars
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np

from jaxlora.errors import UserError
from jaxlora.runtime.config import RuntimeConfig
from jaxlora.runtime.processes import Hosting, gather

# The replicated sharding that weights read inside a step are gathered to
# (set while `Placement.gathering` traces a function); None: left as they are.
_WHOLE: contextvars.ContextVar = contextvars.ContextVar("jaxlora_whole", default=None)


def whole(x: jax.Array) -> jax.Array:
    """A weight as the model reads it inside a compiled step: gathered whole on
    every device when the step is traced under `Placement.gathering` with
    fsdp > 1 (an all-gather over the fsdp axis, right where it is used), else
    `x` itself."""
    sharding = _WHOLE.get()
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def mesh_shape(cfg: RuntimeConfig, devices: int, processes: int = 1) -> tuple[int, int]:
    """(data, fsdp) for `devices` devices of `processes` processes; a UserError
    naming the field when they do not fit. With several processes the mesh must
    take every device: a host left out of it would have no rows to feed."""
    if cfg.fsdp > devices:
        raise UserError(f"runtime.fsdp: {cfg.fsdp} devices asked for, {devices} present")
    if cfg.data == -1:
        if devices % cfg.fsdp:
            raise UserError(f"runtime.fsdp: {cfg.fsdp} does not divide the {devices} devices "
                            "present; " + ("a mesh over several processes takes every device: "
                                           "give an fsdp that divides them" if processes > 1
                                           else "set runtime.data too"))
        return devices // cfg.fsdp, cfg.fsdp
    if cfg.data * cfg.fsdp > devices:
        raise UserError(f"runtime: data {cfg.data} x fsdp {cfg.fsdp} = "
                        f"{cfg.data * cfg.fsdp} devices asked for, {devices} present")
    if processes > 1 and cfg.data * cfg.fsdp != devices:
        raise UserError(f"runtime: data {cfg.data} x fsdp {cfg.fsdp} = {cfg.data * cfg.fsdp} "
                        f"of the {devices} devices of {processes} processes; a mesh over "
                        "several processes takes every device (leave runtime.data at -1)")
    return cfg.data, cfg.fsdp


@dataclass(frozen=True)
class Placement:
    """The mesh and the shardings of one run (see the module docstring).
    Hashable, so its rules can be static arguments of a jit'd function."""

    mesh: jax.sharding.Mesh
    shard_trainable: bool  # full fine-tuning, or shard_adapters

    @property
    def devices(self) -> int:
        return self.mesh.devices.size

    @property
    def fsdp(self) -> int:
        return self.mesh.shape["fsdp"]

    @property
    def multi_process(self) -> bool:
        return jax.process_count() > 1

    def replicated(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def gathering(self, fn: Callable) -> Callable:
        """`fn`, traced so that every weight the model reads in it is gathered
        whole where it is used (`whole`): FSDP's all-gather per weight, the
        batch rows staying where they are. `fn` itself when fsdp is 1 (nothing
        is sharded to gather, and the compiled program stays as it was)."""
        if self.fsdp == 1:
            return fn
        replicated = self.replicated()

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            token = _WHOLE.set(replicated)
            try:
                return fn(*args, **kwargs)
            finally:
                _WHOLE.reset(token)

        return traced

    def array_sharding(self, shape: tuple[int, ...], shard: bool) -> jax.sharding.NamedSharding:
        """FSDP: the largest dimension `fsdp` divides goes over the fsdp axis."""
        spec = [None] * len(shape)
        if shard and self.fsdp > 1:
            fits = [i for i, n in enumerate(shape) if n % self.fsdp == 0 and n >= self.fsdp]
            if fits:
                spec[max(fits, key=lambda i: shape[i])] = "fsdp"
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

    def shardings(self, tree: Any, shard: bool) -> Any:
        return jax.tree.map(lambda x: self.array_sharding(np.shape(x), shard), tree)

    def place_weight(self, host: np.ndarray, dtype) -> jax.Array:
        """A base weight from a host array (a view of a memory-mapped checkpoint
        tensor) straight into its FSDP sharding, cast to `dtype`: each device's
        slice is copied out and cast on its own, and each process copies only
        its own devices' slices, each distinct slice once, so no host and no
        device holds more than its share (a replicated weight is whole on each
        device). A slice across the checkpoint's rows (a transposed kernel split
        along its input) still touches every row of the file, in pieces."""
        shape, dtype = np.shape(host), np.dtype(dtype)
        slices: dict[tuple, np.ndarray] = {}  # devices along `data` hold the same slice

        def read(index: tuple) -> np.ndarray:
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in slices:
                slices[key] = np.array(host[index], dtype=dtype)
            return slices[key]

        return jax.make_array_from_callback(shape, self.frozen_sharding(shape), read)

    def frozen_sharding(self, shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
        """Where a frozen array of `shape` (a weight, 4-bit codes or scales) goes."""
        return self.array_sharding(shape, True)

    def batch_sharding(self, ndim: int) -> jax.sharding.NamedSharding:
        spec = [("data", "fsdp")] + [None] * (ndim - 1)
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

    def hosting(self, rows: int):
        """A `Hosting`: the rows of a batch of `rows` that this process's
        devices take (every row with one process), so that it reads and
        tokenizes only their examples."""
        if not self.multi_process:
            return Hosting(rows)
        where = self.batch_sharding(1).addressable_devices_indices_map((rows,))
        held = sorted({r for (index,) in where.values() for r in range(*index.indices(rows))})
        return Hosting(rows, tuple(held), gather)

    def put(self, tree: Any, shard: bool) -> Any:
        """Place `tree` (the same values on every process) on the mesh."""
        return jax.tree.map(lambda x: _global(x, self.array_sharding(np.shape(x), shard)), tree)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A global batch (the same rows on every process, drawn from the same
        seed) as arrays sharded over the mesh by rows: each process transfers
        only the rows of its own devices."""
        return {k: _global(v, self.batch_sharding(np.ndim(v))) for k, v in batch.items()}

    def check_batch(self, field: str, size: int) -> None:
        if size % self.devices:
            raise UserError(f"{field}: {size} rows do not split evenly over the "
                            f"{self.devices} devices of the mesh (data {self.mesh.shape['data']}"
                            f" x fsdp {self.fsdp}); use a multiple of {self.devices}")


def _global(value, sharding: jax.sharding.NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def make_placement(cfg: RuntimeConfig, *, full_fine_tuning: bool) -> Placement:
    """The mesh over the first data x fsdp devices of every process."""
    data, fsdp = mesh_shape(cfg, len(jax.devices()), jax.process_count())
    mesh = jax.sharding.Mesh(device_grid(data, fsdp), ("data", "fsdp"))
    return Placement(mesh=mesh, shard_trainable=full_fine_tuning or cfg.shard_adapters)


def device_grid(data: int, fsdp: int, devices: list | None = None) -> np.ndarray:
    """The first data x fsdp `devices` (default: all) as a (data, fsdp) array, laid out by JAX's
    `create_device_mesh` (what `jax.make_mesh` uses): on a TPU slice it follows
    the chips' interconnect, the fsdp axis (the all-gathers of every step) on
    the closest chips; on the CPU the devices in order, on GPUs in device id
    order. Where it cannot lay out a part of a slice, the devices in order."""
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)[:data * fsdp]
    try:
        return mesh_utils.create_device_mesh((data, fsdp), devices,
                                             allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError, KeyError):
        return np.array(devices).reshape(data, fsdp)


def per_device_bytes(tree: Any, placement: Placement, shard: bool) -> int:
    """Bytes one device holds of `tree` under `placement` (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape, itemsize = np.shape(leaf), np.dtype(leaf.dtype).itemsize
        sharding = placement.array_sharding(shape, shard)
        shard_shape = sharding.shard_shape(shape)
        total += math.prod(shard_shape) * itemsize
    return total


