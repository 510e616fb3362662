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
