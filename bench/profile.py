#!/usr/bin/env python
"""Where jaxlora's train step spends its time, next to the yardstick's, in one process.

For each chosen shape of `step.py`:
  * times jaxlora's step as is and in variants that each drop one thing the
    yardstick does not do (dropout, the padding mask), and the yardstick's step;
    "one key buffer" passes the same dropout key every step instead of a new
    one, which on a GPU tells what patching the step's CUDA graph for a new
    argument buffer each step costs (bench/NOTES.md v5);
  * traces a few steps of jaxlora's and of the yardstick's with the JAX profiler
    and sums the device's kernel time per step by kind (matrix products,
    attention, other fusions, copies) and by kernel, so the gap between the two
    reads as named kernels, and the gap between kernel time and the wall time of
    a step as launch and host overhead.

  python bench/profile.py --device gpu --only bert-base        # GPU shapes of that model
  python bench/profile.py --only tiny-llama --steps 3          # CPU (host-side ops only)

On CPU the trace holds no device kernels; the table then lists the XLA CPU
runtime's own thunks, which says less. Prints text; `--trace-dir` keeps the traces.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def variants(task: str) -> dict:
    """name -> step loss (None: the task's own) for jaxlora's step."""
    from jaxlora.tasks import causal_lm_loss, classification_loss

    def no_mask(model, batch, rng):  # every row is full length here: same maths
        if task == "clm":
            hidden = model.hidden(batch["input_ids"], None, rng=rng)
            return causal_lm_loss(model.logits(hidden[:, :-1]), batch, shifted=True)
        return classification_loss(model(batch["input_ids"], None, rng=rng), batch)

    return {"as is": None, "no padding mask": no_mask}


def timed(call, state, steps: int) -> float:
    """Median ms of `steps` calls after two warm-up calls; `call(state, i)` -> state."""
    import jax

    for i in range(2):
        state = call(state, i)
    jax.block_until_ready(state)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state = call(state, 2 + i)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, state


def kernel_table(trace_dir: str, steps: int, wall_ms: float, top: int) -> list[str]:
    """Device kernel time per step, by kind and by kernel, from a perfetto trace."""
    path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in procs.items() if "/device:" in name}
    chosen = device or {pid for pid, name in procs.items() if "/host:" in name}
    per_kernel = collections.Counter()
    counts = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["pid"] in chosen:
            if not device and not e.get("name", "").endswith(("fusion", "thunk")) \
                    and "fusion" not in e.get("name", ""):
                continue
            per_kernel[e["name"]] += e.get("dur", 0) / 1e3
            counts[e["name"]] += 1
    kinds = collections.Counter()
    for name, ms in per_kernel.items():
        kinds[_kind(name)] += ms
    busy = sum(per_kernel.values()) / steps
    lines = [f"  kernel time {busy:.2f} ms/step of {wall_ms:.2f} ms wall "
             f"({'device' if device else 'host CPU fusions'}; the rest is launch/host/idle)"]
    for kind, ms in kinds.most_common():
        lines.append(f"    {kind:<22}{ms / steps:9.3f} ms  {100 * ms / max(busy * steps, 1e-9):5.1f}%")
    lines.append(f"  top {top} kernels (ms/step, launches/step):")
    for name, ms in per_kernel.most_common(top):
        lines.append(f"    {ms / steps:8.3f} {counts[name] / steps:5.0f}  {name[:110]}")
    return lines


def _kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("cudnn", "fmha", "flash", "sdpa", "attention")):
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "dot")):
        return "matrix products"
    if "transpose" in n or "copy" in n:
        return "transposes/copies"
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    if "reduce" in n:
        return "reductions"
    if "fusion" in n:
        return "elementwise fusions"
    return "other"


def traced(call, state, steps: int, trace_dir: str):
    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for i in range(steps):
            state = call(state, 100 + i)
        jax.block_until_ready(state)
    return state


def profile(shape: dict, gpu: bool, peers: Path, steps: int, trace_steps: int,
            trace_root: str, top: int) -> None:
    import jax

    import step as bench

    label = f"{shape['model']} {shape.get('task', 'cls')} {shape['method']} " \
            f"{shape['batch']}x{shape['seq']}"
    print(f"== {label}", flush=True)
    task = "clm" if shape.get("task") == "clm" else "cls"
    # per-step dropout keys made before any timing, as `fit` makes them ahead of the step
    keys = jax.block_until_ready([jax.random.fold_in(jax.random.key(0), i)
                                  for i in range(max(steps + 2, 100) + trace_steps)])
    results = {}
    for name, loss_fn in variants(task).items():
        for dropout in (("new key", "one key", None) if name == "as is" else ("new key",)):
            step, trainable, frozen, opt_state, batch = bench.our_step(shape, gpu, loss_fn)

            def call(state, i, step=step, frozen=frozen, batch=batch, dropout=dropout):
                trainable, opt_state, _ = state
                key = {"new key": keys[i], "one key": keys[0], None: None}[dropout]
                return step(trainable, frozen, opt_state, batch, key)

            state = (trainable, opt_state, None)
            ms, state = timed(call, state, steps)
            variant = {"new key": name, "one key": "one key buffer",
                       None: "no dropout"}[dropout]
            results[variant] = ms
            print(f"  jaxlora {variant:<18}{ms:9.2f} ms", flush=True)
            if name == "as is" and dropout == "new key" and trace_steps:
                trace = os.path.join(trace_root, "jaxlora")
                traced(call, state, trace_steps, trace)
                ours_trace = (trace, ms)
            del state, step, trainable, frozen, opt_state, batch
    ystep, lora, opt, yfrozen, ids, labels = bench.yardstick_step(peers, shape, gpu)

    def ycall(state, i):
        lora, opt, _ = state
        return ystep(lora, opt, yfrozen, ids, labels)

    yms, ystate = timed(ycall, (lora, opt, None), steps)
    print(f"  yardstick{'':<17}{yms:9.2f} ms   jaxlora / yardstick "
          f"{results['as is'] / yms:.2f}x", flush=True)
    if trace_steps:
        trace = os.path.join(trace_root, "yardstick")
        traced(ycall, ystate, trace_steps, trace)
        print("  -- jaxlora", flush=True)
        print("\n".join(kernel_table(ours_trace[0], trace_steps, ours_trace[1], top)), flush=True)
        print("  -- yardstick", flush=True)
        print("\n".join(kernel_table(trace, trace_steps, yms, top)), flush=True)


def main() -> None:
    import step as bench

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--only", required=True, help="model of the shapes to profile (e.g. bert-base)")
    p.add_argument("--method", default="lora", help="lora, qlora or all")
    p.add_argument("--batch", type=int, help="only the shapes of this batch size")
    p.add_argument("--peers", type=Path,
                   default=Path(os.environ.get("JAXLORA_PEERS", bench.DEFAULT_PEERS)))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--trace-steps", type=int, default=3, help="0: no trace")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--trace-dir", help="keep the traces here (default: a temporary folder)")
    a = p.parse_args()
    gpu = a.device == "gpu"
    shapes = [s for s in (bench.GPU_SHAPES if gpu else bench.CPU_SHAPES)
              if s["model"] == a.only and a.method in ("all", s["method"])
              and a.batch in (None, s["batch"])]
    if not shapes:
        p.error(f"no {a.device} shape of model {a.only} with method {a.method}")
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            root = a.trace_dir or tmp
            profile(shape, gpu, a.peers, a.steps, a.trace_steps,
                    os.path.join(root, f"{shape['model']}-{shape['method']}-{shape['batch']}"), a.top)


if __name__ == "__main__":
    main()
