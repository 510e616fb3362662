"""Where the arrays live: one device mesh over every device of every host, with
a data axis and an FSDP axis, and the rules that place each array on it.

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
kept the weights split and moved the activations instead: the tiny Llama's
train step (recipes/tiny-llama-offline.toml) on (data=2, fsdp=2) held 218
all-gathers (activations among them), 26 all-to-alls and 15 all-reduces,
where gathering the weights takes 21 all-gathers (one per weight read) and 2
all-reduces.
The step's code is the same on one device and on a pod. With
several processes (a TPU VM pod: one per host) `jax.distributed.initialize()`
joins them first (`distributed`), the mesh spans every host's devices, and
each host hands its own devices their rows of every batch.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal

import jax
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jaxlora.errors import UserError

# Environment variables that say "this process is one of several".
MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "TPU_WORKER_HOSTNAMES",
                     "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


class RuntimeConfig(BaseModel):
    """The recipe's [runtime] table: the devices a run uses and how arrays are laid out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # devices along the data axis; -1: all the devices the fsdp axis leaves
    data: int = Field(-1, ge=-1, le=65536)
    # devices along the FSDP axis: frozen weights (and, for full fine-tuning, the
    # trainable weights and optimizer state) are sharded over it
    fsdp: int = Field(1, ge=1, le=65536)
    # also shard the LoRA factors, the head and their optimizer state (default: replicated)
    shard_adapters: bool = False
    # join the other processes with jax.distributed.initialize(): auto = when the
    # environment names several processes (TPU VM pod, SLURM, JAX_NUM_PROCESSES)
    distributed: Literal["auto", "on", "off"] = "auto"

    @field_validator("data")
    @classmethod
    def _some_devices(cls, data: int) -> int:
        if data == 0:
            raise ValueError("a mesh needs at least 1 device along data; -1 takes every "
                             "device the fsdp axis leaves")
        return data


# XLA:CPU hands matrix products to YNNPACK by default, in fusions that also take
# in the elementwise work and reductions around them (a GELU or LayerNorm
# backward between two products). On the bench's CPU those fusions ran several
# times slower than XLA's own loop fusions, and YNNPACK's batched products
# (attention) slower than XLA's: without them the MiniLM step took 0.83x the
# time, bert-base and tiny-llama the same (bench/NOTES.md, v7). Tests compare
# the numbers with transformers and PEFT either way.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """XLA options for jaxlora's compiled steps: `CPU_COMPILER_OPTIONS` on the CPU
    backend, nothing elsewhere. Left out where the user's XLA_FLAGS set that
    option already, or where this XLA does not know it (checked once, on a
    trivial function)."""
    if jax.default_backend() != "cpu":
        return None
    if any(name in os.environ.get("XLA_FLAGS", "") for name in CPU_COMPILER_OPTIONS):
        return None
    try:
        jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(
            compiler_options=CPU_COMPILER_OPTIONS)
    except Exception:  # an option this XLA does not know: its own defaults
        return None
    return dict(CPU_COMPILER_OPTIONS)


def jit(fn, **kwargs):
    """`jax.jit` with `compiler_options()`: how jaxlora compiles its steps."""
    return jax.jit(fn, compiler_options=compiler_options(), **kwargs)


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


def host_memory(available: bool = False) -> int | None:
    """This machine's physical memory in bytes, or (`available`) what of it the
    kernel says is available now (MemAvailable: free plus reclaimable cache),
    where the OS says."""
    if available:
        try:
            with open("/proc/meminfo") as info:
                for line in info:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    try:
        pages = "SC_AVPHYS_PAGES" if available else "SC_PHYS_PAGES"
        return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def device_memory(free: bool = False) -> int | None:
    """One local device's memory in bytes (or, `free`, what it has left now),
    where the backend reports it; on the CPU, the host's RAM (available RAM)
    shared by this process's CPU devices."""
    if jax.default_backend() == "cpu":
        ram = host_memory(available=free)
        return ram // len(jax.local_devices()) if ram else None
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit is None or not free:
        return limit
    return max(limit - stats.get("bytes_in_use", 0), 0)


def whole_bytes(tree: Any) -> int:
    """Bytes of every array in `tree`, each counted whole (not per shard)."""
    return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def multi_process_environment() -> bool:
    """Whether the environment says this process is one of several: JAX's,
    SLURM's or Open MPI's variables, or a Cloud TPU VM whose metadata server
    lists several workers (a pod slice's hosts: `gcloud ... ssh --command`
    shells carry none of the TPU variables; JAX reads the same server)."""
    if os.environ.get("JAX_NUM_PROCESSES", "1") not in ("", "1"):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name, "1") not in ("", "1"):
            return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get(
            "MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    return tpu_pod_workers() > 1


# Google's PCI vendor id: the TPU chips of a Cloud TPU VM.
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_METADATA_URL = ("http://metadata.google.internal/computeMetadata/v1/instance/"
                    "attributes/worker-network-endpoints")


def tpu_pod_workers(pci_devices: str = "/sys/bus/pci/devices",
                    url: str = TPU_METADATA_URL, timeout: float = 5.0) -> int:
    """The hosts of this Cloud TPU VM's slice, as its metadata server lists
    them (`worker-network-endpoints`, one entry per host); 0 on a machine
    without TPU chips (nothing is asked then) or where the server does not
    answer."""
    import glob
    import urllib.request

    def vendor(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""

    if not any(vendor(path) == GOOGLE_PCI_VENDOR
               for path in glob.glob(os.path.join(pci_devices, "*", "vendor"))):
        return 0
    try:
        request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            listed = answer.read().decode()
    except (OSError, ValueError):
        return 0
    return len([worker for worker in listed.split(",") if worker.strip()])


_initialized = False


def initialize(cfg: RuntimeConfig) -> bool:
    """`jax.distributed.initialize()` when `cfg.distributed` asks for it (or, on
    auto, when the environment names several processes); returns whether this
    process is one of several. Must run before anything touches a device."""
    global _initialized
    wanted = cfg.distributed == "on" or (cfg.distributed == "auto"
                                         and multi_process_environment())
    if wanted and not _initialized:
        # A TPU VM pod, SLURM or Open MPI tell JAX everything; elsewhere
        # JAX_COORDINATOR_ADDRESS (read by JAX) with these two:
        given = {}
        for key, name in (("num_processes", "JAX_NUM_PROCESSES"),
                          ("process_id", "JAX_PROCESS_ID")):
            value = os.environ.get(name, "").strip()
            if value:
                if not value.isdecimal():  # what int() reads, signs aside
                    raise UserError(f"runtime.distributed: {name}={value!r} is not a "
                                    "whole number")
                given[key] = int(value)
        try:
            jax.distributed.initialize(**given)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"runtime.distributed: jax.distributed.initialize() failed: "
                            f"{str(e).splitlines()[0]} (on a TPU VM pod it needs no settings; "
                            "elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                            "JAX_PROCESS_ID)") from None
        _initialized = True
    return jax.process_count() > 1


@dataclass(frozen=True)
class StopAgreement:
    """How the processes of one run agree on where to stop: `at_boundary()` is
    asked once per step boundary by every process and turns true at the same
    boundary on all of them; `notify`: a signal to one process must be passed
    on as a SIGTERM, which JAX's preemption service takes for a notice to all."""

    at_boundary: Callable[[], bool]
    notify: bool


def agreed_stop(requested: Callable[[], bool]) -> StopAgreement | None:
    """The stop agreement of this run; None for one process on its own.

    A process that stops alone leaves the others waiting in the next step's
    collectives. `jax.distributed.initialize()` starts JAX's preemption
    service, which takes SIGTERM (from then on no Python handler sees it,
    even with a single process): a SIGTERM to any process is a notice to all,
    they agree on the step boundary after the furthest one any of them
    reached, and `reached_preemption_sync_point` turns true there for every
    one. The boundaries are counted from 1 in each session, the same on every
    process (they all start at the same step), so a notice that came before
    training stops at its first boundary.

    Where there is no such service (several processes that JAX joined without
    `jax.distributed`, or `jax_enable_preemption_service` off), the processes
    vote instead: each boundary, every process's `requested()` goes into a
    small all-reduce on the devices, dispatched without waiting, and each
    vote is read `StopVotes.LAG` boundaries later, so that all of them stop
    at the same boundary."""
    if jax.distributed.is_initialized():
        from jax.experimental import multihost_utils

        try:  # boundary 0: where every process stands before training
            multihost_utils.reached_preemption_sync_point(0)
        except RuntimeError:  # the service is off
            pass
        else:
            boundaries = itertools.count(1)
            return StopAgreement(
                lambda: multihost_utils.reached_preemption_sync_point(next(boundaries)), True)
    if jax.process_count() == 1:
        return None
    return StopAgreement(StopVotes(requested), False)


class StopVotes:
    """Every process's stop request, all-reduced on the devices at each
    boundary (`__call__`) and read `LAG` boundaries later: by then the small
    collective has long run behind the steps dispatched before it, so reading
    it costs no wait, and every process reads the same vote at the same
    boundary."""

    LAG = 2

    def __init__(self, requested: Callable[[], bool]):
        self.requested = requested
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
        self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("all"))
        self.any = jax.jit(lambda votes: votes.max(), out_shardings=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
        self.cast: collections.deque = collections.deque()

    def __call__(self) -> bool:
        local = np.full(jax.local_device_count(), int(bool(self.requested())), np.int32)
        self.cast.append(self.any(jax.make_array_from_process_local_data(self.sharding, local)))
        return len(self.cast) > self.LAG and bool(np.asarray(self.cast.popleft()))


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
        """A `jaxlora.data.Hosting`: the rows of a batch of `rows` that this
        process's devices take (every row with one process), so that it reads
        and tokenizes only their examples."""
        from jaxlora.data import Hosting

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


def to_host(tree: Any) -> Any:
    """Every array of `tree` as a host numpy array, gathered from every process
    where it is spread over several (the same on each process)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.array(x)

    return jax.tree.map(one, tree)


def per_device_bytes(tree: Any, placement: Placement, shard: bool) -> int:
    """Bytes one device holds of `tree` under `placement` (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape, itemsize = np.shape(leaf), np.dtype(leaf.dtype).itemsize
        sharding = placement.array_sharding(shape, shard)
        shard_shape = sharding.shard_shape(shape)
        total += math.prod(shard_shape) * itemsize
    return total


def agree_path(make: Callable[[], Any], *, new: bool = False) -> Any:
    """The run folder (or None) that `make()` gives process 0, on every process;
    `make()` itself with a single process. `new`: `make` creates the folder.

    Whatever `make` raises on process 0 reaches every process (a UserError
    with its message), instead of leaving the others waiting for a path that
    never comes. Every process must then see the folder: where one does not
    (hosts each writing to a disk of their own), every process raises a
    UserError naming the processes, and a folder just made is removed again
    (nothing is in it yet)."""
    from pathlib import Path

    if jax.process_count() == 1:
        return make()
    made, failure, said = None, None, None
    if jax.process_index() == 0:
        try:
            made = make()
            said = "none:" if made is None else f"path:{made}"
        except Exception as e:  # noqa: BLE001 - the others must hear of any failure
            failure = e
            said = "error:" + (str(e) if isinstance(e, UserError) else
                               f"process 0: {type(e).__name__}: {e}")[:1000]
    agreed = agree_text(said)
    if failure is not None:
        raise failure
    kind, _, text = agreed.partition(":")
    if kind == "error":
        raise UserError(text)
    if kind == "none":
        return None
    path = Path(text)
    blind = [i for i, seen in enumerate(every_process(path.is_dir())) if not seen]
    if blind:
        if new and made is not None:
            made.rmdir()
        raise UserError(f"output.dir: process(es) {', '.join(map(str, blind))} cannot see "
                        f"{path}, the run folder process 0 {'made' if new else 'goes on with'}; "
                        "every host must see output.dir at the same path (a shared filesystem: "
                        "NFS, a Filestore or gcsfuse mount)")
    return path


def agree_check(check: Callable[[], None]) -> None:
    """`check()` on process 0 for all of them (itself with one process): the
    UserError it raises (a refusal) or the OSError (a write that failed) is
    raised on every process, which would otherwise go on alone and wait for
    process 0 in the next collective; any other exception is raised as is on
    process 0 and as a UserError naming it on the others. One small broadcast
    with several."""
    if jax.process_count() == 1:
        check()
        return
    failure, said = None, None
    if jax.process_index() == 0:
        try:
            check()
        except UserError as e:
            failure, said = e, ["refused", str(e).encode()[:3800].decode(errors="ignore")]
        except OSError as e:
            failure, said = e, ["write", e.errno, e.strerror or str(e), str(e.filename or "")]
        except Exception as e:  # noqa: BLE001 - the others must hear of any failure
            failure, said = e, ["refused", f"process 0: {type(e).__name__}: {e}"[:3800]]
    said = agree_text(None if said is None else json.dumps(said))
    if failure is not None:
        raise failure
    if said:
        kind, *detail = json.loads(said)
        if kind == "refused":
            raise UserError(detail[0])
        number, text, name = detail
        raise OSError(number, text, name or None)


def gather(values: np.ndarray) -> np.ndarray:
    """`values` (a small array of the same shape everywhere) of every process,
    stacked in process order, on every process."""
    if jax.process_count() == 1:
        return np.asarray(values)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def every_process(flag: bool) -> list[bool]:
    """`flag` of each process, in process order, on every process."""
    if jax.process_count() == 1:
        return [bool(flag)]
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([flag], np.int32))
    return [bool(f) for f in np.asarray(flags).reshape(-1)]


def agree_text(text: str | None, limit: int = 4096) -> str | None:
    """Process 0's `text` (up to `limit` bytes of UTF-8) on every process; the
    others may pass None. The text itself with a single process."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    raw = np.zeros(limit + 1, np.uint8)  # the last byte: 1 = too long (every process raises)
    if text is not None:
        encoded = text.encode()
        if len(encoded) > limit:
            raw[-1] = 1
        else:
            raw[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    agreed = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    if agreed[-1]:
        raise UserError(f"{(text or 'process 0: a text')[:80]}...: longer than the {limit} "
                        "bytes the processes can agree on")
    return bytes(agreed[:-1][agreed[:-1] > 0]).decode()


def device_bytes(tree: Any) -> int:
    """Bytes the first device holds of the placed arrays of `tree`."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            first = leaf.sharding.device_set and min(leaf.sharding.device_set, key=lambda d: d.id)
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == first)
        else:
            total += np.asarray(leaf).nbytes
    return total
