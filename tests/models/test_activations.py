"""The exact GELU with its own gradient equals PyTorch's `nn.functional.gelu`
(erf form), forward and backward, in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlora.models.layers import ACTIVATIONS, gelu


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_gelu_matches_torch_forward_and_gradient(dtype, atol):
    x = np.random.default_rng(0).normal(0.0, 3.0, (4096,)).astype(np.float32)
    x[:4] = [0.0, -12.0, 12.0, -0.5]  # the centre and both tails
    jx = jnp.asarray(x, dtype)
    upstream = np.linspace(-2.0, 2.0, x.size).astype(np.float32)
    tx = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=True)
    expected = torch.nn.functional.gelu(tx)
    expected.backward(torch.tensor(upstream, dtype=getattr(torch, dtype)))

    ours, vjp = jax.vjp(gelu, jx)
    (grad,) = vjp(jnp.asarray(upstream, dtype))
    assert ours.dtype == jx.dtype and grad.dtype == jx.dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), expected.detach().float().numpy(),
                               atol=atol, rtol=atol)
    np.testing.assert_allclose(np.asarray(grad, np.float32), tx.grad.float().numpy(),
                               atol=atol, rtol=atol)
    # and it is the function transformers' "gelu" names
    assert ACTIVATIONS["gelu"] is gelu
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x))),
                               np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False)),
                               atol=1e-6)
