"""4-bit quantization: round-trip error bounds, codebooks, odd shapes, packing,
the bits per parameter, bitsandbytes' values, and QLoRA on a real model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
import pytest
from flax import nnx

from jaxlora.lora import QLoraConfig, adapt
from jaxlora.models import bert, load_model
from jaxlora.quant import (CODEBOOKS, DYNAMIC_CODE, INT4_CODE, NF4_CODE, QuantConfig,
                           QuantizedKernel, QuantState, bits_per_parameter, dequantize,
                           footprint, quantize)


def _roundtrip(x: np.ndarray, cfg: QuantConfig) -> np.ndarray:
    flat = jnp.asarray(x.reshape(-1))
    return np.asarray(dequantize(quantize(flat, cfg), flat.size, cfg)).reshape(x.shape)


def _matrices():
    rng = np.random.default_rng(0)
    return {"gaussian": rng.standard_normal((64, 192)).astype(np.float32),
            "heavy-tailed": rng.standard_t(2, (64, 192)).astype(np.float32)}


@pytest.mark.parametrize("kind", ["nf4", "int4"])
@pytest.mark.parametrize("matrix", ["gaussian", "heavy-tailed"])
def test_error_per_block_is_bounded(kind, matrix):
    x = _matrices()[matrix]
    cfg = QuantConfig(type=kind, double_quant=False)
    y = _roundtrip(x, cfg)
    code = CODEBOOKS[kind]
    half_gap = np.max(np.diff(code[1:] if kind == "int4" else code)) / 2
    blocks, err = x.reshape(-1, 64), np.abs(x - y).reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    assert np.all(err <= half_gap * absmax * (1 + 1e-6))
    # the largest value of each block is stored exactly (codebook ends are +-1)
    rows = np.arange(len(blocks))
    peak = np.abs(blocks).argmax(axis=1)
    np.testing.assert_allclose(y.reshape(-1, 64)[rows, peak], blocks[rows, peak], rtol=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_double_quant_adds_only_the_scale_error(kind):
    x = _matrices()["heavy-tailed"]
    plain = _roundtrip(x, QuantConfig(type=kind, double_quant=False))
    dq = _roundtrip(x, QuantConfig(type=kind, double_quant=True))
    absmax = np.abs(x.reshape(-1, 64)).max(axis=1)
    # The codes are the same; each block's scale moves by at most half the widest
    # gap of the 8-bit dynamic code times its 256-block's largest centred scale.
    half_gap = np.max(np.diff(DYNAMIC_CODE)) / 2
    centred = np.abs(absmax - absmax.mean()).max()  # one 256-block here: 192 scales
    scale_err = np.abs(dq.reshape(-1, 64) - plain.reshape(-1, 64)).max(axis=1)
    assert np.all(scale_err <= half_gap * centred * (1 + 1e-5))
    assert np.all(scale_err <= 0.01 * absmax.max())


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_every_codebook_value_round_trips_exactly(kind):
    code = CODEBOOKS[kind] if kind == "nf4" else INT4_CODE[1:]  # -8/7 is never chosen
    x = np.tile(code, 4)  # blocks of 64 holding every value, absmax exactly 1
    y = _roundtrip(x, QuantConfig(type=kind, double_quant=False))
    np.testing.assert_array_equal(y, x)


def test_shapes_not_divisible_by_the_block_are_padded_and_cut():
    rng = np.random.default_rng(1)
    for n in (1, 63, 65, 129, 1001):
        x = rng.standard_normal(n).astype(np.float32)
        cfg = QuantConfig(double_quant=True)
        state = quantize(jnp.asarray(x), cfg)
        assert state["codes"].shape == (math.ceil(n / 2),)
        assert state["absmax_codes"].shape == (math.ceil(n / 64),)
        y = np.asarray(dequantize(state, n, cfg))
        assert y.shape == (n,) and np.all(np.abs(y - x) <= np.abs(x).max() * 0.2)


def test_packing_two_codes_per_byte():
    x = np.array([-1.0, 1.0, 0.0, 0.0] + [0.0] * 60, np.float32)
    state = quantize(jnp.asarray(x), QuantConfig(double_quant=False))
    assert state["codes"].dtype == jnp.uint8 and state["codes"].shape == (32,)
    assert int(state["codes"][0]) == (0 << 4) | 15  # -1 -> code 0 (high nibble), 1 -> code 15
    assert int(state["codes"][1]) == (7 << 4) | 7  # zeros -> code 7


def test_bits_per_parameter_from_the_real_arrays():
    kernel = jnp.asarray(np.random.default_rng(2).standard_normal((512, 512)), jnp.float32)
    linear = type("L", (), {})()
    for dq, expected in ((True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4.5)):
        linear.kernel = QuantizedKernel(kernel, QuantConfig(double_quant=dq))
        bits = bits_per_parameter({"x": linear})
        assert bits == pytest.approx(expected, abs=2e-4)
        if dq:
            assert bits <= 4.13


def test_config():
    assert QuantConfig().use_double_quant and not QuantConfig(type="int4").use_double_quant
    with pytest.raises(pydantic.ValidationError):
        QuantConfig(block_size=63)
    with pytest.raises(pydantic.ValidationError):
        QuantConfig(type="nf3")


def test_nf4_matches_bitsandbytes():
    import bitsandbytes.functional as bnb
    import torch

    np.testing.assert_allclose(bnb.create_dynamic_map(signed=True).numpy(), DYNAMIC_CODE,
                               rtol=0, atol=1e-7)
    w = _matrices()["gaussian"][:63, :150]  # a torch (out, in) weight; 9450 is not 64-aligned
    for dq in (False, True):
        q, st = bnb.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w)), blocksize=64,
                                  quant_type="nf4", compress_statistics=dq)
        np.testing.assert_array_equal(st.code.numpy(), NF4_CODE)
        reference = bnb.dequantize_4bit(q, st).numpy()
        ours = _roundtrip(w, QuantConfig(type="nf4", block_size=64, double_quant=dq))
        # identical codes; with double quantization the scales differ by float32 rounding
        np.testing.assert_allclose(ours, reference, rtol=2e-6, atol=1e-7)


def test_qlora_model_equals_base_with_dequantized_weights(tiny_bert_dir):
    model = load_model(tiny_bert_dir, task="classification", num_labels=2, attention="xla").model
    reference = load_model(tiny_bert_dir, task="classification", num_labels=2,
                           attention="xla").model
    ids = np.random.default_rng(0).integers(1000, 2000, (3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    graphdef, trainable, frozen, _ = adapt(model, QLoraConfig(rank=4), bert.LORA_TARGETS,
                                           jax.random.key(0))
    # the reference: plain float weights set to the dequantized values
    for path, layer in reference.linear_layers().items():
        layer.kernel.set_value(model.linear_layers()[path].kernel.dequantize_out_in(jnp.float32).T)
    out = nnx.merge(graphdef, trainable, frozen)(ids, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference(ids, mask)), atol=1e-6)
    # and the quantized weights are frozen state, never trainable
    assert not [v for _, v in nnx.to_flat_state(trainable) if isinstance(v, QuantState)]
    assert any(isinstance(v, QuantState) for _, v in nnx.to_flat_state(frozen))
    sizes = footprint(frozen)
    assert 0 < sizes["quantized_bytes"] < sizes["frozen_bytes"]
