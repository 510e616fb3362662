"""Several processes as one run: joining them, and agreeing on what one of
them decided or met.

A TPU VM pod runs one process per host; `initialize` joins them through
`jax.distributed`. From then on a process that fails or stops alone would
leave the others waiting in the next collective, so whatever must hold for
all of them goes through one mechanism: the work is done where it can be
(process 0 for a check or a write of the run folder, `from_process_0`;
every process for its own share of the data, `Hosting.agree`), and its
outcome, a value or the failure it met, is told to every process as one
small JSON message (`_told`, `_heard`). A failure is raised again on the
process that met it, and as the same refusal (a `UserError` with its
message) or write failure (an `OSError`) on the others. Stopping on a
signal is agreed at step boundaries (`agreed_stop`).
"""

from __future__ import annotations

import collections
import glob
import itertools
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxlora.errors import UserError

# Environment variables that say "this process is one of several".
MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "TPU_WORKER_HOSTNAMES",
                     "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
# Google's PCI vendor id: the TPU chips of a Cloud TPU VM.
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_METADATA_URL = ("http://metadata.google.internal/computeMetadata/v1/instance/"
                    "attributes/worker-network-endpoints")
# Bytes of a failure's message that reach the other processes, and of the
# whole outcome told.
TOLD_BYTES = 3800
AGREED_BYTES = 4096  # what `agree_text` takes


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


def tpu_pod_workers(pci_devices: str = "/sys/bus/pci/devices",
                    url: str = TPU_METADATA_URL, timeout: float = 5.0) -> int:
    """The hosts of this Cloud TPU VM's slice, as its metadata server lists
    them (`worker-network-endpoints`, one entry per host); 0 on a machine
    without TPU chips (nothing is asked then) or where the server does not
    answer."""
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


def initialize(cfg) -> bool:
    """`jax.distributed.initialize()` when `cfg.distributed` (a `RuntimeConfig`)
    asks for it (or, on auto, when the environment names several processes);
    returns whether this process is one of several. Must run before anything
    touches a device."""
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


def primary() -> bool:
    """Whether this process speaks for the run and writes its folder's files:
    the only one, or process 0 of several; the others compute, and write
    nothing but their part of the checkpoints (through orbax)."""
    return jax.process_index() == 0


# -- the collectives every agreement is made of ------------------------------

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


# -- one mechanism: an outcome told to every process --------------------------

def _cut(text: str) -> str:
    return text.encode()[:TOLD_BYTES].decode(errors="ignore")


def _told(error: BaseException, speaker: str) -> list:
    """How a process tells the others of the failure it met (`_heard` reads it
    back): a refusal by its message, a failed write by its OS error, anything
    else named with its type."""
    named = _cut(f"{speaker}: {type(error).__name__}: {error}")
    if isinstance(error, UserError):
        return ["refused", _cut(str(error))] if str(error) else ["failed", speaker]
    if isinstance(error, OSError):
        return ["write", error.errno, error.strerror or str(error), str(error.filename or ""),
                named]
    return ["failed", named]


def _said(told: list, limit: int) -> bytes:
    """`told` as the JSON bytes that go to the other processes, its message cut
    to fit in `limit` bytes."""
    said = json.dumps(told, ensure_ascii=False).encode()
    while len(said) > limit and told[-1]:
        told = told[:-1] + [told[-1][:len(told[-1]) // 2]]
        said = json.dumps(told, ensure_ascii=False).encode()
    if len(said) > limit:  # what is left is longer still (a file name of thousands of bytes)
        said = json.dumps(["failed", "a failure too long to tell"]).encode()
    return said


def _heard(told: list, oserror: bool) -> Exception:
    """The exception a process raises for another's failure: the same refusal,
    the same failed write (`oserror`; else a refusal naming it), or a refusal
    naming what the other met."""
    if told[0] == "write" and oserror:
        number, strerror, filename, _ = told[1:]
        return OSError(number, strerror, filename or None)
    return UserError(told[-1])


def _attempt(work: Callable[[], Any], speaker: str) -> tuple[Any, BaseException | None, list]:
    """`work()`'s result, the failure it raised (None), and the outcome to tell."""
    try:
        result = work()
    except BaseException as e:  # noqa: BLE001 - the others must hear of any failure
        return None, e, _told(e, speaker)  # (a Ctrl-C included)
    return result, None, ["ok"]


def from_process_0(work: Callable[[], Any], *, oserror: bool = True) -> Any:
    """`work()` done by process 0 for every process (itself with one process),
    its result (a JSON value) returned on all. What it raises is raised on
    process 0 as it is and reaches the others (see the module docstring): a
    refusal as the same `UserError`, a failed write as the same `OSError`
    (`oserror`; else as a `UserError` naming it), anything else as a
    `UserError` naming it. One small broadcast."""
    if jax.process_count() == 1:
        return work()
    failure, said = None, None
    if jax.process_index() == 0:
        result, failure, told = _attempt(work, "process 0")
        if failure is None:
            said = json.dumps(told + [result])
        else:
            said = _said(told, AGREED_BYTES).decode()
    heard = json.loads(agree_text(said))
    if failure is not None:
        raise failure
    if heard[0] != "ok":
        raise _heard(heard, oserror)
    return heard[1]


def agree_check(check: Callable[[], None]) -> None:
    """`check()` on process 0 for all of them (a refusal or a write of the run
    folder): see `from_process_0`. What it returns is not told."""
    def checked() -> None:
        check()

    from_process_0(checked)


def agree_path(make: Callable[[], Path | None], *, new: bool = False) -> Path | None:
    """The run folder (or None) that `make()` gives process 0, on every process
    (see `from_process_0`; an OSError there reaches the others as a refusal
    naming it). `new`: `make` creates the folder. Every process must then see
    the folder: where one does not (hosts each writing to a disk of their own),
    every process raises a UserError naming the processes, and a folder just
    made is removed again (nothing is in it yet)."""
    if jax.process_count() == 1:
        return make()
    made = []

    def chosen() -> str | None:
        made.append(make())
        return None if made[0] is None else str(made[0])

    path = from_process_0(chosen, oserror=False)
    if path is None:
        return None
    path = Path(path)
    blind = [i for i, seen in enumerate(every_process(path.is_dir())) if not seen]
    if blind:
        if new and made:
            made[0].rmdir()
        raise UserError(f"output.dir: process(es) {', '.join(map(str, blind))} cannot see "
                        f"{path}, the run folder process 0 {'made' if new else 'goes on with'}; "
                        "every host must see output.dir at the same path (a shared filesystem: "
                        "NFS, a Filestore or gcsfuse mount)")
    return path


@dataclass(frozen=True)
class Hosting:
    """How the batches of one split are laid out, and which of their rows this
    process feeds (see `jaxlora.data.Split`). `held` None: every row (one
    process). `gather` stacks a small integer array from every process, in
    process order, on every process (None: this process alone)."""

    rows: int
    held: tuple[int, ...] | None = None
    gather: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def held_rows(self) -> range | tuple[int, ...]:
        return range(self.rows) if self.held is None else self.held

    def combine(self, values: np.ndarray, how: Callable = np.sum) -> np.ndarray:
        """`values` of every process reduced over the processes by `how`."""
        values = np.asarray(values)
        return values if self.gather is None else how(np.asarray(self.gather(values)), axis=0)

    def agree(self, work: Callable[[], Any], limit: int = 4096) -> Any:
        """`work()` on every process, where it may fail on some (each reads its
        own share): whatever one raises stops all of them, the others with a
        UserError carrying the message of the first process that failed (see
        the module docstring), instead of leaving them in a collective the
        failed one never joins."""
        if self.gather is None:
            return work()
        result, failure, told = _attempt(work, "another process failed")
        said = b"" if failure is None else _said(told, limit)
        raw = np.zeros(limit, np.uint8)
        raw[:len(said)] = np.frombuffer(said, np.uint8)
        heard = [bytes(row[row > 0]).decode() for row in self.gather(raw)]
        if failure is not None:
            raise failure
        first = next((json.loads(text) for text in heard if text), None)
        if first is not None:
            raise _heard(first, oserror=False)
        return result


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
