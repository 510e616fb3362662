"""The recipe's [runtime] table: the devices a run uses and how arrays are laid out."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RuntimeConfig(BaseModel):
    """The recipe's [runtime] table: the devices a run uses and how arrays are laid out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # devices along the data axis; -1: all the devices the fsdp axis leaves
    data: int = Field(-1, ge=-1, le=65536)
    # devices along the FSDP axis: frozen weights (and, for full fine-tuning, the
    # trainable weights and optimizer state) are sharded over it
    fsdp: int = Field(1, ge=1, le=65536)
    # also shard the LoRA factors, the head and their optimizer state (default: replicated)
    shard_adapters: bool = False
    # join the other processes with jax.distributed.initialize(): auto = when the
    # environment names several processes (TPU VM pod, SLURM, JAX_NUM_PROCESSES)
    distributed: Literal["auto", "on", "off"] = "auto"

    @field_validator("data")
    @classmethod
    def _some_devices(cls, data: int) -> int:
        if data == 0:
            raise ValueError("a mesh needs at least 1 device along data; -1 takes every "
                             "device the fsdp axis leaves")
        return data
