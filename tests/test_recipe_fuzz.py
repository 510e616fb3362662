"""Property-based fuzzing of recipe documents (hypothesis): random types,
missing and unknown keys, out-of-range numbers, huge strings and wrong nesting,
mutated from a valid recipe. Every one either validates or is refused with a
`UserError`: one message naming the file, never another exception."""

import tomllib

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxlora.errors import UserError
from runner.recipe import load_recipe

VALID = {
    "model": {"source": "some/model", "task": "classification"},
    "data": {"source": "data.csv", "labels": ["neg", "pos"], "eval_size": 10,
             "max_length": 64, "length_buckets": [32]},
    "adapter": {"method": "lora", "rank": 8, "alpha": 16.0, "targets": ["query", "value"]},
    "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
    "eval": {"batch_size": 16},
}
KEYS = sorted({k for table in VALID.values() for k in table} | set(VALID) | {
    "method", "quant", "type", "block_size", "double_quant", "prompt_column", "packing",
    "extends", "name", "description", "output", "dir", "schedule", "warmup_ratio"})

scalars = st.one_of(
    st.booleans(), st.integers(min_value=-2**63, max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.text(min_size=5000, max_size=20000).map(lambda s: s[:20000]),
    st.sampled_from(["lora", "qlora", "full", "nf4", "int4", "auto", "causal-lm", "", "../x"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=8)
paths = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3)
edits = st.lists(st.tuples(st.sampled_from(["set", "delete"]), paths, values), max_size=6)


def _apply(document: dict, edit) -> None:
    action, path, value = edit
    node = document
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if action == "delete":
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


@settings(max_examples=520, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits)
def test_any_recipe_document_validates_or_is_refused_cleanly(tmp_path_factory, edits):
    document = {k: dict(v) for k, v in VALID.items()}
    for edit in edits:
        _apply(document, edit)
    document.pop("extends", None)  # chains are tested in test_recipe.py
    try:
        text = tomli_w.dumps(document)
    except (TypeError, ValueError):
        return  # not expressible in TOML (e.g. NaN keys): nothing a user can write
    tomllib.loads(text)  # what we wrote is TOML
    path = tmp_path_factory.mktemp("fuzz") / "r.toml"
    path.write_text(text)
    try:
        load_recipe(path)
    except UserError as e:
        message = str(e)
        assert message.startswith(f"{path}: ") and "Traceback" not in message
        assert all(line.startswith(f"{path}: ") for line in message.splitlines())
