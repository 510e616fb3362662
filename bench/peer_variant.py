#!/usr/bin/env python
"""The PEFT peer (`peft_step.py` from ../shared/peers) with one LoRA variant on.

    python bench/peer_variant.py PEERS_DIR VARIANT [peft_step.py's options]

VARIANT is `dora` or `rslora` (PEFT's `LoraConfig(use_dora=True)` /
`use_rslora=True`), or `loraplus:RATIO` (LoRA+: the peer's AdamW is made by
`peft.optimizers.create_loraplus_optimizer`, the `lora_B` weights and the
vectors at RATIO times the learning rate). Everything else is
the peer's own code, run as its own script: the same model, batch, timing
and JSON line, so that `bench/step.py --variants` compares like with like.
"""

from __future__ import annotations

import functools
import runpy
import sys
from pathlib import Path


def _with_variant(variant: str) -> None:
    """Patch peft / torch so that the peer's step trains `variant`."""
    import peft
    import torch

    if variant in ("dora", "rslora"):
        peft.LoraConfig = functools.partial(peft.LoraConfig, use_dora=variant == "dora",
                                            use_rslora=variant == "rslora")
        return
    ratio = float(variant.removeprefix("loraplus:"))
    made = {}
    get_peft_model, adamw = peft.get_peft_model, torch.optim.AdamW

    def remember(model, config, *args, **kwargs):
        made["model"] = get_peft_model(model, config, *args, **kwargs)
        return made["model"]

    def loraplus(params, lr, **kwargs):  # the peer's trainable parameters: the model's
        from peft.optimizers import create_loraplus_optimizer
        return create_loraplus_optimizer(made["model"], adamw, lr=lr, loraplus_lr_ratio=ratio,
                                         **kwargs)

    peft.get_peft_model, torch.optim.AdamW = remember, loraplus


def main() -> None:
    peers, variant = Path(sys.argv[1]), sys.argv[2]
    if variant not in ("dora", "rslora") and not variant.startswith("loraplus:"):
        sys.exit(f"unknown variant {variant!r}: dora, rslora or loraplus:RATIO")
    # the peer's folder first, as when it runs as its own script; not bench/,
    # whose profile.py would shadow the standard library's (torch imports it)
    sys.path[0] = str(peers)
    _with_variant(variant)
    script = peers / "peft_step.py"
    sys.argv = [str(script)] + sys.argv[3:]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
