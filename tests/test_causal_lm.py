"""Causal-LM fine-tuning end to end on tiny random decoders the test builds
(GPT-2 and Llama, with a small word-level tokenizer): the loss mask of
prompt/response data, and a run whose perplexity falls."""

import json
import shutil

import numpy as np
import pytest

from test_cli import runner_here as _runner
from tiny_models import qa_rows, save_word_tokenizer, tiny_decoder_dir, write_qa


def test_prompt_response_loss_mask_covers_the_response_only(tmp_path):
    from jaxlora.data import LmFormat, tokenize_lm_batch

    tok = save_word_tokenizer(tmp_path, with_bos=True)
    out = tokenize_lm_batch({"p": ["what is the cat ?"], "r": ["the cat sat ."]}, tokenizer=tok,
                            fmt=LmFormat(prompt_column="p", response_column="r",
                                         template="question {prompt} answer"),
                            max_length=16, pad_id=0, eos_id=tok.eos_token_id)
    ids, mask = out["input_ids"][0], out["loss_mask"][0]
    words = tok.convert_ids_to_tokens(ids)
    assert words[:13] == ["<s>", "question", "what", "is", "the", "cat", "?", "answer",
                          "the", "cat", "sat", ".", "</s>"]
    assert mask == [0] * 8 + [1] * 5 + [0] * 3  # response and EOS; not prompt, not padding
    assert out["attention_mask"][0] == [1] * 13 + [0] * 3 and out["truncated"] == [False]
    cut = tokenize_lm_batch({"p": ["what is the cat ?"], "r": ["the cat sat ."]}, tokenizer=tok,
                            fmt=LmFormat(prompt_column="p", response_column="r"),
                            max_length=8, pad_id=0, eos_id=tok.eos_token_id)
    assert cut["truncated"] == [True] and cut["loss_mask"][0] == [0] * 6 + [1] * 2


def test_causal_lm_loss_counts_targets_only():
    import jax.numpy as jnp

    from jaxlora.tasks import causal_lm_loss

    logits = jnp.zeros((1, 4, 5)).at[0, 1, 3].set(10.0)  # position 1 predicts token 3
    batch = {"input_ids": jnp.array([[1, 2, 3, 4]]), "attention_mask": jnp.ones((1, 4)),
             "loss_mask": jnp.array([[0, 0, 1, 0]]), "weights": jnp.ones(1)}
    loss, count = causal_lm_loss(logits, batch)
    assert float(count) == 1.0 and float(loss) < 1e-3  # only token 3 counts, and it is right


RECIPE = """
[model]
source = "model"
task = "causal-lm"
[data]
source = "data.jsonl"
{data}
max_length = 16
eval_size = 20
[adapter]
{adapter}
[train]
epochs = 4
batch_size = 10
learning_rate = 5e-3
warmup_ratio = 0.0
log_every = 5
[eval]
batch_size = 10
"""


PAIRS = 'prompt_column = "prompt"\nresponse_column = "response"\ntemplate = "question {prompt} answer"'


@pytest.mark.parametrize("name, method, targets, data", [
    ("gpt2", "lora", '["c_attn", "mlp.c_proj"]', 'text_column = "text"\npacking = true'),
    ("llama-gqa-rope3", "lora", '"all-linear"', PAIRS),
    ("qwen2", "qlora", '["q_proj", "v_proj"]', PAIRS),
    ("llama-tied", "full", None, 'text_column = "text"'),
])
def test_causal_lm_run_lowers_perplexity(tmp_path, name, method, targets, data):
    tiny_decoder_dir(tmp_path / "model", name)
    write_qa(tmp_path / "data.jsonl")
    adapter = (f'method = "{method}"' if method == "full"
               else f'method = "{method}"\nrank = 8\ntargets = {targets}')
    (tmp_path / "lm.toml").write_text(RECIPE.format(data=data, adapter=adapter))
    done = _runner("run", "lm.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = list((tmp_path / "runs" / "lm").iterdir())
    evals = json.loads((run / "eval.json").read_text())
    before, after = evals["before"], evals["after"]
    assert before["examples"] == after["examples"] == 20 and after["tokens"] > 0
    assert after["perplexity"] < 0.5 * before["perplexity"]
    assert after["perplexity"] == pytest.approx(np.exp(after["loss"]))
    assert "perplexity" in done.stdout and "| perplexity |" in (run / "report.md").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["target_tokens"]["eval"] == after["tokens"]
    if "packing" in data:  # 100 training texts of 7 tokens, two to a 16-token row
        assert manifest["data"]["train_size"] == 100
        assert manifest["data"]["packed_rows"] == 50
    again = _runner("eval", str(run), cwd=tmp_path)  # a finished causal-lm run, re-evaluated
    assert again.returncode == 0 and "perplexity" in again.stdout
    report = (run / "report.md").read_text()
    assert "| metric | before (baseline) | after | change |" in report
    assert "Baseline: the base model itself, before fine-tuning" in report
    if "prompt" in data:  # greedy completions of the 20 eval prompts, before and after
        assert before["exact_match_examples"] == after["exact_match_examples"] == 20
        assert after["exact_match"] > before["exact_match"]
        assert "exact match" in done.stdout
        # `runner eval` judges the greedy answers too, as the run did
        assert "exact match" in again.stdout, again.stdout
        [written] = list((run / "evals").iterdir())
        assert json.loads(written.read_text())["metrics"]["exact_match"] == \
            pytest.approx(after["exact_match"])
    else:
        assert "exact_match" not in after
    out = _runner("generate", str(run), "--prompt", "what is the dog ?", "--max-new-tokens",
                  "6", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    [row] = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert row["prompt"] == "what is the dog ?" and 0 < row["tokens"] <= 6
    if name == "llama-gqa-rope3":  # once: the plain form, and eval on other data
        shown = _runner("generate", str(run), "--prompt", "what is the dog ?",
                        "--max-new-tokens", "6", cwd=tmp_path)
        lines = shown.stdout.splitlines()
        assert shown.returncode == 0 and "prompt:" in lines, shown.stdout
        at = lines.index("prompt:")
        assert lines[at + 1] == "what is the dog ?" and lines[at + 2].startswith("completion (")
        other = tmp_path / "other.jsonl"
        other.write_text("\n".join(json.dumps(r) for r in qa_rows(30)[:7]) + "\n")
        elsewhere = _runner("eval", str(run), "--data", str(other), cwd=tmp_path)
        assert elsewhere.returncode == 0, elsewhere.stderr[-2000:]
        from runner.run_folder import stamp_order

        newest = max((run / "evals").iterdir(), key=stamp_order)
        result = json.loads(newest.read_text())
        assert result["data"]["rows"] == 7 and result["metrics"]["examples"] == 7
        assert result["metrics"]["exact_match_examples"] == 7
    _check_exports(tmp_path, run, method)
    table = _runner("compare", str(run), "--markdown", cwd=tmp_path)
    assert table.returncode == 0 and "perplexity before -> after" in table.stdout
    shown = _runner("report", str(run), cwd=tmp_path)  # its files pass report's checks
    assert shown.returncode == 0 and "perplexity" in shown.stdout, shown.stderr[-2000:]


def test_generation_refuses_to_run_past_learned_positions(tmp_path):
    from jaxlora.errors import UserError
    from jaxlora.generate import GenerateConfig, generate
    from jaxlora.models import load_model

    tiny_decoder_dir(tmp_path, "gpt2")  # n_positions 64
    model = load_model(tmp_path, task="causal-lm", attention="xla").model
    from flax import nnx

    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    with pytest.raises(UserError, match="exceeds the model's 64 positions"):
        generate(graphdef, trainable, frozen, [[5] * 60], GenerateConfig(max_new_tokens=5),
                 eos_id=None)


def _check_exports(root, run, method):
    """PEFT and merged exports load in PyTorch with jaxlora's logits (float32, 1e-4).
    A QLoRA adapter was trained on the 4-bit base, so its PEFT export is only
    loaded; its merged export carries the dequantized base and must match."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from runner.build import open_run

    formats = ("merged",) if method == "full" else ("peft", "merged")
    for fmt in formats:
        done = _runner("export", str(run), "--format", fmt, cwd=root)
        assert done.returncode == 0, done.stderr[-2000:]
    opened = open_run(run)
    ids = np.array([[1, 5, 6, 7, 8, 20, 4], [1, 9, 10, 11, 0, 0, 0]], np.int32)
    mask = (np.arange(7)[None, :] < np.array([[7], [4]])).astype(np.int32)
    ours = np.asarray(opened.model()(ids, mask))
    merged, info = AutoModelForCausalLM.from_pretrained(str(run / "export" / "merged"),
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # generation stops where jaxlora's does: every end-of-sequence id
    from transformers import GenerationConfig

    from jaxlora.generate import stop_ids

    generation = GenerationConfig.from_pretrained(str(run / "export" / "merged"))
    ends = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [
        generation.eos_token_id]
    assert ends == stop_ids(opened.tokenizer, opened.model_dir, chat=False)
    assert merged.generation_config.eos_token_id == generation.eos_token_id
    real = mask.astype(bool)
    inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask))
    with torch.no_grad():
        via_merged = merged.eval()(**inputs).logits.numpy()
    np.testing.assert_allclose(via_merged[real], ours[real], atol=1e-4, rtol=0)
    if method == "full":
        return
    config = json.loads((run / "export" / "peft" / "adapter_config.json").read_text())
    gpt2 = opened.manifest["model"]["adapted_layers"][0].startswith("transformer.h.")
    assert config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] == gpt2
    base = AutoModelForCausalLM.from_pretrained(str(root / "model"))
    peft_model = PeftModel.from_pretrained(base, str(run / "export" / "peft")).eval()
    with torch.no_grad():
        via_peft = peft_model(**inputs).logits.numpy()
    if method != "qlora":
        np.testing.assert_allclose(via_peft[real], ours[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace('text_column = "text"', 'text_column = "text"\nlabels = ["a", "b"]'),
     "data.labels: for causal-lm only with prompt/response pairs or conversations"),
    (lambda t: t.replace('text_column = "text"', 'prompt_column = "prompt"'),
     "give both prompt_column and response_column"),
    (lambda t: t.replace('text_column = "text"', 'text_column = "body"'), "no column 'body'"),
    # a classifier without labels infers them from label_column, which this data lacks
    (lambda t: t.replace('task = "causal-lm"', 'task = "classification"'),
     "no column 'label' (label_column) in split 'train'"),
])
def test_causal_lm_bad_input(tmp_path, edit, expected):
    tiny_decoder_dir(tmp_path / "model", "gpt2")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in qa_rows(30)) + "\n")
    (tmp_path / "lm.toml").write_text(edit(RECIPE.format(
        data='text_column = "text"', adapter='method = "lora"\nrank = 8\ntargets = ["c_attn"]')))
    done = _runner("run", "lm.toml", cwd=tmp_path)
    assert done.returncode == 2 and expected in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


def test_shipped_recipes_validate_and_the_offline_one_runs(tmp_path):
    """Every recipe in recipes/ validates; the offline decoder recipe runs on
    what tests/tiny_models.py writes (as `make tiny` does)."""
    from pathlib import Path

    from tiny_models import main as make_tiny

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for recipe in sorted(recipes.glob("*.toml")):
        done = _runner("validate", str(recipe), cwd=tmp_path)
        assert done.returncode == 0, (recipe, done.stderr)
    (tmp_path / "recipes").mkdir()
    shutil.copy(recipes / "tiny-llama-offline.toml", tmp_path / "recipes")
    make_tiny(str(tmp_path / ".tiny"))
    done = _runner("run", "recipes/tiny-llama-offline.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = list((tmp_path / "runs" / "tiny-llama-offline").iterdir())
    evals = json.loads((run / "eval.json").read_text())
    assert evals["after"]["perplexity"] < evals["before"]["perplexity"]
    assert evals["after"]["exact_match"] > evals["before"]["exact_match"]


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-rope3"])
def test_a_packed_row_computes_what_its_examples_compute_alone(tmp_path, name):
    """Packing changes nothing an example sees: logits of each packed example
    equal its own unpacked logits, and the loss counts the same targets."""
    import jax.numpy as jnp

    from jaxlora.data import Split, pack
    from jaxlora.models import load_model
    from jaxlora.tasks import causal_lm_loss

    tiny_decoder_dir(tmp_path, name)
    model = load_model(tmp_path, task="causal-lm", attention="xla").model
    rng = np.random.default_rng(0)
    lengths = [5, 3, 6, 4]
    ids = np.zeros((4, 12), np.int32)
    mask = np.zeros((4, 12), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(4, 200, n)
        mask[i, :n] = 1
    split = Split(input_ids=ids, attention_mask=mask, labels=np.zeros(4, np.int32),
                  loss_mask=mask.copy())
    packed = pack(split)
    assert len(packed) == 2  # [5 + 3], [6 + 4]: 12 columns each at most
    np.testing.assert_array_equal(packed.segment_ids[0, :9], [1] * 5 + [2] * 3 + [0])
    np.testing.assert_array_equal(packed.positions[0, :8], [0, 1, 2, 3, 4, 0, 1, 2])
    alone = np.asarray(model(ids, mask))
    together = np.asarray(model(packed.input_ids, packed.attention_mask,
                                segment_ids=packed.segment_ids, positions=packed.positions))
    starts = {0: (0, 0), 1: (0, 5), 2: (1, 0), 3: (1, 6)}
    for i, n in enumerate(lengths):
        row, at = starts[i]
        np.testing.assert_allclose(together[row, at:at + n], alone[i, :n], atol=1e-4)

    def loss(split, logits):
        batch = next(split.batches(len(split), shuffle=False))
        return causal_lm_loss(jnp.asarray(logits[:, :batch["input_ids"].shape[1]]), batch)

    (a, count_a), (b, count_b) = loss(split, alone), loss(packed, together)
    assert float(count_a) == float(count_b) == sum(n - 1 for n in lengths)
    assert float(a) == pytest.approx(float(b), abs=1e-5)
