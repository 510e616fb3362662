"""LoRA: exact equality at initialisation, only adapters and head train, the
trainable-parameter count matches PEFT's, and targets are checked by name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlora.errors import UserError
from jaxlora.lora import LoraConfig, adapt, count_params
from jaxlora.models import bert, load_model
from jaxlora.tasks import classification_step_loss
from jaxlora.train import build_train_step


def _load(folder):
    return load_model(folder, task="classification", num_labels=2, attention="xla", seed=0).model


def _batch(n=4, t=16, vocab=30522, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, t), np.int32)
    mask[1, t // 2:] = 0  # one right-padded row
    return {"input_ids": rng.integers(1, vocab, (n, t), dtype=np.int32), "attention_mask": mask,
            "labels": rng.integers(0, 2, (n,), dtype=np.int32), "weights": np.ones(n, np.float32)}


def test_adapted_model_equals_base_at_init(tiny_bert_dir):
    """Eager and compiled (as the run's "before" evaluation takes the weights
    `adapt` built), the adapted model computes exactly the base model."""
    model = _load(tiny_bert_dir)
    batch = _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    compiled = jax.jit(lambda graphdef, state: nnx.merge(graphdef, *state)(ids, mask))
    base_graphdef, base_state = nnx.split(model)
    base, base_compiled = model(ids, mask), compiled(base_graphdef, (base_state,))
    graphdef, trainable, frozen, paths = adapt(
        model, LoraConfig(rank=4, targets="all-linear"), bert.LORA_TARGETS, jax.random.key(1))
    assert len(paths) == 2 * 6 + 1  # 6 linears per block, 2 blocks, and the pooler
    adapted = nnx.merge(graphdef, trainable, frozen)(ids, mask)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))
    np.testing.assert_array_equal(np.asarray(compiled(graphdef, (trainable, frozen))),
                                  np.asarray(base_compiled))


def test_one_step_changes_only_adapters_and_head(tiny_bert_dir):
    model = _load(tiny_bert_dir)
    graphdef, trainable, frozen, _ = adapt(model, LoraConfig(rank=4, dropout=0.1),
                                           bert.LORA_TARGETS, jax.random.key(1))
    frozen_before = jax.tree.map(np.array, frozen)
    trainable_before = jax.tree.map(np.array, trainable)
    tx = optax.adamw(1e-2)
    step = build_train_step(graphdef, tx, classification_step_loss)
    opt_state = tx.init(trainable)
    for i in range(2):
        trainable, opt_state, _ = step(trainable, frozen, opt_state, _batch(seed=i),
                                       jax.random.key(i))
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.array, frozen))
    changed = {"/".join(map(str, path)): not np.array_equal(np.asarray(var[...]),
                                                            trainable_before_flat)
               for (path, var), (_, trainable_before_flat) in zip(
                   nnx.to_flat_state(trainable),
                   [(p, v[...]) for p, v in nnx.to_flat_state(trainable_before)])}
    assert changed and all(changed.values()), [k for k, v in changed.items() if not v]
    assert any(k.startswith("classifier") for k in changed)
    assert any(k.endswith("lora_a") for k in changed) and any(k.endswith("lora_b") for k in changed)


def test_trainable_count_matches_peft_on_minilm(minilm_dir):
    import peft
    import transformers

    model = _load(minilm_dir)
    _, trainable, frozen, _ = adapt(model, LoraConfig(rank=8, targets=["query", "value"]),
                                    bert.LORA_TARGETS, jax.random.key(0))
    torch_model = transformers.BertForSequenceClassification.from_pretrained(minilm_dir,
                                                                             num_labels=2)
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))
    peft_trainable, peft_total = peft_model.get_nb_trainable_parameters()
    assert count_params(trainable) == peft_trainable == 74_498
    # PEFT's total also counts the frozen original of the head it trains (modules_to_save).
    head = 384 * 2 + 2
    assert count_params(trainable) + count_params(frozen) == peft_total - head


def test_lora_factor_layout_and_init(tiny_bert_dir):
    model = _load(tiny_bert_dir)
    adapt(model, LoraConfig(rank=4, alpha=8), bert.LORA_TARGETS, jax.random.key(0))
    adapter = model.bert.linear_layers()["encoder.layer.0.attention.self.query"].lora
    a, b = adapter.lora_a[...], adapter.lora_b[...]
    assert a.shape == (32, 4) and b.shape == (4, 32)
    assert a.dtype == b.dtype == jnp.float32
    assert float(jnp.abs(a).max()) <= 1 / np.sqrt(32) and not np.any(np.asarray(b))
    assert adapter.scale == 2.0


def test_unknown_target_lists_the_linear_layers(tiny_bert_dir):
    model = _load(tiny_bert_dir)
    with pytest.raises(UserError) as e:
        adapt(model, LoraConfig(targets=["q_proj"]), bert.LORA_TARGETS, jax.random.key(0))
    message = str(e.value)
    assert "'q_proj' is not a LoRA target" in message
    assert "bert.encoder.layer.0.attention.self.query" in message  # the model's layers listed


def test_output_does_not_catch_attention_output(tiny_bert_dir):
    model = _load(tiny_bert_dir)
    _, _, _, paths = adapt(model, LoraConfig(targets=["output"]), bert.LORA_TARGETS,
                           jax.random.key(0))
    assert paths == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]


@pytest.mark.parametrize("family, expected", [
    ("bert", ["bert.encoder.layer.0.attention.self.query",
              "bert.encoder.layer.0.attention.self.value"]),
    ("gpt2", ["transformer.h.0.attn.c_attn"]),
    ("llama-gqa-rope3", ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]),
])
def test_without_targets_lora_goes_where_peft_puts_it_by_default(tiny_bert_dir, tmp_path,
                                                                 family, expected):
    """A recipe that names no `adapter.targets` gets the family's default, PEFT's
    (BERT query/value, GPT-2 c_attn, Llama/Mistral/Qwen2 q_proj/v_proj)."""
    from tiny_models import tiny_decoder_dir

    if family == "bert":
        loaded = load_model(tiny_bert_dir, task="classification", num_labels=2)
    else:
        loaded = load_model(tiny_decoder_dir(tmp_path, family), task="causal-lm")
    _, _, _, paths = adapt(loaded.model, LoraConfig(rank=2), loaded.lora_targets,
                           jax.random.key(0))
    assert paths[:len(expected)] == expected and len(paths) == 2 * len(expected)


def test_generating_from_a_recipes_base_model_checks_no_targets(tmp_path):
    """`runner generate RECIPE` uses no adapter, so targets this model lacks
    (BERT's names on a Llama) are no reason to refuse."""
    from test_cli import runner_here
    from tiny_models import tiny_decoder_dir

    import json

    from tiny_models import qa_rows

    tiny_decoder_dir(tmp_path / "model", "llama-gqa-rope3")
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in qa_rows(10)) + "\n")
    (tmp_path / "r.toml").write_text('[model]\nsource = "model"\ntask = "causal-lm"\n'
                                     '[data]\nsource = "x.jsonl"\neval_size = 2\nmax_length = 16\n'
                                     '[adapter]\ntargets = ["query", "value"]\n')
    done = runner_here("generate", "r.toml", "--prompt", "the cat", "--max-new-tokens", "3",
                       cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    refused = runner_here("run", "r.toml", cwd=tmp_path)  # training does check them
    assert refused.returncode == 2 and "'query' is not a LoRA target" in refused.stderr
