"""LoRA: low-rank adapters on named linear layers, and the trainable/frozen split.

For a frozen linear layer W0 (stored (in, out)) LoRA adds a trainable low-rank
update:

    y = x W0 + b + s * dropout(x) A B        A: (in, r)   B: (r, out)   s = alpha / r

    x ──► W0 ──────────────┐
    │                      (+) ──► y
    └─► dropout ─► A ─► B ─┘  × s

Variants, as PEFT has them (`use_rslora`, `use_dora`):

    rsLoRA (scaling = "rslora")  the scale is alpha / sqrt(r), not alpha / r
                                 (Kalajdzievski 2023: the update's size then
                                 does not shrink as the rank grows)
    DoRA   (dora = true)         y = m / ||W0 + s A B|| * x (W0 + s A B) + b
                                 (Liu et al. 2024), the norm per output feature
                                 (over W0's input axis), m a trained magnitude
                                 per output feature starting at ||W0||, the
                                 bias not scaled. The norm is a constant in the
                                 gradient (PEFT detaches it: the paper's 4.3).
                                 W0 is the weight the layer computes with (the
                                 dequantized 4-bit one under qlora).

DoRA keeps ||W0||^2 per output feature as a frozen `DoraNorm` and computes the
norm of W0 + s A B from it and two rank-r products (`_sq_norm_gain`), never
forming W0 + s A B: no weight-sized temporary per layer, and with B = 0 the
norm is exactly the initial magnitude, so the model is exactly the base model.
With dropout in training the rescaled base term sees the dropped-out input,
as in PEFT (one more x W0 product per layer).

How A and B start (`init`), each as PEFT's `init_lora_weights` of that name:

    default    A kaiming-uniform (bound 1/sqrt(in)), B zero: the adapted model
               starts exactly equal to the base model
    gaussian   A ~ normal(0, std 1/r), B zero: the same, exactly
    pissa      PiSSA (Meng et al. 2024): W0 = U S V^T (full SVD, float32);
               A = U_r sqrt(S_r / s), B = sqrt(S_r / s) V_r^T (s the scale)
               take the r principal singular values and vectors, and the
               frozen weight becomes the residual W0 - s A B (cast back to its
               dtype), so the model starts equal to the base up to rounding.
               For QLoRA the residual is what gets quantized. The SVD is not
               bit-reproducible across machines: whoever rebuilds the model
               passes the factors it started from (`adapt(initial=...)`) and
               gets the same residual again: bit for bit on the same kind of
               device with the same layout of the frozen weights, elsewhere
               up to the float32 rounding of the product s A B (a matmul's
               summation order depends on the backend and the sharding)

A and B are `nnx.LoRAParam` in float32 whatever the base dtype (and so is DoRA's m). PEFT stores
`lora_A.weight` as (r, in) and `lora_B.weight` as (out, r): export transposes.

Which weights train is decided by variable *type* (`trainable_filter`), once,
by `nnx.split` before compiling:

    method   trainable                     frozen
    lora     nnx.LoRAParam + HeadParam     BaseWeight (+ DoraNorm)
    qlora    nnx.LoRAParam + HeadParam     QuantState (4-bit linears) + BaseWeight (+ DoraNorm)
    full     BaseWeight + HeadParam        -

Targets are names of linear layers inside each transformer block, as the
model family declares them (`LORA_TARGETS`, e.g. BERT's `query`, `value`,
`attention.output`), or `all-linear`. A name the family does not know, or one
that matches no layer, is an error that lists the model's linear layers.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Annotated, Any, Literal, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator,
                      model_validator)

from jaxlora.errors import UserError
from jaxlora.models.layers import BaseWeight, FrozenKernel, HeadParam, Linear, dropout
from jaxlora.quant import QuantConfig, Sharding, quantize_linears
from jaxlora.runtime import to_host, whole

ALL_LINEAR = "all-linear"


class LoraConfig(BaseModel):
    """`adapter.method = "lora"`: low-rank adapters over frozen base weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["lora"] = "lora"
    rank: int = Field(8, gt=0, le=4096)  # r, the inner dimension of A and B
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout on the adapter's input (train only)
    # the update's scale: alpha / rank, or rsLoRA's alpha / sqrt(rank) (rank-stabilized)
    scaling: Literal["standard", "rslora"] = "standard"
    dora: bool = False  # DoRA: a trained magnitude per output feature times the normalized W + BA
    # layer names, or all-linear; unset: the model family's default (PEFT's: BERT
    # query/value, GPT-2 c_attn, Llama/Mistral/Qwen2 q_proj/v_proj)
    targets: Union[Literal["all-linear"], list[str], None] = None
    # how A and B start: default (kaiming-uniform A, zero B), gaussian (normal A,
    # std 1/rank, zero B), or pissa (W's principal singular vectors; W becomes the residual)
    init: Literal["default", "gaussian", "pissa"] = "default"

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, v):
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("must list at least one layer name, each once")
        return v

    @model_validator(mode="after")
    def _pissa_not_with_dora(self):
        if self.init == "pissa" and self.dora:
            raise ValueError('adapter.init = "pissa" with adapter.dora = true: not supported '
                             "(DoRA's magnitudes start from a weight with B at zero; PiSSA "
                             "starts B at the principal part); choose one")
        return self

    @property
    def scale(self) -> float:
        """The factor of the update B A: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.scaling == "rslora" else self.rank)


class QLoraConfig(LoraConfig):
    """`adapter.method = "qlora"`: LoRA over 4-bit quantized frozen linear weights."""

    method: Literal["qlora"] = "qlora"
    quant: QuantConfig = QuantConfig()  # [adapter.quant]: codebook, block size, double quant


class FullConfig(BaseModel):
    """`adapter.method = "full"`: every base weight is trained (no adapters)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["full"] = "full"


def variant_names(adapter: dict) -> list[str]:
    """The LoRA variants an [adapter] table as data (a manifest's recipe, a
    `model_dump()`) turns on, by their papers' names."""
    init = adapter.get("init", "default")
    return (["rsLoRA"] if adapter.get("scaling") == "rslora" else []) + \
        (["DoRA"] if adapter.get("dora") else []) + \
        (["PiSSA"] if init == "pissa" else [f"{init} init"] if init != "default" else [])


def _method(value) -> str | None:
    """The discriminator: `method`, which defaults to "lora" when left out."""
    if isinstance(value, dict):
        return value.get("method", "lora")
    return getattr(value, "method", None)


# The recipe's [adapter] table: one variant per method, chosen by `method`.
AdapterConfig = Annotated[Union[Annotated[LoraConfig, Tag("lora")],
                                Annotated[QLoraConfig, Tag("qlora")],
                                Annotated[FullConfig, Tag("full")]],
                          Discriminator(_method)]


class LoRAAdapter(nnx.Module):
    """The low-rank update `scale * dropout(x) A B` of one linear layer."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, scale: float,
                 dropout_rate: float, key: jax.Array, init: str = "default"):
        self.lora_a = nnx.LoRAParam(_fresh_a(init, key, in_features, rank))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), jnp.float32))
        self.scale = scale
        self.dropout_rate = dropout_rate

    def __call__(self, x: jax.Array, rng: jax.Array | None, kernel: FrozenKernel,
                 base: jax.Array) -> jax.Array:
        """What the layer adds to `base` = x W (+ bias); `kernel` unused here."""
        x = dropout(x, self.dropout_rate, rng).astype(jnp.float32)
        return (x @ whole(self.lora_a[...])) @ whole(self.lora_b[...]) * self.scale


def _fresh_a(init: str, key: jax.Array, in_features: int, rank: int) -> jax.Array:
    """A freshly drawn A (in, r): PEFT's "gaussian" (std 1/r), else its default
    (kaiming_uniform_(a=sqrt(5)): bound 1/sqrt(in)); PiSSA's replace it."""
    if init == "gaussian":
        return jax.random.normal(key, (in_features, rank), jnp.float32) / rank
    bound = 1.0 / math.sqrt(in_features)
    return jax.random.uniform(key, (in_features, rank), jnp.float32, -bound, bound)


Factors = dict[str, tuple[np.ndarray, np.ndarray]]  # layer path -> (A (in, r), B (r, out))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _principal(kernel: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """PEFT's `pissa_init` ("pissa": full SVD) on our (in, out) kernel, which is
    PEFT's (out, in) weight transposed: A = U_r sqrt(S_r / s) is PEFT's lora_A
    transposed, B = sqrt(S_r / s) V_r^T its lora_B transposed."""
    u, s, vh = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(s[:rank] / scale)
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@functools.partial(jax.jit, static_argnums=(3, 4))
def _residual(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float,
              sharding: Sharding | None) -> jax.Array:
    """W0 - s A B in float32, cast back to the kernel's dtype (in `sharding`).
    The product at full float32 precision: a GPU's default may round float32
    products to TF32 (10 mantissa bits), far coarser than the start needs."""
    product = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    residual = (kernel.astype(jnp.float32) - scale * product).astype(kernel.dtype)
    if sharding is None:
        return residual
    return jax.lax.with_sharding_constraint(residual, sharding(residual.shape))


def pissa(linears: dict[str, Linear], paths: list[str], cfg: LoraConfig,
          initial: Factors | None = None, sharding: Sharding | None = None
          ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """PiSSA on the layers `paths`, in place: each kernel becomes its residual;
    returns the factors A, B each adapter starts from, as the device arrays
    the residual was computed from (for `apply_lora`: uploaded once). They are
    computed (SVD) unless `initial` gives them (a model rebuilt: the same
    residual as when it was first built, bit for bit on the same kind of
    device and `sharding`, else up to the rounding of s A B; see the module
    docstring)."""
    factors = {}
    scale = cfg.scale
    for path in paths:
        layer = linears[path]
        smallest = min(layer.in_features, layer.out_features)
        if cfg.rank > smallest:
            raise UserError(f"adapter.rank: {cfg.rank} is more than the {smallest} singular "
                            f'values {path} has; adapter.init = "pissa" takes the top rank '
                            "of them")
        # on the host, whole (a sharded kernel's SVD may come out spread over processes)
        a, b = map(jnp.asarray, initial[path] if initial is not None else
                   to_host(_principal(layer.kernel[...], cfg.rank, scale)))
        layer.kernel[...] = _residual(layer.kernel[...], a, b, scale, sharding)
        factors[path] = (a, b)
    return factors


class DoraNorm(nnx.Variable):
    """||W||^2 per output feature of a DoRA layer's frozen weight (frozen)."""


class DoRAAdapter(LoRAAdapter):
    """DoRA: the layer becomes `m / ||W + s A B|| * x (W + s A B) + bias`, with
    the norm per output feature, `m` trained, and the norm a constant in the
    gradient (see the module docstring); it returns what that adds to `base`."""

    def __init__(self, in_features: int, out_features: int, *, sq_norm: jax.Array,
                 **lora):
        super().__init__(in_features, out_features, **lora)
        self.sq_norm = DoraNorm(sq_norm)
        # the same square root as `__call__` takes of sq_norm + 0 while B = 0
        self.magnitude = nnx.LoRAParam(jnp.sqrt(sq_norm))

    def __call__(self, x: jax.Array, rng: jax.Array | None, kernel: FrozenKernel,
                 base: jax.Array) -> jax.Array:
        a, b = whole(self.lora_a[...]), whole(self.lora_b[...])
        gain = jax.lax.stop_gradient(_sq_norm_gain(a, b, kernel, self.scale))
        norm = jnp.sqrt(whole(self.sq_norm[...]) + gain)
        magnitude = whole(self.magnitude[...])
        # m / norm - 1 written so that it is exactly 0 where m is the norm: XLA
        # turns a division by a square root into a product with rsqrt, not exact
        excess = (magnitude - norm) / norm
        if rng is not None and self.dropout_rate > 0:
            # as PEFT: with dropout in training, the rescaled base term sees the
            # dropped-out input too (the layer's own x W + bias keeps the whole x)
            x = dropout(x, self.dropout_rate, rng)
            base = kernel.apply(x)
        update = (x.astype(jnp.float32) @ a) @ b * self.scale
        return excess * base.astype(jnp.float32) + (magnitude / norm) * update


def _sq_norm_gain(a: jax.Array, b: jax.Array, kernel: FrozenKernel, scale: float) -> jax.Array:
    """||W + s A B||^2 - ||W||^2 per output feature j, never forming W + s A B:
    sum_k B_kj (2 s (A^T W)_kj + s^2 (A^T A B)_kj). Exactly 0 where B is 0.
    The products at full float32 precision, as `_residual`'s: a GPU's default
    rounds float32 inputs to TF32, and they are rank-r (r / tokens of the
    layer's own x W); bfloat16 inputs are exact products either way."""
    full = jax.lax.Precision.HIGHEST
    a_w = jax.lax.dot_general(a.astype(kernel.value.dtype), kernel.value,
                              (((0,), (kernel.in_axis,)), ((), ())), precision=full,
                              preferred_element_type=jnp.float32)  # (r, out)
    a_a_b = jnp.matmul(jnp.matmul(a.T, a, precision=full), b, precision=full)  # (r, out)
    return jnp.sum(b * (2.0 * scale * a_w + scale * scale * a_a_b), axis=0)


def _sq_norms(kernel: FrozenKernel) -> jax.Array:
    """||W||^2 per output feature, float32."""
    return jnp.sum(jnp.square(kernel.value.astype(jnp.float32)), axis=kernel.in_axis)


def _matches(path: str, suffix: str) -> bool:
    """`path` is `<...>.<block index>.<suffix>`: the layer `suffix` inside a block."""
    return re.fullmatch(rf"(.*\.)?\d+\.{re.escape(suffix)}", path) is not None


def select_targets(targets, linears: dict[str, Linear], table: dict[str, str]) -> list[str]:
    """The paths of the linear layers that `targets` names (see the module
    docstring); None: the family's default (`table.default`)."""
    if targets is None:
        targets = getattr(table, "default", None)
        if not targets:
            raise UserError("adapter.targets: this model family has no default LoRA targets; "
                            f"name them: {', '.join(table)} or {ALL_LINEAR!r}")
    if targets == ALL_LINEAR:
        return list(linears)
    listing = "\n  ".join(linears)
    chosen: set[str] = set()
    for name in targets:
        if name not in table:
            raise UserError(
                f"adapter.targets: {name!r} is not a LoRA target of this model; valid names: "
                f"{', '.join(table)} or {ALL_LINEAR!r}. The model's linear layers:\n  {listing}")
        hits = [p for p in linears if _matches(p, table[name])]
        if not hits:
            raise UserError(f"adapter.targets: {name!r} matched no linear layer of this "
                            f"model. Its linear layers:\n  {listing}")
        chosen.update(hits)
    return [p for p in linears if p in chosen]  # model order


def apply_lora(linears: dict[str, Linear], paths: list[str], cfg: LoraConfig, key: jax.Array,
               factors: dict[str, tuple[jax.Array, jax.Array]] | None = None) -> None:
    """Attach a fresh `LoRAAdapter` to every layer of `paths`; PiSSA's `factors`
    (see `pissa`) replace the drawn A and zero B where given."""
    for path, k in zip(paths, jax.random.split(key, len(paths))):
        layer = linears[path]
        shared = dict(rank=cfg.rank, scale=cfg.scale, dropout_rate=cfg.dropout, key=k,
                      init=cfg.init)
        layer.lora = (DoRAAdapter(layer.in_features, layer.out_features, **shared,
                                  sq_norm=_sq_norms(layer.frozen_kernel(jnp.float32)))
                      if cfg.dora else LoRAAdapter(layer.in_features, layer.out_features, **shared))
        if factors:
            layer.lora.lora_a[...], layer.lora.lora_b[...] = map(jnp.asarray, factors[path])


def trainable_filter(method: Literal["lora", "qlora", "full"]):
    """The nnx filter selecting the trainable variables for `method`."""
    if method in ("lora", "qlora"):
        return nnx.Any(nnx.LoRAParam, HeadParam)
    return nnx.Any(BaseWeight, HeadParam)


def count_params(state) -> int:
    """Number of scalars in an nnx State (or any pytree of arrays)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(state))


class Adapted(NamedTuple):
    """A model split once by variable type, after `adapt`."""

    graphdef: nnx.GraphDef
    trainable: Any  # nnx.State of what trains (`trainable_filter`)
    frozen: Any  # nnx.State of the rest
    layers: list[str]  # the paths of the linear layers that got adapters


def adapt(model: nnx.Module, cfg, table: dict[str, str], key: jax.Array,
          sharding: Sharding | None = None, *, attach: bool = True,
          initial: Factors | None = None) -> Adapted:
    """Step 1, the method: PiSSA's residuals (`cfg.init`; from the factors
    `initial` gives, else by SVD), then quantize the linear weights (QLoRA;
    their codes and scales computed straight into `sharding`, see
    `quant.Sharding`), attach adapters (LoRA, QLoRA; not without `attach`: the
    base model as the method holds it), and split the model once into
    (graphdef, trainable, frozen) by variable type; also gives the adapted
    layer paths."""
    linears = model.linear_layers()
    paths = ([] if cfg.method == "full" or not attach else
             select_targets(cfg.targets, linears, table))
    principal = cfg.method != "full" and cfg.init == "pissa"
    factors = pissa(linears, paths, cfg, initial, sharding) if principal else None
    if cfg.method == "qlora":
        quantize_linears(linears, cfg.quant, sharding)
    apply_lora(linears, paths, cfg, key, factors)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg.method), ...)
    return Adapted(graphdef, trainable, frozen, paths)


def adapter_factors(model: nnx.Module) -> Factors:
    """Every adapter's A (in, r) and B (r, out), float32 on the host, by layer path."""
    return {path: to_host((layer.lora.lora_a[...], layer.lora.lora_b[...]))
            for path, layer in model.linear_layers().items() if layer.lora is not None}
