"""Recipe validation: every shipped recipe is valid; each kind of mistake is one
message naming the file and the dotted field."""

from pathlib import Path

import pytest

from jaxlora.errors import UserError
from jaxlora.lora import FullConfig, LoraConfig, QLoraConfig
from runner.recipe import SHIPPED, load_recipe, recipe_hash, recipe_named, to_toml

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.toml"))

BASE = """
[model]
source = "some/model"
[data]
source = "data.csv"
labels = ["neg", "pos"]
eval_size = 10
"""


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate_and_round_trip(path, tmp_path):
    recipe = load_recipe(path)
    again = tmp_path / path.name
    again.write_text(to_toml(recipe))
    assert load_recipe(again) == recipe  # the resolved form is itself a valid recipe
    assert recipe_hash(load_recipe(again)) == recipe_hash(recipe)


def test_defaults_fill_in(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(BASE)
    recipe = load_recipe(f)
    assert recipe.name == "mine"
    assert isinstance(recipe.adapter, LoraConfig) and recipe.adapter.rank == 8
    assert recipe.train.batch_size == 32 and recipe.eval.before


def test_methods_full_and_qlora_slot_in(tmp_path):
    f = tmp_path / "full.toml"
    f.write_text(BASE + '[adapter]\nmethod = "full"\n')
    assert isinstance(load_recipe(f).adapter, FullConfig)
    f.write_text(BASE + '[adapter]\nmethod = "qlora"\nrank = 4\n')
    adapter = load_recipe(f).adapter
    assert isinstance(adapter, QLoraConfig) and adapter.rank == 4
    assert adapter.quant.type == "nf4" and adapter.quant.use_double_quant


@pytest.mark.parametrize("extra, expected", [
    ('[adapter]\nrank = "eight"\n', 'adapter.rank: expected an integer, got the string "eight"'),
    ('[adapter]\nrank = "8"\n',
     'adapter.rank: expected an integer, got the string "8"; write it without quotes: 8'),
    ('[adapter]\nalpha = "16.0"\n', 'adapter.alpha: expected a number, got the string "16.0"'),
    ('[train]\nepochs = 2.0\n', "train.epochs: expected an integer, got the number 2.0"),
    ('[eval]\nbefore = 1\n', "eval.before: expected true or false, got the number 1"),
    ('[adapter]\nrank = -1\n', "adapter.rank: Input should be greater than 0 (got -1)"),
    ('[adapter]\nrnak = 8\n', "adapter.rnak: unknown key; did you mean 'rank'?"),
    ('[train]\nlearnig_rate = 1e-3\n', "train.learnig_rate: unknown key; did you mean 'learning_rate'?"),
    ('[adapter]\nmethod = "lorax"\n', "adapter.method: unknown method 'lorax'"),
    ('[adapter]\ntargets = []\n', "adapter.targets: must list at least one layer name"),
    ('[train]\nbatch_size = 0\n', "train.batch_size: Input should be greater than 0"),
    ('[eval]\nbefore = "maybe"\n', 'eval.before: expected true or false, got the string "maybe"'),
    ('[outptu]\ndir = "x"\n', "outptu: unknown key; did you mean 'output'?"),
    ('[adapter]\nmethod = "qlora"\n[adapter.quant]\ntype = "nf3"\n',
     "adapter.quant.type: Input should be 'nf4' or 'int4'"),
    ('[adapter]\nmethod = "qlora"\n[adapter.quant]\nblocksize = 32\n',
     "adapter.quant.blocksize: unknown key; did you mean 'block_size'?"),
    ('[adapter]\nmethod = "qlora"\n[adapter.quant]\nblock_size = 33\n',
     "adapter.quant.block_size: must be even"),
    ('[adapter]\nmethod = "full"\nrank = 8\n', 'adapter.rank: only for method "lora" or "qlora"'),
    ('[adapter]\nmethod = "lora"\n[adapter.quant]\ntype = "nf4"\n',
     'adapter.quant: only for method "qlora"'),
    ('[train]\nseed = 99999999999999999999\n',
     "train.seed: Input should be less than or equal to 4294967295"),
])
def test_bad_fields_are_named(tmp_path, extra, expected):
    f = tmp_path / "bad.toml"
    f.write_text(BASE + extra)
    with pytest.raises(UserError) as e:
        load_recipe(f)
    assert str(e.value).startswith(f"{f}: ")
    assert expected in str(e.value)


def test_missing_section_and_field(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[data]\nsource = "d.csv"\neval_size = 3\n')
    message = str(pytest.raises(UserError, load_recipe, f).value)
    assert f"{f}: model: required, but missing" in message
    assert "data.labels" not in message  # a classifier without labels infers them


def test_not_toml_and_missing_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[model\nsource = 1")
    assert "not valid TOML" in str(pytest.raises(UserError, load_recipe, f).value)
    assert "recipe file not found" in str(
        pytest.raises(UserError, load_recipe, tmp_path / "none.toml").value)


def test_hash_changes_with_any_field(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('name = "x"\n' + BASE)
    b.write_text('name = "x"\n' + BASE + "[train]\nlearning_rate = 1e-3\n")
    assert recipe_hash(load_recipe(a)) != recipe_hash(load_recipe(b))


def _chain(tmp_path):
    (tmp_path / "base.toml").write_text(BASE + "[adapter]\nrank = 8\ntargets = [\"query\", \"value\"]\n"
                                        "[train]\nlearning_rate = 1e-3\n")
    (tmp_path / "mid.toml").write_text('extends = "base.toml"\n[adapter]\nrank = 16\n')
    (tmp_path / "child.toml").write_text('extends = "mid.toml"\n[train]\nepochs = 2\n')
    return tmp_path / "child.toml"


def test_extends_chains_with_a_deep_merge_and_records_provenance(tmp_path):
    from runner.recipe import load_with_provenance, provenance_rows

    recipe, provenance = load_with_provenance(_chain(tmp_path))
    assert recipe.name == "child" and recipe.adapter.rank == 16
    assert recipe.adapter.targets == ["query", "value"] and recipe.train.learning_rate == 1e-3
    assert recipe.train.epochs == 2 and recipe.data.labels == ["neg", "pos"]
    where = {field: source for field, _, source in provenance_rows(recipe, provenance)}
    assert where["adapter.rank"].endswith("mid.toml")
    assert where["adapter.targets"].endswith("base.toml")
    assert where["train.epochs"].endswith("child.toml")
    assert where["train.batch_size"] == "default" and where["name"] == "the file name"


def test_set_overrides_are_validated_like_the_file(tmp_path):
    from runner.recipe import load_with_provenance

    child = _chain(tmp_path)
    recipe, provenance = load_with_provenance(
        child, ["train.learning_rate=3e-4", 'adapter.targets=["query"]', "description=hello"])
    assert recipe.train.learning_rate == 3e-4 and recipe.adapter.targets == ["query"]
    assert recipe.description == "hello" and provenance["train.learning_rate"] == "--set"
    for bad, expected in [("adapter.rank=-1", "adapter.rank"), ("train.learnin_rate=1", "did you mean"),
                          ("nonsense", "expected FIELD=VALUE"),
                          ("model.source.x=1", "is a value, not a table")]:
        with pytest.raises(UserError, match=expected):
            load_recipe(child, [bad])
    # a bad value names where it was given: --set, or the file of the chain that set it
    with pytest.raises(UserError, match=r"^--set: adapter\.rank: "):
        load_recipe(child, ["adapter.rank=-1"])
    with pytest.raises(UserError, match=r"mid\.toml: adapter\.rank: "):
        (tmp_path / "mid.toml").write_text('extends = "base.toml"\n[adapter]\nrank = 0\n')
        load_recipe(child)


def test_a_byte_order_mark_is_no_error(tmp_path):
    (tmp_path / "windows.toml").write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_recipe(tmp_path / "windows.toml").data.labels == ["neg", "pos"]


def test_a_parents_relative_sources_are_read_from_its_own_folder(tmp_path):
    """A path in a parent recipe means what it meant there, however deep the
    chain; hub ids and paths that are not beside the parent stay as written."""
    from jaxlora.sources import resolve

    deep = tmp_path / "shared" / "bert"
    (deep / "model").mkdir(parents=True)
    (deep / "train.csv").write_text("text,label\n")
    (deep / "base.toml").write_text(BASE.replace('"some/model"', '"model"')
                                    .replace('"data.csv"', '"./train.csv"'))
    (tmp_path / "shared" / "mid.toml").write_text('extends = "bert/base.toml"\n')
    (tmp_path / "child.toml").write_text('extends = "shared/mid.toml"\n')
    recipe = load_recipe(tmp_path / "child.toml")
    assert recipe.model.source == "shared/bert/model"
    assert recipe.data.source == "shared/bert/train.csv"
    assert resolve(recipe.model.source, "model", tmp_path) == (deep / "model").resolve()
    (deep / "base.toml").write_text(BASE)  # a hub id, and a file from the working directory
    recipe = load_recipe(tmp_path / "child.toml")
    assert (recipe.model.source, recipe.data.source) == ("some/model", "data.csv")


def test_a_parents_chat_template_file_is_read_from_its_own_folder(tmp_path):
    """A chat template file named in a parent recipe means the file beside the
    parent, as its sources do; a template's own text stays as written."""
    from test_chat import CHAT_RECIPE

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "tmpl.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (shared / "rows.jsonl").write_text("")
    (shared / "base.toml").write_text(CHAT_RECIPE.format(
        data="rows.jsonl", columns='chat = true\nchat_template = "tmpl.jinja"'))
    (tmp_path / "child.toml").write_text('extends = "shared/base.toml"\n')
    recipe = load_recipe(tmp_path / "child.toml")
    assert recipe.data.chat_template == "shared/tmpl.jinja"
    assert recipe.data.source == "shared/rows.jsonl"
    inline = "{{ messages[0].content }}"
    (shared / "base.toml").write_text(CHAT_RECIPE.format(
        data="rows.jsonl", columns=f'chat = true\nchat_template = "{inline}"'))
    assert load_recipe(tmp_path / "child.toml").data.chat_template == inline


def test_extends_refuses_cycles_and_escapes_from_a_run_folder(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(UserError, match="a cycle"):
        load_recipe(tmp_path / "a.toml")
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up.toml").write_text('extends = "../base.toml"\n')
    assert load_recipe(tmp_path / "sub" / "up.toml").data.labels == ["neg", "pos"]
    (tmp_path / "sub" / "link.toml").symlink_to(tmp_path / "base.toml")
    (tmp_path / "sub" / "via-link.toml").write_text('extends = "link.toml"\n')
    assert load_recipe(tmp_path / "sub" / "via-link.toml").name == "via-link"
    # a run folder's recipe (beside its manifest.json) may not leave the run folder
    (tmp_path / "sub" / "manifest.json").write_text("{}")
    for name in ("up.toml", "via-link.toml"):
        with pytest.raises(UserError, match=r"is outside .*sub; a recipe of a run folder"):
            load_recipe(tmp_path / "sub" / name)
    (tmp_path / "lost.toml").write_text('extends = "nope.toml"\n')
    with pytest.raises(UserError, match=r"lost\.toml: extends: 'nope\.toml': no such recipe"):
        load_recipe(tmp_path / "lost.toml")
    (tmp_path / "odd.toml").write_text("extends = 3\n")
    with pytest.raises(UserError, match="extends: expected the name of a shipped recipe"):
        load_recipe(tmp_path / "odd.toml")


def test_validate_shows_where_values_come_from(tmp_path):
    from test_cli import runner_here

    child = _chain(tmp_path)
    done = runner_here("validate", str(child), "--full", "--set", "train.seed=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--set" in done.stdout and "default" in done.stdout and "mid.toml" in done.stdout
    done = runner_here("validate", str(child), "--set", "train.seed=minus one", cwd=tmp_path)
    assert done.returncode == 2 and "train.seed" in done.stderr


@pytest.mark.parametrize("backend, expected", [("cpu", "float32"), ("gpu", "bfloat16"),
                                               ("tpu", "bfloat16")])
def test_auto_dtypes_are_bfloat16_on_accelerators(monkeypatch, backend, expected):
    import jax

    from jaxlora.models.config import ModelConfig

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert ModelConfig(source="m").dtypes() == (expected, expected)
    # an explicit choice stands on any backend; frozen weights may differ from activations
    assert ModelConfig(source="m", compute_dtype="float32").dtypes() == ("float32", "float32")
    assert ModelConfig(source="m", param_dtype="float32").dtypes() == ("float32", expected)


def test_a_codec_that_is_no_text_encoding_is_refused(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(BASE.replace('eval_size = 10', 'eval_size = 10\nencoding = "rot13"'))
    with pytest.raises(UserError, match=r"data.encoding: 'rot13' is not a text encoding"):
        load_recipe(f)


def test_a_recipe_nested_too_deeply_is_refused_not_a_recursion_error(tmp_path):
    f = tmp_path / "deep.toml"
    f.write_text(BASE + "[train]\nx = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UserError, match="deep.toml: arrays or tables nested too deeply"):
        load_recipe(f)
    plain = tmp_path / "plain.toml"
    plain.write_text(BASE)
    with pytest.raises(UserError, match="--set train.x: a value nested too deeply"):
        load_recipe(plain, ["train.x=" + "[" * 5000 + "]" * 5000])


def test_a_run_recorded_before_a_field_existed_is_the_same_recipe(tmp_path):
    """A run folder made before some fields existed (its manifest's recipe
    lacks them) still matches its recipe as read now, where they take their
    defaults; a real change is still refused, naming the field."""
    from jaxlora.errors import UserError
    from runner.recipe import canonical, load_recipe
    from runner.resume import require_same_recipe

    (tmp_path / "r.toml").write_text('[model]\nsource = "m"\n[data]\nsource = "d.csv"\n'
                                     'labels = ["a", "b"]\neval_size = 2\n')
    recipe = load_recipe(tmp_path / "r.toml")
    recorded = canonical(recipe)
    for added in ("chat", "messages_column", "train_on", "too_long"):
        del recorded["data"][added]
    manifest = {"recipe": recorded, "recipe_hash": "made by an earlier jaxlora"}
    assert require_same_recipe(tmp_path, manifest, recipe, "") == []
    recorded["train"]["learning_rate"] = 0.5
    with pytest.raises(UserError, match="train.learning_rate: 0.5 -> 0.0005"):
        require_same_recipe(tmp_path, manifest, recipe, "")


def test_a_run_made_before_encoding_auto_and_empty_still_resumes(tmp_path):
    """Runs recorded data.encoding = "utf-8" (the old default) and no data.empty:
    the same recipe now reads "auto" and "drop", which do what those did, so
    resuming is no change; any other encoding is one."""
    from runner.recipe import canonical
    from runner.resume import require_same_recipe

    f = tmp_path / "r.toml"
    f.write_text(BASE)
    recipe = load_recipe(f)
    old = canonical(recipe)
    old["data"] = {**old["data"], "encoding": "utf-8"}
    del old["data"]["empty"]
    manifest = {"recipe": old, "recipe_hash": "from an older version"}
    assert require_same_recipe(tmp_path, manifest, recipe, "advice") == []
    old["data"]["encoding"] = "latin-1"
    with pytest.raises(UserError, match=r"data\.encoding: 'latin-1' -> 'auto'"):
        require_same_recipe(tmp_path, manifest, recipe, "advice")


def test_a_recipe_name_on_the_command_line_is_a_file_or_a_shipped_recipe(tmp_path,
                                                                         monkeypatch):
    """A folder of a shipped recipe's name in the working directory does not
    hide it; a file of that name does; a '\\' makes a path, as in extends."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bert-sentiment").mkdir()
    assert recipe_named(Path("bert-sentiment")) == SHIPPED / "bert-sentiment.toml"
    (tmp_path / "mine").write_text(BASE)
    assert recipe_named(Path("mine")) == Path("mine")
    assert recipe_named(Path("a\\bert-sentiment")) == Path("a\\bert-sentiment")
