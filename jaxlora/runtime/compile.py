"""How jaxlora compiles its steps: `jax.jit` with the XLA options of this backend."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

# XLA:CPU hands matrix products to YNNPACK by default, in fusions that also take
# in the elementwise work and reductions around them (a GELU or LayerNorm
# backward between two products); on the CPU those fusions ran slower than
# XLA's own loop fusions. Why, measured: bench/NOTES.md v7. Tests compare the
# numbers with transformers and PEFT either way.
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
