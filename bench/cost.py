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

    import jax

    def report(name, lowered):
        compiled = lowered.compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        print(f"{name:10s} flops {cost.get('flops', 0):.4g}  bytes accessed "
              f"{cost.get('bytes accessed', 0):.4g}  transcendentals "
              f"{cost.get('transcendentals', 0):.4g}", flush=True)
        return compiled

    step, *args = bench.yardstick_step(a.peers, shape, False)
    report("yardstick", step.lower(*args))
    step, *args = bench.our_step(shape, False)
    compiled = report("jaxlora", step.lower(*args, jax.random.key(0)))
    if a.hlo:
        a.hlo.write_text(compiled.as_text())


if __name__ == "__main__":
    main()
