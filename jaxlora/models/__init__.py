"""Model families, keyed by the Hugging Face `model_type` in a folder's config.json.

Every family is one module exposing the same names (one interface per kind of
component, so adding GPT-2 or Llama is adding a file and a line here):

    Config         frozen dataclass of the architecture, with `Config.from_hf(hf_config)`
    load           (model_dir, *, task, num_labels, param_dtype, compute_dtype, attention, seed,
                   place)
                   -> weights.LoadedModel
    LORA_TARGETS   user-facing LoRA target name -> Hugging Face module path in a block
    WEIGHT_RULES   the checkpoint -> model table (`weights.Rule`s)
    IGNORED        regexes of checkpoint keys deliberately not loaded
    TASKS          the tasks it builds models for ("classification", "causal-lm")
    PREFIXES       prefixes stripped from checkpoint keys (e.g. "bert.")
    ARCHITECTURE   `weights.Architecture`: `Config.from_hf` and the four tables above
                   (the ignored keys as a function of the config where they depend on it),
                   what `load` reads a checkpoint with (`weights.load_checkpoint`)
    CLASSIFIER_ARCHITECTURE, CLASSIFIER_PREFIX, HEAD_RULES
                   export: the transformers classifier class, the prefix of its
                   encoder keys ("bert."), the rules for the task head

The task model a family builds exposes `linear_layers()`: every `Linear` by
its Hugging Face module path.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Literal

import jax.numpy as jnp

from jaxlora.errors import UserError
from jaxlora.models import bert, gguf, gpt2, llama
from jaxlora.models.layers import AttentionImpl
from jaxlora.models.weights import LoadedModel, Place, config_path, read_config_json

Task = Literal["classification", "causal-lm"]
TASKS: tuple[Task, ...] = ("classification", "causal-lm")

# MiniLM checkpoints declare model_type "bert": same architecture. Mistral and
# Qwen2 are Llama with other settings (see jaxlora.models.llama).
FAMILIES: dict[str, ModuleType] = {"bert": bert, "gpt2": gpt2, "llama": llama,
                                   "mistral": llama, "qwen2": llama}


def family(model_dir: Path) -> ModuleType:
    """The family module for the folder's config.json `model_type` (a GGUF
    file's architecture)."""
    if gguf.is_gguf(model_dir):
        return FAMILIES[gguf.model_type(model_dir)]
    path = config_path(model_dir)
    model_type = read_config_json(model_dir).get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"{path}: model_type {model_type!r} is not supported; "
                        f"supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def load_model(model_dir: Path, *, task: Task, num_labels: int | None = None,
               param_dtype=jnp.float32, compute_dtype=jnp.float32,
               attention: AttentionImpl = "auto", seed: int = 0,
               place: Place | None = None) -> LoadedModel:
    """The task model for the folder, base weights loaded and checked (and put
    where `place` says: see `weights.Place`), a head (classification) seeded by `seed`."""
    fam = family(model_dir)
    if task not in fam.TASKS:
        raise UserError(f"task {task!r} is not supported by {fam.__name__.rsplit('.', 1)[-1]} "
                        f"models; supported: {', '.join(fam.TASKS)}")
    return fam.load(Path(model_dir), task=task, num_labels=num_labels, param_dtype=param_dtype,
                    compute_dtype=compute_dtype, attention=attention, seed=seed, place=place)
