"""LoRA: low-rank adapters on named linear layers, and the trainable/frozen split.

For a frozen linear layer W0 (stored (in, out)) LoRA adds a trainable low-rank
update:

    y = x W0 + b + (alpha / r) * dropout(x) A B        A: (in, r)   B: (r, out)

    x ──► W0 ──────────────┐
    │                      (+) ──► y
    └─► dropout ─► A ─► B ─┘  × alpha/r

A is drawn like PEFT's (kaiming-uniform, bound 1/sqrt(in)); B starts at zero,
so the adapted model starts exactly equal to the base model. A and B are
`nnx.LoRAParam` in float32 whatever the base dtype. PEFT stores
`lora_A.weight` as (r, in) and `lora_B.weight` as (out, r): export transposes.

Which weights train is decided by variable *type* (`trainable_filter`), once,
by `nnx.split` before compiling:

    method   trainable                     frozen
    lora     nnx.LoRAParam + HeadParam     BaseWeight
    qlora    nnx.LoRAParam + HeadParam     QuantState (4-bit linears) + BaseWeight
    full     BaseWeight + HeadParam        -

Targets are names of linear layers inside each transformer block, as the
model family declares them (`LORA_TARGETS`, e.g. BERT's `query`, `value`,
`attention.output`), or `all-linear`. A name the family does not know, or one
that matches no layer, is an error that lists the model's linear layers.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, NamedTuple, Union

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from jaxlora.errors import UserError
from jaxlora.models.layers import BaseWeight, HeadParam, Linear, dropout
from jaxlora.quant import QuantConfig, quantize_linears
from jaxlora.runtime import whole

ALL_LINEAR = "all-linear"


class LoraConfig(BaseModel):
    """`adapter.method = "lora"`: low-rank adapters over frozen base weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["lora"] = "lora"
    rank: int = Field(8, gt=0, le=4096)  # r, the inner dimension of A and B
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout on the adapter's input (train only)
    # layer names, or all-linear; unset: the model family's default (PEFT's: BERT
    # query/value, GPT-2 c_attn, Llama/Mistral/Qwen2 q_proj/v_proj)
    targets: Union[Literal["all-linear"], list[str], None] = None

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, v):
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("must list at least one layer name, each once")
        return v


class QLoraConfig(LoraConfig):
    """`adapter.method = "qlora"`: LoRA over 4-bit quantized frozen linear weights."""

    method: Literal["qlora"] = "qlora"
    quant: QuantConfig = QuantConfig()  # [adapter.quant]: codebook, block size, double quant


class FullConfig(BaseModel):
    """`adapter.method = "full"`: every base weight is trained (no adapters)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["full"] = "full"


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
    """The low-rank update `(alpha / r) * dropout(x) A B` of one linear layer."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
                 dropout_rate: float, key: jax.Array):
        bound = 1.0 / math.sqrt(in_features)  # PEFT: kaiming_uniform_(a=sqrt(5))
        self.lora_a = nnx.LoRAParam(
            jax.random.uniform(key, (in_features, rank), jnp.float32, -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), jnp.float32))
        self.scale = alpha / rank
        self.dropout_rate = dropout_rate

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        x = dropout(x, self.dropout_rate, rng).astype(jnp.float32)
        return (x @ whole(self.lora_a[...])) @ whole(self.lora_b[...]) * self.scale


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


def apply_lora(linears: dict[str, Linear], cfg: LoraConfig, table: dict[str, str],
               key: jax.Array) -> list[str]:
    """Attach a fresh `LoRAAdapter` to every targeted layer; returns their paths."""
    paths = select_targets(cfg.targets, linears, table)
    for path, k in zip(paths, jax.random.split(key, len(paths))):
        layer = linears[path]
        layer.lora = LoRAAdapter(layer.in_features, layer.out_features, rank=cfg.rank,
                                 alpha=cfg.alpha, dropout_rate=cfg.dropout, key=k)
    return paths


def trainable_filter(method: Literal["lora", "qlora", "full"]):
    """The nnx filter selecting the trainable variables for `method`."""
    if method in ("lora", "qlora"):
        return nnx.Any(nnx.LoRAParam, HeadParam)
    return nnx.Any(BaseWeight, HeadParam)


def count_params(state) -> int:
    """Number of scalars in an nnx State (or any pytree of arrays)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(state))


def without_adapters(trainable):
    """`trainable` with every LoRA B set to zero: the adapted model then computes
    exactly the base model (used for the "before" evaluation)."""
    flat = [(path, var.replace(jnp.zeros_like(var[...])) if path[-1] == "lora_b" else var)
            for path, var in nnx.to_flat_state(trainable)]
    return nnx.from_flat_state(flat)


class Adapted(NamedTuple):
    """A model split once by variable type, after `adapt`."""

    graphdef: nnx.GraphDef
    trainable: Any  # nnx.State of what trains (`trainable_filter`)
    frozen: Any  # nnx.State of the rest
    layers: list[str]  # the paths of the linear layers that got adapters


def adapt(model: nnx.Module, cfg, table: dict[str, str], key: jax.Array,
          sharding=None, *, attach: bool = True) -> Adapted:
    """Step 1, the method: quantize the linear weights (QLoRA; their codes and
    scales computed straight into `sharding`, see `quant.Sharding`), attach
    adapters (LoRA, QLoRA; not without `attach`: the base model as the method
    holds it), and split the model once into (graphdef, trainable, frozen) by
    variable type; also gives the adapted layer paths."""
    if cfg.method == "qlora":
        quantize_linears(model.linear_layers(), cfg.quant, sharding)
    paths = ([] if cfg.method == "full" or not attach else
             apply_lora(model.linear_layers(), cfg, table, key))
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg.method), ...)
    return Adapted(graphdef, trainable, frozen, paths)
