"""Building blocks shared by every architecture: typed weights, Linear, Head, LayerNorm,
Embed, dropout and attention.

Trainable versus frozen is a *type*, not a flag (see `jaxlora.lora.trainable_filter`):

    BaseWeight   a pretrained weight loaded from the checkpoint. Frozen under
                 `lora` (and, quantized, under `qlora`); trainable under `full`.
    HeadParam    a task head created fresh for fine-tuning (the classifier):
                 always trainable.
    nnx.LoRAParam  LoRA factors, attached to a `Linear` by `jaxlora.lora`.

`BaseWeight` deliberately does not subclass `nnx.Param`, so no `nnx.Param`
filter picks up frozen weights by accident.

Randomness is explicit: modules never hold RNG state. A forward pass in train
mode receives one `jax.random` key and splits it down the tree, so the jit'd
train step stays a pure function of (trainable, frozen, opt_state, batch, rng).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.errors import UserError
from jaxlora.runtime import whole

AttentionImpl = Literal["auto", "xla", "cudnn"]


class BaseWeight(nnx.Variable):
    """A pretrained weight from the base checkpoint (frozen unless method = full)."""


class HeadParam(nnx.Param):
    """A freshly initialised task head (e.g. the classifier): always trained."""


def split_key(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    """`n` independent keys from `rng`, or `n` Nones in eval mode (`rng` is None)."""
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))


def dropout(x: jax.Array, rate: float, rng: jax.Array | None,
            index: jax.Array | None = None) -> jax.Array:
    """Inverted dropout; the identity when `rng` is None (eval) or `rate` is 0.

    The keep mask comes from a counter-based hash (murmur3's 32-bit finaliser
    over the element index, keyed by two words drawn from `rng`) rather than
    `jax.random.bernoulli`, whose threefry is far dearer per element on the CPU
    (bench/NOTES.md v1): the hash fuses into the multiply, and is just as
    reproducible from `rng`.
    `index` (uint32, broadcastable to x) gives each element's index when `x` is
    a block of a larger array, so the block draws the larger array's mask.
    """
    if rng is None or rate <= 0.0:
        return x
    seeds = jax.random.bits(rng, (2,), jnp.uint32)
    if index is None:
        index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
    bits = _fmix32((index * jnp.uint32(0x9E3779B9) ^ seeds[0]) + seeds[1])
    keep = bits < jnp.uint32(min(int(round((1.0 - rate) * 2**32)), 2**32 - 1))
    scaled = (x.astype(jnp.float32) * (1.0 / (1.0 - rate))).astype(x.dtype)
    return jnp.where(keep, scaled, jnp.zeros((), x.dtype))


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """The exact GELU, `0.5 x (1 + erf(x / sqrt 2))` (PyTorch's `nn.GELU()`,
    transformers' "gelu"), computed in float32 and returned in `x`'s dtype.

    Its own gradient keeps only `x` for the backward pass, which recomputes
    `Phi(x) + x phi(x)` there. `jax.nn.gelu(approximate=False)` is written with
    erfc, whose autodiff evaluates a two-branch rational approximation and keeps
    two more (batch, seq, intermediate) arrays (bench/NOTES.md v5).
    """
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype)


def _gelu_forward(x):
    return gelu(x), x


def _gelu_backward(x, g):
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))
    pdf = jnp.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
    return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_forward, _gelu_backward)


# transformers' activation names (`hidden_act`, `activation_function`) ->
# functions: "gelu" is the exact erf form, the tanh approximation has two names.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's finaliser: a cheap bijective mix of 32-bit words."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


class FrozenKernel(NamedTuple):
    """A linear layer's frozen weight at use, in the compute dtype and laid out
    as stored: a kernel (in, out), a 4-bit kernel dequantized (out, in). An
    adapter that needs the weight itself (DoRA's norms) gets this very array:
    nothing is dequantized or transposed twice."""

    value: jax.Array
    in_axis: int  # the axis of the input features: 0 for (in, out), 1 for (out, in)

    def apply(self, x: jax.Array) -> jax.Array:
        """`x W`: the last axis of `x` contracted with the input axis."""
        return jax.lax.dot_general(x, self.value, (((x.ndim - 1,), (self.in_axis,)), ((), ())))

    def out_in(self) -> jax.Array:
        """The weight as PyTorch stores it, (out, in)."""
        return self.value if self.in_axis == 1 else self.value.T


class Linear(nnx.Module):
    """`y = x @ kernel + bias`, kernel stored (in, out) as a `BaseWeight`.

    `self.lora` is None until `jaxlora.lora.apply_lora` attaches an adapter;
    then `y += adapter(x, rng, kernel, x @ kernel)` (the weight and the bias-free
    base output are handed over for DoRA, which rescales them). The kernel is
    cast to the input's dtype (the compute dtype) at use, inside the compiled
    step; a quantized kernel (`jaxlora.quant.QuantizedKernel`) dequantizes there.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype=jnp.float32):
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = BaseWeight(jnp.zeros((in_features, out_features), dtype))
        self.bias = BaseWeight(jnp.zeros((out_features,), dtype)) if use_bias else None
        self.lora = nnx.data(None)  # an adapter module once LoRA is applied

    def frozen_kernel(self, dtype) -> FrozenKernel:
        """The frozen weight in `dtype`, as stored (a quantized one dequantized)."""
        if isinstance(self.kernel, nnx.Variable):
            return FrozenKernel(whole(self.kernel[...]).astype(dtype), 0)
        return FrozenKernel(self.kernel.dequantize_out_in(dtype), 1)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        kernel = self.frozen_kernel(x.dtype)
        y = kernel.apply(x)
        update = None if self.lora is None else self.lora(x, rng, kernel, y)
        if self.bias is not None:
            y = y + whole(self.bias[...]).astype(x.dtype)
        if update is not None:
            y = y + update.astype(y.dtype)
        return y


class Head(nnx.Module):
    """A fresh task head `y = x @ kernel + bias` whose weights are `HeadParam`.

    Not a `Linear`: LoRA never targets it and the loader never fills it. Kept in
    float32 whatever the base weights' dtype, since it is always trained. Initialised
    as transformers does: kernel ~ normal(0, init_std), bias 0.
    """

    def __init__(self, in_features: int, out_features: int, *, init_std: float,
                 key: jax.Array):
        self.kernel = HeadParam(
            init_std * jax.random.normal(key, (in_features, out_features), jnp.float32))
        self.bias = HeadParam(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """float32 outputs, whatever the dtype of `x`."""
        return x.astype(jnp.float32) @ whole(self.kernel[...]) + whole(self.bias[...])


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32 (as transformers does)."""

    def __init__(self, size: int, *, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.scale = BaseWeight(jnp.ones((size,), dtype))
        self.bias = BaseWeight(jnp.zeros((size,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        centered = x32 - mean
        var = jnp.square(centered).mean(-1, keepdims=True)
        # The scale joins the per-row 1/std before meeting the centred values:
        # the same maths as `((x - mean) / std) * scale`, but written that way
        # XLA's CPU backend fuses each layer's LayerNorm backward into the next
        # layer's, down the whole stack (huge fusions, O(layers^2) work; bench/NOTES.md v6).
        factor = jax.lax.rsqrt(var + self.eps) * whole(self.scale[...]).astype(jnp.float32)
        return (centered * factor + whole(self.bias[...]).astype(jnp.float32)).astype(x.dtype)


class Embed(nnx.Module):
    """A lookup table (num, features) stored as a `BaseWeight`."""

    def __init__(self, num: int, features: int, *, dtype=jnp.float32):
        self.embedding = BaseWeight(jnp.zeros((num, features), dtype))

    def __call__(self, ids: jax.Array, dtype) -> jax.Array:
        return jnp.take(whole(self.embedding[...]), ids, axis=0).astype(dtype)


def resolve_attention(implementation: AttentionImpl, dtype=jnp.bfloat16) -> Literal["xla", "cudnn"]:
    """`auto` picks the fused cuDNN kernel on GPU for 16-bit compute, XLA otherwise
    (cuDNN raises on CPU and refuses float32 inputs)."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fused_possible = jax.default_backend() == "gpu" and half
    if implementation == "auto":
        return "cudnn" if fused_possible else "xla"
    if implementation == "cudnn" and not fused_possible:
        raise UserError(f"model.attention: cudnn needs a GPU and a 16-bit compute_dtype "
                        f"(here: {jax.default_backend()}, {jnp.dtype(dtype).name}); use auto or xla")
    return implementation


@dataclass(frozen=True)
class AttentionSpec:
    """A layer's attention settings: fixed when the layer is built, static under jit.

    `causal` lets position i see keys <= i; `window` (sliding-window attention,
    as Mistral's) further limits it to the `window` keys ending at i;
    `implementation` is a resolved `AttentionImpl` (see `resolve_attention`);
    `dropout_rate` applies to the attention probabilities in train mode.
    """

    causal: bool = False
    window: int | None = None
    implementation: Literal["xla", "cudnn"] = "xla"
    dropout_rate: float = 0.0


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              spec: AttentionSpec = AttentionSpec(), *, mask: jax.Array | None,
              rng: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention over (batch, seq, heads, head_dim) arrays, as
    the layer's `spec` says; k and v may have fewer heads than q (grouped-query
    attention).

    `mask` is the (batch, seq) key padding mask (1 = real token). The fused
    cuDNN kernel takes padding as sequence lengths, so it assumes right padding,
    which is what `jaxlora.data` produces. Dropout on the attention
    probabilities (train mode only: `rng` given) needs the probabilities, so it
    runs the explicit XLA formulation; the fused kernel has no dropout and skips it.
    `segment_ids` (batch, seq), for packed rows, keeps attention within each
    example; it runs through XLA (the fused kernel takes no such mask).

    On the CPU the XLA path is always the explicit formulation, and causal
    attention runs in blocks of queries (`cpu_query_block`), each against only
    the keys it can see (see `_explicit_attention`).
    """
    local = None if spec.window is None else (spec.window - 1, 0)
    implementation = spec.implementation
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        mask = same if mask is None else same & mask.astype(bool)[:, None, None, :]
        implementation = "xla"
    dropping = rng is not None and spec.dropout_rate > 0.0
    if implementation == "cudnn":
        lengths = None if mask is None else mask.sum(-1).astype(jnp.int32)
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=spec.causal, query_seq_lengths=lengths,
            key_value_seq_lengths=lengths, local_window_size=local, implementation="cudnn")
    on_cpu = jax.default_backend() == "cpu"
    if dropping or on_cpu:
        block = cpu_query_block(q.shape[1]) if on_cpu and spec.causal else None
        return _explicit_attention(q, k, v, mask, spec, rng, block)
    return jax.nn.dot_product_attention(q, k, v, mask=_key_mask(mask), is_causal=spec.causal,
                                        local_window_size=local, implementation="xla")


CPU_QUERY_BLOCKS = 8
CPU_MIN_QUERY_BLOCK = 128


def cpu_query_block(queries: int) -> int:
    """How many queries one block of causal attention takes on the CPU: the
    queries in `CPU_QUERY_BLOCKS` blocks, at least `CPU_MIN_QUERY_BLOCK` each.

    XLA computes the whole (queries x keys) score matrix of one product, half of
    which a causal mask throws away; block by block each query block meets only
    the keys up to its last query. Smaller blocks mean many small products and,
    in the backward, padding of each block's key gradients.
    Why these sizes: bench/NOTES.md v8 (`bench/attention.py` times them).
    """
    return max(CPU_MIN_QUERY_BLOCK, -(-queries // CPU_QUERY_BLOCKS))


def _key_mask(mask: jax.Array | None) -> jax.Array | None:
    """(batch, seq) key padding -> (batch, 1, 1, seq); a 4-D mask passes as is."""
    if mask is None or mask.ndim == 4:
        return mask
    return mask.astype(bool)[:, None, None, :]


def _explicit_attention(q, k, v, mask, spec, rng, block=None):
    """softmax(q k^T / sqrt(d) + masks) v written out, masked as `spec` says, with
    dropout on the probabilities at `spec.dropout_rate` when `rng` is given (train
    mode); `mask` is (batch, keys) or 4-D (batch, 1, queries, keys).

    With `block`, the queries go in blocks of that many, and each block meets
    only the keys it can see: up to its last query when causal, and from its
    first query's window start. Rows are whole in each block, so every
    probability is what the single product gives (dropout too: each block
    draws its elements' mask by their index in the whole (b, heads, q, k)
    array, see `dropout`'s `index`). A query row with no visible key at all (a
    padded query) averages the values of its block's key range instead of all
    keys; such rows are padding and carry no loss.
    """
    causal, window = spec.causal, spec.window
    rate = spec.dropout_rate if rng is not None and spec.dropout_rate > 0.0 else 0.0
    b, t, heads, d = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    # queries (b, kv_heads, groups, t, d), keys (b, kv_heads, d, s), values (b, kv_heads, s, d):
    # query head n uses kv head n // groups, as jnp.repeat(k, groups, axis=2) would. The
    # scale goes on q (fewer elements than the scores); the products are 4-D, a block's
    # groups and queries on one axis (XLA:CPU runs them faster than the 5-D form's:
    # bench/NOTES.md v8).
    qt = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, kv_heads, groups, d)
    qt = qt.transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    mask = None if mask is None else (
        mask.astype(bool)[:, None, None, None, :] if mask.ndim == 2 else mask[:, :, None])
    # dropout hashes each element's index in the whole array, so every block draws
    # the whole array's mask (XLA computes the sliced iota in place, never whole)
    index = (jax.lax.iota(jnp.uint32, b * heads * t * s_len).reshape(b, kv_heads, groups, t, s_len)
             if rate > 0.0 else None)
    outputs = []
    for start in range(0, t, block) if block else [0]:
        stop = min(start + block, t) if block else t
        first = max(0, start - window + 1) if block and window is not None else 0
        last = min(stop, s_len) if block and causal else s_len
        rows, cols = stop - start, last - first
        scores = jnp.einsum("bkqd,bkds->bkqs",
                            qt[:, :, :, start:stop].reshape(b, kv_heads, groups * rows, d),
                            kt[..., first:last], preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kv_heads, groups, rows, cols)
        query = jnp.arange(start, stop)[:, None]
        key = jnp.arange(first, last)[None, :]
        allowed = jnp.ones((rows, cols), bool)
        if causal:
            allowed = allowed & (key <= query)
        if window is not None:
            allowed = allowed & (key > query - window)
        allowed = allowed[None, None, None]
        if mask is not None:
            mask_rows = slice(None) if mask.shape[3] == 1 else slice(start, stop)
            allowed = allowed & mask[:, :, :, mask_rows, first:last]
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        if rate > 0.0:
            probs = dropout(probs, rate, rng, index[..., start:stop, first:last])
        context = jnp.einsum("bkqs,bksd->bkqd",
                             probs.astype(v.dtype).reshape(b, kv_heads, groups * rows, cols),
                             vt[:, :, first:last])
        outputs.append(context.reshape(b, kv_heads, groups, rows, d))
    out = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, d)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (Llama's): statistics in float32, scale only."""

    def __init__(self, size: int, *, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.scale = BaseWeight(jnp.ones((size,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        # transformers casts back to the input dtype before the scale
        return whole(self.scale[...]).astype(x.dtype) * y.astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary position embedding, transformers' half-split convention: the
    (batch, seq, heads, head_dim) `x` rotated by angles positions * inv_freq."""
    angles = positions[:, :, None].astype(jnp.float32) * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: tuple, index: jax.Array,
                     key_valid: jax.Array, window: int | None = None
                     ) -> tuple[jax.Array, tuple]:
    """Attention for generation with a KV cache of fixed length L.

    q, k, v: (batch, T, heads, head_dim) for the T new tokens, which go to cache
    slots index .. index + T - 1; `cache` is (keys, values), each (batch, L,
    kv_heads, head_dim); `key_valid` (batch, L) marks the slots holding real
    tokens (left padding is not). Query i sees the valid slots up to its own,
    and within `window` of it when given. Returns the context and the cache.
    """
    keys = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, index, 0, 0))
    values = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, index, 0, 0))
    t, length = q.shape[1], keys.shape[1]
    slot = jnp.arange(length)[None, :]
    query = index + jnp.arange(t)[:, None]
    allowed = slot <= query
    if window is not None:
        allowed = allowed & (slot > query - window)
    mask = allowed[None, None] & key_valid.astype(bool)[:, None, None, :]
    context = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                           mask=mask, implementation="xla")
    return context, (keys, values)


# train.remat: what a layer keeps for the backward pass.
#   none           every activation (fastest, most memory)
#   full           only the layer's input; the layer is recomputed in the backward
#   dots-saveable  the matmul outputs; the cheap elementwise work is recomputed
REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots-saveable": jax.checkpoint_policies.dots_saveable}


def stack_layers(policy: str, call):
    """`call(layer, *args)` for one block of a layer stack, under the remat
    `policy` (see REMAT_POLICIES); "none" returns `call` itself.

    The layer goes through `jax.checkpoint` as its state (split, then merged
    again inside), so the recomputation sees the same weights as arguments;
    a block's forward never writes its state, so nothing needs to flow back.
    """
    if policy == "none":
        return call

    def checkpointed(layer, *args):
        graphdef, state = nnx.split(layer)

        def pure(state, *args):
            return call(nnx.merge(graphdef, state), *args)

        return jax.checkpoint(pure, policy=REMAT_POLICIES[policy])(state, *args)

    return checkpointed


def set_remat(model: nnx.Module, policy: str) -> None:
    """Set the remat policy of every layer stack in `model` (modules with a
    `remat` attribute): a static attribute, so it is part of the graph."""
    if policy != "none" and policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}")
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and hasattr(module, "remat"):
            module.remat = policy


class CausalLMHead:
    """The call of a decoder LM (GPT-2, Llama family): `hidden` runs the layer
    stack named by `BACKBONE`, `logits` (the model's own) the vocabulary head.
    The train step calls them apart, to put only the positions that predict a
    token through the head."""

    BACKBONE: str

    def __call__(self, input_ids, attention_mask=None, *, rng=None, segment_ids=None,
                 positions=None):
        return self.logits(self.hidden(input_ids, attention_mask, rng=rng,
                                       segment_ids=segment_ids, positions=positions))

    def hidden(self, input_ids, attention_mask=None, *, rng=None, segment_ids=None,
               positions=None):
        """The last hidden states (batch, seq, hidden), before the head."""
        return getattr(self, self.BACKBONE)(input_ids, attention_mask, rng=rng,
                                            segment_ids=segment_ids, positions=positions)
