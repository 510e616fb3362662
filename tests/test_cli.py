"""The real `runner` command end to end on tiny assets, and its bad-input path:
every mistake exits 2 with a message naming the field or file, no traceback."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = [sys.executable, "-m", "runner.cli"]


def _runner(*args, cwd: Path, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(cwd / "hf-datasets-cache"))
    return subprocess.run(RUNNER + list(args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def runner_here(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`runner ARGS` inside this process: the same `main`, without the seconds an
    interpreter and JAX take to start (tests of signals use real processes)."""
    from runner.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["runner", *args], code, out.getvalue(), err.getvalue())


def _workdir(path: Path, model_dir: Path, recipe: str) -> Path:
    """`path` holding `recipe` (TOML text) as tiny.toml beside a copy of the
    tiny model as model/ and the tiny tweets as tweets.csv."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_dir, path / "model")
    _tweets_csv(path / "tweets.csv")
    (path / "tiny.toml").write_text(recipe)
    return path


def tiny_run(root: Path, model_dir: Path, recipe: str) -> Path:
    """The run folder of a finished tiny run of `recipe` in `root` (`_workdir`),
    made by the CLI in this process."""
    _workdir(root, model_dir, recipe)
    done = runner_here("run", "tiny.toml", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    [found] = (root / "runs" / "tiny").iterdir()
    return found


def _tweets_csv(path: Path, n: int = 96) -> Path:
    """A tiny latin-1 CSV like the default recipe's: sentiment,confidence,text."""
    good = ["love it", "what a great day", "so happy with this", "brilliant ride"]
    bad = ["hate it", "awful traffic", "terrible idea", "never again"]
    rows = ["sentiment,confidence,text"]
    for i in range(n):
        label, words = [("positive", good), ("negative", bad), ("neutral", ["meh"])][i % 3]
        rows.append(f"{label},0.9,{words[i % len(words)]} caf\xe9 {i}")
    path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    return path


TINY_RECIPE = """
description = "tiny end-to-end"
[model]
source = "model"
[data]
source = "tweets.csv"
encoding = "latin-1"
text_column = "text"
label_column = "sentiment"
labels = ["negative", "positive"]
max_length = 16
eval_size = 20
[adapter]
method = "lora"
rank = 4
targets = ["query", "value"]
[train]
epochs = 3
batch_size = 8
learning_rate = 1e-2
log_every = 2
[eval]
batch_size = 16
"""


@pytest.fixture()
def workdir(tmp_path, tiny_bert_dir):
    return _workdir(tmp_path, tiny_bert_dir, TINY_RECIPE)


def read_events(folder: Path) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of the TensorBoard scalars in `folder`, the way
    TensorBoard reads them: the event files in order, a purge mark (a session
    START at step s) dropping the earlier files' events at steps >= s."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[tuple[str, int], float] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                scalars = {k: v for k, v in scalars.items() if k[1] < event.step}
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_run_end_to_end(workdir):
    done = _runner("run", "tiny.toml", "--set", "eval.every_steps=6",
                   "--set", "output.tensorboard=true", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((workdir / "runs" / "tiny").iterdir())
    assert len(runs) == 1
    run = runs[0]
    for name in ("recipe.toml", "manifest.json", "metrics.jsonl", "eval.json", "report.md"):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["recipe_hash"]) == 64
    assert manifest["model"]["fingerprint"] and manifest["environment"]["packages"]["jax"]
    assert manifest["model"]["trainable_params"] == 2 * 2 * (32 * 4 + 4 * 32) + 32 * 2 + 2
    assert manifest["data"]["dropped"] == {"neutral": 32}
    evals = json.loads((run / "eval.json").read_text())
    assert evals["before"]["examples"] == evals["after"]["examples"] == 20
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # 64 labelled rows - 20 eval = 44 train: 6 batches of 8 per epoch, 3 epochs
    train = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train] == list(range(2, 19, 2))
    # evaluated every 6 steps during training; the last step is "after"
    periodic = [x for x in lines if "eval" in x]
    assert [x["step"] for x in periodic] == [6, 12]
    assert all(x["eval"]["examples"] == 20 and 0 <= x["eval"]["accuracy"] <= 1
               for x in periodic)
    assert manifest["data"]["train_size"] == 44
    report = (run / "report.md").read_text()
    assert "| accuracy |" in report and "neutral" in report
    assert "![train and eval loss](loss.png)" in report
    assert "![before and after](before_after.png)" in report
    from PIL import Image

    for name in ("loss.png", "before_after.png"):
        with Image.open(run / name) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    assert "before" in done.stdout and "after" in done.stdout
    assert "train loss" in done.stdout and "eval loss" in done.stdout  # the sparklines
    # TensorBoard: every train record and every evaluation, with the same values
    events = read_events(run / "tensorboard")
    for x in train:
        assert events[("train/loss", x["step"])] == pytest.approx(x["loss"], rel=1e-6)
        assert ("train/learning_rate", x["step"]) in events
    curve = [(0, evals["before"]), *[(x["step"], x["eval"]) for x in periodic],
             (18, evals["after"])]
    for step, metrics in curve:
        assert events[("eval/loss", step)] == pytest.approx(metrics["loss"], rel=1e-6)
        assert events[("eval/accuracy", step)] == pytest.approx(metrics["accuracy"])
    # `runner report` draws the same charts again and renders report.md
    (run / "loss.png").unlink()
    shown = runner_here("report", str(run), cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    assert (run / "loss.png").is_file() and "Before and after" in shown.stdout
    # The resolved recipe in the run folder runs as is: validate it.
    again = _runner("validate", str(run / "recipe.toml"), cwd=workdir)
    assert again.returncode == 0, again.stderr


def test_validate_prints_the_resolved_recipe(workdir):
    done = _runner("validate", "tiny.toml", "--full", cwd=workdir)
    assert done.returncode == 0
    assert "warmup_ratio" in done.stdout and "valid" in done.stdout  # defaults filled in


def test_help():
    for args in (["--help"], ["run", "--help"], ["validate", "--help"]):
        done = subprocess.run(RUNNER + args, capture_output=True, text=True)
        assert done.returncode == 0 and "recipe" in done.stdout
    for command in ("eval", "predict", "export", "compare"):
        done = subprocess.run(RUNNER + [command, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "RUN_DIR" in done.stdout
        if command == "export":  # the class that loads a merged export, per task
            text = " ".join(done.stdout.split())
            assert "AutoModelForSequenceClassification (task classification)" in text
            assert "AutoModelForCausalLM (task causal-lm" in text


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace("rank = 4", 'rank = "four"'), "adapter.rank"),
    (lambda t: t.replace("rank = 4", "rank = -4"), "adapter.rank"),
    (lambda t: t.replace("rank = 4", "rnak = 4"), "did you mean 'rank'"),
    (lambda t: t.replace("[model]", "[modle]"), "model: required"),
    (lambda t: t.replace('source = "tweets.csv"', 'source = "nope.csv"'), "nope.csv"),
    (lambda t: t.replace('label_column = "sentiment"', 'label_column = "mood"'), "mood"),
    (lambda t: t.replace('targets = ["query", "value"]', 'targets = ["q_proj"]'), "q_proj"),
    (lambda t: t.replace('source = "model"', 'source = "./no-model"'), "no-model"),
    (lambda t: t.replace("max_length = 16", "max_length = 200"), "data.max_length: 200"),
    (lambda t: t.replace('source = "model"', 'source = "model"\nattention = "cudnn"'),
     "model.attention: cudnn needs a GPU"),
    (lambda t: "adapter = 3\n" + t.replace("[adapter]\n", "[adapter_old]\n"),
     "adapter: expected a table"),
])
def test_bad_input_exits_2_without_traceback(workdir, edit, expected):
    recipe = workdir / "tiny.toml"
    recipe.write_text(edit(recipe.read_text()))
    done = _runner("run", "tiny.toml", cwd=workdir)
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().startswith("error:")
    assert not (workdir / "runs").exists()  # bad input leaves no half-made run folder


def test_missing_recipe_file(tmp_path):
    done = _runner("run", "missing.toml", cwd=tmp_path)
    assert done.returncode == 2 and "recipe file not found" in done.stderr


def test_qlora_and_full_runs_then_compare(workdir):
    recipe = (workdir / "tiny.toml").read_text()
    (workdir / "tiny-qlora.toml").write_text(recipe.replace('method = "lora"',
                                                            'method = "qlora"'))
    full = recipe.replace('method = "lora"\nrank = 4\ntargets = ["query", "value"]\n',
                          'method = "full"\n')
    (workdir / "tiny-full.toml").write_text(full)
    run_dirs = []
    for name in ("tiny-qlora", "tiny-full"):
        done = _runner("run", f"{name}.toml", cwd=workdir)
        assert done.returncode == 0, done.stderr[-3000:]
        run_dirs += list((workdir / "runs" / name).iterdir())
    qlora = json.loads((run_dirs[0] / "manifest.json").read_text())["model"]
    # tiny matrices: the per-tensor scale and offset weigh more than at MiniLM size (4.127)
    assert 4.127 < qlora["bits_per_quantized_param"] < 4.25
    assert 0 < qlora["quantized_bytes"] < qlora["frozen_bytes"]
    full = json.loads((run_dirs[1] / "manifest.json").read_text())["model"]
    assert full["frozen_bytes"] == 0 and full["bits_per_quantized_param"] is None
    assert full["trainable_params"] == full["total_params"]
    # packed 4-bit storage does not change how many weights the model has
    assert qlora["total_params"] == full["total_params"] + 2 * 2 * (32 * 4 + 4 * 32)
    assert "4-bit linear weights" in (run_dirs[0] / "report.md").read_text()

    done = _runner("compare", *map(str, run_dirs), "--markdown", cwd=workdir)
    assert done.returncode == 0, done.stderr
    markdown = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert markdown[0].startswith("| run | method | trainable params | frozen MiB")
    assert [row.split(" | ")[1] for row in markdown[1:]] == ["qlora", "full"]
    assert f"{qlora['bits_per_quantized_param']:.3f}" in markdown[1]


def test_compare_refuses_what_is_not_a_finished_run(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text('{"status": "running"}')
    (tmp_path / "half" / "eval.json").write_text("{}")
    for target, words in ((tmp_path, "no manifest.json"), (tmp_path / "half", "did not finish")):
        done = _runner("compare", str(target), cwd=tmp_path)
        assert done.returncode == 2 and words in done.stderr
        assert "Traceback" not in done.stderr


def test_a_diverging_run_stops_with_a_message(workdir, monkeypatch):
    """A NaN loss ends the run: exit 2, the step named, the manifest says so."""
    import jax.numpy as jnp

    from jaxlora import tasks

    original = tasks.STEP_LOSSES["classification"]

    def nan_from_step_1(model, batch, rng):
        loss, count = original(model, batch, rng)
        return jnp.where(batch["labels"].sum() >= 0, jnp.nan, loss), count

    monkeypatch.setitem(tasks.STEP_LOSSES, "classification", nan_from_step_1)
    done = runner_here("run", "tiny.toml", cwd=workdir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "train: the loss became nan at step 1" in done.stderr
    assert "no checkpoint was written before it" in done.stderr
    [run] = list((workdir / "runs" / "tiny").iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "diverged" and manifest["diverged"]["step"] == 1


def test_a_base_model_with_nan_weights_is_named_not_the_learning_rate(workdir):
    """Its eval loss before training is already NaN: the message points at the
    model's weights, not at train.learning_rate."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    path = workdir / "model" / "model.safetensors"
    tensors = load_file(path)
    [name] = [k for k in tensors if k.endswith("word_embeddings.weight")]
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, path)
    done = runner_here("run", "tiny.toml", cwd=workdir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert "the base model's eval loss was already nan before training" in message
    assert "learning_rate" not in message


def test_recipes_lists_the_library(tmp_path):
    """One line per recipe, in 80 columns, saying which need the network."""
    done = runner_here("recipes", cwd=tmp_path)  # no ./recipes here: the shipped ones
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()[2:] if line.strip()}
    assert all(len(line) <= 80 for line in lines.values()), lines
    shipped = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.toml"))
    for path in shipped:
        assert path.stem in lines, (path.stem, lines)
    for name, needs in [("bert-sentiment", "offline"), ("smollm2-tweets-chat", "offline"),
                        ("gpt2-alpaca-lora", "network"), ("bert-base-sst2-lora", "network")]:
        assert lines[name].split()[1:3] == [needs, "qlora" if "qlora" in name else "lora"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "local.toml").write_text(
        '[model]\nsource = "model"\n[data]\nsource = "hub-org/data"\nlabels = ["a", "b"]\n'
        'eval_size = 2\n')
    (tmp_path / "mine" / "model").mkdir()
    (tmp_path / "mine" / "broken.toml").write_text("[model]\n")
    done = runner_here("recipes", "mine", cwd=tmp_path)
    assert done.returncode == 0 and "local   network  lora" in done.stdout  # hub data
    assert "broken  invalid: model.source: required" in done.stdout
    (tmp_path / "mine" / "data.csv").write_text("text,label\n")
    (tmp_path / "mine" / "local.toml").write_text(
        '[model]\nsource = "model"\n[data]\nsource = "data.csv"\nlabels = ["a", "b"]\n'
        'eval_size = 2\n')
    assert "local   offline  lora" in runner_here("recipes", "mine", cwd=tmp_path).stdout
    done = runner_here("recipes", "nowhere", cwd=tmp_path)
    assert done.returncode == 2 and "no such folder" in done.stderr


BROKEN_DATA = {
    # case: (file bytes, extra [data] lines, what the message must say)
    "missing file": (None, "", r"tweets\.csv: no such file"),
    "not utf-8": ("sentiment,text\npositive,caf\xe9 ol\xe9\n".encode("latin-1"), "",
                  r'tweets\.csv: byte 0xe9 at offset 27 \(line 2\) is not UTF-8 .*encoding = '
                  r'"auto".*latin-1'),
    "utf-8 read as latin-1": ("sentiment,text\npositive,caf\xe9 ol\xe9\n".encode(),
                              'encoding = "latin-1"\neval_size = 20\n',
                              r"tweets\.csv: encoding is latin-1, but the file is valid UTF-8 "
                              r"with non-ASCII characters \(line 2: 'positive,caf\xe9 ol\xe9', "
                              r"which latin-1 reads as 'positive,caf\xc3\xa9 .*\"latin-1!\""),
    "empty file": (b"", "", r"tweets\.csv: the file is empty"),
    "missing column": (b"sentiment,body\npositive,hi\n", "", r"no column 'text' \(text_column\)"),
    "empty text": (b"sentiment,text\npositive,fine\nnegative,\npositive,ok\n",
                   'empty = "error"\neval_size = 20\n',
                   r"column 'text' is empty in 1 row.*data row 2 .*line 3 of the file"),
    # a quoted field holding newlines: the data row and the file line differ
    "empty text after a quoted newline": (
        b'sentiment,text\npositive,"two\nlines"\nnegative,\n',
        'empty = "error"\neval_size = 20\n', r"data row 2 \(1-based, header not counted, line 4 of "
                                      r"the file\)"),
    "no label in labels": (b"sentiment,text\nhappy,a\nsad,b\n", "",
                           r"no row .* label in \['negative', 'positive'\].*'happy' \(1\)"),
    "one class": (b"sentiment,text\n" + b"positive,good day\n" * 40, "",
                  r"the training set has only one class, 'positive'"),
    "eval larger than data": (b"sentiment,text\n" + b"positive,a\nnegative,b\n" * 5, "",
                              r"eval_size 20 leaves no training rows.*10 rows"),
    "eval split missing": (b"sentiment,text\npositive,a\nnegative,b\n",
                           "eval_split = \"test\"\n", r"no split 'test'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_DATA))
def test_broken_data_is_one_message_and_no_run_folder(workdir, case):
    """Through the whole command: exit 2, one message naming the file and the
    column or row, no traceback, and no run folder made for a run that cannot start."""
    import re

    content, extra, expected = BROKEN_DATA[case]
    recipe = (workdir / "tiny.toml").read_text().replace('encoding = "latin-1"\n', "")
    if extra:
        recipe = recipe.replace("eval_size = 20\n", extra)
    (workdir / "tiny.toml").write_text(recipe)
    (workdir / "tweets.csv").unlink()
    if content is not None:
        (workdir / "tweets.csv").write_bytes(content)
    done = runner_here("run", "tiny.toml", cwd=workdir)
    assert done.returncode == 2, done.stderr[-2000:]
    message = " ".join(done.stderr.split())
    assert re.search(expected, message), message
    assert "tweets.csv" in message and "Traceback" not in done.stderr
    assert not (workdir / "runs").exists()


def test_texts_from_stdin_and_the_command_line_must_be_utf8(monkeypatch):
    """`predict TEXT...` and `generate --prompt`: "-" reads stdin's lines (blank
    ones skipped); bytes that are not UTF-8 are one message naming the line or
    the argument, not a tokenizer traceback."""
    from jaxlora.errors import UserError
    from runner.terminal import read_texts as _texts

    stdin = lambda data: io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")  # noqa: E731
    monkeypatch.setattr("sys.stdin", stdin("fine day\n\n  \nbad day\n".encode()))
    assert _texts(["first", "-"]) == ["first", "fine day", "bad day"]
    monkeypatch.setattr("sys.stdin", stdin(b"fine\n\xff\xfe bad\n"))
    with pytest.raises(UserError, match="stdin line 2 is not valid utf-8"):
        _texts(["-"])
    with pytest.raises(UserError, match="text 2 of the command line is not valid utf-8"):
        _texts(["fine", "\udcff"])  # how Python passes an undecodable argv byte


def _disk_fills_at(monkeypatch, name: str):
    """From the first write of the file `name` on, every file the run writes
    whole (`run_folder.write_atomic`) fails as on a full disk; returns the real
    writer, to give the space back."""
    import errno

    from runner import run_folder

    written, full = run_folder.write_atomic, []

    def filling(path, text):
        if path.name == name or full:
            full.append(path.name)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written(path, text)

    monkeypatch.setattr(run_folder, "write_atomic", filling)
    return written


def test_a_full_disk_as_a_run_starts_is_one_message_not_a_traceback(workdir, monkeypatch):
    """The first files of a new run folder cannot be written (a full disk or a
    quota): one message naming the file, exit 2."""
    _disk_fills_at(monkeypatch, "recipe.toml")
    done = runner_here("run", "tiny.toml", cwd=workdir)
    assert done.returncode == 2, done.stderr[-2000:]
    message = " ".join(done.stderr.split())
    assert "recipe.toml: cannot write: No space left on device" in message
    assert "nothing was trained" in message and "Traceback" not in done.stderr


def test_a_disk_full_at_the_report_leaves_a_run_that_goes_on(workdir, monkeypatch):
    """The disk fills as the run writes its report: exit 2 with one message,
    and the run folder is not "finished" on disk, so `runner run RUN_DIR`
    goes on (trimming metrics.jsonl there cannot be written either at first:
    one message again, not a traceback) and, with space, writes the report."""
    import json

    from runner import run_folder

    written = _disk_fills_at(monkeypatch, "report.md")
    done = runner_here("run", "tiny.toml", cwd=workdir)
    assert done.returncode == 2, done.stderr[-2000:]
    message = " ".join(done.stderr.split())
    assert "report.md: cannot write: No space left on device" in message
    [run] = (workdir / "runs" / "tiny").iterdir()
    assert f"`runner run {run.relative_to(workdir)}` goes on" in message
    assert json.loads((run / "manifest.json").read_text())["status"] != "finished"
    assert not (run / "report.md").exists()
    again = runner_here("run", str(run), cwd=workdir)  # every write still fails
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "metrics.jsonl: cannot write: No space left on device; nothing was trained" in \
        " ".join(again.stderr.split())
    monkeypatch.setattr(run_folder, "write_atomic", written)
    resumed = runner_here("run", str(run), cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
    assert "accuracy" in (run / "report.md").read_text()


def test_a_metrics_file_that_cannot_be_opened_is_one_message(workdir, monkeypatch):
    """metrics.jsonl cannot be created (no inode left, say), after the run
    folder's first files were written: one message naming it and what to do,
    exit 2, and the manifest says the run failed."""
    import errno
    import json
    import pathlib

    opened = pathlib.Path.open

    def open_(path, *args, **kwargs):
        if path.name == "metrics.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", open_)
    done = runner_here("run", "tiny.toml", cwd=workdir)
    assert done.returncode == 2, done.stderr[-2000:]
    message = " ".join(done.stderr.split())
    assert "metrics.jsonl: cannot write: No space left on device" in message
    assert "no checkpoint was written yet. Free space, then run the same command again" \
        in message and "Traceback" not in done.stderr
    [run] = (workdir / "runs" / "tiny").iterdir()
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"


def test_a_gpu_run_says_when_the_fused_kernel_skips_attention_dropout(workdir, monkeypatch,
                                                                     tiny_bert_dir):
    """cuDNN's fused attention (the GPU's default) has no dropout on the
    attention probabilities: where it would run a model whose config asks for
    some, the run says so and names the setting that applies it."""
    import jax

    from jaxlora.models import load_model
    from jaxlora.models.gpt2 import GPT2Config
    from runner.build import attention_dropout_skipped
    from runner.recipe import load_recipe

    config = load_model(tiny_bert_dir, task="classification", num_labels=2).config
    rate = config.attention_dropout
    assert rate > 0
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    recipe = load_recipe(workdir / "tiny.toml", [])
    assert attention_dropout_skipped(recipe, config) == rate  # auto: cuDNN on a GPU in bf16
    gpt2 = GPT2Config.from_hf({"vocab_size": 8, "n_positions": 8, "n_embd": 4, "n_layer": 1,
                               "n_head": 1, "attn_pdrop": 0.25})
    assert attention_dropout_skipped(recipe, gpt2) == 0.25  # GPT-2's attn_pdrop
    for sets in (["model.attention=xla"], ["model.compute_dtype=float32"]):
        assert attention_dropout_skipped(load_recipe(workdir / "tiny.toml", sets), config) == 0.0
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert attention_dropout_skipped(recipe, config) == 0.0


def test_a_recipe_without_labels_infers_them_and_every_command_sees_them(workdir):
    """Issue 25 through `runner`: a class called NA (pandas' missing value) is
    kept, rows without text are dropped and counted, no `labels` given: the
    train split's sorted values are printed, recorded and written into the run's
    recipe.toml, so `eval` and `predict` see the same ones; data whose labels
    changed refuses the resume, naming them. eval_size is a fraction."""
    import math

    rows = ["sentiment,text"]
    for i in range(48):
        label, words = [("good", "caf\u00e9 great"), ("bad", "awful"), ("NA", "so so")][i % 3]
        rows.append(f"{label},{words} {i}")
    rows += ["good,", "bad,  "]  # no text: dropped and counted
    (workdir / "tweets.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    recipe = (workdir / "tiny.toml").read_text()
    recipe = recipe.replace('encoding = "latin-1"\n', "").replace(
        'labels = ["negative", "positive"]\n', "").replace("eval_size = 20", "eval_size = 0.25")
    (workdir / "tiny.toml").write_text(recipe)
    done = runner_here("plan", "tiny.toml", "--json", cwd=workdir)  # the head's size: 3 labels
    assert done.returncode == 0, done.stderr[-3000:]
    done = runner_here("run", "tiny.toml", "--set", "train.epochs=1", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    out = " ".join(done.stdout.split())
    assert ("labels: NA, bad, good (inferred: the sorted distinct values of column "
            "'sentiment' in split 'train')") in out
    assert "(2 train rows without text, dropped)" in out
    (run,) = (workdir / "runs" / "tiny").iterdir()
    data = json.loads((run / "manifest.json").read_text())["data"]
    assert data["label_names"] == ["NA", "bad", "good"]
    assert data["labels_inferred"].startswith("the sorted distinct values")
    assert data["empty_texts"] == {"train": 2} and data["dropped"] == {}
    assert "Rows dropped as their text is empty or missing: train 2." in (
        run / "report.md").read_text()
    done = runner_here("validate", "tiny.toml", cwd=workdir)
    assert "labels inferred from the data" in done.stdout, done.stdout
    assert data["eval_size"] == math.ceil(0.25 * 48) == 12 and data["train_size"] == 36
    assert data["label_counts"]["train"]["NA"] + data["label_counts"]["eval"]["NA"] == 16
    assert 'labels = [\n    "NA",\n    "bad",\n    "good",\n]' in (run / "recipe.toml").read_text()
    done = runner_here("eval", str(run), cwd=workdir)  # the held-out set: the same data
    assert done.returncode == 0, done.stderr[-3000:]
    done = runner_here("predict", str(run), "so so 100", "--json", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(json.loads(done.stdout.splitlines()[-1])["probabilities"]) == {"NA", "bad", "good"}
    done = runner_here("export", str(run), "--format", "merged", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((run / "export" / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "NA", "1": "bad", "2": "good"}
    # a stopped run whose data now holds another label: resuming would train
    # another head, so the recipe (its inferred labels) differs: --resume refuses
    # it (without --resume it is a new run, as any changed recipe)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    # with the same data the labels inferred again are the run's: it goes on
    done = runner_here("run", "tiny.toml", "--set", "train.epochs=1", cwd=workdir)
    assert done.returncode == 0 and "resuming" in done.stdout, done.stdout[-3000:]
    assert "not resuming" not in done.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    with (workdir / "tweets.csv").open("a", encoding="utf-8") as f:
        f.write("meh,whatever\n")
    done = runner_here("run", "tiny.toml", "--resume", "--set", "train.epochs=1", cwd=workdir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert ("data.labels: ['NA', 'bad', 'good'] -> ['NA', 'bad', 'good', 'meh']" in message
            and "--fresh" in message), message


def test_an_inherited_latin1_does_not_garble_a_utf8_file(workdir):
    """A recipe extending one for a latin-1 file inherits its encoding; a UTF-8
    file is then refused, naming the setting that reads it anyway."""
    (workdir / "tweets.csv").write_text("sentiment,text\npositive,caf\u00e9\n"
                                        "negative,na\u00efve\n" * 10, encoding="utf-8")
    (workdir / "child.toml").write_text('extends = "tiny.toml"\n[data]\nsource = "tweets.csv"\n')
    done = runner_here("run", "child.toml", cwd=workdir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert ("tweets.csv: encoding is latin-1, but the file is valid UTF-8 with non-ASCII "
            "characters (line 2: 'positive,caf\u00e9', which latin-1 reads as "
            "'positive,caf\u00c3\u00a9')") in message
    assert 'write encoding = "latin-1!" to read it as latin-1 anyway' in message
    assert not (workdir / "runs").exists()
