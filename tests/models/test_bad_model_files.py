"""A broken model folder (config.json or model.safetensors) is one UserError
naming the file (and the field), never a traceback: through the loader the
pipeline uses (`load_model`, `read_safetensors`) and through `runner plan`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxlora.errors import UserError
from jaxlora.models import load_model, weights
from test_cli import runner_here
from tiny_models import tiny_decoder_dir, write_qa

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny-llama-offline.toml"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama (grouped-query attention, llama3 rope), as `make tiny` writes it."""
    return tiny_decoder_dir(tmp_path_factory.mktemp("tiny_llama"), "llama-gqa-rope3")


@pytest.fixture
def folder(tmp_path, tiny_llama) -> Path:
    """A copy of the tiny Llama to break."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "llama"))


def _edit_config(folder: Path, edit) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return path


def _safetensors(header, data: bytes = b"") -> bytes:
    """A safetensors file: 8-byte little-endian header length, JSON header, data."""
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def test_the_unbroken_copy_loads(folder):
    loaded = load_model(folder, task="causal-lm")
    assert loaded.config.num_heads == 4


@pytest.mark.parametrize("edit, expected", [
    # transformers' own validation divides by it (ZeroDivisionError)
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads must be a positive integer"),
    (lambda c: c.update(num_attention_heads=-4), "num_attention_heads must be a positive integer"),
    # huggingface_hub's StrictDataclassFieldValidationError
    (lambda c: c.update(intermediate_size="64"), "intermediate_size must be a positive integer"),
    (lambda c: c.update(rms_norm_eps="tiny"), "field 'rms_norm_eps'"),
    # a KeyError from transformers' rope validation
    (lambda c: c["rope_parameters"].pop("factor"),
     "Missing required keys in `rope_parameters` for 'rope_type'='llama3': {'factor'}"),
    # transformers only warns; the model would fail on it later
    (lambda c: c["rope_parameters"].update(factor="8"), "rope_parameters.factor must be a number"),
    # a ValueError (in a class validation error) from transformers
    (lambda c: c.update(hidden_size=34), "is not a multiple of the number of attention heads"),
    # a dropout probability of 1 or more overflowed the keep threshold; below 0 trained silently
    (lambda c: c.update(attention_dropout=1.5), "attention_dropout must be a probability in [0, 1)"),
    (lambda c: c.update(attention_dropout=-0.5), "attention_dropout must be a probability in"),
], ids=["heads-0", "heads-negative", "intermediate-str", "eps-str", "rope-no-factor",
        "rope-factor-str", "hidden-not-multiple", "dropout-over-1", "dropout-negative"])
def test_broken_config_is_named(folder, edit, expected):
    path = _edit_config(folder, edit)
    with pytest.raises(UserError) as e:
        load_model(folder, task="causal-lm")
    message = str(e.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message
    assert "\n" not in message


def test_a_config_of_random_bytes_is_named(folder):
    path = folder / "config.json"
    path.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(UserError, match=r"config\.json: not a JSON object"):
        load_model(folder, task="causal-lm")


def test_random_bytes_are_not_safetensors(folder):
    path = folder / "model.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(130_000))
    with pytest.raises(UserError, match="not a valid safetensors file: its header length") as e:
        load_model(folder, task="causal-lm")
    assert str(e.value).startswith(f"{path}: ")


def test_header_length_beyond_the_file_is_refused_before_reading(folder):
    path = folder / "model.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")  # was a MemoryError
    with pytest.raises(UserError) as e:
        load_model(folder, task="causal-lm")
    assert str(e.value) == (f"{path}: not a valid safetensors file: its header length "
                            f"({2**40} bytes) does not fit in the 2 bytes after it")


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("content, expected", [
    (b"", "0 bytes, fewer than the 8 of its header length"),
    (b"\x02\x00\x00", "3 bytes, fewer than the 8 of its header length"),
    ((0).to_bytes(8, "little") + b"{}", "its header length (0 bytes) does not fit"),
    ((11).to_bytes(8, "little") + b"{}", "its header length (11 bytes) does not fit in the 2"),
    ((100).to_bytes(8, "little") + bytes(range(156, 256)), "its header is not JSON"),
    ((10).to_bytes(8, "little") + b"{not json}", "its header is not JSON"),
    (_safetensors([1, 2]), "its header is not a JSON object (a list)"),
    (_safetensors({"w": [0, 8]}), "tensor 'w' is described by [0, 8], not a JSON object"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)),
     "tensor 'w' has no 'data_offsets'"),
    (_safetensors({"w": {**F32, "dtype": 4}}, bytes(8)), "tensor 'w' has dtype 4, not a name"),
    (_safetensors({"w": {**F32, "shape": [-2]}}, bytes(8)), "tensor 'w' has shape [-2]"),
    (_safetensors({"w": {**F32, "shape": "2"}}, bytes(8)), "tensor 'w' has shape '2'"),
    (_safetensors({"w": {**F32, "data_offsets": [8]}}, bytes(8)), "has data_offsets [8]"),
    (_safetensors({"w": {**F32, "data_offsets": [8, 0]}}, bytes(8)), "has data_offsets [8, 0]"),
    (_safetensors({"w": {**F32, "data_offsets": [0, 2**62]}}, bytes(8)),
     f"tensor 'w' ends at byte {2**62} of the data, which has only 8"),
    (_safetensors({"w": F32}, bytes(4)), "tensor 'w' ends at byte 8 of the data, which has only 4"),
    (_safetensors({"w": {**F32, "data_offsets": [0, 4]}}, bytes(8)),
     "tensor 'w' has 4 bytes; its dtype F32 and shape [2] take 8"),
    (_safetensors({"w": F32, "v": {**F32, "data_offsets": [4, 12]}}, bytes(12)),
     "tensors 'w' and 'v' overlap"),
], ids=lambda value: value[:40] if isinstance(value, str) else "file")
def test_malformed_safetensors_is_named(tmp_path, content, expected):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        weights.read_safetensors(tmp_path)
    assert str(e.value).startswith(f"{path}: not a valid safetensors file: "), str(e.value)
    assert expected in str(e.value)


def test_unsupported_dtype_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(
        _safetensors({"w": {**F32, "dtype": "C64"}}, bytes(8)))
    with pytest.raises(UserError, match=r"model\.safetensors: tensor 'w' has unsupported dtype "
                                        r"C64; supported: F64, F32"):
        weights.read_safetensors(tmp_path)


def test_well_formed_edge_cases_still_read(tmp_path):
    # Only empty tensors (no data bytes at all), metadata, and a gap between tensors.
    (tmp_path / "model.safetensors").write_bytes(_safetensors(
        {"__metadata__": {"format": "pt"}, "e": {"dtype": "F32", "shape": [0, 3],
                                                 "data_offsets": [0, 0]}}))
    assert weights.read_safetensors(tmp_path)["e"].shape == (0, 3)
    data = np.arange(2, dtype="<f4").tobytes() + bytes(4) + np.arange(3, dtype="<i2").tobytes()
    (tmp_path / "model.safetensors").write_bytes(_safetensors(
        {"w": F32, "i": {"dtype": "I16", "shape": [3, 1], "data_offsets": [12, 18]}}, data))
    read = weights.read_safetensors(tmp_path)
    assert read["w"].tolist() == [0.0, 1.0] and read["i"].ravel().tolist() == [0, 1, 2]


@pytest.mark.parametrize("broken", ["config.json", "model.safetensors"])
def test_runner_plan_exits_2_without_traceback(tmp_path, folder, broken):
    if broken == "config.json":
        _edit_config(folder, lambda c: c.update(num_attention_heads=0))
    else:
        (folder / broken).write_bytes((2**40).to_bytes(8, "little") + b"{}")
    recipe = RECIPE.read_text().replace('"../.tiny/llama"', json.dumps(str(folder)))
    recipe = recipe.replace('"../.tiny/qa.jsonl"', json.dumps(str(write_qa(tmp_path / "qa.jsonl"))))
    assert str(folder) in recipe and "qa.jsonl" in recipe
    (tmp_path / "broken.toml").write_text(recipe)
    done = runner_here("plan", "broken.toml", cwd=tmp_path)
    code, out, err = done.returncode, done.stdout, done.stderr
    assert code == 2, err[-2000:]
    assert "Traceback" not in out + err
    assert err.strip().startswith(f"error: {folder / broken}: ")


@pytest.mark.parametrize("name, content, expected", [
    ("tokenizer_config.json", "[1, 2]", "AttributeError"),
    ("tokenizer.json", '{"version": "1.0"}', "cannot load a tokenizer"),
])
def test_a_broken_tokenizer_file_is_named_not_a_traceback(folder, name, content, expected):
    from runner.build import load_tokenizer

    (folder / name).write_text(content)
    with pytest.raises(UserError) as e:
        load_tokenizer(folder)
    assert str(e.value).startswith(f"{folder}: cannot load a tokenizer from the model folder")
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("weight_map, expected", [
    ({"a": 5}, "weight_map names 5 as a shard"),
    ({"a": "model.safetensors", "b": 5}, "not a safetensors index (TypeError"),
    ({"a": "../elsewhere.safetensors"}, "weight_map names '../elsewhere.safetensors'"),
])
def test_a_broken_safetensors_index_is_named(folder, weight_map, expected):
    from jaxlora.models.weights import weight_files

    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError) as e:
        weight_files(folder)
    assert str(e.value).startswith(f"{index}: ") and expected in str(e.value)
