"""The recipe's [model] table: which base model, for which task, in which dtypes."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import BaseModel, ConfigDict

Dtype = Literal["auto", "float32", "bfloat16"]


class ModelConfig(BaseModel):
    """Step 3: the base model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str  # hub id, local folder, or pkg://PACKAGE/path/inside (safetensors + config.json)
    # classification: a fresh head on an encoder's pooled output (BERT family);
    # causal-lm: next-token prediction with a decoder's own LM head (GPT-2, Llama family)
    task: Literal["classification", "causal-lm"] = "classification"
    compute_dtype: Dtype = "auto"  # activations; auto = bfloat16 on GPU/TPU, float32 on CPU
    param_dtype: Dtype = "auto"  # frozen base weights; auto = the compute dtype
    attention: Literal["auto", "xla", "cudnn"] = "auto"  # auto = cuDNN fused kernel on GPU, else XLA

    def dtypes(self) -> tuple[jnp.dtype, jnp.dtype]:
        """(param dtype, compute dtype) resolved for the current platform."""
        compute = self.compute_dtype
        if compute == "auto":
            compute = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        param = compute if self.param_dtype == "auto" else self.param_dtype
        return jnp.dtype(param), jnp.dtype(compute)
