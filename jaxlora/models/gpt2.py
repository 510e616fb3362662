"""GPT-2 in Flax NNX, loaded from Hugging Face safetensors, for causal-LM fine-tuning.

    GPT2LMHeadModel
    └── transformer: GPT2Model
        ├── wte (tokens), wpe (positions) -> dropout
        ├── h[i]: GPT2Block (pre-LayerNorm)
        │     x = x + dropout(attn_proj(attention(c_attn(ln_1(x)))))      causal
        │     x = x + dropout(mlp_proj(gelu(c_fc(ln_2(x)))))
        └── ln_f -> logits = x @ wte^T (the head is tied to the token embeddings)

GPT-2 stores its linear layers as `Conv1D`, whose weight is already (in, out),
the axis order of our `Linear`: the weight table loads them without a transpose (and
PEFT export marks them `fan_in_fan_out`). `c_attn` is the fused q/k/v
projection, as in the checkpoint, so a LoRA on `c_attn` is PEFT's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxlora.errors import UserError
from jaxlora.models import weights
from jaxlora.models.layers import (ACTIVATIONS, AttentionImpl, AttentionSpec, CausalLMHead, Embed,
                                   LayerNorm, Linear, attention, cached_attention, dropout,
                                   resolve_attention, split_key, stack_layers)
from jaxlora.runtime import whole

TASKS = ("causal-lm",)

# Hugging Face module inside `h.{i}` -> `Linear` attribute of `GPT2Block`.
_BLOCK_LINEARS = {"attn.c_attn": "c_attn", "attn.c_proj": "attn_proj", "mlp.c_fc": "c_fc",
                  "mlp.c_proj": "mlp_proj"}
LORA_TARGETS = weights.TargetTable({"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj",
                                    "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"},
                                   default=["c_attn"])  # PEFT's default for GPT-2


def _conv1d(hf_module: str, path: str) -> list[weights.Rule]:
    """GPT-2's `Conv1D` stores (in, out): no transpose, unlike `nn.Linear`."""
    return [weights.Rule(f"{hf_module}.weight", f"{path}.kernel"),
            weights.Rule(f"{hf_module}.bias", f"{path}.bias")]


WEIGHT_RULES: list[weights.Rule] = [
    *weights.embedding("wte", "transformer.wte"),
    *weights.embedding("wpe", "transformer.wpe"),
    *(rule for hf, ours in _BLOCK_LINEARS.items()
      for rule in _conv1d(f"h.{{i}}.{hf}", f"transformer.h.{{i}}.{ours}")),
    *weights.layer_norm("h.{i}.ln_1", "transformer.h.{i}.ln_1"),
    *weights.layer_norm("h.{i}.ln_2", "transformer.h.{i}.ln_2"),
    *weights.layer_norm("ln_f", "transformer.ln_f"),
]
# Old checkpoints carry the causal-mask buffers; the LM head is tied to wte.
IGNORED: list[str] = [r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"]
PREFIXES = ("transformer.",)
CAUSAL_LM_ARCHITECTURE = "GPT2LMHeadModel"
FAN_IN_FAN_OUT = True  # PEFT: the base weights are stored (in, out)


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    activation: str
    eps: float
    resid_pdrop: float
    embd_pdrop: float
    attn_pdrop: float

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def attention_dropout(self) -> float:  # the name BERT's and Llama's configs use
        return self.attn_pdrop

    @classmethod
    def from_hf(cls, hf_config: Any) -> GPT2Config:
        c = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if c.get(flag):
                raise UserError(f"{flag} = true is not supported")
        if c.get("tie_word_embeddings") is False:
            raise UserError("tie_word_embeddings = false is not supported for GPT-2 (its LM "
                            "head is the token embedding table)")
        if c.get("scale_attn_weights") is False:
            raise UserError("scale_attn_weights = false is not supported")
        if c.get("activation_function", "gelu_new") not in ACTIVATIONS:
            raise UserError(f"activation_function {c['activation_function']!r} is not "
                            f"supported; supported: {', '.join(ACTIVATIONS)}")
        try:
            return cls(vocab_size=c["vocab_size"], n_positions=c["n_positions"],
                       n_embd=c["n_embd"], n_layer=c["n_layer"], n_head=c["n_head"],
                       n_inner=c.get("n_inner") or 4 * c["n_embd"],
                       activation=c.get("activation_function", "gelu_new"),
                       eps=c.get("layer_norm_epsilon", 1e-5),
                       resid_pdrop=c.get("resid_pdrop", 0.1), embd_pdrop=c.get("embd_pdrop", 0.1),
                       attn_pdrop=c.get("attn_pdrop", 0.1))
        except KeyError as e:
            raise UserError(f"the GPT-2 config has no {e.args[0]!r}") from None


Config = GPT2Config
# What `load` reads a checkpoint with (see `weights.load_checkpoint`).
ARCHITECTURE = weights.Architecture(config_from_hf=GPT2Config.from_hf, rules=WEIGHT_RULES,
                                    ignore=IGNORED, strip_prefixes=PREFIXES,
                                    lora_targets=LORA_TARGETS)


class GPT2Block(nnx.Module):
    def __init__(self, config: GPT2Config, *, param_dtype, attention: str):
        self.config = config
        self.attention_spec = AttentionSpec(causal=True, implementation=attention,
                                            dropout_rate=config.attn_pdrop)
        n, inner = config.n_embd, config.n_inner
        self.ln_1 = LayerNorm(n, eps=config.eps, dtype=param_dtype)
        self.c_attn = Linear(n, 3 * n, dtype=param_dtype)
        self.attn_proj = Linear(n, n, dtype=param_dtype)
        self.ln_2 = LayerNorm(n, eps=config.eps, dtype=param_dtype)
        self.c_fc = Linear(n, inner, dtype=param_dtype)
        self.mlp_proj = Linear(inner, n, dtype=param_dtype)

    def __call__(self, x, mask, rng, cache=None, index=None, segment_ids=None):
        """The block; with a KV `cache` (generation) `mask` is the cache's
        key-valid mask and the result is (x, cache), else x."""
        cfg = self.config
        keys = split_key(rng, 7)
        heads = (*x.shape[:2], cfg.n_head, cfg.n_embd // cfg.n_head)
        q, k, v = jnp.split(self.c_attn(self.ln_1(x), rng=keys[0]), 3, axis=-1)
        q, k, v = q.reshape(heads), k.reshape(heads), v.reshape(heads)
        if cache is not None:
            context, cache = cached_attention(q, k, v, cache, index, mask)
        else:
            context = attention(q, k, v, self.attention_spec, mask=mask, rng=keys[1],
                                segment_ids=segment_ids)
        h = self.attn_proj(context.reshape(x.shape), rng=keys[2])
        x = x + dropout(h, cfg.resid_pdrop, keys[3])
        h = self.mlp_proj(ACTIVATIONS[cfg.activation](self.c_fc(self.ln_2(x), rng=keys[4])),
                          rng=keys[5])
        x = x + dropout(h, cfg.resid_pdrop, keys[6])
        return x if cache is None else (x, cache)


class GPT2Model(nnx.Module):
    def __init__(self, config: GPT2Config, *, param_dtype, compute_dtype, attention):
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype)
        impl = resolve_attention(attention, compute_dtype)
        self.wte = Embed(config.vocab_size, config.n_embd, dtype=param_dtype)
        self.wpe = Embed(config.n_positions, config.n_embd, dtype=param_dtype)
        self.remat = "none"  # train.remat: see layers.REMAT_POLICIES
        self.h = nnx.List([GPT2Block(config, param_dtype=param_dtype, attention=impl)
                           for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, eps=config.eps, dtype=param_dtype)

    def __call__(self, input_ids, attention_mask, *, rng=None, segment_ids=None,
                 positions=None):
        """`segment_ids` and `positions` (batch, seq) describe packed rows."""
        if input_ids.shape[1] > self.config.n_positions:
            raise UserError(f"sequences of {input_ids.shape[1]} tokens exceed the model's "
                            f"n_positions {self.config.n_positions}")
        embed_key, *layer_keys = split_key(rng, 1 + len(self.h))
        if positions is None:
            positions = jnp.arange(input_ids.shape[1])[None, :]
        x = self.wte(input_ids, self.compute_dtype) + self.wpe(positions, self.compute_dtype)
        x = dropout(x, self.config.embd_pdrop, embed_key)
        call = stack_layers(self.remat, lambda block, x, mask, key, segments: block(
            x, mask, key, segment_ids=segments))
        for block, key in zip(self.h, layer_keys):
            x = call(block, x, attention_mask, key, segment_ids)
        return self.ln_f(x)

    def decode(self, input_ids, positions, key_valid, cache, index):
        x = self.wte(input_ids, self.compute_dtype) + self.wpe(positions, self.compute_dtype)
        new = []
        for block, block_cache in zip(self.h, cache):
            x, block_cache = block(x, key_valid, None, block_cache, index)
            new.append(block_cache)
        return self.ln_f(x), new


class GPT2LMHeadModel(CausalLMHead, nnx.Module):
    """`(input_ids, attention_mask) -> float32 logits (batch, seq, vocab)`."""

    BACKBONE = "transformer"  # the layer stack `hidden` runs

    def __init__(self, config: GPT2Config, *, param_dtype=jnp.float32,
                 compute_dtype=jnp.float32, attention: AttentionImpl = "xla"):
        self.config = config
        self.position_limit = config.n_positions  # learned positions: none beyond
        self.transformer = GPT2Model(config, param_dtype=param_dtype,
                                     compute_dtype=compute_dtype, attention=attention)

    def logits(self, x):
        """float32 logits of hidden states `x` (..., hidden)."""
        table = whole(self.transformer.wte.embedding[...]).astype(x.dtype)
        return (x @ table.T).astype(jnp.float32)

    def init_cache(self, batch: int, length: int) -> list:
        """An empty KV cache: per block (keys, values), each (batch, length, heads, head_dim)."""
        cfg = self.config
        shape = (batch, length, cfg.n_head, cfg.n_embd // cfg.n_head)
        dtype = self.transformer.compute_dtype
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layer)]

    def decode(self, input_ids, positions, key_valid, cache, index):
        """Generation: float32 logits (batch, 1, vocab) of the last new token, and the cache."""
        x, cache = self.transformer.decode(input_ids, positions, key_valid, cache, index)
        return self.logits(x[:, -1:]), cache  # only the last position picks a token

    def linear_layers(self) -> dict[str, Linear]:
        return {f"transformer.h.{i}.{hf}": getattr(block, ours)
                for i, block in enumerate(self.transformer.h)
                for hf, ours in _BLOCK_LINEARS.items()}


def load(model_dir: Path, *, task: str = "causal-lm", num_labels: int | None = None,
         param_dtype=jnp.float32, compute_dtype=jnp.float32, attention: AttentionImpl = "auto",
         seed: int = 0, place: weights.Place | None = None) -> weights.LoadedModel:
    """A `GPT2LMHeadModel` with the folder's weights."""
    return weights.load_checkpoint(
        model_dir, ARCHITECTURE,
        lambda config: GPT2LMHeadModel(config, param_dtype=param_dtype,
                                       compute_dtype=compute_dtype, attention=attention),
        dtype=param_dtype, place=place)
