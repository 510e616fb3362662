"""Time one layer's attention, forward and backward, three ways in one process.

  * jaxlora's `layers.attention` as the model calls it (on the CPU: written out,
    causal attention in blocks of `layers.cpu_query_block(seq)` queries);
  * `jax.nn.dot_product_attention` through XLA (one product over all keys);
  * PyTorch's `scaled_dot_product_attention` (the peer's; on the CPU a flash
    kernel that skips the masked half of a causal score matrix), if torch is here.

  python bench/attention.py                             # 4 x 256, 8 heads of 64, causal
  python bench/attention.py --batch 1 --seq 1024 --block 64 --block 128
  python bench/attention.py --both-ways --batch 32 --seq 128 --heads 12 --head-dim 32

Each variant's calls are interleaved (this machine's speed drifts), medians
printed as wall and process CPU time per call (ms), with the largest
difference of jaxlora's outputs and gradients from JAX's own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--both-ways", action="store_true", help="not causal (BERT)")
    parser.add_argument("--block", type=int, action="append",
                        help="query block sizes to time besides the default (repeatable)")
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxlora.models import layers
    from jaxlora.runtime import jit

    causal = not args.both_ways
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cotangent = (jax.random.normal(key, shape) for key in keys)
    mask = jnp.ones(shape[:2], jnp.int32)

    def timed(attend):
        def forward_and_backward(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v), q, k, v)
            return out, vjp(cotangent)
        return jit(forward_and_backward)

    spec = layers.AttentionSpec(causal=causal)

    def with_block(block):
        return lambda q, k, v: layers._explicit_attention(q, k, v, mask, spec, None, block)

    variants = {f"jaxlora (block {layers.cpu_query_block(args.seq)})": timed(
        lambda q, k, v: layers.attention(q, k, v, spec, mask=mask))}
    for block in args.block or []:
        variants[f"jaxlora, block {block}"] = timed(with_block(block))
    variants["jax.nn.dot_product_attention"] = timed(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask.astype(bool)[:, None, None],
                                                     is_causal=causal, implementation="xla"))
    results = {name: jax.block_until_ready(f(q, k, v)) for name, f in variants.items()}
    reference = results["jax.nn.dot_product_attention"]
    for name, result in results.items():
        gap = max(float(jnp.abs(a - b).max()) for a, b in
                  zip(jax.tree.leaves(result), jax.tree.leaves(reference)))
        print(f"{name:32s} max |difference| from JAX's {gap:.2e}")

    calls = {name: (lambda f=f: jax.block_until_ready(f(q, k, v))) for name, f in variants.items()}
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    if torch is not None:
        tq, tk, tv = (torch.randn(*shape, requires_grad=True) for _ in range(3))
        tdo = torch.randn(args.batch, args.heads, args.seq, args.head_dim)

        def torch_call():
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (tq, tk, tv)),
                                                 is_causal=causal)
            out.backward(tdo)
        torch_call()
        calls[f"torch SDPA ({torch.get_num_threads()} threads)"] = torch_call

    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(args.calls):
        for name, call in calls.items():
            c0, t0 = time.process_time(), time.perf_counter()
            call()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    what = "causal" if causal else "both ways"
    print(f"\n{args.batch} x {args.seq}, {args.heads} heads of {args.head_dim}, {what}, "
          f"forward + backward, median of {args.calls} (ms)")
    print(f"{'':40s} {'wall':>8s} {'cpu':>8s}")
    for name in calls:
        print(f"{name:40s} {statistics.median(wall[name]) * 1e3:8.1f} "
              f"{statistics.median(cpu[name]) * 1e3:8.1f}")


if __name__ == "__main__":
    main()
