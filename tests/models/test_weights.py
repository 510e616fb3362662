"""The table-driven safetensors loader: reading, rules, and every refusal."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from jaxlora.errors import UserError
from jaxlora.models import bert, load_model, weights
from jaxlora.models.layers import BaseWeight, Linear


def _edited_checkpoint(tmp_path, tiny_bert_dir, edit):
    """A copy of the tiny checkpoint (config + single safetensors file) after `edit(tensors)`."""
    tensors = load_file(tiny_bert_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(tiny_bert_dir / "config.json", tmp_path / "config.json")
    return tmp_path


def test_rules_read_both_ways():
    rule = weights.Rule("encoder.layer.{i}.output.dense.weight", "bert.layers.{i}.output.kernel",
                        "transpose")
    assert rule.model_path("encoder.layer.11.output.dense.weight") == "bert.layers.11.output.kernel"
    assert rule.hf_key("bert.layers.3.output.kernel") == "encoder.layer.3.output.dense.weight"
    # Dots are literal and numbers only: no accidental matches.
    assert rule.model_path("encoder.layer.1.attention.output.dense.weight") is None
    assert rule.model_path("encoderXlayer.1.output.dense.weight") is None
    assert rule.model_path("encoder.layer.x.output.dense.weight") is None
    assert rule.to_model(np.zeros((2, 3))).shape == (3, 2)


def test_every_model_weight_has_exactly_one_rule(tiny_bert_dir):
    model = bert.load(tiny_bert_dir, num_labels=2).model
    paths = [".".join(map(str, p)) for p, v in nnx.iter_graph(model) if isinstance(v, BaseWeight)]
    assert len(paths) == 5 + 2 * 16 + 2
    for path in paths:
        assert sum(rule.hf_key(path) is not None for rule in bert.WEIGHT_RULES) == 1, path


def test_reads_bfloat16_and_other_dtypes(tmp_path):
    tensors = {"bf16": torch.randn(3, 4).to(torch.bfloat16), "f16": torch.randn(2).half(),
               "f32": torch.randn(2, 2), "i64": torch.arange(5), "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "model.safetensors")
    read = weights.read_safetensors(tmp_path)
    assert set(read) == set(tensors)
    assert read["bf16"].dtype == np.dtype("bfloat16")
    for name, tensor in tensors.items():
        assert read[name].shape == tuple(tensor.shape)
        assert np.array_equal(read[name].astype(np.float64), tensor.double().numpy()), name


def test_reads_sharded_checkpoints(tmp_path, tiny_bert_dir):
    import transformers

    transformers.BertModel.from_pretrained(tiny_bert_dir).save_pretrained(
        tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(weights.weight_files(tmp_path)) > 1
    sharded, single = weights.read_safetensors(tmp_path), weights.read_safetensors(tiny_bert_dir)
    assert set(sharded) == set(single)
    assert all(np.array_equal(sharded[k], single[k]) for k in single)
    (tmp_path / weights.weight_files(tmp_path)[-1].name).unlink()
    with pytest.raises(UserError, match="missing: model-0000"):
        weights.read_safetensors(tmp_path)


def test_missing_key_is_named(tmp_path, tiny_bert_dir):
    folder = _edited_checkpoint(tmp_path, tiny_bert_dir,
                                lambda t: t.pop("encoder.layer.1.output.dense.weight"))
    with pytest.raises(UserError, match=r"missing from the checkpoint \(1\): "
                                        r"encoder\.layer\.1\.output\.dense\.weight") as e:
        bert.load(folder, num_labels=2)
    assert str(folder) in str(e.value)


def test_unexpected_key_is_named(tmp_path, tiny_bert_dir):
    def edit(tensors):
        tensors["encoder.layer.0.adapter.weight"] = torch.zeros(2)
        tensors["encoder.layer.7.output.dense.bias"] = torch.zeros(32)  # beyond the depth
    folder = _edited_checkpoint(tmp_path, tiny_bert_dir, edit)
    with pytest.raises(UserError, match=r"unexpected checkpoint keys \(2\): "
                                        r"encoder\.layer\.0\.adapter\.weight, "
                                        r"encoder\.layer\.7\.output\.dense\.bias"):
        bert.load(folder, num_labels=2)


def test_shape_mismatch_is_named(tmp_path, tiny_bert_dir):
    def edit(tensors):
        tensors["pooler.dense.weight"] = torch.zeros(32, 16)
    folder = _edited_checkpoint(tmp_path, tiny_bert_dir, edit)
    with pytest.raises(UserError, match=r"pooler\.dense\.weight: model expects \(32, 32\), "
                                        r"checkpoint has \(16, 32\) after transposing"):
        bert.load(folder, num_labels=2)


def test_duplicate_key_after_prefix_stripping_is_refused(tmp_path, tiny_bert_dir):
    def edit(tensors):
        tensors["bert.pooler.dense.bias"] = tensors["pooler.dense.bias"].clone()
    folder = _edited_checkpoint(tmp_path, tiny_bert_dir, edit)
    with pytest.raises(UserError, match=r"pooler\.dense\.bias \(also given as"):
        bert.load(folder, num_labels=2)


def test_ignored_keys_are_reported(tmp_path, tiny_bert_dir):
    def edit(tensors):
        tensors["cls.predictions.bias"] = torch.zeros(3)
        tensors["embeddings.position_ids"] = torch.arange(128)[None]
    loaded = bert.load(_edited_checkpoint(tmp_path, tiny_bert_dir, edit), num_labels=2)
    assert loaded.ignored_keys == ["cls.predictions.bias", "embeddings.position_ids"]


def test_pickle_only_folder_is_refused(tmp_path, tiny_bert_dir):
    shutil.copy(tiny_bert_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded, not even opened")
    with pytest.raises(UserError, match=r"pytorch_model\.bin.*pickle.*safetensors"):
        bert.load(tmp_path, num_labels=2)


def test_folder_without_weights_is_refused(tmp_path, tiny_bert_dir):
    shutil.copy(tiny_bert_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match=f"{tmp_path}: no weights"):
        bert.load(tmp_path, num_labels=2)


def test_missing_folder_and_config_are_named(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nope'}: no such model folder"):
        load_model(tmp_path / "nope", task="classification", num_labels=2)
    with pytest.raises(UserError, match=f"{tmp_path}: no config.json"):
        bert.load(tmp_path, num_labels=2)


def test_corrupt_safetensors_is_named(tmp_path, tiny_bert_dir):
    shutil.copy(tiny_bert_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="model.safetensors: not a valid safetensors file"):
        weights.read_safetensors(tmp_path)


def test_unknown_model_type_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(UserError, match="model_type 't5' is not supported; supported: bert"):
        load_model(tmp_path, task="classification", num_labels=2)


class _Dense(nnx.Module):
    def __init__(self):
        self.dense = Linear(16, 16)


def test_filled_weights_do_not_alias_the_file(tmp_path):
    # An aligned read-only memmap is what JAX on CPU would map without copying.
    path = tmp_path / "weights.bin"
    np.arange(16 * 16 + 16, dtype=np.float32).tofile(path)
    data = np.memmap(path, dtype=np.float32, mode="r")
    model = _Dense()
    weights.fill(model, {"dense.weight": data[:256].reshape(16, 16), "dense.bias": data[256:]},
                 weights.linear("dense", "dense"), ignore=[], strip_prefixes=(),
                 dtype=np.float32)
    np.zeros(16 * 16 + 16, dtype=np.float32).tofile(path)  # rewritten in place
    assert model.dense.kernel[...].sum() == np.arange(256).sum()
    assert model.dense.bias[...].sum() == np.arange(256, 272).sum()


def test_fingerprint_follows_weights_and_config(tmp_path, tiny_bert_dir):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert_dir, copy)
    assert weights.fingerprint(copy) == weights.fingerprint(tiny_bert_dir)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.2}))
    assert weights.fingerprint(copy) != weights.fingerprint(tiny_bert_dir)
