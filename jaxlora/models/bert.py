"""BERT-family encoders (BERT, MiniLM) in Flax NNX, loaded from Hugging Face safetensors.

    BertForSequenceClassification
    ├── bert: BertModel
    │   ├── embeddings: word + position + token_type -> LayerNorm -> dropout
    │   ├── layers[i]: BertLayer (post-LayerNorm)
    │   │     x = norm(x + dropout(attention_output(attention(query, key, value))))
    │   │     x = norm(x + dropout(output(act(intermediate(x)))))
    │   └── pooler: tanh(dense(hidden state of token 0))
    ├── dropout
    └── classifier: Head (HeadParam, fresh) -> float32 logits

Our module tree is flatter than transformers' (`layers.{i}.query` for
`encoder.layer.{i}.attention.self.query`). `WEIGHT_RULES` maps checkpoint keys
onto it, and `linear_layers()` names every `Linear` by its Hugging Face module
path, which is what LoRA targets and PEFT export use. Both are built from the
one table `_BLOCK_LINEARS`.

Randomness is explicit: `rng=None` is eval mode (no dropout); in train mode one
key is split down the tree, one per dropout site and one per `Linear` call (a
LoRA adapter on that `Linear` uses it for its own dropout).

Every family module exposes the same names: `Config`, `load`, `LORA_TARGETS`,
`WEIGHT_RULES`, `IGNORED`, `PREFIXES`, `ARCHITECTURE` (the last four and
`Config.from_hf` as one `weights.Architecture`), and for export
`CLASSIFIER_ARCHITECTURE`, `CLASSIFIER_PREFIX`, `HEAD_RULES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.errors import UserError
from jaxlora.models import weights
from jaxlora.models.layers import (ACTIVATIONS, AttentionImpl, AttentionSpec, Embed, Head,
                                   LayerNorm, Linear, attention, dropout, resolve_attention,
                                   split_key, stack_layers)

# Hugging Face module inside `encoder.layer.{i}` -> `Linear` attribute of `BertLayer`.
_BLOCK_LINEARS = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_output",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
}
_BLOCK_NORMS = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}

TASKS = ("classification",)

# User-facing LoRA target name -> Hugging Face module path inside a block; the
# default targets are PEFT's for BERT.
LORA_TARGETS = weights.TargetTable({
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention.output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}, default=["query", "value"])

# Checkpoint keys (after `PREFIXES` are stripped) -> paths in `BertForSequenceClassification`.
WEIGHT_RULES: list[weights.Rule] = [
    *weights.embedding("embeddings.word_embeddings", "bert.embeddings.word"),
    *weights.embedding("embeddings.position_embeddings", "bert.embeddings.position"),
    *weights.embedding("embeddings.token_type_embeddings", "bert.embeddings.token_type"),
    *weights.layer_norm("embeddings.LayerNorm", "bert.embeddings.norm"),
    *(rule for hf, ours in _BLOCK_LINEARS.items()
      for rule in weights.linear(f"encoder.layer.{{i}}.{hf}", f"bert.layers.{{i}}.{ours}")),
    *(rule for hf, ours in _BLOCK_NORMS.items()
      for rule in weights.layer_norm(f"encoder.layer.{{i}}.{hf}", f"bert.layers.{{i}}.{ours}")),
    *weights.linear("pooler.dense", "bert.pooler"),
]
# Checkpoint keys deliberately not loaded: a buffer, pretraining heads, and an
# existing classifier (the task gets a fresh one).
IGNORED: list[str] = [r"embeddings\.position_ids", r"cls\..*", r"classifier\..*"]
# Task checkpoints (e.g. BertForSequenceClassification) nest the encoder under `bert.`.
PREFIXES = ("bert.",)
# Export (`jaxlora.export`): the transformers class of our task model, the prefix
# its encoder keys take there, and the fresh head's rules.
CLASSIFIER_ARCHITECTURE = "BertForSequenceClassification"
CLASSIFIER_PREFIX = "bert."
HEAD_RULES: list[weights.Rule] = weights.linear("classifier", "classifier")


@dataclass(frozen=True)
class BertConfig:
    """The architecture, read from a transformers `BertConfig` with `from_hf`."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_dropout: float
    attention_dropout: float
    classifier_dropout: float
    hidden_act: str  # a key of ACTIVATIONS
    pad_token_id: int
    initializer_range: float = 0.02  # std of the fresh classifier's kernel

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"hidden_act {self.hidden_act!r} is not supported; "
                            f"supported: {', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not a multiple of "
                            f"num_attention_heads {self.num_heads}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> BertConfig:
        """From a transformers config object or its dict (as in config.json)."""
        c = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
        position_type = c.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise UserError(f"position_embedding_type {position_type!r} is not supported; "
                            "supported: absolute")
        try:
            classifier_dropout = c.get("classifier_dropout")
            return cls(
                vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                intermediate_size=c["intermediate_size"],
                max_position_embeddings=c["max_position_embeddings"],
                type_vocab_size=c["type_vocab_size"], layer_norm_eps=c["layer_norm_eps"],
                hidden_dropout=c["hidden_dropout_prob"],
                attention_dropout=c["attention_probs_dropout_prob"],
                classifier_dropout=(c["hidden_dropout_prob"] if classifier_dropout is None
                                    else classifier_dropout),
                hidden_act=c["hidden_act"], pad_token_id=c.get("pad_token_id") or 0,
                initializer_range=c.get("initializer_range", 0.02))
        except KeyError as e:
            raise UserError(f"the BERT config has no {e.args[0]!r}") from None


Config = BertConfig
# What `load` reads a checkpoint with (see `weights.load_checkpoint`).
ARCHITECTURE = weights.Architecture(config_from_hf=BertConfig.from_hf, rules=WEIGHT_RULES,
                                    ignore=IGNORED, strip_prefixes=PREFIXES,
                                    lora_targets=LORA_TARGETS)


class BertEmbeddings(nnx.Module):
    """word + position + token type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig, *, param_dtype):
        self.config = config
        self.word = Embed(config.vocab_size, config.hidden_size, dtype=param_dtype)
        self.position = Embed(config.max_position_embeddings, config.hidden_size,
                              dtype=param_dtype)
        self.token_type = Embed(config.type_vocab_size, config.hidden_size, dtype=param_dtype)
        self.norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, dtype,
                 rng: jax.Array | None) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (self.word(input_ids, dtype) + self.position(positions, dtype)
             + self.token_type(token_type_ids, dtype))
        return dropout(self.norm(x), self.config.hidden_dropout, rng)


class BertLayer(nnx.Module):
    """One post-LayerNorm transformer block: self-attention, then the feed-forward."""

    def __init__(self, config: BertConfig, *, param_dtype, attention: AttentionImpl):
        self.config = config
        self.attention_spec = AttentionSpec(implementation=attention,
                                            dropout_rate=config.attention_dropout)
        hidden, inner = config.hidden_size, config.intermediate_size
        self.query = Linear(hidden, hidden, dtype=param_dtype)
        self.key = Linear(hidden, hidden, dtype=param_dtype)
        self.value = Linear(hidden, hidden, dtype=param_dtype)
        self.attention_output = Linear(hidden, hidden, dtype=param_dtype)
        self.attention_norm = LayerNorm(hidden, eps=config.layer_norm_eps, dtype=param_dtype)
        self.intermediate = Linear(hidden, inner, dtype=param_dtype)
        self.output = Linear(inner, hidden, dtype=param_dtype)
        self.output_norm = LayerNorm(hidden, eps=config.layer_norm_eps, dtype=param_dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None, rng: jax.Array | None) -> jax.Array:
        cfg = self.config
        (q_key, k_key, v_key, attention_key, attention_output_key, attention_dropout_key,
         intermediate_key, output_key, output_dropout_key) = split_key(rng, 9)
        heads = (*x.shape[:2], cfg.num_heads, cfg.hidden_size // cfg.num_heads)
        q = self.query(x, rng=q_key).reshape(heads)
        k = self.key(x, rng=k_key).reshape(heads)
        v = self.value(x, rng=v_key).reshape(heads)
        context = attention(q, k, v, self.attention_spec, mask=mask, rng=attention_key)
        h = self.attention_output(context.reshape(x.shape), rng=attention_output_key)
        x = self.attention_norm(x + dropout(h, cfg.hidden_dropout, attention_dropout_key))
        h = ACTIVATIONS[cfg.hidden_act](self.intermediate(x, rng=intermediate_key))
        h = self.output(h, rng=output_key)
        return self.output_norm(x + dropout(h, cfg.hidden_dropout, output_dropout_key))


class BertModel(nnx.Module):
    """The encoder: `(input_ids, attention_mask) -> (last_hidden_state, pooled)`."""

    def __init__(self, config: BertConfig, *, param_dtype=jnp.float32,
                 compute_dtype=jnp.float32, attention: AttentionImpl = "xla"):
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.attention_impl = resolve_attention(attention, compute_dtype)
        self.embeddings = BertEmbeddings(config, param_dtype=param_dtype)
        self.remat = "none"  # train.remat: see layers.REMAT_POLICIES
        self.layers = nnx.List([BertLayer(config, param_dtype=param_dtype,
                                          attention=self.attention_impl)
                                for _ in range(config.num_layers)])
        self.pooler = Linear(config.hidden_size, config.hidden_size, dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                 token_type_ids: jax.Array | None = None, *,
                 rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Hidden states (batch, seq, hidden) and pooled (batch, hidden), in the compute dtype.

        `attention_mask` is 1 for real tokens, right padded; `rng` None means eval.
        """
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise UserError(f"sequences of {input_ids.shape[1]} tokens exceed the model's "
                            f"max_position_embeddings {self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        embeddings_key, pooler_key, *layer_keys = split_key(rng, 2 + len(self.layers))
        x = self.embeddings(input_ids, token_type_ids, self.compute_dtype, embeddings_key)
        block = stack_layers(self.remat, lambda layer, x, mask, key: layer(x, mask, key))
        for layer, key in zip(self.layers, layer_keys):
            x = block(layer, x, attention_mask, key)
        return x, jnp.tanh(self.pooler(x[:, 0], rng=pooler_key))

    def linear_layers(self) -> dict[str, Linear]:
        """Every `Linear`, keyed by its Hugging Face module path in `BertModel`."""
        linears = {f"encoder.layer.{i}.{hf}": getattr(layer, ours)
                   for i, layer in enumerate(self.layers) for hf, ours in _BLOCK_LINEARS.items()}
        return {**linears, "pooler.dense": self.pooler}


class BertForSequenceClassification(nnx.Module):
    """The encoder's pooled output -> dropout -> a fresh classifier head -> float32 logits."""

    def __init__(self, config: BertConfig, num_labels: int, *, key: jax.Array,
                 param_dtype=jnp.float32, compute_dtype=jnp.float32,
                 attention: AttentionImpl = "xla"):
        self.config = config
        self.bert = BertModel(config, param_dtype=param_dtype, compute_dtype=compute_dtype,
                              attention=attention)
        self.classifier = Head(config.hidden_size, num_labels,
                               init_std=config.initializer_range, key=key)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                 token_type_ids: jax.Array | None = None, *,
                 rng: jax.Array | None = None) -> jax.Array:
        """float32 logits (batch, num_labels); `rng` None means eval (no dropout)."""
        bert_key, dropout_key = split_key(rng, 2)
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, rng=bert_key)
        return self.classifier(dropout(pooled, self.config.classifier_dropout, dropout_key))

    def linear_layers(self) -> dict[str, Linear]:
        """Every `Linear`, keyed by its Hugging Face module path (the head is not one)."""
        return {f"bert.{path}": linear for path, linear in self.bert.linear_layers().items()}


def load(model_dir: Path, *, task: str = "classification", num_labels: int,
         param_dtype=jnp.float32,
         compute_dtype=jnp.float32, attention: AttentionImpl = "auto",
         seed: int = 0, place: weights.Place | None = None) -> weights.LoadedModel:
    """A `BertForSequenceClassification` with the folder's weights and a head seeded by `seed`."""
    return weights.load_checkpoint(
        model_dir, ARCHITECTURE,
        lambda config: BertForSequenceClassification(
            config, num_labels, key=jax.random.key(seed), param_dtype=param_dtype,
            compute_dtype=compute_dtype, attention=attention),
        dtype=param_dtype, place=place)
