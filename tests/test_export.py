"""Export round trips with the real PyTorch packages: a tiny trained run
exported as PEFT and loaded with `PeftModel.from_pretrained`, and exported
merged and loaded with `AutoModelForSequenceClassification`, gives jaxlora's
logits within 1e-4 (float32). Also `runner eval` / `runner predict` on the run,
and the refusals (not a run folder, unknown format, an existing folder)."""

import json
import shutil

import numpy as np
import pytest

from test_cli import TINY_RECIPE, _tweets_csv
from test_cli import runner_here as _runner

from runner.run_folder import stamp_order

TEXTS = ["love it caf\xe9", "awful traffic today", "so happy with this brilliant ride",
         "never again, terrible idea", "meh"]


def _recipe(text: str, method: str) -> str:
    if method == "full":
        return text.replace('method = "lora"\nrank = 4\ntargets = ["query", "value"]\n',
                            'method = "full"\n')
    # every linear kind, so suffix-ambiguous names (output.dense) are exercised
    return (text.replace('method = "lora"', f'method = "{method}"')
            .replace('targets = ["query", "value"]',
                     'targets = ["query", "value", "attention.output", "output"]\n'
                     'dropout = 0.1\nalpha = 12'))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir):
    """One finished tiny run per method, made by the real CLI."""
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_bert_dir, root / "model")
    _tweets_csv(root / "tweets.csv")
    out = {}
    for method in ("lora", "qlora", "full"):
        (root / f"{method}.toml").write_text(_recipe(TINY_RECIPE, method))
        done = _runner("run", f"{method}.toml", cwd=root)
        assert done.returncode == 0, done.stderr[-3000:]
        out[method] = next((root / "runs" / method).iterdir())
    out["root"] = root
    return out


def _jaxlora_logits(run_dir, texts):
    from runner.build import open_run

    opened = open_run(run_dir)
    enc = opened.tokenizer(texts, padding=True, return_tensors="np")
    logits = opened.model()(enc["input_ids"].astype(np.int32),
                            enc["attention_mask"].astype(np.int32))
    return opened, enc, np.asarray(logits)


def test_peft_export_loads_in_peft_with_equal_logits(runs):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = runs["lora"]
    done = _runner("export", str(run), "--format", "peft", cwd=runs["root"])
    assert done.returncode == 0, done.stderr[-2000:]
    folder = run / "export" / "peft"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["r"] == 4 and config["lora_alpha"] == 12 and config["modules_to_save"] == ["classifier"]
    assert "encoder.layer.1.attention.output.dense" in config["target_modules"]
    assert len(config["target_modules"]) == 2 * 4

    opened, enc, ours = _jaxlora_logits(run, TEXTS)
    base = AutoModelForSequenceClassification.from_pretrained(str(runs["root"] / "model"),
                                                              num_labels=2)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    # exactly the adapted layers got adapters (no suffix matched a wrong layer)
    adapted = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A")
                     for n, _ in model.named_modules() if n.endswith(".lora_A"))
    assert adapted == sorted(p for p in opened.manifest["model"]["adapted_layers"])
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(enc["input_ids"]),
                       attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
    assert np.abs(ours).max() > 0.01  # not a degenerate comparison
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_merged_export_loads_in_transformers_with_equal_logits(runs, method):
    import torch
    from transformers import AutoModelForSequenceClassification

    run = runs[method]
    done = _runner("export", str(run), "--format", "merged", cwd=runs["root"])
    assert done.returncode == 0, done.stderr[-2000:]
    if method == "qlora":
        assert "dequantized NF4" in done.stdout
    folder = run / "export" / "merged"
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.id2label == {0: "negative", 1: "positive"}
    _, enc, ours = _jaxlora_logits(run, TEXTS)
    with torch.no_grad():
        theirs = model.eval()(input_ids=torch.tensor(enc["input_ids"]),
                              attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_export_refusals(runs, tmp_path):
    root, run = runs["root"], runs["lora"]
    done = _runner("export", str(run), "--format", "onnx", cwd=root)
    assert done.returncode == 2 and "--format: 'onnx' is not an export format" in done.stderr
    done = _runner("export", str(runs["full"]), "--format", "peft", cwd=root)
    assert done.returncode == 2 and "no adapter" in done.stderr
    assert not (runs["full"] / "export" / "peft").exists()
    # a classifier's head has no place in GGUF: refused, nothing written
    done = _runner("export", str(run), "--format", "gguf", "--quant", "q8_0", cwd=root)
    assert done.returncode == 2 and "classification head, which GGUF (llama.cpp) does not " \
        "carry" in " ".join(done.stderr.split()), done.stderr
    assert not (run / "export" / "gguf-q8_0").exists() and "Traceback" not in done.stderr
    done = _runner("export", str(runs["qlora"]), "--format", "peft", cwd=root)
    assert done.returncode == 0 and "trained against NF4-quantized base weights" in done.stdout
    assert (runs["qlora"] / "export" / "peft" / "adapter_model.safetensors").is_file()
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    done = _runner("export", str(run), "--format", "peft", "--out", str(target), cwd=root)
    assert done.returncode == 2 and "already exists" in done.stderr
    assert (target / "keep.txt").read_text() == "mine"  # nothing overwritten
    done = _runner("export", str(run), "--format", "peft", "--out",
                   str(target / "keep.txt" / "sub"), cwd=root)
    assert done.returncode == 2 and "keep.txt is a file, not a folder" in done.stderr
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    for command in ("export", "eval", "predict"):
        extra = {"export": ["--format", "peft"], "eval": [], "predict": ["hello"]}[command]
        done = _runner(command, str(empty), *extra, cwd=root)
        assert done.returncode == 2 and "not a run folder" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_a_killed_exports_temporary_folder_goes_with_the_next_export(runs, tmp_path):
    """SIGKILL during an export leaves its hidden temporary folder: the next
    export to the same place removes it, once its writer is gone, and leaves
    a live export's (and another machine's) alone. The PEFT config names
    the base model as the recipe wrote it, not where it resolved to."""
    import os
    import subprocess

    from runner.commands.export import _host

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid whose process has ended
    out = tmp_path / "mine"
    stale = tmp_path / f".mine.tmp-{_host()}-{gone.pid}-abcd"
    live = tmp_path / f".mine.tmp-{_host()}-{os.getpid()}-efgh"
    elsewhere = tmp_path / f".mine.tmp-otherhost-{gone.pid}-ijkl"
    for folder in (stale, live, elsewhere):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"half")
    done = _runner("export", str(runs["lora"]), "--format", "peft", "--out", str(out),
                   cwd=runs["root"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert not stale.exists() and live.is_dir() and elsewhere.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["mine", live.name, elsewhere.name])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "model"  # [model] source = "model"


def test_eval_reproduces_the_run_and_takes_other_data(runs, tmp_path):
    root, run = runs["root"], runs["lora"]
    done = _runner("eval", str(run), cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    [written] = list((run / "evals").iterdir())
    again = json.loads(written.read_text())["metrics"]
    after = json.loads((run / "eval.json").read_text())["after"]
    assert again["accuracy"] == after["accuracy"] and again["examples"] == 20
    assert again["loss"] == pytest.approx(after["loss"], abs=1e-6)

    other = tmp_path / "other.csv"
    other.write_text("sentiment,confidence,text\npositive,1,great\nnegative,1,awful\n"
                     "neutral,1,fine\n", encoding="latin-1")
    done = _runner("eval", str(run), "--data", str(other), cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "neutral: 1" in done.stdout  # dropped rows are reported
    newest = max((run / "evals").iterdir(), key=stamp_order)
    assert json.loads(newest.read_text())["metrics"]["examples"] == 2
    # the training rows' majority label, scored on the other data's two rows
    assert json.loads(newest.read_text())["baseline"]["accuracy"] == 0.5
    assert "majority" in done.stdout
    done = _runner("eval", str(run), "--data", str(tmp_path / "missing.csv"), cwd=root)
    assert done.returncode == 2 and "missing.csv" in done.stderr


def test_evaluations_within_one_second_sort_in_the_order_written(tmp_path):
    from runner.run_folder import fresh_file

    written = []
    for _ in range(12):
        path = fresh_file(tmp_path, ".json")
        path.write_text("{}")
        written.append(path)
    assert len(set(written)) == 12 and any("-2.json" in p.name for p in written)
    assert sorted(tmp_path.iterdir(), key=stamp_order) == written


def test_predict_prints_labels_and_probabilities(runs):
    root, run = runs["root"], runs["lora"]
    done = _runner("predict", str(run), *TEXTS[:3], "--json", cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == TEXTS[:3]
    _, _, logits = _jaxlora_logits(run, TEXTS[:3])
    for row, z in zip(rows, logits):
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        assert row["label"] == ["negative", "positive"][int(z.argmax())]
        assert row["probabilities"]["positive"] == pytest.approx(float(p[1]), abs=1e-5)
    done = _runner("predict", str(run), "love it", cwd=root)
    assert done.returncode == 0 and "p(positive)" in done.stdout


def test_generation_config_names_every_end_of_sequence_id():
    """A merged causal LM's generation_config.json keeps the base model's
    settings and lists every id jaxlora stops at (EOS and end of turn)."""
    from types import SimpleNamespace

    from jaxlora.export import generation_config

    tokenizer = SimpleNamespace(bos_token_id=1, pad_token_id=None)
    base = {"temperature": 0.6, "eos_token_id": 2, "transformers_version": "4.0"}
    config = generation_config(base, tokenizer, [2, 32000, 32001])
    assert config == {"temperature": 0.6, "eos_token_id": [2, 32000, 32001],
                      "bos_token_id": 1}
    assert generation_config({}, tokenizer, [2])["eos_token_id"] == 2
