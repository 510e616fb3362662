"""Base weights go from the memory-mapped checkpoint straight into their FSDP
sharding: each device's slice is read on its own (so a host of a pod reads only
its own devices' share, and no device holds a whole sharded weight), and QLoRA's
4-bit codes and scales are computed straight into theirs. Same values as the
plain one-device load. Runs in a child process with 8 CPU devices."""

import os
import subprocess
import sys

from tiny_models import tiny_decoder_dir
from conftest import xla_flags

SCRIPT = r"""
import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora import runtime
from jaxlora.lora import QLoraConfig, adapt
from jaxlora.models import load_model, weights
from jaxlora.models.layers import BaseWeight
from jaxlora.quant import QuantConfig, QuantState, _quantize_kernel

assert jax.device_count() == 8, jax.devices()
FSDP = 4
reads = []  # (shape of the checkpoint tensor as the model lays it out, shape read)


class Recorded(np.ndarray):
    def __getitem__(self, index):
        out = super().__getitem__(index)
        reads.append((self.shape, np.shape(out)))
        return out


plain_read = weights.read_safetensors_file
weights.read_safetensors_file = lambda path: {k: v.view(Recorded)
                                             for k, v in plain_read(path).items()}

placement = runtime.make_placement(runtime.RuntimeConfig(data=2, fsdp=FSDP),
                                   full_fine_tuning=False)
folder = sys.argv[1]
placed = load_model(folder, task="causal-lm", attention="xla", place=placement.place_weight)
placed_reads = list(reads)
plain = load_model(folder, task="causal-lm", attention="xla")


def base_weights(model):
    return {path: var[...] for path, var in nnx.iter_graph(model) if isinstance(var, BaseWeight)}


ours, reference = base_weights(placed.model), base_weights(plain.model)
assert ours.keys() == reference.keys() and len(ours) > 10
split = 0
for path, array in ours.items():
    expected = placement.frozen_sharding(array.shape)
    assert array.sharding.is_equivalent_to(expected, array.ndim), (path, array.sharding)
    split += "fsdp" in expected.spec
    np.testing.assert_array_equal(np.asarray(array), np.asarray(reference[path]), err_msg=path)
assert split >= 10, split

# Cast on the way (float32 checkpoint -> bfloat16 weights): the same rounding.
for path, array in base_weights(load_model(folder, task="causal-lm", attention="xla",
                                           param_dtype=jnp.bfloat16,
                                           place=placement.place_weight).model).items():
    want = reference[path].astype(jnp.bfloat16)
    assert array.dtype == jnp.bfloat16 and array.sharding.is_equivalent_to(
        placement.frozen_sharding(array.shape), array.ndim), path
    np.testing.assert_array_equal(np.asarray(array), np.asarray(want), err_msg=path)

# Each read is one device's slice: a quarter of a weight that has a dimension
# FSDP divides, the whole of one that has none (replicated). The two devices
# along `data` that hold the same slice share one read.
assert reads
for full, read in reads:
    divisible = any(n % FSDP == 0 for n in full)
    assert math.prod(read) == math.prod(full) // (FSDP if divisible else 1), (full, read)
assert len(placed_reads) == sum(FSDP if any(n % FSDP == 0 for n in a.shape) else 1
                                for a in ours.values()), len(placed_reads)
print("largest read", max(math.prod(read) for _, read in reads), "of",
      max(math.prod(full) for full, _ in reads))

# QLoRA: the codes and scales land in their sharding, equal to the plain
# quantization (float scales to rounding: a sharded mean sums in another order).
cfg = QLoraConfig(rank=4, targets="all-linear", quant=QuantConfig(block_size=32))
key = jax.random.key(0)
*_, frozen_placed, _ = adapt(placed.model, cfg, placed.lora_targets, key,
                             sharding=placement.frozen_sharding)
*_, frozen_plain, _ = adapt(plain.model, cfg, plain.lora_targets, key)
codes = 0
reference = dict(nnx.to_flat_state(frozen_plain))
for path, var in nnx.to_flat_state(frozen_placed):
    if isinstance(var, QuantState):
        array = var[...]
        expected = placement.frozen_sharding(array.shape)
        assert array.sharding.is_equivalent_to(expected, array.ndim), (path, array.sharding)
        want = np.asarray(reference[path][...])
        if np.issubdtype(want.dtype, np.floating):  # the scales' mean, summed in parts
            np.testing.assert_allclose(np.asarray(array), want, rtol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(array), want)
        codes += path[-1] == "codes" and "fsdp" in expected.spec
assert codes == 14, codes  # 7 linear layers x 2 blocks, each split 4 ways

# ... computed on the mesh in parts: the compiled quantizer gathers at most the
# per-block scales (one per 32 values, for double quantization), never values or codes.
weight = placement.place_weight(np.ones((32, 64), np.float32), jnp.float32)
hlo = _quantize_kernel.lower(weight, cfg.quant, placement.frozen_sharding).compile().as_text()
gathered = [math.prod(int(n) for n in dims.split(",") if n)
            for dims in re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather\(", hlo)]
assert max(gathered, default=0) <= 32 * 64 // 32, gathered
print("ok")
"""


def test_base_weights_load_straight_into_their_shards(tmp_path):
    folder = tiny_decoder_dir(tmp_path / "llama", "llama-gqa-rope3")
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok"), done.stdout
