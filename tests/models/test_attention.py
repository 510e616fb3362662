"""Every attention path gives the same outputs: `jax.nn.dot_product_attention`
through XLA, the explicit formulation (attention dropout anywhere, every call on
the CPU) in one product or in query blocks, the KV-cache path of generation, and
cuDNN's fused kernel where a GPU runs it; with padding, causal masks,
grouped-query heads, a sliding window and packed rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models import layers
from jaxlora.models.layers import (AttentionSpec, _explicit_attention, _key_mask, attention,
                                   cached_attention, dropout)

CASES = [dict(causal=False, window=None), dict(causal=True, window=None),
         dict(causal=True, window=3)]


def _inputs(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 10, 4, 8), dtype)
    k = jax.random.normal(keys[1], (2, 10, 2, 8), dtype)  # grouped-query: 2 kv heads
    v = jax.random.normal(keys[2], (2, 10, 2, 8), dtype)
    mask = (np.arange(10)[None, :] < np.array([[10], [6]])).astype(np.int32)  # right padding
    return q, k, v, mask


@pytest.mark.parametrize("case", CASES, ids=str)
def test_xla_explicit_and_cached_paths_agree(case):
    q, k, v, mask = _inputs()
    real = mask.astype(bool)
    reference = np.asarray(_jax_attention(q, k, v, mask, **case))
    explicit = np.asarray(_explicit_attention(q, k, v, mask, AttentionSpec(**case),
                                              jax.random.key(1)))
    np.testing.assert_allclose(explicit[real], reference[real], atol=1e-5)
    if case["causal"]:  # generation: the whole sequence written into an empty cache at 0
        cache = (jnp.zeros_like(k), jnp.zeros_like(v))
        cached, (keys, _) = cached_attention(q, k, v, cache, 0, mask, case["window"])
        np.testing.assert_allclose(np.asarray(cached)[real], reference[real], atol=1e-5)
        np.testing.assert_array_equal(np.asarray(keys), np.asarray(k))
        # and token by token: each query alone against the cache so far
        cache = (jnp.zeros_like(k), jnp.zeros_like(v))
        for t in range(10):
            out, cache = cached_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache, t,
                                          mask * (np.arange(10) <= t), case["window"])
            rows = real[:, t]
            np.testing.assert_allclose(np.asarray(out)[rows, 0], reference[rows, t], atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused kernel runs on a GPU only")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cudnn_agrees_with_xla(case):
    q, k, v, mask = _inputs(jnp.bfloat16)
    real = mask.astype(bool)
    xla = np.asarray(attention(q, k, v, AttentionSpec(implementation="xla", **case), mask=mask),
                     np.float32)
    fused = np.asarray(attention(q, k, v, AttentionSpec(implementation="cudnn", **case),
                                 mask=mask), np.float32)
    np.testing.assert_allclose(fused[real], xla[real], atol=2e-2)


def _jax_attention(q, k, v, mask, causal, window):
    """JAX's own XLA formulation, the reference for ours."""
    return jax.nn.dot_product_attention(
        q, k, v, mask=_key_mask(mask), is_causal=causal, implementation="xla",
        local_window_size=None if window is None else (window - 1, 0))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("block", [3, 4])
def test_query_blocks_give_the_single_products_outputs_and_gradients(case, block):
    """Attention in blocks of queries, each against only the keys it can see
    (neither block size divides the 10 positions)."""
    q, k, v, mask = _inputs()
    real = mask.astype(bool)
    cotangent = jax.random.normal(jax.random.key(5), q.shape)

    def run(block):
        def f(q, k, v):
            return _explicit_attention(q, k, v, mask, AttentionSpec(**case), None, block)

        @jax.jit
        def forward_and_backward(q, k, v):
            out, vjp = jax.vjp(f, q, k, v)
            return out, vjp(cotangent * real[:, :, None, None])  # padded queries carry no loss
        return forward_and_backward(q, k, v)

    reference = _jax_attention(q, k, v, mask, **case)
    (single, single_grads), (blocked, blocked_grads) = run(None), run(block)
    np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(reference)[real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(single)[real], atol=1e-5)
    for a, b in zip(single_grads, blocked_grads):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


@pytest.mark.parametrize("block", [None, 4])
def test_attention_dropout_draws_the_whole_arrays_mask_in_any_block(block):
    """Dropout on the probabilities: the blocked formulation drops exactly the
    elements that dropout over the whole (batch, heads, queries, keys) array
    drops, so a step gives the same result whatever the block size."""
    q, k, v, mask = _inputs()
    real = mask.astype(bool)
    key, rate = jax.random.key(7), 0.4
    # the reference written out with the whole array's dropout, kv heads repeated
    groups = q.shape[2] // k.shape[2]
    kr, vr = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqnh,bknh->bnqk", q, kr) * q.shape[-1] ** -0.5
    allowed = _key_mask(mask) & jnp.tril(jnp.ones((10, 10), bool))[None, None]
    probs = jax.nn.softmax(jnp.where(allowed, scores, jnp.finfo(jnp.float32).min), axis=-1)
    dropped = jax.jit(lambda p: dropout(p, rate, key))(probs)
    assert 0.2 < float((dropped == 0).mean()) < 0.8  # the reference does drop
    reference = jnp.einsum("bnqk,bknh->bqnh", dropped, vr)
    spec = AttentionSpec(causal=True, dropout_rate=rate)
    out = jax.jit(lambda q, k, v: _explicit_attention(q, k, v, mask, spec, key, block))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(reference)[real], atol=1e-5)


def test_packed_rows_in_blocks():
    """Segment ids (packed rows) with causal blocks: each example sees only itself."""
    q, k, v, _ = _inputs()
    segments = jnp.asarray(np.repeat([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3]], 2, axis=0))
    same = segments[:, None, :, None] == segments[:, None, None, :]
    reference = jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True,
                                             implementation="xla")
    out = _explicit_attention(q, k, v, same, AttentionSpec(causal=True), None, 3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), atol=1e-5)


def _products(fn, *args) -> int:
    return sum(eqn.primitive.name == "dot_general" for eqn in jax.make_jaxpr(fn)(*args).eqns)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the query blocks are the CPU's")
def test_cpu_attention_runs_causal_queries_in_blocks(monkeypatch):
    q, k, v, mask = _inputs()
    monkeypatch.setattr(layers, "CPU_MIN_QUERY_BLOCK", 4)
    causal = _products(lambda q, k, v: attention(q, k, v, AttentionSpec(causal=True), mask=mask),
                       q, k, v)
    both_ways = _products(lambda q, k, v: attention(q, k, v, mask=mask), q, k, v)
    assert (causal, both_ways) == (2 * 3, 2)  # 10 queries: blocks of 4, 4 and 2


def test_cpu_query_blocks_are_at_most_eight_of_at_least_128_queries():
    assert [layers.cpu_query_block(t) for t in (10, 256, 1024, 1025, 4096)] == [
        128, 128, 128, 129, 512]



@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_keeps_one_minus_rate_scaled_without_bias(dtype):
    """Dropout keeps 1 - rate of the elements, each scaled by 1 / (1 - rate)
    computed in float32 (as torch does): in bfloat16, dividing by the rate
    rounded to bfloat16 (0.8984 for 0.9) made every kept value 0.17% too large."""
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (128, 512)), dtype)
    y = np.asarray(layers.dropout(x, 0.1, jax.random.key(0)), np.float32)
    kept = y != 0
    assert abs(kept.mean() - 0.9) < 0.005
    ratio = y[kept] / np.asarray(x, np.float32)[kept]
    assert abs(ratio.mean() * 0.9 - 1.0) < 2e-4, ratio.mean()


def _reference_keep(size: int, rate: float, key) -> np.ndarray:
    """The keep mask written with uint32 arithmetic and shifts (numpy): murmur3's
    finaliser over index * golden ratio, keyed by two words drawn from `key`."""
    s0, s1 = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
    with np.errstate(over="ignore"):
        h = (np.arange(size, dtype=np.uint32) * np.uint32(0x9E3779B9) ^ s0) + s1
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h < np.uint32(min(int(round((1.0 - rate) * 2**32)), 2**32 - 1))



@pytest.mark.parametrize("rate", [0.1, 0.5, 1e-10])
def test_dropout_mask_is_the_uint32_hash_bit_for_bit(rate):
    """The keep mask is murmur3's finaliser over the element index, keyed by two
    words drawn from the key, written out here in numpy: a change to the mask
    (which changes every run's numbers) cannot pass unnoticed."""
    x = jnp.ones((64, 1031), jnp.float32)
    for seed in range(4):
        key = jax.random.key(seed)
        keep = np.asarray(jax.jit(lambda x: layers.dropout(x, rate, key))(x)) != 0
        np.testing.assert_array_equal(keep.ravel(), _reference_keep(x.size, rate, key))
