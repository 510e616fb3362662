"""XLA's cost analysis of jaxlora's compiled train step and the yardstick's on
one CPU shape of `step.py`: flops, bytes accessed and transcendentals, no
timing. Equal flops with more bytes accessed points at relayouts and copies.

    .venv/bin/python bench/cost.py --only bert-base [--hlo /tmp/ours.hlo]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    import step as bench

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", required=True, choices=sorted({s["model"] for s in bench.CPU_SHAPES}))
    p.add_argument("--peers", type=Path,
                   default=Path(os.environ.get("JAXLORA_PEERS", bench.DEFAULT_PEERS)))
    p.add_argument("--hlo", type=Path, help="also write our step's compiled HLO here")
    a = p.parse_args()
    shape = next(s for s in bench.CPU_SHAPES if s["model"] == a.only and s["method"] == "lora")
    sys.path.insert(0, str(a.peers))

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jax_minimal_step as yard
    from jaxlora.tasks import STEP_LOSSES
    from jaxlora.train import build_train_step

    yard.DT = jnp.float32
    task = "clm" if shape.get("task") == "clm" else "cls"
    b, t = shape["batch"], shape["seq"]

    def report(name, lowered):
        compiled = lowered.compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        print(f"{name:10s} flops {cost.get('flops', 0):.4g}  bytes accessed "
              f"{cost.get('bytes accessed', 0):.4g}  transcendentals "
              f"{cost.get('transcendentals', 0):.4g}", flush=True)
        return compiled

    frozen, lora = yard.init(shape["model"], 8, task, False, jax.random.PRNGKey(0))
    tx = optax.adamw(1e-4)
    ids = jax.random.randint(jax.random.PRNGKey(0), (b, t), 1, yard.SHAPES[shape["model"]]["vocab"])
    labels = jnp.zeros((b,), jnp.int32)
    statics = dict(shape=shape["model"], task=task, rank=8, alpha=16.0, impl=None)

    def yard_step(lora, opt, frozen, ids, labels):
        loss, grads = jax.value_and_grad(yard.loss_fn)(lora, frozen, ids, labels, **statics)
        updates, opt = tx.update(grads, opt, lora)
        return optax.apply_updates(lora, updates), opt, loss

    report("yardstick", jax.jit(yard_step).lower(lora, tx.init(lora), frozen, ids, labels))

    graphdef, trainable, frozen, vocab = bench._build(shape, False)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1, vocab, (b, t), dtype=np.int32),
             "attention_mask": np.ones((b, t), np.int32), "labels": np.zeros(b, np.int32),
             "weights": np.ones(b, np.float32), "loss_mask": np.ones((b, t), np.int32)}
    tx = optax.adamw(1e-4, weight_decay=0.01)
    step = build_train_step(graphdef, tx, STEP_LOSSES["causal-lm" if task == "clm"
                                                      else "classification"])
    compiled = report("jaxlora", step.lower(trainable, frozen, tx.init(trainable), batch,
                                            jax.random.key(0)))
    if a.hlo:
        a.hlo.write_text(compiled.as_text())


if __name__ == "__main__":
    main()
