"""`runner sweep`: a grid of recipe variations on the tiny BERT, run one
point after another as ordinary run folders, capped by --max, resumed where
it stopped (after a real SIGTERM, each point then equal to the points of a
sweep never stopped), compared in sweep.md (and again by `runner compare
SWEEP_DIR`); bad values refused before anything is written; the planning
(top-level commas, points, merged recipes, dropped fields), the table
(stars and dominance as shown), the chart and the stops (signals passed on
to a stand-in child, the messages) alone."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jaxlora.errors import UserError
from runner import charts, tables
from runner.commands import sweep as sweep_command
from runner.signals import Interrupted, StopSignals
from runner.sweep import (COSTS, SCORES, SIZES, comparison_table, dominates, figures,
                          open_folder, plan, score_axis, split_top_level)
from test_chat import CHAT_RECIPE
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
        assert "os.fork()" not in result.stderr  # JAX's warning: the sweep started no backend
    [sweep] = (workdir / "runs").iterdir()
    return workdir, sweep, done


def _a_grid_runs_each_point_once_capped_by_max_and_compared(swept, monkeypatch):
    """--max 3 runs 3 points, the same command the 4th, once more none; the
    table's rows, stars and dominance; compare SWEEP_DIR writes it again."""
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
    # the command that runs the whole sweep, as given last (--max left out)
    assert "`runner sweep tiny.toml --set adapter.rank=4,8 --set train.seed=1,2`" in text
    rows = _table(text)
    assert [row["point"] for row in rows] == NAMES
    assert [(row["rank"], row["seed"]) for row in rows] == [("4", "1"), ("4", "2"),
                                                             ("8", "1"), ("8", "2")]
    # the seed draws each point's new head: "before" differs, the majority class not
    assert re.search(r"before fine-tuning \(the base model\), per point: #1 accuracy "
                     r"0\.\d{3}, macro-F1 0\.\d{3}; #2 accuracy", text)
    assert "majority class (its most frequent training label), the same for every point: " \
           "accuracy 0.400, macro-F1 0.286" in text
    assert "**dominated** when another point is no worse on every score" in " ".join(
        text.split())
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
    # every line fits, but a path, printed whole on a line of its own (print_path)
    wide = [line for line in compared.stdout.splitlines()
            if len(line) > 80 and line != str(sweep / "sweep.md")]
    assert not wide, compared.stdout
    assert all(name in compared.stdout for name in NAMES)  # the table, transposed to fit
    assert (sweep / "sweep.md").read_text() == text and (sweep / "sweep.png").is_file()
    # --markdown: the table alone on stdout, the notes on stderr (the same
    # test as the grid's, so that pytest-xdist runs the grid once)
    markdown = _runner("compare", str(sweep), "--markdown", cwd=workdir)
    out = markdown.stdout.strip()
    assert out and all(line.startswith("|") for line in out.splitlines())
    assert "sweep.md:" in markdown.stderr and "majority class" in markdown.stderr
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


def _sigterm_mid_point_then_the_same_command_finishes_equal_to_a_sweep_never_stopped(
        swept):
    """A real SIGTERM in the middle of point 2, then the same command: every
    point equal, bit for bit, to the grid's uninterrupted points."""
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


def test_a_grid_then_a_sigterm_mid_point(swept, monkeypatch):
    """The grid (capped, completed, given again, compared) and a sweep stopped
    mid-point then finished equal to it: one test, since both read the grid
    fixture and pytest-xdist would otherwise build it on each worker."""
    _a_grid_runs_each_point_once_capped_by_max_and_compared(swept, monkeypatch)
    _sigterm_mid_point_then_the_same_command_finishes_equal_to_a_sweep_never_stopped(swept)


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


def test_every_point_drops_what_its_own_method_does_not_take(recipe_dir):
    """Whatever the file's method and whoever set the field (the file, the
    grid): a full point drops rank and LoRA+'s lr_ratio_b, a lora point the
    quant table; what a --point's own text sets is refused instead."""
    full_file = TINY_RECIPE.replace('method = "lora"\nrank = 4\ntargets = ["query", "value"]',
                                    'method = "full"')
    (recipe_dir / "full.toml").write_text(full_file)
    planned = plan(recipe_dir / "full.toml", recipe_dir,
                   ["adapter.method=full,lora", "adapter.rank=4,16"], [])
    assert [p.name for p in planned.points] == ["method=full", "method=lora rank=4",
                                                "method=lora rank=16"]
    assert 'adapter.method = "full" takes no adapter.rank: left out of its points' in \
        planned.notes

    planned = plan(recipe_dir / "tiny.toml", recipe_dir,
                   ["adapter.method=qlora,lora", "adapter.quant.block_size=32,64"], [])
    assert [(p.recipe.adapter.method, getattr(p.recipe.adapter, "quant", None))
            for p in planned.points][2] == ("lora", None)
    assert [p.recipe.adapter.quant.block_size for p in planned.points[:2]] == [32, 64]
    assert len(planned.points) == 3  # the two lora points are one

    (recipe_dir / "plus.toml").write_text('extends = "tiny.toml"\n[train]\nlr_ratio_b = 16.0\n')
    planned = plan(recipe_dir / "plus.toml", recipe_dir, ["adapter.method=lora,full"], [])
    assert [p.recipe.train.lr_ratio_b for p in planned.points] == [16.0, None]
    assert any("train.lr_ratio_b" in note for note in planned.notes)

    with pytest.raises(UserError, match=r"point 1 of 1 .*adapter\.rank"):
        plan(recipe_dir / "tiny.toml", recipe_dir, [],
             ['x: adapter.method="full" adapter.rank=4'])


def test_a_chat_template_file_beside_the_recipe_is_read_from_the_sweep_folder(tmp_path):
    (tmp_path / "chat.toml").write_text(CHAT_RECIPE.format(
        data="rows.jsonl", columns='chat = true\nchat_template = "tmpl.jinja"'))
    (tmp_path / "tmpl.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    [point] = plan(tmp_path / "chat.toml", tmp_path, [], []).points
    assert point.recipe.data.chat_template == str(tmp_path / "tmpl.jinja")
    inline = "{{ messages[0].content }}"
    [point] = plan(tmp_path / "chat.toml", tmp_path, [f"data.chat_template={inline!r}"],
                   []).points
    assert point.recipe.data.chat_template == inline  # the template's own text


def test_names_and_values_are_shown_as_written_never_as_markup_and_pipes_escaped():
    from rich.console import Console

    from runner.terminal import print_path

    name = "template=[INST] {prompt} [/INST] [bold]x|y"
    console = Console(record=True, width=200)
    console.print(tables.wide("sweep [x]", ["#", "point"], [["#1", name]]))
    console.print(tables.transposed(None, ["#", "point"], [["#1", name]]))
    print_path(console, f"[1/1] {name}: runner run", "/tmp/[bold]a.toml")
    said = console.export_text()
    assert said.count(name) == 3 and "/tmp/[bold]a.toml" in said and "sweep [x]" in said
    assert tables.markdown(["#", "point"], [["#1", name]]).splitlines()[2] == \
        r"| #1 | template=[INST] {prompt} [/INST] [bold]x\|y |"


def _row(number: int, **given) -> dict:
    blank = {key: None for key, *_ in SCORES + COSTS + SIZES}
    return {"number": number, "point": {"name": f"p{number}", "values": {}},
            "figures": {**blank, **given}}


def test_stars_and_dominance_judge_the_figures_as_shown_lower_perplexity_best():
    """Causal-LM rows: perplexity and exact match columns, the lowest
    perplexity starred; 3.0004 and 3.0001 both show as 3.000, so neither
    dominates the other; the point worse only in perplexity is dominated."""
    rows = [_row(1, perplexity=3.0004, exact_match=0.5, train_seconds=10.04,
                 peak_memory_mb=100.0),
            _row(2, perplexity=3.0001, exact_match=0.5, train_seconds=10.01,
                 peak_memory_mb=100.0),
            _row(3, perplexity=4.0, exact_match=0.5, train_seconds=10.0, peak_memory_mb=100.0)]
    names, cells, dominated_by = comparison_table(rows, [])
    assert "perplexity" in names and "exact match" in names and "accuracy" not in names
    column = dict(zip(names, zip(*cells)))
    assert column["perplexity"] == (f"3.000 {STAR}", f"3.000 {STAR}", "4.000")
    assert column["train s"] == (f"10.0 {STAR}",) * 3
    assert column["dominated by"] == ("-", "-", "#1, #2")
    assert dominated_by == [[], [], [1, 2]]
    assert score_axis(SCORES[2]) == "perplexity after fine-tuning (lower is better)"
    assert score_axis(SCORES[0]).endswith("(higher is better)")


def test_train_time_leaves_compilation_out_and_steps_per_second_follows(tmp_path):
    manifest = {"status": "finished", "train": {"steps": 20, "train_seconds": 7.0,
                                                "compile_seconds": 1.0, "median_step_ms": 50.0},
                "timings": {"sessions": 2, "train_seconds": 12.5, "compile_seconds": 2.5}}
    got = figures({"manifest": manifest, "eval": {"after": {"accuracy": 0.5}}, "dir": tmp_path})
    assert got["train_seconds"] == 10.0 and got["steps_per_second"] == 2.0


def test_the_chart_fits_any_number_of_points(tmp_path):
    import warnings

    dots = [charts.Dot(f"#{n}", 0.5 + n / 100, None if n % 5 == 0 else float(n), 100.0 + n,
                       n % 2 == 0) for n in range(1, 31)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns where the layout does not fit
        charts.write_sweep_png(tmp_path / "sweep.png", dots, score_axis(SCORES[0]))
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_folder_of_another_sweep_is_refused_naming_the_first_difference(recipe_dir,
                                                                          tmp_path):
    folder = tmp_path / "s"
    tiny = recipe_dir / "tiny.toml"
    open_folder(folder, plan(tiny, recipe_dir, ["train.seed=1,2"], []), "first")
    with pytest.raises(UserError, match=r"point 1 \(01-seed-1\): train\.learning_rate: "
                                        r"0\.01 there, 0\.5 here"):
        open_folder(folder, plan(tiny, recipe_dir, ["train.seed=1,2",
                                                    "train.learning_rate=0.5"], []), "x")
    with pytest.raises(UserError, match="point 1 is '01-seed-1' there, '01-seed-2' here"):
        open_folder(folder, plan(tiny, recipe_dir, ["train.seed=2,1"], []), "x")
    open_folder(folder, plan(tiny, recipe_dir, ["train.seed=1,2"], []), "last")
    assert json.loads((folder / "sweep.json").read_text())["command"] == "last"


# -- stops ----------------------------------------------------------------------------------

# A stand-in for a point's `runner run`: counts the SIGTERMs and SIGINTs it
# gets (into argv[1]), exits as a stop does at the count argv[2], and by
# itself after 3 s; argv[1] + ".ready" once its handlers are in place.
COUNTING_CHILD = '''
import signal, sys, time
path, needed, got = sys.argv[1], int(sys.argv[2]), []
def on(signum, frame):
    got.append(signum)
    open(path, "w").write(str(len(got)))
    if len(got) == needed:
        sys.exit(128 + signum)
signal.signal(signal.SIGTERM, on)
signal.signal(signal.SIGINT, on)
open(path + ".ready", "w").close()
end = time.monotonic() + 3
while time.monotonic() < end:
    time.sleep(0.01)
'''


def _counting_child(tmp_path: Path, needed: int) -> list[str]:
    return [sys.executable, "-c", COUNTING_CHILD, str(tmp_path / "count"), str(needed)]


def _ready(tmp_path: Path) -> None:
    ready = tmp_path / "count.ready"
    for _ in range(500):
        if ready.exists():
            return
        time.sleep(0.01)
    raise AssertionError("the child never started")


def _signals_after_popen(monkeypatch, tmp_path: Path, then) -> None:
    """Popen, as the sweep calls it, then `then()` once the child is ready."""
    real = subprocess.Popen

    def popen(*args, **kwargs):
        child = real(*args, **kwargs)
        _ready(tmp_path)
        then()
        return child
    monkeypatch.setattr(sweep_command.subprocess, "Popen", popen)


def test_a_signal_right_after_the_point_starts_is_passed_on(monkeypatch, tmp_path):
    _signals_after_popen(monkeypatch, tmp_path, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with StopSignals() as stop:
        code = sweep_command._child(_counting_child(tmp_path, 1), stop)
    assert code == 128 + signal.SIGTERM and stop.signum == signal.SIGTERM


def test_two_quick_signals_stop_the_point_at_once(monkeypatch, tmp_path):
    """Both come before the sweep looked (a long poll here): the child gets two."""
    def twice():
        def send():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=send, daemon=True).start()
    _signals_after_popen(monkeypatch, tmp_path, twice)
    monkeypatch.setattr(sweep_command, "POLL_SECONDS", 1.0)
    with StopSignals() as stop, pytest.raises(Interrupted):
        sweep_command._child(_counting_child(tmp_path, 2), stop)
    assert (tmp_path / "count").read_text() == "2"


HANGUP_PARENT = '''
import sys
from runner.commands import sweep
from runner.signals import StopSignals
with StopSignals() as stop, sweep._hangup_stops():
    print(sweep._child(sys.argv[1:], stop), flush=True)
'''


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGKILL])
def test_a_hangup_or_the_sweeps_death_stops_the_point_with_sigterm(tmp_path, signum):
    """SIGHUP to the sweep is passed on as SIGTERM; a sweep killed outright
    leaves the point a SIGTERM (Linux's parent-death signal)."""
    parent = subprocess.Popen([sys.executable, "-c", HANGUP_PARENT,
                               *_counting_child(tmp_path, 1)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                  [str(Path(__file__).parents[1]),
                                   os.environ.get("PYTHONPATH", "")])))
    _ready(tmp_path)
    parent.send_signal(signum)
    out, _ = parent.communicate(timeout=30)
    for _ in range(300):  # the child's count, written as it gets the signal
        if (tmp_path / "count").exists():
            break
        time.sleep(0.01)
    assert (tmp_path / "count").read_text() == "1"
    if signum == signal.SIGHUP:
        assert out.strip() == str(128 + signal.SIGTERM)


class _Point:
    name, folder = "p", "01-p"


@pytest.mark.parametrize("code, finished, words", [
    (2, False, "during point 1 of 1 (p), which failed (exit 2); `again` runs it again"),
    (143, True, "point 1 of 1 (p) finished; `again` goes on with the next point"),
    (143, False, "during point 1 of 1 (p); `again` goes on: finished points are skipped, "
                 "this one resumes"),
])
def test_a_stop_says_what_the_same_command_does_with_the_point(monkeypatch, tmp_path, code,
                                                                finished, words):
    from rich.console import Console

    stop = StopSignals()
    stop.signum = signal.SIGTERM
    monkeypatch.setattr(sweep_command, "_child", lambda command, stop: code)
    answers = iter([False, finished])  # not before the point runs; after it, `finished`
    monkeypatch.setattr(sweep_command.sweeps, "finished", lambda folder, point: next(answers))
    with pytest.raises(Interrupted, match=re.escape(f"interrupted by SIGTERM {words}")):
        sweep_command._run_point(tmp_path, _Point, (1, 1), Console(), stop, "again")


def test_a_stop_names_the_points_that_failed_before_it(monkeypatch, tmp_path):
    from rich.console import Console

    outcomes = iter([["a (exit 2)"], Interrupted(signal.SIGTERM, "interrupted by SIGTERM "
                                                                 "during point 2 of 2 (b)")])

    def run_point(*_):
        outcome = next(outcomes)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
    monkeypatch.setattr(sweep_command, "_run_point", run_point)
    with pytest.raises(Interrupted, match=r"during point 2 of 2 \(b\); failed before the "
                                          r"stop: a \(exit 2\)"):
        sweep_command._run_points(tmp_path, [_Point, _Point], Console(), StopSignals(), "x")
