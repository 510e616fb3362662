"""`runner report` and `runner compare` on a damaged or hand-edited run folder:
one message naming the file and the key (or line), exit 2, no traceback, and
the charts and report.md already there left as they were."""

import json
import shutil
from pathlib import Path

import pytest
from test_cli import TINY_RECIPE, _tweets_csv, runner_here

from runner import run_folder

KEPT = ("loss.png", "before_after.png", "report.md")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert_dir) -> Path:
    """One finished tiny classification run (eval records in metrics.jsonl too)."""
    work = tmp_path_factory.mktemp("damaged")
    shutil.copytree(tiny_bert_dir, work / "model")
    _tweets_csv(work / "tweets.csv")
    (work / "tiny.toml").write_text(TINY_RECIPE)
    done = runner_here("run", "tiny.toml", "--set", "train.max_steps=6",
                       "--set", "eval.every_steps=4", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = list((work / "runs" / "tiny").iterdir())
    for name in KEPT + ("metrics.jsonl", "eval.json", "manifest.json"):
        assert (run / name).is_file(), name
    return run


@pytest.fixture()
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    return copy


def _edit_json(name: str, change):
    def edit(run: Path) -> None:
        data = json.loads((run / name).read_text())
        change(data)
        (run / name).write_text(json.dumps(data))
    return edit


def _metrics_lines(run: Path) -> list[bytes]:
    return (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)


def _first_line_42(run: Path) -> None:
    (run / "metrics.jsonl").write_bytes(b"42\n" + (run / "metrics.jsonl").read_bytes())


def _xff_in_line_2(run: Path) -> None:
    lines = _metrics_lines(run)
    lines[1] = lines[1].replace(b'"loss"', b'"lo\xffss"', 1)
    (run / "metrics.jsonl").write_bytes(b"".join(lines))


def _cut_mid_line_3(run: Path) -> None:
    lines = _metrics_lines(run)
    assert len(lines) >= 4
    cut = b"".join(lines[:2]) + lines[2][:len(lines[2]) // 2]
    (run / "metrics.jsonl").write_bytes(cut)


def _after_strings(evals: dict) -> None:
    evals["after"] = {k: str(v) for k, v in evals["after"].items()}


# case: (edit of the run folder, file named, what the message says after "FILE: ")
REPORT_CASES = {
    "metrics first line 42": (_first_line_42, "metrics.jsonl",
                              "line 1: expected a JSON object (found 42)"),
    "metrics not utf-8": (_xff_in_line_2, "metrics.jsonl", "line 2: not UTF-8 text"),
    "metrics missing": (lambda run: (run / "metrics.jsonl").unlink(), "metrics.jsonl",
                        "missing"),
    "metrics cut mid-file": (_cut_mid_line_3, "metrics.jsonl", "line 3: cannot read it as JSON"),
    "metrics step a string": (
        lambda run: (run / "metrics.jsonl").write_text('{"step": "2", "loss": 0.5}\n'),
        "metrics.jsonl", 'line 1: step: expected a number (found "2")'),
    "metrics eval not an object": (
        lambda run: (run / "metrics.jsonl").write_text('{"step": 2, "eval": 0.5}\n'),
        "metrics.jsonl", "line 1: eval: expected an object (found 0.5)"),
}
BOTH_CASES = {
    "eval after a list": (_edit_json("eval.json", lambda e: e.update(after=[1, 2])),
                          "eval.json", "after: expected an object (found [1, 2])"),
    "eval after strings": (_edit_json("eval.json", _after_strings), "eval.json", "after."),
    "eval before a string": (_edit_json("eval.json", lambda e: e.update(before="x")),
                             "eval.json", 'before: expected an object or null (found "x")'),
    "manifest train 5": (_edit_json("manifest.json", lambda m: m.update(train=5)),
                         "manifest.json", "train: expected an object (found 5)"),
    "manifest model oops": (_edit_json("manifest.json", lambda m: m.update(model="oops")),
                            "manifest.json", 'model: expected an object (found "oops")'),
    "manifest recipe name missing": (
        _edit_json("manifest.json", lambda m: m["recipe"].pop("name")),
        "manifest.json", "recipe.name: missing"),
    "eval lacks after": (_edit_json("eval.json", lambda e: e.pop("after")), "eval.json",
                         'no "after" evaluation'),
}
REPORT_ONLY_CASES = {  # what report.md reads and the comparison table does not
    "eval per-class f1 a string": (
        _edit_json("eval.json", lambda e: e["after"]["per_class"]["negative"].update(f1="hi")),
        "eval.json", 'after.per_class.negative.f1: expected a number (found "hi")'),
    "manifest steps a string": (
        _edit_json("manifest.json", lambda m: m["train"].update(steps="6")),
        "manifest.json", 'train.steps: expected a number (found "6")'),
    "manifest total params 0": (
        _edit_json("manifest.json", lambda m: m["model"].update(total_params=0)),
        "manifest.json", "model.total_params: expected a positive number"),
    "manifest devices not strings": (
        _edit_json("manifest.json", lambda m: m["environment"].update(devices=[1])),
        "manifest.json", "environment.devices: expected a list of strings"),
}


def _assert_refused(done, run: Path, name: str, words: str) -> None:
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().startswith("error:")
    assert f"{run / name}: {words}" in done.stderr, done.stderr
    assert "not finish" not in done.stderr  # D8: the run did finish; a file is damaged


@pytest.mark.parametrize("case", [*REPORT_CASES, *BOTH_CASES, *REPORT_ONLY_CASES])
def test_report_refuses_a_damaged_run_folder_and_keeps_its_files(run_copy, case):
    edit, name, words = {**REPORT_CASES, **BOTH_CASES, **REPORT_ONLY_CASES}[case]
    kept = {file: (run_copy / file).read_bytes() for file in KEPT}
    edit(run_copy)
    done = runner_here("report", str(run_copy), cwd=run_copy.parent)
    _assert_refused(done, run_copy, name, words)
    for file, content in kept.items():
        assert (run_copy / file).read_bytes() == content, f"{file} was rewritten"
    assert not list(run_copy.glob("*.tmp"))


@pytest.mark.parametrize("case", list(BOTH_CASES))
def test_compare_refuses_a_damaged_run_folder(finished_run, run_copy, case):
    edit, name, words = BOTH_CASES[case]
    edit(run_copy)
    done = runner_here("compare", str(finished_run), str(run_copy), cwd=run_copy.parent)
    _assert_refused(done, run_copy, name, words)


def test_a_run_that_did_not_finish_gets_a_partial_report_and_compare_skips_it(
        finished_run, run_copy):
    """An interrupted run (no "after" yet, no training figures): `runner report`
    draws what it has and says the report is partial; `runner compare` skips
    it with one line beside the finished run, and refuses when none finished."""
    def interrupted(m):
        m.update(status="interrupted", interrupted={"signal": "SIGTERM", "at": "2026-12-06",
                                                    "checkpoint_step": 4})
        m["train"] = {"total_steps": 6}
    _edit_json("manifest.json", interrupted)(run_copy)
    _edit_json("eval.json", lambda e: e.pop("after"))(run_copy)
    (run_copy / "report.md").unlink()
    done = runner_here("report", str(run_copy), cwd=run_copy.parent)
    assert done.returncode == 0, done.stderr
    report = (run_copy / "report.md").read_text()
    assert report.startswith("# tiny (partial)") and "**Partial report**: the run is " \
        "interrupted" in report
    assert "metrics logged up to step 6" in report and "interrupted by SIGTERM" in report
    assert "| accuracy |" in report and "Partial report" in done.stdout
    done = runner_here("compare", str(finished_run), str(run_copy), "--markdown",
                       cwd=run_copy.parent)
    assert done.returncode == 0, done.stderr
    assert f"skipped {run_copy}: the run did not finish (status 'interrupted')" in \
        " ".join(done.stderr.split())
    assert [line.split(" | ")[0] for line in done.stdout.splitlines()
            if line.startswith("| tiny/")] == [f"| tiny/{finished_run.name}"]
    done = runner_here("compare", str(run_copy), cwd=run_copy.parent)
    assert done.returncode == 2 and "no finished run to compare" in done.stderr
    assert "did not finish" in done.stderr and "'interrupted'" in done.stderr


def test_report_and_compare_of_the_whole_run_still_work(run_copy):
    kept = (run_copy / "loss.png").read_bytes()
    (run_copy / "loss.png").unlink()
    done = runner_here("report", str(run_copy), cwd=run_copy.parent)
    assert done.returncode == 0, done.stderr
    assert "Before and after" in done.stdout and "train loss" in done.stdout
    assert (run_copy / "loss.png").read_bytes() == kept  # drawn again, the same
    done = runner_here("compare", str(run_copy), "--markdown", cwd=run_copy.parent)
    assert done.returncode == 0, done.stderr
    assert "| tiny/run | lora |" in done.stdout
    # a run without "before" (eval.before = false) is whole too
    _edit_json("eval.json", lambda e: e.update(before=None))(run_copy)
    for command in ("report", "compare"):
        done = runner_here(command, str(run_copy), cwd=run_copy.parent)
        assert done.returncode == 0, done.stderr


def test_a_run_in_progress_reads_its_metrics_up_to_a_cut_line(run_copy):
    """The tolerant read (a run's own end, after a resume): up to the first
    unreadable line, never an error."""
    whole = run_folder.read_metrics(run_copy, whole=True)
    lines = _metrics_lines(run_copy)
    (run_copy / "metrics.jsonl").write_bytes(b"".join(lines[:2]) + b'{"step": 9, "lo\xff')
    assert run_folder.read_metrics(run_copy) == whole[:2]
    (run_copy / "metrics.jsonl").unlink()
    assert run_folder.read_metrics(run_copy) == []


# A hand-edited manifest, read by the commands that open a run's model: one
# message naming the key (runner.manifest.TO_REOPEN), not a traceback.
OPENED_CASES = {
    "train 5": (lambda m: m.update(train=5), "train: expected an object (found 5)"),
    "data 5": (lambda m: m.update(data=5), "data: expected an object (found 5)"),
    "model oops": (lambda m: m.update(model="oops"), "model: expected an object"),
    "fingerprint 5": (lambda m: m["model"].update(fingerprint=5),
                      "model.fingerprint: expected a string or null (found 5)"),
    "base_dir 5": (lambda m: m.update(base_dir=5), "base_dir: expected a string (found 5)"),
    "recipe x": (lambda m: m.update(recipe="x"), "recipe: expected an object"),
    "resumed 5": (lambda m: m.update(resumed=[5]), "resumed: expected a list of objects"),
    "environment 5": (lambda m: m.update(environment=5), "environment: expected an object"),
}


@pytest.mark.parametrize("case", list(OPENED_CASES))
@pytest.mark.parametrize("command", [["eval"], ["export", "--format", "peft"],
                                     ["predict", "so happy"]])
def test_commands_that_open_a_run_refuse_a_hand_edited_manifest(run_copy, case, command):
    change, words = OPENED_CASES[case]
    _edit_json("manifest.json", change)(run_copy)
    before = (run_copy / "manifest.json").read_bytes()
    done = runner_here(command[0], str(run_copy), *command[1:], cwd=run_copy.parent)
    _assert_refused(done, run_copy, "manifest.json", words)
    assert (run_copy / "manifest.json").read_bytes() == before
