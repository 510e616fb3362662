"""Trained weights in PyTorch's formats: PEFT adapters and merged models.

PEFT (`peft.PeftModel.from_pretrained(base_model, folder)`):

    adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, ...
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight   (r, in)
                                base_model.model.<module>.lora_B.weight   (out, r)
                                base_model.model.<module>.lora_magnitude_vector  (out,)  DoRA
                                base_model.model.classifier.weight        (labels, hidden)
                                base_model.model.classifier.bias

Our A is (in, r) and B is (r, out), so both are transposed; PEFT's scale is
lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`), as ours; DoRA's
magnitude goes as it is (PEFT loads it over the one it computes from the
base weights). `target_modules` lists the adapted modules by full
path (without the task prefix), because suffixes are ambiguous in BERT:
`output.dense` also ends `attention.output.dense`.

A PiSSA adapter (trained over the residual W0 - s A0 B0) is exported for the
original base weights, as PEFT's own conversion does
(`save_pretrained(path_initial_model_for_weight_conversion=...)`): the
update since the start, s (A B - A0 B0), is the rank-2r adapter
A' = [A | A0], B' = [B ; -B0] (lora_A rows and lora_B columns concatenated),
with lora_alpha doubled so that alpha / r stays s.

Merged (`transformers.AutoModelForSequenceClassification.from_pretrained`):
every linear weight becomes W0 + scale * A B, transposed to torch's (out, in)
(DoRA: times m / ||W0 + scale * A B|| per output row); the other base weights
are written back through the family's weight table (`WEIGHT_RULES` read in
reverse) and the head through `HEAD_RULES`. For QLoRA W0 is the dequantized
4-bit weight the adapter was trained against, not the original full-precision
one.
"""

from __future__ import annotations

import math
import json
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxlora.lora import DoRAAdapter, Factors, adapter_factors
from jaxlora.models.layers import BaseWeight, HeadParam, Linear
from jaxlora.models.weights import rule_for_path

PEFT_PREFIX = "base_model.model."
# numpy dtype -> safetensors dtype name (the inverse of `weights._DTYPES`, float types only).
_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
              np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float64): "F64"}


def kernel_out_in(linear: Linear) -> np.ndarray:
    """The layer's frozen weight as torch stores it, (out, in) float32: the
    kernel transposed, or a quantized kernel dequantized."""
    return np.asarray(linear.frozen_kernel(jnp.float32).out_in())


def lora_delta_out_in(linear: Linear) -> np.ndarray | None:
    """scale * (A B)^T, (out, in) float32, or None without an adapter."""
    if linear.lora is None:
        return None
    a = np.asarray(linear.lora.lora_a[...], np.float32)
    b = np.asarray(linear.lora.lora_b[...], np.float32)
    return (linear.lora.scale * (a @ b)).T


def merged_out_in(linear: Linear) -> np.ndarray:
    """The layer's weight with its adapter merged, (out, in) float32:
    W0 + scale (A B)^T, for DoRA times m / ||that|| per output row (PEFT's
    merge: the norm of the merged rows, which is the norm DoRA's forward uses)."""
    weight = kernel_out_in(linear)
    delta = lora_delta_out_in(linear)
    if delta is None:
        return weight
    weight = weight + delta
    if isinstance(linear.lora, DoRAAdapter):
        magnitude = np.asarray(linear.lora.magnitude[...], np.float32)
        weight = (magnitude / np.linalg.norm(weight, axis=1))[:, None] * weight
    return weight


def peft_tensors(model, family, start: Factors | None = None) -> dict[str, np.ndarray]:
    """PEFT's adapter_model.safetensors contents for an adapted task model
    (DoRA's magnitudes included); with PiSSA's `start` (the factors the
    adapters started from), the adapter of the update since then, for the
    original base weights."""
    tensors = {}
    linears = model.linear_layers()
    for path, (a, b) in adapter_factors(model).items():
        if start is not None:
            a0, b0 = start[path]
            a, b = np.concatenate([a, a0], axis=1), np.concatenate([b, -b0], axis=0)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.T.copy()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.T.copy()
        if isinstance(linears[path].lora, DoRAAdapter):
            tensors[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = np.asarray(
                linears[path].lora.magnitude[...], np.float32)
    for key, value in _head_tensors(model, family).items():
        tensors[PEFT_PREFIX + key] = value
    return tensors


def _prefix(family, task: str) -> str:
    """The prefix of the base model's keys inside the task model transformers
    builds (`bert.` in BertForSequenceClassification, `model.` in LlamaForCausalLM)."""
    return family.CLASSIFIER_PREFIX if task == "classification" else family.PREFIXES[0]


def peft_config(cfg, model, family, *, task: str, base_model: str | None,
                start: Factors | None = None) -> dict:
    """adapter_config.json for a LoRA/QLoRA `cfg` (a `jaxlora.lora.LoraConfig`),
    describing what `peft_tensors(model, family, start)` writes: with PiSSA's
    `start` (required for a PiSSA adapter), the converted rank-2r adapter."""
    if cfg.init == "pissa" and start is None:
        raise ValueError("a PiSSA adapter is exported with the factors it started from "
                         "(start): without them it only fits the residual base weights")
    prefix = _prefix(family, task)
    targets = [path.removeprefix(prefix) for path, linear in model.linear_layers().items()
               if linear.lora is not None]
    # PiSSA's converted adapter has rank 2r; alpha grows with it so that the
    # scale stays (see above): doubled, or times sqrt(2) for rsLoRA's alpha / sqrt(r)
    doubled = 2 if start is not None else 1
    alpha = cfg.alpha * (math.sqrt(doubled) if cfg.scaling == "rslora" else doubled)
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    classify = task == "classification"
    return {"peft_type": "LORA", "task_type": "SEQ_CLS" if classify else "CAUSAL_LM",
            "base_model_name_or_path": base_model, "r": doubled * cfg.rank,
            "lora_alpha": alpha,
            "lora_dropout": cfg.dropout, "target_modules": targets,
            "modules_to_save": [_head_module(family)] if classify else None,
            "bias": "none", "fan_in_fan_out": getattr(family, "FAN_IN_FAN_OUT", False),
            "use_rslora": cfg.scaling == "rslora", "use_dora": cfg.dora,
            "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
            "inference_mode": True, "revision": None}


def merged_tensors(model, family, dtype=np.float32, *,
                   task: str = "classification") -> dict[str, np.ndarray]:
    """The state dict of the transformers task model (`<Family>ForSequenceClassification`,
    `<Family>ForCausalLM`), adapters merged."""
    tensors: dict[str, np.ndarray] = {}
    handled: set[int] = set()
    prefix = _prefix(family, task)
    top_level = tuple(getattr(family, "UNPREFIXED", ()))  # e.g. Llama's lm_head
    for path, linear in model.linear_layers().items():
        weight = merged_out_in(linear)
        # GPT-2's Conv1D keeps (in, out)
        tensors[f"{path}.weight"] = weight.T if getattr(family, "FAN_IN_FAN_OUT", False) else weight
        handled.add(id(linear.kernel))
        if linear.bias is not None:
            tensors[f"{path}.bias"] = np.asarray(linear.bias[...], np.float32)
            handled.add(id(linear.bias))
    for path, variable in nnx.iter_graph(model):
        if not isinstance(variable, BaseWeight) or id(variable) in handled:
            continue
        dotted = ".".join(map(str, path))
        rule, key = rule_for_path(dotted, family.WEIGHT_RULES)
        if key is None:
            raise ValueError(f"no weight rule writes {dotted}")
        tensors[key if key.startswith(top_level) else prefix + key] = rule.to_model(
            np.asarray(variable[...], np.float32))
    tensors.update(_head_tensors(model, family))
    return {k: np.ascontiguousarray(v).astype(dtype) for k, v in tensors.items()}


def _head_tensors(model, family) -> dict[str, np.ndarray]:
    out = {}
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, HeadParam):
            dotted = ".".join(map(str, path))
            rule, key = rule_for_path(dotted, family.HEAD_RULES)
            if key is None:
                raise ValueError(f"no head rule writes {dotted}")
            out[key] = np.ascontiguousarray(rule.to_model(np.asarray(variable[...], np.float32)))
    return out


def _head_module(family) -> str:
    return family.HEAD_RULES[0].hf.rsplit(".", 1)[0]


def write_safetensors(path: Path, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """A safetensors file (8-byte header size, JSON header, raw little-endian
    bytes; this host's byte order, which is little-endian wherever JAX runs)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {a.dtype} is not exported")
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())


def generation_config(base: dict, tokenizer, eos_ids: list[int]) -> dict:
    """generation_config.json of a merged causal LM: the base model's own
    settings (`base`, from its folder's file; {} without one), with every id
    that ends an answer (`eos_ids`: the tokenizer's EOS, the base file's and a
    chat template's end of turn, as `jaxlora.generate.stop_ids` gathers
    them), so transformers' `generate` stops where jaxlora's does."""
    config = {k: v for k, v in base.items() if k != "transformers_version"}
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else list(eos_ids)
    for key in ("bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None)
        if config.get(key) is None and value is not None:
            config[key] = int(value)
    return config
