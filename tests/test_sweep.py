"""`runner sweep`: a grid of recipe variations on the tiny BERT, run one
point after another as ordinary run folders, capped by --max, resumed where
it stopped (after a real SIGTERM, each point then equal to the points of a
sweep never stopped), compared in sweep.md (and again by `runner compare
SWEEP_DIR`); bad values refused before anything is written; the planning
(top-level commas, points, merged recipes, dropped adapter fields) alone."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlora.errors import UserError
from runner.sweep import dominates, plan, split_top_level
from test_cli import TINY_RECIPE
from test_cli import runner_here as _runner
from test_resume import _loss_lines, _meta, _workdir

# 4 points: rank 4 (the suite's tiny runs' compiled step) and 8, each with
# seeds 1 and 2 (the same compiled steps again); 18 steps, a metrics line every 2
SWEEP = ("sweep", "tiny.toml", "--set", "adapter.rank=4,8", "--set", "train.seed=1,2")
NAMES = ["rank=4 seed=1", "rank=4 seed=2", "rank=8 seed=1", "rank=8 seed=2"]
STEPS = 18


def _folders(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir())


def _table(markdown: str) -> list[dict]:
    """The rows of sweep.md's table, by column name."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    names = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(names, (cell.strip() for cell in line.strip("|").split("|"))))
            for line in lines[1:]]


def _number(cell: str) -> float:
    return float(cell.replace(STAR, "").replace(",", "").split()[0])


STAR = "★"


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_bert_dir):
    """The 2x2 grid run with --max 3, then the same without --max, then
    once more: (the work folder, the sweep folder, the three results)."""
    workdir = _workdir(tmp_path_factory.mktemp("swept"), tiny_bert_dir, TINY_RECIPE)
    done = [_runner(*SWEEP, "--max", "3", cwd=workdir), _runner(*SWEEP, cwd=workdir),
            _runner(*SWEEP, cwd=workdir)]
    for result in done:
        assert result.returncode == 0, result.stderr[-3000:]
    [sweep] = (workdir / "runs").iterdir()
    return workdir, sweep, done


def test_a_grid_runs_each_point_once_capped_by_max_and_compared(swept, monkeypatch):
    workdir, sweep, (capped, rest, again) = swept
    assert re.fullmatch(r"tiny-sweep-[0-9a-f]{8}", sweep.name)  # the same folder each time
    assert "sweep: 3 of 4 points" in capped.stdout
    assert "--max 3: 1 more point(s) not run" in capped.stdout
    assert f"not in the table: #4 {NAMES[3]}: no run folder" in capped.stdout
    assert rest.stdout.count("finished already, skipped") == 3
    assert f"[4/4] {NAMES[3]}: runner run" in rest.stdout
    assert again.stdout.count("finished already, skipped") == 4
    assert "runner run" not in again.stdout
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    assert [p["name"] for p in points] == NAMES
    for point, folder in zip(points, _folders(sweep)):
        [run] = folder.iterdir()  # one run folder each: nothing ran twice
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "finished" and manifest["train"]["steps"] == STEPS
        assert manifest["recipe"]["adapter"]["rank"] == point["values"]["adapter.rank"]
        assert manifest["recipe"]["train"]["seed"] == point["values"]["train.seed"]
        assert manifest["recipe_hash"] == point["recipe_hash"]
        assert (sweep / f"{folder.name}.toml").is_file()
    assert (sweep / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = (sweep / "sweep.md").read_text()
    rows = _table(text)
    assert [row["point"] for row in rows] == NAMES
    assert [(row["rank"], row["seed"]) for row in rows] == [("4", "1"), ("4", "2"),
                                                             ("8", "1"), ("8", "2")]
    # the seed draws each point's new head: "before" differs, the majority class not
    assert re.search(r"before fine-tuning \(the base model\), per point: #1 accuracy "
                     r"0\.\d{3}, macro-F1 0\.\d{3}; #2 accuracy", text)
    assert "majority class (its most frequent training label), the same for every point: " \
           "accuracy 0.400, macro-F1 0.286" in text
    assert "**dominated** when another point is no worse on every score" in text
    # the stars mark each column's best; "dominated by" names points that are
    # no worse on scores and costs, and better on one
    for column, best in (("accuracy", max), ("macro-F1", max), ("train s", min),
                         ("peak MiB", min), ("steps/s", max), ("trainable", min)):
        values = [_number(row[column]) for row in rows]
        assert [STAR in row[column] for row in rows] == [v == best(values) for v in values]
    assert [_number(row["trainable"]) for row in rows] == [1090, 1090, 2114, 2114]
    for row in rows:
        for other in filter(None, row["dominated by"].strip("-").split(", ")):
            them = rows[int(other.strip("#")) - 1]
            assert all(_number(them[c]) >= _number(row[c]) for c in ("accuracy", "macro-F1"))
            assert all(_number(them[c]) <= _number(row[c]) for c in ("train s", "peak MiB"))
    assert "│ point" in again.stdout or "┃ point" in again.stdout  # the table, shown

    # runner compare SWEEP_DIR writes the same sweep.md again, from the run folders
    (sweep / "sweep.md").unlink()
    (sweep / "sweep.png").unlink()
    monkeypatch.setenv("COLUMNS", "80")
    compared = _runner("compare", str(sweep), cwd=workdir)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert all(len(line) <= 80 for line in compared.stdout.splitlines()), compared.stdout
    assert all(name in compared.stdout for name in NAMES)  # the table, transposed to fit
    assert (sweep / "sweep.md").read_text() == text and (sweep / "sweep.png").is_file()
    # a point's run folder is an ordinary one
    run = next(_folders(sweep)[0].iterdir())
    assert _runner("report", str(run), cwd=workdir).returncode == 0


# Test only: in the `runner run` of the point whose recipe file holds
# SWEEP_STOP_POINT, the first metrics line sends SIGTERM to the sweep (the
# parent) and waits until the sweep has passed it on: the stop falls
# mid-training however fast the steps are.
STOP_HOOK = '''
import os, signal, sys, time
point = os.environ.get("SWEEP_STOP_POINT")
if point and "run" in sys.argv and any(point in arg for arg in sys.argv):
    from runner import session
    log = session.Session.log
    def log_then_stop(self, record):
        log(self, record)
        if not getattr(log_then_stop, "sent", False):
            log_then_stop.sent = True
            os.kill(os.getppid(), signal.SIGTERM)
            end = time.monotonic() + 60
            while not self.stop.requested() and time.monotonic() < end:
                time.sleep(0.01)
    session.Session.log = log_then_stop
'''


def test_sigterm_mid_point_then_the_same_command_finishes_equal_to_a_sweep_never_stopped(
        swept):
    workdir, reference, _ = swept
    (workdir / "hook").mkdir()
    (workdir / "hook" / "sitecustomize.py").write_text(STOP_HOOK)
    command = (*SWEEP, "--max", "2", "--out", "stopped")
    env = dict(os.environ, SWEEP_STOP_POINT="02-",
               PYTHONPATH=os.pathsep.join([str(workdir / "hook"),
                                           os.environ.get("PYTHONPATH", "")]))
    stopped = subprocess.run([sys.executable, "-m", "runner.cli", *command], cwd=workdir,
                             env=env, capture_output=True, text=True, timeout=300)
    said = " ".join(stopped.stderr.split())
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert f"interrupted by SIGTERM during point 2 of 2 ({NAMES[1]})" in said
    assert f"`runner sweep tiny.toml {' '.join(command[2:])}` goes on" in said
    folders = _folders(workdir / "stopped")
    [run] = folders[1].iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert 0 < manifest["interrupted"]["checkpoint_step"] < STEPS  # stopped mid-training

    resumed = _runner(*command, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[1/2] {NAMES[0]}: finished already, skipped" in resumed.stdout
    assert [list(folder.iterdir()) for folder in folders] == [[next(folders[0].iterdir())],
                                                              [run]]  # went on in its folder
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["resumed"]) == 1
    for mine, theirs in zip(folders, _folders(reference)[:2]):
        [a], [b] = mine.iterdir(), theirs.iterdir()
        assert json.loads((a / "eval.json").read_text()) == json.loads(
            (b / "eval.json").read_text())
        assert _meta(a, STEPS)["sha256"] == _meta(b, STEPS)["sha256"]  # the final weights
        assert _loss_lines(a) == _loss_lines(b)


# -- refused before anything is written ------------------------------------------------


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    return _workdir(tmp_path_factory.mktemp("planned"), tiny_bert_dir, TINY_RECIPE)


@pytest.mark.parametrize("args, words", [
    (("--set", "adapter.rank=4,-1"), ["point 2 of 2 (adapter.rank=-1): adapter.rank:",
                                      "greater than 0 (got -1)"]),
    (("--set", "adapter.rank=4,16", "--set", "train.learning_rate=1e-3,big"),
     ["point 2 of 4 (adapter.rank=4 train.learning_rate=big): train.learning_rate: "
      'expected a number, got the string "big"']),
    (("--point", "a: adapter.rnak=4"), ["adapter.rnak: unknown key; did you mean 'rank'?"]),
    (("--set", "adapter.rank=4,,8"), ["an empty value in the list"]),
    (("--point", "x: adapter.rank=4", "--point", "x: adapter.rank=8"),
     ["two points are named 'x'"]),
])
def test_a_bad_value_is_refused_before_any_point_runs(recipe_dir, args, words):
    done = _runner("sweep", "tiny.toml", *args, cwd=recipe_dir)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert all(word in said for word in words), said
    assert not (recipe_dir / "runs").exists()  # no sweep folder


def test_a_point_that_fails_is_said_and_the_sweep_exits_1(recipe_dir, tmp_path):
    """The point's own `runner run` refuses its data (exit 2): the sweep says
    so, compares nothing (no point finished) and exits 1."""
    done = _runner("sweep", "tiny.toml", "--point", 'bad: data.source="missing.csv"',
                   "--out", str(tmp_path / "sweep"), cwd=recipe_dir)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "[1/1] bad: failed (exit 2); the sweep goes on" in done.stdout
    assert "failed: bad (exit 2); the same command runs them again" in done.stderr
    assert not (tmp_path / "sweep" / "sweep.md").exists()


# -- planning ------------------------------------------------------------------------------


def test_values_split_on_top_level_commas_only():
    assert split_top_level('["query","value"],all-linear') == ['["query","value"]',
                                                                "all-linear"]
    assert split_top_level('"a,b", \'c,d\' ,{x=1,y=[2,3]},5') == ['"a,b"', "'c,d'",
                                                                  "{x=1,y=[2,3]}", "5"]
    assert split_top_level(r'"say \"hi, there\"",x') == [r'"say \"hi, there\""', "x"]
    assert split_top_level("4") == ["4"]
    assert split_top_level(' a="x y"  b=[1, 2] ', None) == ['a="x y"', "b=[1, 2]"]


def test_points_with_equal_recipes_run_once_and_a_new_method_drops_what_it_does_not_take(
        recipe_dir):
    planned = plan(recipe_dir / "tiny.toml", recipe_dir,
                   ["adapter.method=lora,full", "adapter.rank=4,16"], [])
    assert [p.name for p in planned.points] == ["method=lora rank=4", "method=lora rank=16",
                                                "method=full"]
    full = planned.points[2]
    assert full.recipe.adapter.method == "full" and full.values == {"adapter.method": "full"}
    assert full.merged == ("adapter.method=full adapter.rank=16",)
    assert planned.notes[0] == ('adapter.method = "full" takes no adapter.rank, '
                                "adapter.targets: left out of its points")
    assert "is the same recipe as adapter.method=full adapter.rank=4: run once" in \
        planned.notes[1]
    assert full.recipe.model.source == str(recipe_dir / "model")  # read from any folder
    # the same command plans the same folder; another grid another
    again = plan(recipe_dir / "tiny.toml", recipe_dir,
                 ["adapter.method=lora,full", "adapter.rank=4,16"], [])
    other = plan(recipe_dir / "tiny.toml", recipe_dir, ["adapter.rank=4,16"], [])
    assert planned.default_folder() == again.default_folder() != other.default_folder()


def test_named_points_times_the_grid_and_quant_dropped_going_to_lora(recipe_dir):
    (recipe_dir / "q.toml").write_text('extends = "tiny.toml"\n[adapter]\nmethod = "qlora"\n'
                                       'quant = {type = "int4"}\n')
    planned = plan(recipe_dir / "q.toml", recipe_dir, ["adapter.rank=4,16", "train.epochs=1"],
                   ["QLoRA:", 'LoRA: adapter.method="lora"',
                    'adapter.targets=["query","value"] adapter.alpha=8'])
    assert [p.name for p in planned.points] == [
        "QLoRA rank=4", "QLoRA rank=16", "LoRA rank=4", "LoRA rank=16", "rank=4 alpha=8.0",
        "rank=16 alpha=8.0"]
    assert planned.notes == ['adapter.method = "lora" takes no adapter.quant: left out of '
                             "its points"]
    assert all(p.recipe.train.epochs == 1 for p in planned.points)  # one value: every point
    assert planned.points[2].recipe.adapter.method == "lora"
    assert planned.points[4].recipe.adapter.quant.type == "int4"
    with pytest.raises(UserError, match="'rank' is not FIELD=VALUE"):
        plan(recipe_dir / "q.toml", recipe_dir, [], ["x: rank"])


def test_a_point_is_dominated_only_by_one_no_worse_everywhere_and_better_somewhere():
    criteria = [("accuracy", "", "", max), ("perplexity", "", "", min),
                ("train_seconds", "", "", min)]
    a = {"accuracy": 0.9, "perplexity": 2.0, "train_seconds": 10}
    assert dominates(a, {**a, "train_seconds": 11}, criteria)
    assert dominates(a, {**a, "accuracy": 0.8}, criteria)
    assert not dominates(a, a, criteria)  # equal: better nowhere
    assert not dominates(a, {**a, "accuracy": 0.8, "train_seconds": 9}, criteria)  # a trade
    assert not dominates(a, {**a, "perplexity": None, "accuracy": 0.1}, criteria)
