"""BERT in Flax NNX against transformers' PyTorch BERT, and the model's interface.

The cuDNN attention path is not tested here: on CPU `implementation="cudnn"`
raises. On an H100 (jax 0.11.2), BERT at MiniLM's shape in bfloat16 agreed with
the XLA path to bfloat16 rounding, forward and gradient; cuDNN refuses float32.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxlora.errors import UserError
from jaxlora.models import bert, load_model
from jaxlora.models.layers import BaseWeight, HeadParam, Linear

TEXTS = ["a short one", "this sentence is quite a bit longer than the other two, isn't it?",
         "middle length text here"]
TOLERANCE = 1e-4


def _batch(model_dir):
    """Three texts of different lengths, right padded to the longest."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(TEXTS, padding=True, return_tensors="np")
    assert tokenizer.padding_side == "right" and len(set(batch["attention_mask"].sum(1))) == 3
    return batch["input_ids"], batch["attention_mask"]


def _torch_bert(model_dir, ids, mask, prefixed=False):
    cls = transformers.BertForSequenceClassification if prefixed else transformers.BertModel
    model = cls.from_pretrained(model_dir).eval()
    encoder = model.bert if prefixed else model
    with torch.no_grad():
        out = encoder(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _assert_parity(model_dir, prefixed=False):
    ids, mask = _batch(model_dir)
    loaded = bert.load(model_dir, num_labels=2, attention="xla")
    # On GPU, float32 matmuls default to reduced (TF32-like) precision: 5e-3 off on an H100.
    with jax.default_matmul_precision("highest"):
        hidden, pooled = loaded.model.bert(jnp.asarray(ids), jnp.asarray(mask))
    ref_hidden, ref_pooled = _torch_bert(model_dir, ids, mask, prefixed)
    real = mask[..., None].astype(bool)  # padding positions carry no meaning
    assert np.abs(np.where(real, np.asarray(hidden) - ref_hidden, 0)).max() < TOLERANCE
    assert np.abs(np.asarray(pooled) - ref_pooled).max() < TOLERANCE
    return loaded


def test_parity_tiny_random(tiny_bert_dir):
    _assert_parity(tiny_bert_dir)


@pytest.mark.slow
def test_parity_minilm(minilm_dir):
    loaded = _assert_parity(minilm_dir)
    assert loaded.ignored_keys == ["embeddings.position_ids"]
    assert loaded.config.num_layers == 6 and loaded.config.hidden_act == "gelu"


def test_prefixed_checkpoint_loads_and_ignores_its_classifier(tiny_bert_prefixed_dir):
    loaded = _assert_parity(tiny_bert_prefixed_dir, prefixed=True)
    assert loaded.ignored_keys == ["classifier.bias", "classifier.weight"]


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    return load_model(tiny_bert_dir, task="classification", num_labels=3, seed=0)


def test_logits_are_float32_whatever_the_compute_dtype(tiny_bert_dir, tiny):
    ids, mask = _batch(tiny_bert_dir)
    assert tiny.model(ids, mask).shape == (3, 3)
    assert tiny.model(ids, mask).dtype == jnp.float32
    low = bert.load(tiny_bert_dir, num_labels=3, param_dtype=jnp.bfloat16,
                    compute_dtype=jnp.bfloat16)
    assert low.model.bert.layers[0].query.kernel[...].dtype == jnp.bfloat16
    assert low.model.classifier.kernel[...].dtype == jnp.float32
    hidden, _ = low.model.bert(ids, mask)
    assert hidden.dtype == jnp.bfloat16
    assert low.model(ids, mask).dtype == jnp.float32


def test_weights_are_typed_and_the_head_is_initialised(tiny):
    variables = [v for _, v in nnx.iter_graph(tiny.model) if isinstance(v, nnx.Variable)]
    assert all(isinstance(v.get_value(), jax.Array) for v in variables)  # nothing abstract left
    assert all(isinstance(v, (BaseWeight, HeadParam)) for v in variables)
    heads = {id(v) for v in variables if isinstance(v, HeadParam)}
    assert heads == {id(tiny.model.classifier.kernel), id(tiny.model.classifier.bias)}
    kernel = np.asarray(tiny.model.classifier.kernel[...])
    assert kernel.shape == (32, 3) and 0.01 < kernel.std() < 0.03
    assert not np.asarray(tiny.model.classifier.bias[...]).any()


def test_head_depends_on_the_seed_only(tiny_bert_dir, tiny):
    again = bert.load(tiny_bert_dir, num_labels=3, seed=0)
    other = bert.load(tiny_bert_dir, num_labels=3, seed=1)
    kernel = tiny.model.classifier.kernel[...]
    assert np.array_equal(kernel, again.model.classifier.kernel[...])
    assert not np.array_equal(kernel, other.model.classifier.kernel[...])


def test_dropout_only_with_rng(tiny_bert_dir, tiny):
    ids, mask = _batch(tiny_bert_dir)
    model = tiny.model
    eval_a, eval_b = model(ids, mask), model(ids, mask)
    train_a = model(ids, mask, rng=jax.random.key(1))
    train_a_again = model(ids, mask, rng=jax.random.key(1))
    train_b = model(ids, mask, rng=jax.random.key(2))
    assert np.array_equal(eval_a, eval_b)
    assert np.array_equal(train_a, train_a_again)
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a)


def test_every_linear_gets_a_key_in_train_mode(tiny_bert_dir, tiny, monkeypatch):
    seen = []
    original = Linear.__call__
    monkeypatch.setattr(Linear, "__call__",
                        lambda self, x, rng=None: seen.append(rng) or original(self, x, rng))
    ids, mask = _batch(tiny_bert_dir)
    tiny.model(ids, mask, rng=jax.random.key(0))
    assert len(seen) == len(tiny.model.linear_layers())
    assert len({int(jax.random.key_data(k).sum()) for k in seen}) == len(seen)  # all distinct
    seen.clear()
    tiny.model(ids, mask)
    assert seen == [None] * len(tiny.model.linear_layers())


def test_linear_layers_are_named_as_in_the_checkpoint(tiny_bert_prefixed_dir):
    from safetensors import safe_open

    loaded = bert.load(tiny_bert_prefixed_dir, num_labels=2)
    linears = loaded.model.linear_layers()
    every_linear = [node for _, node in nnx.iter_graph(loaded.model) if isinstance(node, Linear)]
    assert len(linears) == len(every_linear) == 2 * 6 + 1
    assert "bert.encoder.layer.0.attention.self.query" in linears
    assert "bert.pooler.dense" in linears
    with safe_open(tiny_bert_prefixed_dir / "model.safetensors", "np") as f:
        checkpoint = {key: f.get_tensor(key) for key in f.keys()}
    for path, linear in linears.items():
        assert np.array_equal(checkpoint[f"{path}.weight"].T, linear.kernel[...])


def test_lora_targets_match_one_linear_per_layer(tiny):
    names = list(tiny.model.linear_layers())
    for target, suffix in bert.LORA_TARGETS.items():
        pattern = re.compile(rf".*\.layer\.\d+\.{re.escape(suffix)}")
        assert len([n for n in names if pattern.fullmatch(n)]) == 2, target


def test_config_from_hf_dict_and_its_errors():
    hf = transformers.BertConfig(hidden_act="gelu_new", classifier_dropout=None).to_dict()
    config = bert.BertConfig.from_hf(hf)
    assert config.classifier_dropout == config.hidden_dropout == 0.1
    assert config.hidden_act == "gelu_new"
    with pytest.raises(UserError, match="hidden_act 'swish'.*gelu"):
        bert.BertConfig.from_hf({**hf, "hidden_act": "swish"})
    with pytest.raises(UserError, match="relative_key"):
        bert.BertConfig.from_hf({**hf, "position_embedding_type": "relative_key"})
    with pytest.raises(UserError, match="'vocab_size'"):
        bert.BertConfig.from_hf({k: v for k, v in hf.items() if k != "vocab_size"})


def test_sequences_longer_than_the_position_table_are_refused(tiny):
    ids = jnp.zeros((1, 129), jnp.int32)
    with pytest.raises(UserError, match="max_position_embeddings 128"):
        tiny.model(ids, jnp.ones_like(ids))
