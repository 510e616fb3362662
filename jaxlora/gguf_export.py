"""A causal LM written as one GGUF file, llama.cpp's format, with the `gguf`
package's writer: what `runner export --format gguf` writes, and what
llama.cpp, Ollama and LM Studio load. The inverse of the reader
(`jaxlora.models.gguf`), sharing its tables:

    state dict (HF names, float32,    -> tensors under the package's names for the
    adapters merged: `export.merged_      architecture (`gguf.TensorNameMap`); Llama's
    tensors`)                             query/key rows interleaved for llama.cpp's
                                          rotary layout (`gguf.permute`, the inverse
                                          of the reader's); 2-D weights in the chosen
                                          type, norms and biases in F32
    transformers config               -> `{arch}.*` keys as llama.cpp's converter
                                          writes them (`gguf.Keys`)
    Llama 3.1/3.2 rope (`llama3`)     -> the `rope_freqs` tensor: what each rotary
                                          frequency is divided by, as llama.cpp's
                                          converter computes it (no metadata key)
    tokenizer                         -> tokens, merges (byte-level BPE) or scores
                                          (SentencePiece), token types, BOS/EOS/padding
                                          ids, add_bos_token, the pre-tokenizer's name
                                          and the chat template: copied from the base
                                          model's own GGUF file where it was one, else
                                          derived from the fast tokenizer

Supported: Llama, Mistral (llama.cpp's `llama` architecture), Qwen2 and GPT-2
(`gpt2`, its Conv1D weights transposed as llama.cpp's converter does) with
either vocabulary llama.cpp's converter writes from a Hugging Face folder:

- byte-level BPE (`tokenizer.ggml.model = "gpt2"`) whose pre-tokenizer
  llama.cpp names (`gguf.PRE_TOKENIZERS`): Llama 3.x-style and SmolLM Llamas,
  Qwen2, GPT-2, Mistral-architecture models with such a vocabulary;
- SentencePiece-style BPE (`"llama"`: byte fallback, "▁" for a space, a
  space put before the text or not): Llama 2, TinyLlama, Mistral 7B. llama.cpp
  merges the pair whose result scores highest where transformers merges the
  pair listed first, so each token's score is minus the rank of the first
  merge that makes it (SentencePiece's own scores follow that order; llama.cpp's
  converter, given no tokenizer.model, writes -1000 for all and so merges
  left to right). llama.cpp also merges any pair whose join is a token: a
  tokenizer whose merges are not all those pairs, in the order of the scores,
  is refused (`_check_merges`).

Refused with the reason, by `check` before the weights are merged: other
vocabularies and pre-tokenizers, rope scaling other than linear and `llama3`
(and `llama3` outside the llama architecture).

A chat model whose end-of-turn token (`GgufModel.end_of_turn`: the first stop
id of `jaxlora.generate.stop_ids`, chat, that its template writes) is not its
EOS gets `tokenizer.ggml.eot_token_id`, as llama.cpp's converter writes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from jaxlora.errors import UserError
from jaxlora.models import gguf as reader
from jaxlora.models import llama

# --quant -> the GGML type of the 2-D weights (norms and biases stay F32).
QUANTS = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "f32": "F32"}
DEFAULT_QUANT = "f16"
# --quant -> general.file_type (`gguf.LlamaFileType`: the type of most tensors)
FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "f32": "ALL_F32"}
# transformers model type -> llama.cpp architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
# GPT-2's Conv1D weights, (in, out) in its checkpoints: llama.cpp's converter transposes them
CONV1D = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
UNUSED, BYTE = 5, 6  # llama.cpp's token types (and reader.NORMAL, CONTROL, USER_DEFINED)
NORMAL = reader.NORMAL
# the score llama.cpp's converter gives added and padding tokens of a SentencePiece vocabulary
ADDED_SCORE = -1000.0


@dataclass(frozen=True)
class GgufModel:
    """What one GGUF file holds: a merged causal LM and its tokenizer."""

    name: str  # general.name
    description: str  # general.description: what it is, how it was made
    tensors: dict[str, np.ndarray]  # Hugging Face names, float32, adapters merged
    config: Any  # the transformers config of the model
    tokenizer: Any  # its fast tokenizer
    chat_template: str | None  # the template it was trained with (None: the tokenizer's)
    source: Path | None = None  # the base model's GGUF file, whose tokenizer is copied
    end_of_turn: int | None = None  # a chat model's end-of-turn id, where it is not EOS
    # the tokenizer keys `check` gave for this tokenizer and source (None: `write` finds them)
    tokenizer_keys: dict[str, tuple] | None = None


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise UserError(f"--quant: {quant!r} is not a GGUF type written here; choose one of "
                        f"{', '.join(QUANTS)}")


def architecture(config) -> str:
    """The llama.cpp architecture the model is written as; a UserError with the
    reason for a model this writer does not take."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise UserError(f"GGUF export of {kind!r} models is not supported; supported: "
                        "Llama, Mistral, Qwen2, GPT-2")
    if kind == "gpt2":
        return "gpt2"
    rope = llama.rope_type(_rope(config))
    if rope not in ("default", "linear", "llama3"):
        raise UserError(f"GGUF export: rope scaling {rope!r} is not written; supported: none, "
                        "linear, llama3 (Llama 3.1 and 3.2)")
    if ARCHITECTURES[kind] != "llama" and rope_factors(config) is not None:
        which = f"rope type {rope!r}" if rope != "default" else \
            f"{reader.FREQUENCY_FACTORS}, from a GGUF file's rope_freqs"
        raise UserError(f"GGUF export: per-frequency rope factors ({which}) are written for "
                        "llama.cpp's llama architecture only, not for "
                        f"{ARCHITECTURES[kind]!r}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if ARCHITECTURES[kind] == "qwen2" and head_dim * heads != config.hidden_size:
        raise UserError("GGUF export: a Qwen2 model whose head_dim is not hidden_size / heads "
                        "is not supported")
    return ARCHITECTURES[kind]


def check(config, tokenizer, source: Path | None = None) -> dict[str, tuple]:
    """What `write` refuses of a model, found from its config and tokenizer
    alone (before its weights are merged): a UserError with the reason. Gives
    the tokenizer keys found on the way, for `GgufModel.tokenizer_keys`.
    `source`: the base model's GGUF file, whose tokenizer keys are copied as
    they are."""
    architecture(config)
    return _base_fields(tokenizer, config.vocab_size, source)


def _rope(config) -> dict:
    """The config's rope parameters (transformers 5 keeps theta among them)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return dict(params) if isinstance(params, dict) else {}


def rope_factors(config) -> np.ndarray | None:
    """The `rope_freqs` tensor of a Llama-family config: what each rotary
    frequency is divided by (Llama 3.1/3.2's `llama3` rope, or the factors a
    GGUF base model's file gave); None where the rope has none."""
    return llama.LlamaConfig.from_hf(config).frequency_factors()


def notes(config, tokenizer=None) -> list[str]:
    """What the file cannot carry of the model and its tokenizer, said in the
    export's output."""
    out = []
    window = getattr(config, "sliding_window", None)
    if getattr(config, "model_type", None) == "mistral" and window and \
            window < config.max_position_embeddings:
        out.append(f"Mistral is written as llama.cpp's llama architecture, which attends to the "
                   f"whole context: the sliding window of {window} tokens is not kept (outputs "
                   f"are the same for sequences up to {window} tokens)")
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer is not None else {}
    prefix = sentencepiece_prefix(spec)
    ours = {"first": "before the start only, unless the text begins with a space: there "
                     "(after each special token of a chat template)",
            "always": "before every piece too, but none where the piece begins with a space: "
                      "there"}
    if prefix is not None and not prefix.as_llama_cpp:
        out.append("llama.cpp puts a space before every piece of text, its start and what "
                   "follows each special token (SentencePiece's rule); this tokenizer puts one "
                   f"{ours[prefix.scheme]} llama.cpp's ids differ by a \u2581")
    return out


def write(path: Path, model: GgufModel, quant: str) -> None:
    """Write `model` as the GGUF file `path`, its 2-D weights as `quant`."""
    import gguf

    check_quant(quant)
    arch = architecture(model.config)
    tokenizer_fields = _tokenizer_fields(model)  # refusals before anything is written
    names = _tensor_names(arch, model)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name(model.name)
    writer.add_description(model.description)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[quant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_config(writer, model.config, arch)
    for key, (value, vtype, sub_type) in tokenizer_fields.items():
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    _write_tensors(writer, arch, model, quant, names)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_config(writer, config, arch: str) -> None:
    """The architecture's hyperparameters, as llama.cpp's converter writes them."""
    if arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
        writer.add_vocab_size(config.vocab_size)
        return
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta",
                                                                   10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
        if head_dim * heads != config.hidden_size:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    if llama.rope_type(rope) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def tensor_type(name: str, shape: tuple[int, ...], quant: str):
    """The GGML type a tensor is written in: norms, biases (every 1-D tensor) in
    F32, as llama.cpp's converter does; 2-D weights in `quant`, Q8_0 falling
    back to F16 where a row is not a whole number of its 32-value blocks."""
    import gguf

    kind = gguf.GGMLQuantizationType[QUANTS[quant]]
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[kind]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return kind


def _tensor_names(arch: str, model: GgufModel) -> dict[str, str]:
    """The GGUF name of each weight written (Hugging Face name -> GGUF name); a
    tied model's lm_head.weight is left out (llama.cpp then uses the token
    embeddings). A UserError naming a weight the architecture has no name for,
    before anything is written."""
    config = model.config
    known = {hf: name for name, hf in reader.tensor_names(arch, config.num_hidden_layers).items()}
    out = {}
    for hf in model.tensors:
        if hf == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if hf not in known:
            raise UserError(f"GGUF export: the weight {hf!r} has no name in llama.cpp's "
                            f"{arch!r} architecture; this model cannot be written as GGUF")
        out[hf] = known[hf]
    return out


def _write_tensors(writer, arch: str, model: GgufModel, quant: str,
                   names: dict[str, str]) -> None:
    """Every weight under its GGUF name (`names`), in its type, and the rope
    frequency factors where the model has them."""
    import gguf

    config = model.config
    for hf, name in names.items():
        data = model.tensors[hf]
        data = np.ascontiguousarray(data, np.float32)
        heads = reader.rotary_heads(arch, name, config)
        if heads is not None:
            data = reader.permute(data, heads)
        if arch == "gpt2" and name.endswith(CONV1D):
            data = np.ascontiguousarray(data.T)
        kind = tensor_type(name, data.shape, quant)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    factors = None if arch == "gpt2" else rope_factors(config)
    if factors is not None:  # F32, as llama.cpp's converter writes it
        writer.add_tensor(reader.ROPE_FREQS, factors)


# -- the tokenizer -----------------------------------------------------------------

def _tokenizer_fields(model: GgufModel) -> dict[str, tuple]:
    """The `tokenizer.*` keys as (value, value type, array item type): the base
    GGUF file's own, else derived from the fast tokenizer; the chat template
    the model was trained with either way."""
    import gguf

    fields = dict(model.tokenizer_keys) if model.tokenizer_keys is not None else \
        _base_fields(model.tokenizer, model.config.vocab_size, model.source)
    if model.end_of_turn is not None:  # as llama.cpp's converter writes it
        fields[gguf.Keys.Tokenizer.EOT_ID] = (int(model.end_of_turn), gguf.GGUFValueType.UINT32,
                                              None)
    template = model.chat_template or getattr(model.tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        fields[gguf.Keys.Tokenizer.CHAT_TEMPLATE] = (template, gguf.GGUFValueType.STRING, None)
    return fields


def _base_fields(tokenizer, vocab_size: int, source: Path | None) -> dict[str, tuple]:
    """The base model's tokenizer keys: its GGUF file's own (`source`), else
    derived from the fast tokenizer (a UserError where they cannot be)."""
    if source is not None and reader.is_gguf(source):
        return _copied_fields(source)
    return _derived_fields(tokenizer, vocab_size)


def _copied_fields(source: Path) -> dict[str, tuple]:
    """The tokenizer keys of the base model's GGUF file, value types as they were
    (its pre-tokenizer's name included), and its license."""
    import gguf

    found = reader.open_gguf(source)
    out = {}
    for key, field in found.reader.fields.items():
        if key.startswith("tokenizer.") or key == gguf.Keys.General.LICENSE:
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            out[key] = (found.metadata[key], field.types[0], sub)
    return out


def _derived_fields(tokenizer, vocab_size: int) -> dict[str, tuple]:
    """The tokenizer keys of a Hugging Face fast tokenizer: byte-level BPE with a
    pre-tokenizer llama.cpp names, or SentencePiece-style BPE; a UserError
    naming what it is otherwise. Ids the vocabulary leaves free up to the
    embedding's rows are `[PAD<id>]` tokens of type unused, as llama.cpp's
    converter writes them."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())}, "
                        f"beyond the model's {vocab_size} embedding rows")
    if _byte_level(spec):
        fields = _byte_level_fields(spec, _tokens_and_types(tokenizer, vocab, vocab_size))
    elif (prefix := sentencepiece_prefix(spec)) is not None:
        fields = _sentencepiece_fields(spec, _tokens_and_types(tokenizer, vocab, vocab_size),
                                       prefix.scheme != "never")
    else:
        model = spec.get("model") or {}
        raise UserError("GGUF export: the tokenizer is neither a byte-level BPE vocabulary "
                        "(Llama 3, SmolLM, Qwen2) nor a SentencePiece-style one (Llama 2, "
                        f"Mistral: BPE with byte fallback and \"\u2581\" for a space); its "
                        f"model is {model.get('type')!r}")
    return {**fields, **_special_fields(tokenizer)}


def _byte_level(spec: dict) -> bool:
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback") and \
        (spec.get("decoder") or {}).get("type") == "ByteLevel"


def _byte_level_fields(spec: dict, tokens_and_types: tuple[list[str], list[int]]
                       ) -> dict[str, tuple]:
    """A byte-level BPE vocabulary (`gpt2`): its tokens and types
    (`_tokens_and_types`), merges and the pre-tokenizer's name."""
    import gguf

    T, K = gguf.GGUFValueType, gguf.Keys.Tokenizer
    pre = pre_tokenizer_name(spec)
    if pre is None:
        raise UserError("GGUF export: the tokenizer's pre-tokenizer is none that llama.cpp "
                        f"names here ({', '.join(reader.PRE_TOKENIZERS)}); it cannot be written "
                        "so that llama.cpp splits text the same way")
    tokens, types = tokens_and_types
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return {K.MODEL: ("gpt2", T.STRING, None), K.PRE: (pre, T.STRING, None),
            K.LIST: (tokens, T.ARRAY, T.STRING), K.TOKEN_TYPE: (types, T.ARRAY, T.INT32),
            K.MERGES: (merges, T.ARRAY, T.STRING)}


def _sentencepiece_fields(spec: dict, tokens_and_types: tuple[list[str], list[int]],
                          prefix: bool) -> dict[str, tuple]:
    """A SentencePiece-style vocabulary (`llama`), as llama.cpp's converter writes
    one: its tokens (from `_tokens_and_types`; a user-defined token's "▁" as
    a space), scores, types (byte tokens `<0xXX>` of type byte) and whether a
    space goes before the text. A token's score is minus the rank (from 1) of the first merge that
    makes it (below every merge for a token no merge makes, -1000 for added
    and padding tokens), so that llama.cpp, merging the pair whose result
    scores highest, merges in transformers' order; a tokenizer for which it
    would not is refused (`_check_merges`)."""
    import gguf

    T, K = gguf.GGUFValueType, gguf.Keys.Tokenizer
    tokens, types = tokens_and_types
    vocab = spec["model"].get("vocab") or {}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in spec["model"].get("merges") or []]
    unmade = -float(len(merges) + 1)  # below every merge (a character's is never used)
    scores = [unmade if kind == NORMAL else ADDED_SCORE for kind in types]
    for rank, merge in reversed(list(enumerate(merges))):  # the first rank written last
        made = "".join(merge)
        if made in vocab and types[vocab[made]] == NORMAL:
            scores[vocab[made]] = -float(rank + 1)
    for i, token in enumerate(tokens):
        if types[i] == NORMAL and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[i] = BYTE
        elif types[i] == reader.USER_DEFINED:
            tokens[i] = token.replace("\u2581", " ")  # as llama.cpp's converter does
    _check_merges(merges, tokens, scores, types)
    return {K.MODEL: ("llama", T.STRING, None), K.PRE: ("default", T.STRING, None),
            K.LIST: (tokens, T.ARRAY, T.STRING), K.SCORES: (scores, T.ARRAY, T.FLOAT32),
            K.TOKEN_TYPE: (types, T.ARRAY, T.INT32), K.ADD_PREFIX: (prefix, T.BOOL, None)}


def _check_merges(merges: list[tuple[str, str]], tokens: list[str], scores: list[float],
                  types: list[int]) -> None:
    """That llama.cpp, merging by the `scores` written, merges as the tokenizer
    (`merges`, its ranked list) does: llama.cpp merges every pair of tokens
    whose join is a token (`reader.sentencepiece_merges`, what our reader
    rebuilds too), so each must be a merge; and it ranks a pair by its token's
    score, so the merges must come in that order (a token's merges together).
    A UserError naming the first pair otherwise. (A tokenizer converted from
    a tokenizer.model has every such pair; one trained by `tokenizers`' BPE
    trainer, only those it learned.)"""
    kinds, score = dict(zip(tokens, types)), dict(zip(tokens, scores))
    listed = set(merges)
    why = ("so llama.cpp would split text otherwise; a SentencePiece-style tokenizer is "
           "written only where its merges are every pair of tokens that makes a token, "
           "ranked by the token")
    for left, right in reader.sentencepiece_merges(tokens, scores):
        if kinds[left + right] == NORMAL and (left, right) not in listed:
            raise UserError(f"GGUF export: ({left!r}, {right!r}) makes {left + right!r} but is "
                            f"not a merge of the tokenizer, {why}")
    made = [(pair, "".join(pair)) for pair in merges if kinds.get("".join(pair)) == NORMAL]
    for (before, earlier), (pair, token) in zip(made, made[1:]):
        if score[token] > score[earlier]:
            raise UserError(f"GGUF export: the merge {pair} comes after {before} but makes "
                            f"{token!r}, which an earlier merge made: llama.cpp ranks a pair by "
                            f"its token, so it would merge {pair} first, {why}")


def _tokens_and_types(tokenizer, vocab: dict[str, int],
                      vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token and llama.cpp token type: the vocabulary's (`vocab`,
    the tokenizer's) normal, its added tokens control (special) or
    user-defined, `[PAD<id>]` unused."""
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = reader.CONTROL if added.special else reader.USER_DEFINED
    return tokens, types


def _special_fields(tokenizer) -> dict[str, tuple]:
    """BOS/EOS/UNK/padding ids, and whether the tokenizer adds BOS and EOS on
    its own (found by tokenizing a letter)."""
    import gguf

    T, K = gguf.GGUFValueType, gguf.Keys.Tokenizer
    out = {}
    for key, value in ((K.BOS_ID, tokenizer.bos_token_id), (K.EOS_ID, tokenizer.eos_token_id),
                       (K.UNK_ID, tokenizer.unk_token_id), (K.PAD_ID, tokenizer.pad_token_id)):
        if value is not None:
            out[key] = (int(value), T.UINT32, None)
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out[K.ADD_BOS] = (bool(bos is not None and ids[:1] == [bos]), T.BOOL, None)
    out[K.ADD_EOS] = (bool(eos is not None and eos != bos and ids[-1:] == [eos]), T.BOOL, None)
    return out


class SpacePrefix(NamedTuple):
    """How a SentencePiece-style tokenizer puts "▁" before the text (`sentencepiece_prefix`)."""

    scheme: Literal["always", "first", "never"]  # as tokenizers' Metaspace names it
    # whether llama.cpp, told only add_space_prefix (scheme != "never"), puts it where this does
    as_llama_cpp: bool


def sentencepiece_prefix(spec: dict) -> SpacePrefix | None:
    """How a SentencePiece-style tokenizer.json (`spec`: BPE with byte fallback,
    spaces as "▁") puts "▁" before the text: scheme "always" (before every
    piece of text, after each special token too: what llama.cpp does, and
    the `Prepend` normalizer of older Llama files; Metaspace's "always" puts
    none before a piece that begins with a space, unlike llama.cpp), "first"
    (before the start of the text only: transformers 5's Llama tokenizer,
    unlike llama.cpp), "never"; None where `spec` is no such tokenizer."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    decoders = [step.get("type") for step in (spec.get("decoder") or {}).get("decoders") or []]
    if model.get("type") != "BPE" or not model.get("byte_fallback") or \
            "ByteFallback" not in decoders:
        return None
    normalizer = spec.get("normalizer")
    if pre.get("type") == "Metaspace" and normalizer is None and \
            pre.get("replacement") == "\u2581" and not pre.get("split", True):
        scheme = pre.get("prepend_scheme", "always")
        return SpacePrefix(scheme, as_llama_cpp=scheme == "never")
    steps = [(step.get("type"), step.get("prepend") or (step.get("pattern") or {}).get("String"),
              step.get("content")) for step in (normalizer or {}).get("normalizers") or []]
    space = ("Replace", " ", "\u2581")
    if not pre and steps in ([("Prepend", "\u2581", None), space], [space]):
        return SpacePrefix("always" if len(steps) == 2 else "never", as_llama_cpp=True)
    return None


def pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's name for how a tokenizer.json (`spec`) splits text before
    BPE, found from its structure against the reader's table
    (`gguf.PRE_TOKENIZERS`: the split regex, digits one by one, NFC, merges
    ignored for whole words); None when it is none of them. (llama.cpp's
    converter recognises a tokenizer by hashing its ids on a test text; this
    reads the same facts from the file.)"""
    pre = spec.get("pre_tokenizer") or {}
    steps = list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    digits = bool(steps) and steps[0].get("type") == "Digits" and \
        bool(steps[0].get("individual_digits"))
    steps = steps[1:] if digits else steps
    if any(step.get("type") == "ByteLevel" and step.get("add_prefix_space") for step in steps):
        return None
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        split = None
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and \
            steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        split = (steps[0].get("pattern") or {}).get("Regex")
    else:
        return None
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        return None
    ignore = bool((spec.get("model") or {}).get("ignore_merges"))
    for name, (regex, by_digit) in reader.PRE_TOKENIZERS.items():
        if (regex, by_digit) == (split, digits) and (name in reader.NFC) == \
                (normalizer == "NFC") and (name in reader.IGNORE_MERGES) == ignore:
            return name
    return None
