"""Llama-family decoders (Llama 2/3.x, Mistral, Qwen2) in Flax NNX, for causal-LM fine-tuning.

    LlamaForCausalLM
    ├── model: LlamaModel
    │   ├── embed_tokens
    │   ├── layers[i]: LlamaDecoderLayer (pre-RMSNorm)
    │   │     x = x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))  n = norm(x)
    │   │     x = x + down_proj(silu(gate_proj(n)) * up_proj(n))                 n = norm(x)
    │   └── norm
    └── lm_head (or the token embeddings, when tied)

The variants differ only by configuration, read from config.json:
grouped-query attention (num_key_value_heads), RoPE with Llama-3 (or linear)
frequency scaling (or explicit per-frequency factors, a GGUF file's
`rope_freqs` tensor), q/k/v biases (Qwen2, or `attention_bias`), MLP biases,
sliding-window attention (Mistral's `sliding_window`; Qwen2's per layer), tied
or untied embeddings, an explicit head_dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.errors import UserError
from jaxlora.models import weights
from jaxlora.models.gguf import FREQUENCY_FACTORS
from jaxlora.models.layers import (AttentionImpl, AttentionSpec, CausalLMHead, Embed, Linear,
                                   RMSNorm, attention, cached_attention, resolve_attention, rotary,
                                   split_key, stack_layers)
from jaxlora.runtime import whole

TASKS = ("causal-lm",)
_ATTENTION = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
              "self_attn.v_proj": "v_proj", "self_attn.o_proj": "o_proj"}
_MLP = {"mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "down_proj"}
_BLOCK_LINEARS = {**_ATTENTION, **_MLP}
LORA_TARGETS = weights.TargetTable({ours: hf for hf, ours in _BLOCK_LINEARS.items()},
                                   default=["q_proj", "v_proj"])  # PEFT's default

WEIGHT_RULES: list[weights.Rule] = [
    *weights.embedding("embed_tokens", "model.embed_tokens"),
    *(weights.Rule(f"layers.{{i}}.{hf}.{part}", f"model.layers.{{i}}.{ours}.{kind}", transform)
      for hf, ours in _BLOCK_LINEARS.items()
      for part, kind, transform in (("weight", "kernel", "transpose"), ("bias", "bias", "none"))),
    weights.Rule("layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.scale"),
    weights.Rule("layers.{i}.post_attention_layernorm.weight",
                 "model.layers.{i}.post_attention_layernorm.scale"),
    weights.Rule("norm.weight", "model.norm.scale"),
    weights.Rule("lm_head.weight", "lm_head.kernel", "transpose"),
]
IGNORED: list[str] = [r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
PREFIXES = ("model.",)
UNPREFIXED = ("lm_head.",)  # export: keys outside `model.` in LlamaForCausalLM
CAUSAL_LM_ARCHITECTURE = "LlamaForCausalLM"
FAN_IN_FAN_OUT = False
SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    eps: float
    max_position_embeddings: int
    rope_theta: float
    rope: tuple  # (("rope_type", ...), ...) as sorted items, hashable
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    windows: tuple  # per layer: None or the sliding-window size
    attention_dropout: float
    rope_factors: tuple | None = None  # explicit per-frequency RoPE divisors (a GGUF's)

    @classmethod
    def from_hf(cls, hf_config: Any) -> LlamaConfig:
        """From a transformers Llama, Mistral or Qwen2 config object or its dict (config.json)."""
        c = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
        model_type = c.get("model_type", "llama")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"hidden_act {act!r} is not supported; supported: silu")
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        kind = rope_type(rope)
        if kind not in SUPPORTED_ROPE:
            raise UserError(f"rope type {kind!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_ROPE)}")
        factors = c.get(FREQUENCY_FACTORS)
        if factors is not None and kind != "default":
            raise UserError(f"{FREQUENCY_FACTORS} with rope type {kind!r} is not "
                            "supported: the factors are the whole scaling")
        try:
            if factors is not None:
                factors = _frequency_factors(factors, c.get("head_dim") or
                                             c["hidden_size"] // c["num_attention_heads"])
            heads, layers = c["num_attention_heads"], c["num_hidden_layers"]
            window = c.get("sliding_window")
            if model_type == "qwen2":
                use = c.get("use_sliding_window", False)
                types = c.get("layer_types") or ["full_attention"] * layers
                windows = tuple(window if use and t == "sliding_attention" else None
                                for t in types)
            else:
                windows = (window,) * layers
            bias = bool(c.get("attention_bias", False))
            return cls(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                       num_layers=layers, num_heads=heads,
                       num_kv_heads=c.get("num_key_value_heads") or heads,
                       head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                       intermediate_size=c["intermediate_size"], eps=c.get("rms_norm_eps", 1e-6),
                       max_position_embeddings=c["max_position_embeddings"],
                       rope_theta=float(theta), rope=tuple(sorted(rope.items())),
                       tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                       qkv_bias=bias or model_type == "qwen2", o_bias=bias,
                       mlp_bias=bool(c.get("mlp_bias", False)), windows=windows,
                       attention_dropout=c.get("attention_dropout", 0.0) or 0.0,
                       rope_factors=factors)
        except KeyError as e:
            raise UserError(f"the {model_type} config has no {e.args[0]!r}") from None

    def inv_freq(self) -> jax.Array:
        """RoPE inverse frequencies, with the configured scaling applied."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
        rope = dict(self.rope)
        if rope_type(rope) == "linear":
            return inv / rope["factor"]
        factors = self.frequency_factors()
        return inv if factors is None else inv / jnp.asarray(factors, jnp.float32)

    def frequency_factors(self) -> np.ndarray | None:
        """What each rotary frequency is divided by, as llama.cpp's `rope_freqs`
        tensor holds it: the explicit factors, or Llama 3's (`llama3`: 1 for
        wavelengths under original_max_position_embeddings / high_freq_factor,
        `factor` above original / low_freq_factor, interpolated between), as
        transformers and llama.cpp's converter compute them; None without
        per-frequency scaling (default, linear)."""
        if self.rope_factors is not None:
            return np.asarray(self.rope_factors, np.float32)
        rope = dict(self.rope)
        if rope_type(rope) != "llama3":
            return None
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        d = self.head_dim
        wavelen = 2 * math.pi * self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        # 0 above old / low, 1 under old / high: there the factor is `factor` and 1
        smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)
        return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def rope_type(rope: Mapping) -> str:
    """The type of a config's rope parameters (`rope_parameters`, or the older
    `rope_scaling`): its "rope_type", or the legacy key "type" older configs
    write; "default" without either."""
    return rope.get("rope_type", rope.get("type", "default"))


def _frequency_factors(factors, head_dim: int) -> tuple[float, ...]:
    """The config's explicit rope factors (a GGUF file's rope_freqs): one
    positive number per rotary frequency, head_dim / 2 of them; a UserError
    naming the field otherwise."""
    try:
        values = np.asarray(factors, np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.shape != (head_dim // 2,) or not np.all(np.isfinite(values) & (values > 0)):
        raise UserError(f"{FREQUENCY_FACTORS} (a GGUF file's rope_freqs) must hold "
                        f"{head_dim // 2} positive factors, one per rotary frequency of head_dim "
                        f"{head_dim}, not {factors!r:.80}")
    return tuple(values.tolist())


Config = LlamaConfig


def _ignored(config: LlamaConfig) -> list[str]:
    """`IGNORED`, and for a tied model the `lm_head.weight` copy its checkpoint may carry."""
    return IGNORED + ([r"lm_head\.weight"] if config.tie_word_embeddings else [])


# What `load` reads a checkpoint with (see `weights.load_checkpoint`).
ARCHITECTURE = weights.Architecture(config_from_hf=LlamaConfig.from_hf, rules=WEIGHT_RULES,
                                    ignore=_ignored, strip_prefixes=PREFIXES,
                                    lora_targets=LORA_TARGETS)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, window: int | None, *, param_dtype, attention: str):
        self.config = config
        self.attention_spec = AttentionSpec(causal=True, window=window, implementation=attention,
                                            dropout_rate=config.attention_dropout)
        h, d = config.hidden_size, config.head_dim
        self.input_layernorm = RMSNorm(h, eps=config.eps, dtype=param_dtype)
        self.q_proj = Linear(h, config.num_heads * d, use_bias=config.qkv_bias, dtype=param_dtype)
        self.k_proj = Linear(h, config.num_kv_heads * d, use_bias=config.qkv_bias,
                             dtype=param_dtype)
        self.v_proj = Linear(h, config.num_kv_heads * d, use_bias=config.qkv_bias,
                             dtype=param_dtype)
        self.o_proj = Linear(config.num_heads * d, h, use_bias=config.o_bias, dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(h, eps=config.eps, dtype=param_dtype)
        inner = config.intermediate_size
        self.gate_proj = Linear(h, inner, use_bias=config.mlp_bias, dtype=param_dtype)
        self.up_proj = Linear(h, inner, use_bias=config.mlp_bias, dtype=param_dtype)
        self.down_proj = Linear(inner, h, use_bias=config.mlp_bias, dtype=param_dtype)

    @property
    def window(self) -> int | None:
        """The sliding-window size (None: every earlier key), as the attention spec holds it."""
        return self.attention_spec.window

    @window.setter
    def window(self, window: int | None) -> None:
        self.attention_spec = dataclasses.replace(self.attention_spec, window=window)

    def __call__(self, x, mask, positions, inv_freq, rng, cache=None, index=None,
                 segment_ids=None):
        """The block; with a KV `cache` (generation) `mask` is the cache's
        key-valid mask and the result is (x, cache), else x."""
        cfg = self.config
        keys = split_key(rng, 8)
        b, t = x.shape[:2]
        n = self.input_layernorm(x)
        q = self.q_proj(n, rng=keys[0]).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(n, rng=keys[1]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(n, rng=keys[2]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q, k = rotary(q, positions, inv_freq), rotary(k, positions, inv_freq)
        if cache is not None:
            context, cache = cached_attention(q, k, v, cache, index, mask, self.window)
        else:
            context = attention(q, k, v, self.attention_spec, mask=mask, rng=keys[3],
                                segment_ids=segment_ids)
        x = x + self.o_proj(context.reshape(b, t, -1), rng=keys[4])
        n = self.post_attention_layernorm(x)
        h = jax.nn.silu(self.gate_proj(n, rng=keys[5])) * self.up_proj(n, rng=keys[6])
        x = x + self.down_proj(h, rng=keys[7])
        return x if cache is None else (x, cache)


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, param_dtype, compute_dtype, attention):
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype)
        impl = resolve_attention(attention, compute_dtype)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=param_dtype)
        self.remat = "none"  # train.remat: see layers.REMAT_POLICIES
        self.layers = nnx.List([LlamaDecoderLayer(config, config.windows[i],
                                                  param_dtype=param_dtype, attention=impl)
                                for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.eps, dtype=param_dtype)

    def __call__(self, input_ids, attention_mask, *, rng=None, segment_ids=None,
                 positions=None):
        """`segment_ids` and `positions` (batch, seq) describe packed rows."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise UserError(f"sequences of {input_ids.shape[1]} tokens exceed the model's "
                            f"max_position_embeddings {self.config.max_position_embeddings}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        inv_freq = self.config.inv_freq()
        x = self.embed_tokens(input_ids, self.compute_dtype)
        call = stack_layers(self.remat, lambda layer, x, mask, positions, inv_freq, key, segments:
                            layer(x, mask, positions, inv_freq, key, segment_ids=segments))
        for layer, key in zip(self.layers, split_key(rng, len(self.layers))):
            x = call(layer, x, attention_mask, positions, inv_freq, key, segment_ids)
        return self.norm(x)

    def decode(self, input_ids, positions, key_valid, cache, index):
        """Hidden states of the new tokens at cache slots index.., and the cache."""
        inv_freq = self.config.inv_freq()
        x = self.embed_tokens(input_ids, self.compute_dtype)
        new = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer(x, key_valid, positions, inv_freq, None, layer_cache, index)
            new.append(layer_cache)
        return self.norm(x), new


class LlamaForCausalLM(CausalLMHead, nnx.Module):
    """`(input_ids, attention_mask) -> float32 logits (batch, seq, vocab)`."""

    BACKBONE = "model"  # the layer stack `hidden` runs

    def __init__(self, config: LlamaConfig, *, param_dtype=jnp.float32,
                 compute_dtype=jnp.float32, attention: AttentionImpl = "xla"):
        self.config = config
        self.position_limit = None  # RoPE extrapolates past max_position_embeddings, as in HF
        self.model = LlamaModel(config, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                attention=attention)
        self.lm_head = (None if config.tie_word_embeddings else
                        Linear(config.hidden_size, config.vocab_size, use_bias=False,
                               dtype=param_dtype))

    def logits(self, x):
        """float32 logits of hidden states `x` (..., hidden)."""
        if self.lm_head is None:
            logits = x @ whole(self.model.embed_tokens.embedding[...]).astype(x.dtype).T
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)

    def init_cache(self, batch: int, length: int) -> list:
        """An empty KV cache: per layer (keys, values), each (batch, length, kv_heads, head_dim)."""
        cfg = self.config
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        dtype = self.model.compute_dtype
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]

    def decode(self, input_ids, positions, key_valid, cache, index):
        """Generation: float32 logits (batch, 1, vocab) of the last new token, and the cache."""
        x, cache = self.model.decode(input_ids, positions, key_valid, cache, index)
        return self.logits(x[:, -1:]), cache  # only the last position picks a token

    def linear_layers(self) -> dict[str, Linear]:
        """The blocks' linear layers by Hugging Face path; lm_head is left out (as
        PEFT's all-linear and bitsandbytes' 4-bit loading leave it out)."""
        return {f"model.layers.{i}.{hf}": getattr(layer, ours)
                for i, layer in enumerate(self.model.layers)
                for hf, ours in _BLOCK_LINEARS.items()}


def load(model_dir: Path, *, task: str = "causal-lm", num_labels: int | None = None,
         param_dtype=jnp.float32, compute_dtype=jnp.float32, attention: AttentionImpl = "auto",
         seed: int = 0, place: weights.Place | None = None) -> weights.LoadedModel:
    """A `LlamaForCausalLM` (Llama, Mistral or Qwen2 by config) with the folder's
    weights; a tied model's checkpoint may carry an `lm_head.weight` copy, ignored."""
    return weights.load_checkpoint(
        model_dir, ARCHITECTURE,
        lambda config: LlamaForCausalLM(config, param_dtype=param_dtype,
                                        compute_dtype=compute_dtype, attention=attention),
        dtype=param_dtype, place=place)
