"""What the reports say, through the real `runner` commands on one tiny
finished run: the majority-class baseline beside before and after (terminal,
report.md, eval.json, compare, eval), the hyperparameters, stops, resumes and
summed timings, the confusion matrix; tables that fit 80 columns; a loss
chart whose only eval points are before and after drawn as points."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_cli import TINY_RECIPE, _tweets_csv, runner_here

from jaxlora.tasks import classification_metrics, majority_baseline


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_bert_dir):
    """One finished tiny classification run, evaluated before and after only;
    the run's terminal output is kept beside it, in stdout.txt."""
    work = tmp_path_factory.mktemp("reports")
    shutil.copytree(tiny_bert_dir, work / "model")
    _tweets_csv(work / "tweets.csv")
    (work / "tiny.toml").write_text(TINY_RECIPE)
    done = runner_here("run", "tiny.toml", "--set", "train.max_steps=6", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    [folder] = list((work / "runs" / "tiny").iterdir())
    (work / "stdout.txt").write_text(done.stdout)
    return folder


@pytest.fixture()
def run_copy(run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", ".lock", "evals"))
    return copy


def test_majority_baseline_is_what_always_answering_the_top_label_scores():
    """The training rows' most frequent label, scored on the eval rows exactly
    as a classifier's predictions are (70% negative: accuracy 0.70)."""
    names = ["negative", "positive", "neutral"]
    found = majority_baseline({"negative": 70, "positive": 25, "neutral": 5},
                              {"negative": 7, "positive": 2, "neutral": 1}, names)
    labels = np.array([0] * 7 + [1] * 2 + [2])
    expected = classification_metrics(np.zeros(10, np.int64), labels, names)
    assert found["label"] == "negative" and found["accuracy"] == pytest.approx(0.7)
    assert found["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert found["per_class"]["negative"]["f1"] == pytest.approx(2 * 0.7 / 1.7)
    assert found["per_class"]["positive"]["f1"] == 0.0
    assert majority_baseline({"a": 0, "b": 0}, {"a": 1}, ["a", "b"]) is None


def _expected_baseline(manifest: dict) -> dict:
    counts = manifest["data"]["label_counts"]
    return majority_baseline(counts["train"], counts["eval"], manifest["data"]["label_names"])


def test_every_classification_report_has_the_majority_baseline(run, run_copy):
    manifest = json.loads((run / "manifest.json").read_text())
    evals = json.loads((run / "eval.json").read_text())
    expected = _expected_baseline(manifest)
    label = expected["label"]
    assert evals["baseline"] == expected  # eval.json records it
    counts = manifest["data"]["label_counts"]
    assert expected["accuracy"] == pytest.approx(counts["eval"][label] / 20)
    stdout = (run.parent.parent.parent / "stdout.txt").read_text()  # the run's own table
    assert "majority" in stdout and f"always answering '{label}'" in " ".join(stdout.split())
    report = (run / "report.md").read_text()
    assert "| metric | majority | before | after | change |" in report
    assert f"| accuracy | {expected['accuracy']:.3f} | {evals['before']['accuracy']:.3f} |" \
        in report
    assert f"Baseline: always answering '{label}', the most frequent label" in report
    # a run made before baselines were recorded: computed from its manifest
    evals.pop("baseline")
    (run_copy / "eval.json").write_text(json.dumps(evals))
    done = runner_here("report", str(run_copy), cwd=run_copy.parent)
    assert done.returncode == 0, done.stderr
    assert "| metric | majority | before | after | change |" in \
        (run_copy / "report.md").read_text()
    done = runner_here("compare", str(run_copy), "--markdown", cwd=run_copy.parent)
    assert done.returncode == 0, done.stderr
    header, _, row = done.stdout.splitlines()[:3]
    cells = dict(zip(header.split(" | "), row.split(" | ")))
    assert cells["accuracy majority"] == f"{expected['accuracy']:.3f}"
    assert cells["macro-F1 majority"] == f"{expected['macro_f1']:.3f}"


def test_the_report_says_the_hyperparameters_confusion_matrix_and_timings(run):
    report = (run / "report.md").read_text()
    assert ("hyperparameters: method `lora`; rank 4; alpha 16.0; targets `query`, `value`; "
            "learning rate 0.01 (linear, warmup 0.06); max 6 steps; batch 8") in report
    after = json.loads((run / "eval.json").read_text())["after"]
    assert "## Confusion matrix (after fine-tuning)" in report
    assert "| true \\ predicted | negative | positive |" in report
    for name, row in zip(["negative", "positive"], after["confusion"]):
        assert f"| {name} | {row[0]} | {row[1]} |" in report
    timings = json.loads((run / "manifest.json").read_text())["timings"]
    assert timings["sessions"] == 1 and timings["eval_seconds"] > 0
    assert timings["wall_seconds"] > timings["train_seconds"] + timings["eval_seconds"] > 0
    assert f"wall {timings['wall_seconds']:.1f} s" in report
    assert f"eval {timings['eval_seconds']:.1f} s" in report


def test_lora_variants_show_once_and_tag_the_card_hub_safe():
    """Each variant once in the hyperparameters line (the init among them, no
    separate `init` part), and as a hub tag of letters, digits and dashes."""
    from runner.model_card import front_matter
    from runner.report import hyperparameters

    recipe = {"model": {"source": "model", "task": "classification"}, "data": {},
              "adapter": {"method": "lora", "rank": 4, "alpha": 8.0, "scaling": "rslora",
                          "init": "gaussian"},
              "train": {"learning_rate": 0.01, "schedule": "constant", "warmup_ratio": 0.0,
                        "max_steps": 6, "batch_size": 8}}
    line = hyperparameters(recipe)
    assert line.startswith("method `lora (rsLoRA, gaussian init)`; rank 4; alpha 8.0")
    assert line.count("gaussian") == 1
    recipe["adapter"]["init"] = "pissa"
    assert hyperparameters(recipe).lower().count("pissa") == 1
    recipe["adapter"]["init"] = "gaussian"
    fields = front_matter({"recipe": recipe, "model": {"source": "/nonexistent"}}, "peft")
    assert fields["tags"] == ["jaxlora", "lora", "rslora", "gaussian-init", "peft"]


def test_a_resumed_run_reports_its_stop_its_resume_and_summed_times(run_copy):
    """From the manifest: the interruption, each resume, and the timings of
    every session added up (`Session.record_timings` adds this session's)."""
    from types import SimpleNamespace

    from runner.session import Session

    manifest = json.loads((run_copy / "manifest.json").read_text())
    first = dict(manifest["timings"])
    manifest["train"]["train_seconds"] = first["train_seconds"] + 4.0  # fit counts it all
    session = SimpleNamespace(manifest=manifest, _earlier=first, _clock={
        "started": 0.0, "eval": 2.0, "compile": 3.0})
    Session.record_timings(session)  # a second session, up to now
    timings = manifest["timings"]
    assert timings["sessions"] == 2
    for key, mine in (("eval_seconds", 2.0), ("compile_seconds", 3.0),
                      ("train_seconds", 4.0)):
        assert timings[key] == pytest.approx(first[key] + mine, abs=1e-3)
    assert timings["wall_seconds"] > first["wall_seconds"]
    manifest["interrupted"] = {"signal": "SIGTERM", "at": "2026-12-06T10:00:00+00:00",
                               "checkpoint_step": 4}
    manifest["resumed"] = [{"from_step": 4, "at": "2026-12-06T10:05:00+00:00"}]
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    done = runner_here("report", str(run_copy), cwd=run_copy.parent)
    assert done.returncode == 0, done.stderr
    report = (run_copy / "report.md").read_text()
    assert "- interrupted by SIGTERM at 2026-12-06T10:00:00+00:00 (checkpoint at step 4)" \
        in report
    assert "- resumed from step 4 at 2026-12-06T10:05:00+00:00" in report
    assert (f"time (summed over 2 sessions): wall {timings['wall_seconds']:.1f} s, train "
            f"{timings['train_seconds']:.1f} s, compile {timings['compile_seconds']:.1f} s, "
            f"eval {timings['eval_seconds']:.1f} s") in report


def _fits_80(text: str, *paths: str) -> None:
    """No line over 80 columns but one naming a path longer than that whole
    (the terminal wraps it; rich would cut it)."""
    lines = text.splitlines()
    assert lines, text
    for line in lines:
        assert len(line) <= 80 or any(p in line and len(p) > 60 for p in paths), line


def test_compare_and_eval_fit_an_80_column_terminal(run, run_copy, monkeypatch):
    """Wide tables turn to fit: no line over 80 columns, no run name or
    figure cut mid-word, the data path of `eval` whole on its own line."""
    monkeypatch.setenv("COLUMNS", "80")
    done = runner_here("compare", str(run), str(run_copy), cwd=run_copy.parent)
    assert done.returncode == 0, done.stderr
    _fits_80(done.stdout)
    evals = json.loads((run / "eval.json").read_text())
    words = done.stdout.split()
    for name in (f"tiny/{run.name}", "tiny/run", f"{evals['after']['accuracy']:.3f}",
                 f"{evals['before']['macro_f1']:.3f}", f"{evals['baseline']['accuracy']:.3f}"):
        assert name in words, name
    assert "majority" in done.stdout
    done = runner_here("eval", str(run), cwd=run.parent)
    assert done.returncode == 0, done.stderr
    [written] = list((run / "evals").iterdir())
    _fits_80(done.stdout, str(written))
    assert str(written) in done.stdout.splitlines()  # too long to fit: on a line of its own
    source = json.loads((run / "manifest.json").read_text())["data"]["source"]
    assert "data (the recipe's eval split):" in done.stdout
    assert any(line.endswith(source) for line in done.stdout.splitlines())  # whole
    assert "tiny at step 6: 20 examples" in done.stdout and "majority" in done.stdout
    result = json.loads(written.read_text())
    assert result["baseline"] == evals["baseline"]  # the same rows, the same baseline


def test_a_loss_chart_with_only_before_and_after_draws_points(run_copy, monkeypatch):
    """Two eval points (before, after) are markers with no line between them;
    evaluations during training make a line."""
    import matplotlib.axes

    from runner.charts import eval_style

    drawn = []
    plot = matplotlib.axes.Axes.plot

    def recording(self, *args, **kwargs):
        drawn.append(kwargs)
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    done = runner_here("report", str(run_copy), cwd=run_copy.parent)
    assert done.returncode == 0, done.stderr
    [evals] = [k for k in drawn if k.get("label") == "eval loss"]
    assert evals["linestyle"] == "none" and evals["marker"] == "o"
    assert eval_style([(0, 1.0), (3, 0.8), (6, 0.5)])["linestyle"] == "-"


def test_generate_shows_the_prompt_and_the_completion_apart():
    """Each under its own heading; an empty completion says the model stopped at once."""
    import io

    from rich.console import Console

    from runner.commands.generate import show

    out = io.StringIO()
    console = Console(file=out, width=80)
    show({"prompt": "what is the dog ?", "completion": " a dog", "tokens": 3,
          "stopped_at_eos": False}, console)
    show({"prompt": "say nothing", "completion": "", "tokens": 1, "stopped_at_eos": True},
         console, 2)
    lines = out.getvalue().splitlines()
    assert lines[:4] == ["prompt:", "what is the dog ?", "completion (3 tokens):", " a dog"]
    assert lines[4:7] == ["prompt 2:", "say nothing",
                          "completion 2 (1 tokens, then an end-of-sequence token):"]
    assert "(empty: the model stopped at once" in lines[7]


def test_the_tensorboard_extra_brings_tensorboard():
    """`pip install -e '.[tensorboard]'` gives the `tensorboard` command the
    README's `tensorboard --logdir runs/` needs (tensorboardX only writes)."""
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml")
                            .read_text())["project"]
    extra = project["optional-dependencies"]["tensorboard"]
    assert any(dep.split(">")[0].split("=")[0].strip() == "tensorboard" for dep in extra)
