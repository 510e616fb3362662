"""Every attention path gives the same outputs: `jax.nn.dot_product_attention`
through XLA, the explicit formulation used with attention dropout, the KV-cache
path of generation, and cuDNN's fused kernel where a GPU runs it; with padding,
causal masks, grouped-query heads and a sliding window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models.layers import _attention_with_dropout, attention, cached_attention

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
    reference = np.asarray(attention(q, k, v, mask=mask, implementation="xla", **case))
    explicit = np.asarray(_attention_with_dropout(q, k, v, mask, case["causal"], case["window"],
                                                  0.0, jax.random.key(1)))
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
    xla = np.asarray(attention(q, k, v, mask=mask, implementation="xla", **case), np.float32)
    fused = np.asarray(attention(q, k, v, mask=mask, implementation="cudnn", **case), np.float32)
    np.testing.assert_allclose(fused[real], xla[real], atol=2e-2)
