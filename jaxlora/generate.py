"""Text generation from a causal LM: a KV cache and one compiled decode loop.

    prompts (left-padded to P) --prefill--> cache slots 0..P-1, first token
      --while not all done and < max_new_tokens--> one token per step, its
        keys/values written to slot P + i, attention over the valid slots

Everything after the prompt runs inside one `jax.jit` (a `lax.while_loop`), so
a step costs one dispatch-free iteration. The cache has a fixed length (P +
max_new_tokens) so shapes never change. Left padding keeps every row's next
slot the same; positions (for RoPE / learned positions) count each row's real
tokens only, and padded slots are never attended to. Greedy when temperature
is 0, else sampling at that temperature from the top-p nucleus.

On a mesh with FSDP-sharded weights the loop would gather every weight again
for each new token (the model reads weights through `runtime.whole`), a whole
model's worth of traffic per token. Where the whole weights (as stored: 4-bit
codes stay 4-bit) fit in half of what a device has free, they are gathered
once, before the prompt, and the loop reads them in place (`_gather_once`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field

from jaxlora.errors import UserError
from jaxlora import runtime
from jaxlora.runtime import jit, to_host


class GenerateConfig(BaseModel):
    """Sampling settings (the `runner generate` options)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(64, gt=0, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=100.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # nucleus: the smallest set of tokens with this mass
    seed: int = Field(0, ge=0, le=2**32 - 1)


def _pick(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token ids (batch,) from float32 logits (batch, vocab)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        outside = jnp.cumsum(probs, axis=-1) - probs > top_p  # the first token always stays
        sorted_logits = jnp.where(outside, -jnp.inf, sorted_logits)
        logits = jnp.full_like(logits, -jnp.inf).at[
            jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _compiled(graphdef: nnx.GraphDef, batch: int, prompt_len: int, max_new: int,
              temperature: float, top_p: float, placement=None, gather_once: bool = False):
    """The compiled decoding program for one shape of prompts and settings
    (cached: each batch of the same shape reuses it)."""
    length = prompt_len + max_new

    def run(trainable, frozen, ids, valid, positions, key, eos_ids, pad_id):
        """Prefill the prompts into the KV cache, then pick one token per row
        per loop turn until every row stopped or `max_new` are out."""
        key = jax.random.wrap_key_data(key)  # raw key data: what can be placed on a mesh
        if gather_once:  # every weight whole on every device, outside the loop
            trainable, frozen = jax.tree.map(runtime.whole, (trainable, frozen))
        per_token = placement is not None and placement.fsdp > 1 and not gather_once
        model = nnx.merge(graphdef, trainable, frozen)
        cache = model.init_cache(batch, length)
        logits, cache = model.decode(ids, positions, valid, cache, 0)
        key, sub = jax.random.split(key)
        token = _pick(logits[:, -1], sub, temperature, top_p)
        out = jnp.full((batch, max_new), pad_id, jnp.int32).at[:, 0].set(token)
        done = jnp.isin(token, eos_ids)

        def cond(carry):
            i, _, _, _, _, _, done, _ = carry
            return (i < max_new) & ~jnp.all(done)

        def body(carry):
            i, out, cache, valid, token, position, done, key = carry
            slot = prompt_len + i - 1  # where the previous token's keys go
            valid = valid.at[:, slot].set(1)
            position = position + 1
            reader = model
            if per_token:  # tied to the step, so that XLA cannot hoist each weight's
                # gather out of the loop (it is loop-invariant), which would hold them all
                weights, i = jax.lax.optimization_barrier(((trainable, frozen), i))
                reader = nnx.merge(graphdef, *weights)
            logits, cache = reader.decode(token[:, None], position[:, None], valid, cache, slot)
            key, sub = jax.random.split(key)
            token = jnp.where(done, pad_id, _pick(logits[:, 0], sub, temperature, top_p))
            out = out.at[:, i].set(token)
            return i + 1, out, cache, valid, token, position, done | jnp.isin(token, eos_ids), key

        carry = (jnp.int32(1), out, cache, valid, token, positions[:, -1], done, key)
        return jax.lax.while_loop(cond, body, carry)[1]

    return jit(run if placement is None else placement.gathering(run))


# Prompts are left-padded to a multiple of this many tokens (see `generate`).
PROMPT_BLOCK = 16


def _gather_once(placement, trainable, frozen) -> bool:
    """Whether decoding on `placement` gathers the weights once rather than per
    token: only where they are sharded (fsdp > 1), and only where the whole of
    them fits in half of the memory a device has free (the other half is left
    for the cache, the activations and what the run holds already). Where the
    backend does not say, they are gathered once."""
    if placement is None or placement.fsdp == 1:
        return False
    return _fits_whole(placement, runtime.whole_bytes((trainable, frozen)))


@functools.lru_cache(maxsize=16)
def _fits_whole(placement, nbytes: int) -> bool:
    """Decided once per mesh and model size, on the memory free at the first
    call: the later calls (each batch of prompts) neither ask every process
    again nor flip between programs as free memory moves. Every process must
    compile the same program, so with several it takes all of them to say yes."""
    free = runtime.device_memory(free=True)
    return all(runtime.every_process(free is None or nbytes <= free // 2))


# Special tokens that end a chat model's turn (llama.cpp calls them EOT): ChatML,
# Llama 3, Phi 3, Gemma.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def stop_ids(tokenizer, model_dir: Path | None = None, *, chat: bool = False) -> list[int]:
    """The token ids that end a completion: the tokenizer's EOS and every id in
    the model folder's generation_config.json `eos_token_id` (a list for e.g.
    Llama-3 Instruct's <|eot_id|>), as transformers' `generate` uses them; for
    `chat`, also the end-of-turn token of the template's kind (`END_OF_TURN`,
    or the one a GGUF file names). A generation_config.json that is not JSON
    in UTF-8 is a UserError naming it."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if chat:
        vocab = tokenizer.get_vocab()
        named = getattr(tokenizer, "end_of_turn_id", None)  # set by jaxlora.models.gguf
        for token_id in [named] + [vocab.get(token) for token in END_OF_TURN]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    path = None if model_dir is None else Path(model_dir) / "generation_config.json"
    if path is not None and path.is_file():
        try:
            config = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a JSON file in UTF-8 ({e}); fix it, or remove it "
                            "(it only names the ids that end a completion)") from None
        found = config.get("eos_token_id") if isinstance(config, dict) else None
        for value in found if isinstance(found, list) else [found]:
            if isinstance(value, int) and value not in ids:
                ids.append(value)
    return ids


def generate(graphdef: nnx.GraphDef, trainable, frozen, prompts: list[list[int]],
             cfg: GenerateConfig, *, eos_id: int | Sequence[int] | None, pad_id: int = 0,
             placement=None) -> list[list[int]]:
    """The new token ids of each prompt, up to and including the first stop id
    (`eos_id`: one id or several), or `cfg.max_new_tokens` of them. A model
    with learned positions (GPT-2) has none past its `position_limit`.
    `placement` (`jaxlora.runtime.Placement`): the weights are on its mesh, maybe
    over several processes, each calling this with the same prompts; the
    prompts go there replicated and every process gets every completion; with
    FSDP the weights are gathered once per call where they fit (`_gather_once`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    batch, longest = len(prompts), max(len(p) for p in prompts)
    position_limit = getattr(nnx.merge(graphdef, trainable, frozen), "position_limit", None)
    if position_limit is not None and longest + cfg.max_new_tokens > position_limit:
        raise UserError(f"a prompt of {longest} tokens plus {cfg.max_new_tokens} new ones "
                        f"exceeds the model's {position_limit} positions; shorten the prompt "
                        "or lower max_new_tokens")
    # left-padded to a multiple of PROMPT_BLOCK: prompts of nearby lengths (the
    # turns of a chat, the batches of an evaluation) share one compiled program;
    # padding takes no position and no attention
    prompt_len = -(-longest // PROMPT_BLOCK) * PROMPT_BLOCK
    length = prompt_len + cfg.max_new_tokens
    ids = np.full((batch, prompt_len), pad_id, np.int32)
    valid = np.zeros((batch, length), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, prompt_len - len(prompt):] = prompt
        valid[row, prompt_len - len(prompt):prompt_len] = 1
    positions = np.maximum(np.cumsum(valid[:, :prompt_len], axis=1) - 1, 0).astype(np.int32)
    run = _compiled(graphdef, batch, prompt_len, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                    placement, _gather_once(placement, trainable, frozen))
    stops = ([] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id))
    inputs = (ids, valid, positions, np.asarray(jax.random.key_data(jax.random.key(cfg.seed))),
              np.asarray(stops or [-1], np.int32), np.int32(pad_id))
    if placement is not None:
        inputs = placement.put(inputs, False)
    out = to_host(run(trainable, frozen, *inputs))
    result = []
    for row in out.tolist():
        end = next((i for i, token in enumerate(row) if token in stops), None)
        result.append(row if end is None else row[:end + 1])
    return result
