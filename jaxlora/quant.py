"""4-bit frozen weights for QLoRA: NF4 or int4 codes, blockwise absmax scales,
optional double quantization of the scales, two codes packed per byte.

A weight W (stored (in, out) by our Linear) is quantized as its transpose
flattened row-major, i.e. in blocks of `block_size` consecutive *input*
elements of one output unit: exactly the blocks bitsandbytes forms over a
PyTorch (out, in) weight. Per block:

    absmax = max |w|            code = nearest(w / absmax) in the codebook
    w'     = codebook[code] * absmax

Codebooks (16 values, one 4-bit code each):
    nf4    the QLoRA paper's NormalFloat: quantiles of N(0, 1) scaled to [-1, 1],
           with an exact zero (the values bitsandbytes uses)
    int4   symmetric integers -7..7 over 7. The 16th code (-8) is never chosen:
           a symmetric grid maps w and -w to mirrored codes and absmax exactly
           to +-7, which an asymmetric -8..7 grid cannot do.

Double quantization (QLoRA's DQ, default on for nf4) stores the float32
absmax values themselves in 8 bits: subtract their mean, then blockwise absmax
over blocks of 256 with bitsandbytes' signed 8-bit "dynamic" code. Memory per
quantized parameter: 4 + 32/64 = 4.5 bits without DQ; 4 + 8/64 + 32/(64*256)
= 4.127 bits with it (block 64).

The codes and scales are `QuantState` variables: never trainable, never in the
optimizer. `QuantizedKernel.dequantize` runs inside the jit'd step, per layer,
straight into the compute dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jaxlora.runtime import whole

# The QLoRA paper's NF4 codebook, as bitsandbytes ships it.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
INT4_CODE = (np.arange(-8, 8) / 7.0).astype(np.float32)
CODEBOOKS = {"nf4": NF4_CODE, "int4": INT4_CODE}
SCALE_BLOCK = 256  # block of the double-quantized absmax values (bitsandbytes' choice)


def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (256 sorted values in [-1, 1]).

    For each decimal exponent e = -6..0, 2^(e+6) evenly spaced means of
    [0.1, 1] scaled by 10^e, both signs; then 0 and 1; the rest zeros. Dense
    near zero, so small scales keep their relative precision.
    """
    values: list[float] = []
    for i in range(7):
        bounds = np.linspace(0.1, 1.0, 2 ** i + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = 10.0 ** (i - 6)  # scaled in float64, stored in float32, as bitsandbytes
        values += [scale * float(m) for m in means] + [-scale * float(m) for m in means]
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return np.sort(np.array(values, np.float32))


DYNAMIC_CODE = dynamic_code()


class QuantConfig(BaseModel):
    """How QLoRA stores the frozen linear weights ([adapter.quant])."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["nf4", "int4"] = "nf4"  # the 4-bit codebook
    block_size: int = Field(64, ge=2, le=4096)  # elements sharing one absmax scale
    double_quant: bool | None = None  # 8-bit scales; None = on for nf4, off for int4

    @field_validator("block_size")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (two 4-bit codes share a byte)")
        return v

    @property
    def use_double_quant(self) -> bool:
        return self.type == "nf4" if self.double_quant is None else self.double_quant


class QuantState(nnx.Variable):
    """Codes or scales of a quantized frozen weight (never trained)."""


def _nearest(values: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook entry (sorted codebook) for each value."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return jnp.searchsorted(midpoints, values, side="left").astype(jnp.uint8)


def _blockwise(flat: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """(flat padded with zeros to whole blocks, reshaped (blocks, block); absmax per block)."""
    pad = (-flat.size) % block
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, block)
    return blocks, jnp.max(jnp.abs(blocks), axis=1)


def _safe(absmax: jax.Array) -> jax.Array:
    return jnp.where(absmax == 0, 1.0, absmax)  # an all-zero block stays zero


def quantize(flat: jax.Array, cfg: QuantConfig) -> dict[str, jax.Array]:
    """Quantize a 1-D float array; returns the stored arrays (see the module doc)."""
    flat = flat.astype(jnp.float32)
    blocks, absmax = _blockwise(flat, cfg.block_size)
    codes = _nearest(blocks / _safe(absmax)[:, None], jnp.asarray(CODEBOOKS[cfg.type]))
    codes = codes.reshape(-1)[:flat.size]
    codes = jnp.pad(codes, (0, codes.size % 2))
    state = {"codes": (codes[0::2] << 4) | codes[1::2]}  # first code in the high nibble
    if not cfg.use_double_quant:
        state["absmax"] = absmax
        return state
    offset = absmax.mean()
    scale_blocks, scale_absmax = _blockwise(absmax - offset, SCALE_BLOCK)
    scale_codes = _nearest(scale_blocks / _safe(scale_absmax)[:, None],
                           jnp.asarray(DYNAMIC_CODE))
    state["absmax_codes"] = scale_codes.reshape(-1)[:absmax.size]
    state["absmax_scale"] = scale_absmax
    state["absmax_offset"] = offset
    return state


def dequantize(state: dict[str, jax.Array], size: int, cfg: QuantConfig,
               dtype=jnp.float32) -> jax.Array:
    """The 1-D array of `size` values that `quantize` stored, in `dtype`."""
    packed = state["codes"]
    codes = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:size]
    if cfg.use_double_quant:
        n = state["absmax_codes"].size
        scale = jnp.repeat(state["absmax_scale"], SCALE_BLOCK)[:n]
        absmax = (jnp.asarray(DYNAMIC_CODE)[state["absmax_codes"]] * scale
                  + state["absmax_offset"])
    else:
        absmax = state["absmax"]
    block = cfg.block_size
    values = jnp.asarray(CODEBOOKS[cfg.type])[codes]
    pad = (-size) % block
    values = jnp.pad(values, (0, pad)).reshape(-1, block) * absmax[:, None]
    return values.reshape(-1)[:size].astype(dtype)


# Where each stored array of a quantized kernel goes: its shape -> a sharding
# (a mesh's FSDP rule, `runtime.Placement.frozen_sharding`); None: as XLA leaves
# it. Hashable: it is a static argument of the compiled quantizer.
Sharding = Callable[[tuple[int, ...]], jax.sharding.Sharding]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_kernel(kernel: jax.Array, cfg: QuantConfig,
                     sharding: Sharding | None) -> dict[str, jax.Array]:
    stored = quantize(kernel.T.reshape(-1), cfg)
    if sharding is None:
        return stored
    # Constrained inside the function, XLA partitions the quantization over the
    # mesh and no device ever holds more than its share of the outputs.
    return {k: jax.lax.with_sharding_constraint(v, sharding(v.shape)) for k, v in stored.items()}


class QuantizedKernel(nnx.Module):
    """A Linear's (in, out) kernel held as 4-bit codes; dequantizes on use.

    With `sharding`, the codes and scales are computed straight into it (the
    kernel may already be sharded: see `jaxlora.models.weights.Place`)."""

    def __init__(self, kernel: jax.Array, cfg: QuantConfig, sharding: Sharding | None = None):
        self.shape = tuple(kernel.shape)
        self.cfg = cfg
        stored = _quantize_kernel(kernel, cfg, sharding)
        self.state = nnx.Dict({k: QuantState(v) for k, v in stored.items()})

    def dequantize_out_in(self, dtype) -> jax.Array:
        """The kernel in `dtype`, as stored: (out, in), PyTorch's axis order."""
        n_in, n_out = self.shape
        # gathered as stored (4-bit codes, scales), then dequantized whole
        stored = {k: whole(v[...]) for k, v in self.state.items()}
        return dequantize(stored, n_in * n_out, self.cfg, dtype).reshape(n_out, n_in)


def quantize_linears(linears: dict, cfg: QuantConfig, sharding: Sharding | None = None) -> None:
    """Replace every listed Linear's kernel by its quantized form, in place."""
    for layer in linears.values():
        layer.kernel = QuantizedKernel(layer.kernel[...], cfg, sharding)


def footprint(frozen) -> dict:
    """Bytes of all frozen weights, and of the quantized ones, from the arrays."""
    quantized_bytes = other_bytes = 0
    for _, var in nnx.to_flat_state(frozen):
        nbytes = _nbytes(var)
        if isinstance(var, QuantState):
            quantized_bytes += nbytes
        else:
            other_bytes += nbytes
    return {"frozen_bytes": quantized_bytes + other_bytes, "quantized_bytes": quantized_bytes}


def bits_per_parameter(linears: dict) -> float | None:
    """Stored bits per parameter over all quantized kernels (None if there are none)."""
    bits = params = 0
    for layer in linears.values():
        kernel = layer.kernel
        if isinstance(kernel, QuantizedKernel):
            params += math.prod(kernel.shape)
            bits += 8 * sum(_nbytes(v) for v in kernel.state.values())
    return bits / params if params else None


def _nbytes(var: nnx.Variable) -> int:
    """Bytes the variable's array really takes (elements x item size)."""
    value = var[...]
    return int(value.size) * value.dtype.itemsize
