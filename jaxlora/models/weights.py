"""Hugging Face safetensors checkpoints -> Flax NNX modules, driven by a table.

Each architecture declares its weights as data: a list of `Rule`s, each a
checkpoint tensor name, the NNX state path it fills, and a transform (torch's
`nn.Linear` stores its weight (out, in); our `Linear` kernel is (in, out)):

    checkpoint key                                   transform   model path
    encoder.layer.{i}.attention.self.query.weight    transpose   bert.layers.{i}.query.kernel
    encoder.layer.{i}.attention.self.query.bias      none        bert.layers.{i}.query.bias

Both sides are templates whose `{fields}` stand for numbers (layer indices), so
a rule reads both ways: checkpoint key -> model path when loading, and model
path -> checkpoint key when naming a weight the checkpoint lacks (or when
exporting).

`build` never allocates random base weights: it constructs the model with
`nnx.eval_shape` (every variable holds a `jax.ShapeDtypeStruct`), sets each
`BaseWeight` from the checkpoint (`fill`), then initialises the remaining
variables (a fresh classifier head) for real. Loading refuses, naming the keys:
a model weight the checkpoint lacks, a checkpoint tensor that no rule and no
ignore pattern accounts for, and a shape that differs. Pickle checkpoints
(`pytorch_model.bin`, `*.pt`) are refused outright: unpickling can run code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxlora.errors import UserError
from jaxlora.models import gguf
from jaxlora.models.layers import BaseWeight

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# config.json fields that size an architecture (each family reads some of them):
# where present and not null, each must be a positive integer.
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "head_dim", "max_position_embeddings",
               "n_embd", "n_layer", "n_head", "n_inner", "n_positions")
# Numbers of the rope tables that transformers only warns about (a string there
# would fail only later, inside the model).
ROPE_TABLES = ("rope_parameters", "rope_scaling")
ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")
# Dropout probabilities: where present and not null, each must be in [0, 1).
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                  "resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout",
                  "hidden_dropout", "dropout")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
MAX_LISTED = 10  # names listed per kind of error; the count says how many more
HASH_CHUNK = 1 << 20

# safetensors dtype names -> numpy dtypes (bfloat16 and float8 through ml_dtypes,
# which JAX already depends on; `safetensors.numpy` cannot read bfloat16).
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}

Transform = Literal["none", "transpose"]
# Each transform is its own inverse, so export can reuse the table.
_TRANSFORMS: dict[Transform, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda a: a,
    "transpose": lambda a: a.T,
}

M = TypeVar("M", bound=nnx.Module)


@dataclass(frozen=True)
class Rule:
    """One checkpoint tensor <-> one model variable.

    `hf` and `path` are templates with the same `{fields}`, each standing for a
    number: `Rule("h.{i}.mlp.c_fc.weight", "layers.{i}.fc.kernel")`.
    """

    hf: str  # checkpoint tensor name, after the prefix is stripped
    path: str  # dotted NNX state path in the task model
    transform: Transform = "none"  # applied to the checkpoint tensor when loading

    def model_path(self, key: str) -> str | None:
        """The model path that checkpoint `key` fills, or None if this rule does not match."""
        groups = _template_regex(self.hf).fullmatch(key)
        return None if groups is None else self.path.format(**groups.groupdict())

    def hf_key(self, path: str) -> str | None:
        """The checkpoint key that fills model `path`, or None if this rule does not match."""
        groups = _template_regex(self.path).fullmatch(path)
        return None if groups is None else self.hf.format(**groups.groupdict())

    def to_model(self, tensor: np.ndarray) -> np.ndarray:
        """The checkpoint tensor in the model's axis order."""
        return _TRANSFORMS[self.transform](tensor)


@functools.cache
def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(part) if n % 2 == 0 else rf"(?P<{part}>\d+)"
                              for n, part in enumerate(parts)))


def linear(hf_module: str, path: str) -> list[Rule]:
    """Rules for a torch `nn.Linear` (weight (out, in), bias) -> our `Linear`."""
    return [Rule(f"{hf_module}.weight", f"{path}.kernel", "transpose"),
            Rule(f"{hf_module}.bias", f"{path}.bias")]


def layer_norm(hf_module: str, path: str) -> list[Rule]:
    """Rules for a torch `nn.LayerNorm` (weight, bias) -> our `LayerNorm` (scale, bias)."""
    return [Rule(f"{hf_module}.weight", f"{path}.scale"), Rule(f"{hf_module}.bias", f"{path}.bias")]


def embedding(hf_module: str, path: str) -> list[Rule]:
    """Rules for a torch `nn.Embedding` -> our `Embed`."""
    return [Rule(f"{hf_module}.weight", f"{path}.embedding")]


# Where a base weight goes: (host array in the model's axis order, dtype) -> the
# weight's array. The default copies it whole to the default device; a mesh's
# `runtime.Placement.place_weight` puts each device's slice straight on it.
Place = Callable[[np.ndarray, Any], jax.Array]


def to_default_device(host: np.ndarray, dtype) -> jax.Array:
    # `jnp.array` copies; on CPU `jnp.asarray` of an aligned read-only memmap
    # aliases the file, so rewriting the checkpoint would change the model.
    return jnp.array(host, dtype=dtype)


@dataclass(frozen=True)
class LoadedModel:
    """A task model with its base weights loaded, and what is known about them."""

    model: nnx.Module  # the task model: base weights from the checkpoint, head fresh
    config: Any  # the family's own config (e.g. `BertConfig`)
    hf_config: Any  # the transformers config object, for export and tokenizers
    model_dir: Path  # the folder it was loaded from
    ignored_keys: list[str]  # checkpoint keys deliberately not loaded (e.g. a pretraining head)
    lora_targets: dict[str, str]  # the family's LORA_TARGETS: target name -> path in a block

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the weight files and config.json (reads every byte, once, when asked)."""
        return fingerprint(self.model_dir)


class TargetTable(dict):
    """A family's LoRA target names -> Hugging Face module path in a block, and
    `default`: the names a recipe that names none gets (PEFT's default for
    the family)."""

    def __init__(self, table: dict[str, str], *, default: Sequence[str]):
        super().__init__(table)
        self.default = list(default)


@dataclass(frozen=True)
class Architecture:
    """What a family's checkpoints are: how its config is read and its weights routed.

    Each family module defines one as `ARCHITECTURE`, from its `Config.from_hf`,
    `WEIGHT_RULES`, `IGNORED`, `PREFIXES` and `LORA_TARGETS`.
    """

    config_from_hf: Callable[[Any], Any]  # transformers config -> the family's config
    rules: Sequence[Rule]  # the checkpoint -> model table
    # regexes of checkpoint keys deliberately not loaded, or config -> those regexes
    ignore: Sequence[str] | Callable[[Any], Sequence[str]]
    strip_prefixes: Sequence[str]  # prefixes stripped from checkpoint keys (e.g. "bert.")
    lora_targets: dict[str, str]  # LoRA target name -> Hugging Face module path in a block


def load_checkpoint(model_dir: Path, architecture: Architecture,
                    make_model: Callable[[Any], nnx.Module], *, dtype,
                    place: Place | None = None) -> LoadedModel:
    """What every family's `load` does: read config.json into the family's
    config (`architecture.config_from_hf`), build `make_model(config)` with the
    folder's safetensors (see `build`; weights cast to `dtype`, and `place` puts
    each base weight on its devices), and describe the result. The ignored keys
    may depend on the config (`architecture.ignore` a callable)."""
    from_gguf = gguf.is_gguf(model_dir)
    hf_config = gguf.hf_config(model_dir) if from_gguf else read_hf_config(model_dir)
    try:
        config = architecture.config_from_hf(hf_config)
    except UserError as e:
        raise UserError(f"{model_dir if from_gguf else config_path(model_dir)}: {e}") from None
    ignore = architecture.ignore
    patterns = ignore(config) if callable(ignore) else ignore
    tensors = gguf.tensors(model_dir, hf_config) if from_gguf else read_safetensors(model_dir)
    model, ignored = build(lambda: make_model(config), tensors,
                           architecture.rules, ignore=patterns,
                           strip_prefixes=architecture.strip_prefixes, dtype=dtype,
                           source=str(model_dir), place=place)
    return LoadedModel(model=model, config=config, hf_config=hf_config,
                       lora_targets=architecture.lora_targets, model_dir=Path(model_dir),
                       ignored_keys=ignored)


def config_path(model_dir: Path) -> Path:
    """`model_dir/config.json`; UserError naming the folder if it or the file is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such model folder")
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{model_dir}: no {CONFIG_FILE} (a Hugging Face model folder needs one)")
    return path


def read_config_json(model_dir: Path) -> dict:
    """The folder's config.json as a JSON object, or a UserError naming it."""
    path = config_path(model_dir)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: not a JSON object ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a JSON object (a {type(raw).__name__})")
    return raw


def read_hf_config(model_dir: Path):
    """The folder's transformers config (local files only; remote code is never run).

    A broken config.json is a UserError naming the file (and the field, where
    known): the architecture's sizes are checked here (positive integers), and
    whatever else transformers' own parsing and validation raises is wrapped.
    """
    from transformers import AutoConfig

    path = config_path(model_dir)
    raw = read_config_json(model_dir)
    for field in SIZE_FIELDS:
        value = raw.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            raise UserError(f"{path}: {field} must be a positive integer, not {value!r}")
    for field in DROPOUT_FIELDS:
        value = raw.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value < 1):
            raise UserError(f"{path}: {field} must be a probability in [0, 1), not {value!r}")
    for table in ROPE_TABLES:
        rope = raw.get(table)
        for field in ROPE_NUMBERS if isinstance(rope, dict) else ():
            value = rope.get(field)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float))):
                raise UserError(f"{path}: {table}.{field} must be a number, not {value!r}")
    try:
        return AutoConfig.from_pretrained(Path(model_dir))
    except Exception as e:  # third-party code reading user input: any failure is the file's
        raise UserError(f"{path}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (joined with the next when it ends
    with a colon, as "Validation error for field 'x':" does), or its type's name."""
    # str(KeyError("msg")) is the repr of "msg", quotes and all.
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def weight_files(model_dir: Path) -> list[Path]:
    """The folder's safetensors files: `model.safetensors`, or the shards its index names."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such model folder")
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError,
                UnicodeDecodeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e!r})") from None
        odd = [name for name in names if not isinstance(name, str) or not name
               or Path(name).is_absolute() or ".." in Path(name).parts]
        if odd:
            raise UserError(f"{index}: weight_map names {odd[0]!r} as a shard; each entry "
                            "must name a file in the model folder")
        missing = [name for name in names if not (model_dir / name).is_file()]
        if missing:
            raise UserError(f"{index}: names shards that are missing: {_listing(missing)}")
        return [model_dir / name for name in names]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in model_dir.glob(pattern))
    if pickles:
        raise UserError(
            f"{model_dir}: only pickle weights ({_listing(pickles)}); they are refused because "
            "loading a pickle can run arbitrary code. Convert them to safetensors (in "
            "transformers: `AutoModel.from_pretrained(dir).save_pretrained(dir)` writes "
            f"{SINGLE_FILE})")
    raise UserError(f"{model_dir}: no weights ({SINGLE_FILE} or {INDEX_FILE})")


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor in the folder's safetensors files, by name, as read-only host arrays.

    The files are memory-mapped, so a tensor is read from disk only when used.
    """
    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(model_dir):
        for name, tensor in read_safetensors_file(path).items():
            if name in tensors:
                raise UserError(f"{path}: tensor {name!r} is also in another shard")
            tensors[name] = tensor
    return tensors


def read_safetensors_file(path: Path) -> dict[str, np.ndarray]:
    """One safetensors file's tensors, by name, memory-mapped, its header checked first."""
    # The format: an 8-byte little-endian header size, a JSON header mapping each
    # name to {dtype, shape, data_offsets}, then the raw little-endian bytes.
    # Everything in the header is checked against the file before it is used.
    def invalid(why: str) -> UserError:
        return UserError(f"{path}: not a valid safetensors file: {why}")

    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise invalid(f"{file_size} bytes, fewer than the 8 of its header length")
            size = int.from_bytes(head, "little")
            if not 0 < size <= file_size - 8:
                raise invalid(f"its header length ({size} bytes) does not fit in the "
                              f"{file_size - 8} bytes after it")
            raw = f.read(size)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise invalid(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise invalid(f"its header is not a JSON object (a {type(header).__name__})")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - size
    spans = []  # (begin, end, name) of each non-empty tensor's bytes
    for name, info in header.items():
        if not isinstance(info, dict):
            raise invalid(f"tensor {name!r} is described by {info!r}, not a JSON object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                raise invalid(f"tensor {name!r} has no {key!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise invalid(f"tensor {name!r} has dtype {dtype!r}, not a name")
        if dtype not in _DTYPES:
            raise UserError(f"{path}: tensor {name!r} has unsupported dtype {dtype}; "
                            f"supported: {', '.join(_DTYPES)}")
        if not _naturals(shape):
            raise invalid(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
        if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
            raise invalid(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
        begin, end = offsets
        if end > data_size:
            raise invalid(f"tensor {name!r} ends at byte {end} of the data, which has only "
                          f"{data_size}")
        expected = int(np.prod(shape, dtype=object)) * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != expected:
            raise invalid(f"tensor {name!r} has {end - begin} bytes; its dtype {dtype} and "
                          f"shape {shape} take {expected}")
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise invalid(f"tensors {first!r} and {second!r} overlap")
    # np.memmap cannot map zero bytes (a file of empty tensors has no data).
    data = (np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size) if data_size
            else np.zeros(0, np.uint8))
    return {name: data[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
            for name, info in header.items() for begin, end in [info["data_offsets"]]}


def _naturals(value) -> bool:
    """Whether `value` is a JSON list of integers >= 0."""
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)


def fingerprint(model_dir: Path) -> str:
    """sha256 (hex) over the names and bytes of the weight files and config.json
    (of a GGUF model, its one file)."""
    digest = hashlib.sha256()
    files = (gguf.fingerprint_files(model_dir) if gguf.is_gguf(model_dir) else
             [*weight_files(model_dir), config_path(model_dir)])
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def build(ctor: Callable[[], M], tensors: dict[str, np.ndarray], rules: Sequence[Rule], *,
          ignore: Sequence[str], strip_prefixes: Sequence[str], dtype,
          source: str = "checkpoint", place: Place | None = None) -> tuple[M, list[str]]:
    """Construct `ctor()` with its `BaseWeight`s from `tensors` and the rest freshly initialised.

    Returns the model and the checkpoint keys ignored (see `fill`).
    """
    model = nnx.eval_shape(ctor)
    ignored = fill(model, tensors, rules, ignore=ignore, strip_prefixes=strip_prefixes,
                   dtype=dtype, source=source, place=place)
    # Under jit, XLA computes only what is returned, so the constructor's base
    # weights are never materialised: only the other variables (the head) are.
    fresh = jax.jit(lambda: nnx.state(ctor(), nnx.Not(BaseWeight)))()
    nnx.update(model, fresh)
    return model, ignored


def fill(model: nnx.Module, tensors: dict[str, np.ndarray], rules: Sequence[Rule], *,
         ignore: Sequence[str], strip_prefixes: Sequence[str], dtype,
         source: str = "checkpoint", place: Place | None = None) -> list[str]:
    """Set every `BaseWeight` of `model` (abstract or real) from `tensors`, cast to
    `dtype` and put where `place` says (default: whole, on the default device).

    A key loses the first of `strip_prefixes` it starts with, then must match an
    `ignore` regex (full match) or a rule. Raises one `UserError`, naming `source`,
    for all missing weights, unexpected keys and shape mismatches; nothing is set
    then. Returns the ignored keys, as named in the checkpoint.
    """
    targets = {".".join(map(str, path)): variable for path, variable in nnx.iter_graph(model)
               if isinstance(variable, BaseWeight)}
    ignore_res = [re.compile(pattern) for pattern in ignore]
    ignored, unexpected, mismatched = [], [], []
    planned: dict[str, tuple[str, Rule]] = {}  # model path -> (checkpoint key, rule)
    for key in sorted(tensors):
        name = _strip_prefix(key, strip_prefixes)
        if any(pattern.fullmatch(name) for pattern in ignore_res):
            ignored.append(key)
            continue
        rule, path = _route(name, rules)
        if path not in targets:  # no rule, or e.g. a layer beyond the model's depth
            unexpected.append(key)
        elif path in planned:
            unexpected.append(f"{key} (also given as {planned[path][0]})")
        else:
            planned[path] = (key, rule)
            expected = tuple(targets[path].get_value().shape)
            found = rule.to_model(tensors[key]).shape
            if found != expected:
                mismatched.append(f"{key}: model expects {expected}, checkpoint has {found}"
                                  + (" after transposing" if rule.transform == "transpose" else ""))
    missing = [_expected_key(path, rules) for path in targets if path not in planned]
    problems = [f"{title} ({len(names)}): {_listing(names)}" for title, names in [
        ("model weights missing from the checkpoint", missing),
        ("unexpected checkpoint keys", unexpected),
        ("shape mismatches", mismatched)] if names]
    if problems:
        raise UserError(f"{source}: cannot load the weights; " + "; ".join(problems))
    place = place or to_default_device
    for path, (key, rule) in planned.items():
        # A view of the memory-mapped tensor: `place` copies out only what it needs.
        targets[path].set_value(place(rule.to_model(tensors[key]), dtype))
    return ignored


def _strip_prefix(key: str, prefixes: Sequence[str]) -> str:
    prefix = next((p for p in prefixes if key.startswith(p)), "")
    return key[len(prefix):]


def _route(name: str, rules: Sequence[Rule]) -> tuple[Rule | None, str | None]:
    for rule in rules:
        path = rule.model_path(name)
        if path is not None:
            return rule, path
    return None, None


def rule_for_path(path: str, rules: Sequence[Rule]) -> tuple[Rule | None, str | None]:
    """The rule that fills model `path` and the checkpoint key it reads (export
    writes that key), or (None, None)."""
    for rule in rules:
        key = rule.hf_key(path)
        if key is not None:
            return rule, key
    return None, None


def _expected_key(path: str, rules: Sequence[Rule]) -> str:
    key = rule_for_path(path, rules)[1]
    return f"{path} (no rule for it)" if key is None else key


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown if len(names) <= MAX_LISTED else f"{shown}, ... ({len(names) - MAX_LISTED} more)"
