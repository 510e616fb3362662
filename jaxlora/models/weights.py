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
from jaxlora.models.layers import BaseWeight

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
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
        """The checkpoint tensor in the model's layout."""
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


# Where a base weight goes: (host array in the model's layout, dtype) -> the
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


def load_checkpoint(model_dir: Path, *, config_from_hf: Callable[[Any], Any],
                    make_model: Callable[[Any], nnx.Module], rules: Sequence[Rule],
                    ignore: Sequence[str] | Callable[[Any], Sequence[str]],
                    strip_prefixes: Sequence[str], dtype,
                    lora_targets: dict[str, str], place: Place | None = None) -> LoadedModel:
    """What every family's `load` does: read config.json into the family's
    config (`config_from_hf`), build `make_model(config)` with the folder's
    safetensors (see `build`; `place` puts each base weight on its devices),
    and describe the result. `ignore` may depend on the config (a callable)."""
    hf_config = read_hf_config(model_dir)
    try:
        config = config_from_hf(hf_config)
    except UserError as e:
        raise UserError(f"{config_path(model_dir)}: {e}") from None
    patterns = ignore(config) if callable(ignore) else ignore
    model, ignored = build(lambda: make_model(config), read_safetensors(model_dir), rules,
                           ignore=patterns, strip_prefixes=strip_prefixes, dtype=dtype,
                           source=str(model_dir), place=place)
    return LoadedModel(model=model, config=config, hf_config=hf_config, lora_targets=lora_targets,
                       model_dir=Path(model_dir), ignored_keys=ignored)


def config_path(model_dir: Path) -> Path:
    """`model_dir/config.json`; UserError naming the folder if it or the file is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such model folder")
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{model_dir}: no {CONFIG_FILE} (a Hugging Face model folder needs one)")
    return path


def read_hf_config(model_dir: Path):
    """The folder's transformers config (local files only; remote code is never run)."""
    from transformers import AutoConfig

    path = config_path(model_dir)
    try:
        return AutoConfig.from_pretrained(Path(model_dir))
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: {e}") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The folder's safetensors files: `model.safetensors`, or the shards its index names."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such model folder")
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e!r})") from None
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
        for name, tensor in _read_file(path).items():
            if name in tensors:
                raise UserError(f"{path}: tensor {name!r} is also in another shard")
            tensors[name] = tensor
    return tensors


def _read_file(path: Path) -> dict[str, np.ndarray]:
    # The format: an 8-byte little-endian header size, a JSON header mapping each
    # name to {dtype, shape, data_offsets}, then the raw little-endian bytes.
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        if not header:
            return {}
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
        tensors = {}
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise UserError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            tensors[name] = data[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        return tensors
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: not a valid safetensors file ({e!r})") from None


def fingerprint(model_dir: Path) -> str:
    """sha256 (hex) over the names and bytes of the weight files and config.json."""
    digest = hashlib.sha256()
    for path in [*weight_files(model_dir), config_path(model_dir)]:
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
