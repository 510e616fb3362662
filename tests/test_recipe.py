"""Recipe validation: every shipped recipe is valid; each kind of mistake is one
message naming the file and the dotted field."""

from pathlib import Path

import pytest

from jaxlora.errors import UserError
from jaxlora.lora import FullConfig, LoraConfig, QLoraConfig
from runner.recipe import load_recipe, recipe_hash, to_toml

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
    ('[adapter]\nrank = "eight"\n', "adapter.rank: Input should be a valid integer"),
    ('[adapter]\nrank = -1\n', "adapter.rank: Input should be greater than 0 (got -1)"),
    ('[adapter]\nrnak = 8\n', "adapter.rnak: unknown key; did you mean 'rank'?"),
    ('[train]\nlearnig_rate = 1e-3\n', "train.learnig_rate: unknown key; did you mean 'learning_rate'?"),
    ('[adapter]\nmethod = "lorax"\n', "adapter.method: unknown method 'lorax'"),
    ('[adapter]\ntargets = []\n', "adapter.targets: must list at least one layer name"),
    ('[train]\nbatch_size = 0\n', "train.batch_size: Input should be greater than 0"),
    ('[eval]\nbefore = "maybe"\n', "eval.before: Input should be a valid boolean"),
    ('[outptu]\ndir = "x"\n', "outptu: unknown key; did you mean 'output'?"),
    ('[adapter]\nmethod = "qlora"\n[adapter.quant]\ntype = "nf3"\n',
     "adapter.quant.type: Input should be 'nf4' or 'int4'"),
    ('[adapter]\nmethod = "qlora"\n[adapter.quant]\nblocksize = 32\n',
     "adapter.quant.blocksize: unknown key; did you mean 'block_size'?"),
    ('[adapter]\nmethod = "qlora"\n[adapter.quant]\nblock_size = 33\n',
     "adapter.quant.block_size: must be even"),
    ('[adapter]\nmethod = "full"\nrank = 8\n', "adapter.rank: unknown key"),
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
    assert f"{f}: data.labels: required, but missing" in message


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
