"""Where the arrays live and how the processes of one run agree: the lowest
layer of jaxlora, importing nothing of it but `jaxlora.errors`.

    config.py      RuntimeConfig: the recipe's [runtime] table
    mesh.py        the (data, fsdp) device mesh and `Placement`: where each
                   array goes, FSDP gathering (`whole`)
    processes.py   joining the processes of a pod, and one mechanism by which
                   what one process decided or met reaches all of them
                   (`from_process_0`, `Hosting.agree`); agreed stops
    memory.py      memory probes: host and device memory, bytes of arrays
    compile.py     `jit`: jax.jit with this backend's XLA options

The step's code is the same on one device and on a pod: with several
processes (a TPU VM pod, one per host) `initialize` joins them first, the
mesh spans every host's devices, and each host hands its own devices their
rows of every batch.
"""

from jaxlora.runtime.compile import CPU_COMPILER_OPTIONS, compiler_options, jit
from jaxlora.runtime.config import RuntimeConfig
from jaxlora.runtime.memory import (device_bytes, device_memory, host_memory, peak_memory,
                                    whole_bytes)
from jaxlora.runtime.mesh import (Placement, device_grid, make_placement, mesh_shape,
                                  per_device_bytes, whole)
from jaxlora.runtime.processes import (GOOGLE_PCI_VENDOR, MULTI_PROCESS_ENV, TPU_METADATA_URL,
                                       Hosting, StopAgreement, StopVotes, agree_check,
                                       agree_path, agree_text, agreed_stop, every_process,
                                       from_process_0, gather, initialize,
                                       multi_process_environment, primary, to_host,
                                       tpu_pod_workers)

__all__ = ["CPU_COMPILER_OPTIONS", "GOOGLE_PCI_VENDOR", "Hosting", "MULTI_PROCESS_ENV",
           "Placement", "RuntimeConfig", "StopAgreement", "StopVotes", "TPU_METADATA_URL",
           "agree_check", "agree_path", "agree_text", "agreed_stop", "compiler_options",
           "device_bytes", "device_grid", "device_memory", "every_process", "from_process_0",
           "gather", "host_memory", "initialize", "jit", "make_placement", "mesh_shape",
           "multi_process_environment", "peak_memory", "per_device_bytes", "primary",
           "to_host", "tpu_pod_workers", "whole", "whole_bytes"]
