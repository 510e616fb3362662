"""Tiny random decoders with a word-level tokenizer, and a small question/answer
data set: what the causal-LM tests train on, and what the offline recipe
`recipes/tiny-llama-offline.toml` runs on.

    .venv/bin/python tests/tiny_models.py .tiny      # or: make tiny

writes .tiny/llama/ (a 2-layer Llama with grouped-query attention and Llama-3
rope scaling, saved by transformers as safetensors, with its tokenizer) and
.tiny/qa.jsonl (120 rows: text, prompt, response).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

WORDS = ("the a cat dog bird sat ran flew on under over mat rug tree . question answer is "
         "what where who red blue green ?").split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]

TINY = dict(vocab_size=211, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)
CONFIGS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=211, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama-gqa-rope3": ("LlamaConfig", "LlamaForCausalLM",
                        dict(TINY, num_key_value_heads=2, rope_scaling={
                            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(TINY, tie_word_embeddings=True)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM",
                       dict(TINY, num_key_value_heads=1, sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(TINY, num_key_value_heads=2)),
}


def save_tiny_decoder(name: str, folder):
    """A tiny random decoder saved by transformers (safetensors), every weight perturbed."""
    import torch
    import transformers

    config_cls, model_cls, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model.eval()


def save_word_tokenizer(folder, with_bos: bool):
    """A word-level fast tokenizer over WORDS (ids < 211, the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def tiny_decoder_dir(folder, name):
    save_tiny_decoder(name, folder)
    save_word_tokenizer(folder, with_bos=not name.startswith("gpt2"))
    return folder


def qa_rows(n=120, seed=0) -> list[dict]:
    """Sentences about three animals, and question/answer pairs about them."""
    rng = np.random.default_rng(seed)
    animals, places = ["cat", "dog", "bird"], ["mat", "rug", "tree"]
    verbs = {"cat": "sat", "dog": "ran", "bird": "flew"}
    rows = []
    for _ in range(n):
        a, p = animals[rng.integers(3)], places[rng.integers(3)]
        rows.append({"text": f"the {a} {verbs[a]} on the {p} .",
                     "prompt": f"what is the {a} ?", "response": f"the {a} {verbs[a]} ."})
    return rows


def write_qa(path) -> Path:
    Path(path).write_text("\n".join(json.dumps(r) for r in qa_rows()) + "\n")
    return Path(path)


def main(out: str) -> None:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    tiny_decoder_dir(root / "llama", "llama-gqa-rope3")
    write_qa(root / "qa.jsonl")
    print(f"wrote {root / 'llama'} and {root / 'qa.jsonl'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".tiny")


# -- chat models: a byte-level BPE tokenizer with chat templates, and GGUF files ----

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# The same, its assistant turns marked for transformers' return_assistant_tokens_mask.
CHATML_MARKED = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
                 "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + "
                 "'<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}{{ '<|im_start|>' + "
                 "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                 "{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
          "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHAT_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_CORPUS = ("the cat sat on the mat . what is the dog ? the dog ran . hello there , how "
               "are you today ? is this tweet negative or positive ? i love it . i hate it . "
               "negative positive system user assistant you are a helpful bot . 0123456789")


def varied_strings(n: int = 300, seed: int = 0) -> list[str]:
    """Varied texts for tokenizer comparisons: the corpus's words, digits,
    punctuation, spacing, unicode, the chat tokens."""
    rng = np.random.default_rng(seed)
    words = CHAT_CORPUS.split() + ["café", "naïve", "😀", "日本", "  ", "\n", "\t", "1234567",
                                   "<|im_start|>", "<|im_end|>", "don't", "I'm", "HELLO"]
    return ["".join(rng.choice(["", " "]) + words[rng.integers(len(words))]
                    for _ in range(rng.integers(1, 12))) for _ in range(n)]


def chat_tokenizer(folder=None, template: str = CHATML, vocab_size: int = 320):
    """A small byte-level BPE tokenizer (GPT-2's kind, trained here) with the chat
    special tokens and `template`; saved to `folder` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CHAT_CORPUS] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", chat_template=template)
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def sentencepiece_tokenizer(folder=None, template: str = CHATML, vocab_size: int = 400):
    """A small SentencePiece-style tokenizer (Llama 2's kind: BPE with byte
    fallback, <0x00>..<0xFF> byte tokens, "▁" for a space), trained here on
    words, its merges every pair that makes a token (in the tokens' order),
    as transformers converts a tokenizer.model; with <unk>, <s>, </s>, the
    ChatML tokens as special tokens and `template`, as transformers'
    LlamaTokenizer (BOS added, "▁" before the start of the text); saved to
    `folder` when given."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    words = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    words.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    words.train_from_iterator([CHAT_CORPUS] * 50, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, limit_alphabet=40))
    vocab = words.get_vocab()
    learned = {token: -i for token, i in vocab.items() if token not in specials}
    fast = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, learned),
                          unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                          pad_token="<unk>", chat_template=template, add_bos_token=True)
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def letters_tokenizer(pieces: list[str], merges: list[tuple[str, str]]):
    """A SentencePiece-style tokenizer (transformers' LlamaTokenizer: byte
    fallback, "▁" before the text) of <unk>, <s>, </s>, the 256 byte tokens,
    "▁" and `pieces`, merging by `merges` only; no BOS added."""
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    vocab = {token: i for i, token in enumerate(specials + ["\u2581", *pieces])}
    return LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>",
                          eos_token="</s>", add_bos_token=False)


def write_gguf_keys(path, fields: dict):
    """A GGUF file (llama architecture) of metadata `fields` alone (key ->
    (value, value type, item type), as `jaxlora.gguf_export` makes them): a
    tokenizer, which llama.cpp loads vocab-only, or a config."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (value, kind, sub) in fields.items():
        writer.add_key_value(key, value, kind, sub_type=sub)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file,
                  writer.write_tensors_to_file, writer.close):
        write()
    return path


def chat_decoder_dir(folder, template: str = CHATML, tie: bool = False, kind: str = "Llama",
                     vocabulary=None, rope: dict | None = None):
    """A tiny random decoder (`kind`: Llama, Mistral, Qwen2 or GPT2) with the chat
    tokenizer's vocabulary (or `vocabulary`'s: a function like `chat_tokenizer`)
    and `rope` (rope parameters), saved by transformers."""
    import torch
    import transformers

    tokenizer = (vocabulary or chat_tokenizer)(folder, template)
    torch.manual_seed(0)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if kind == "GPT2":  # 1024 positions: transformers' GGUF loader reads no other count
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2,
                                         n_head=4, n_positions=1024, **ids)
        model = transformers.GPT2LMHeadModel(config)
    else:
        extra = {"sliding_window": None} if kind == "Mistral" else {}
        extra.update({"rope_parameters": rope} if rope else {})
        config = getattr(transformers, f"{kind}Config")(
            **dict(TINY, vocab_size=len(tokenizer), max_position_embeddings=256),
            num_key_value_heads=2, tie_word_embeddings=tie, **ids, **extra)
        model = getattr(transformers, f"{kind}ForCausalLM")(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model.eval(), tokenizer


def write_gguf(path, model, tokenizer, qtype: str = "F32", *, pre: str = "gpt2",
               name: str = "tiny llama"):
    """`model` (a transformers Llama) and `tokenizer` (byte-level BPE) as a GGUF
    file, as llama.cpp's converter writes one: its tensor names (the `gguf`
    package's table), query and key rows interleaved for its rotary layout,
    2-D weights in `qtype` (F32, F16, Q8_0, Q4_0, ...), norms in F32."""
    import json

    import gguf

    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens) | set(CHAT_SPECIAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in special else 1 for token, _ in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m
                             for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    kind = gguf.GGMLQuantizationType[qtype]
    for key, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if key.endswith("q_proj.weight") else kv
            data = (data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:])
                    .swapaxes(1, 2).reshape(data.shape))
        if data.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(names.get_name(key, try_suffixes=(".weight",)), data)
        else:
            writer.add_tensor(names.get_name(key, try_suffixes=(".weight",)),
                              gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
