"""The shipped hub recipes (BERT-base on SST-2 and on IMDB) run through the
hub code path with no network: a local Hugging Face cache laid out as
huggingface_hub keeps it, holding a tiny random BERT under the recipe's model
id and a few rows in each dataset's own file layout and features (parquet
files under data/ or plain_text/, the label a ClassLabel), with
HF_HUB_OFFLINE=1. Each recipe runs as shipped, shrunk by --set only."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _snapshot(cache: Path, kind: str, repo: str) -> Path:
    """An empty snapshot folder of `repo` in the cache, named by refs/main."""
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


def _reviews(n: int, offset: int) -> tuple[list[str], list[int]]:
    good = ["a moving, beautifully acted film", "funny and warm", "a triumph"]
    bad = ["a tedious mess", "dull and far too long", "the worst script this year"]
    texts = [f"{(good if i % 2 else bad)[i % 3]} ({offset + i})" for i in range(n)]
    return texts, [i % 2 for i in range(n)]


def _write_split(path: Path, text_column: str, names: list[str], n: int, offset: int,
                 unlabelled: bool = False) -> None:
    import datasets

    texts, labels = _reviews(n, offset)
    if unlabelled:  # GLUE's test split and IMDB's "unsupervised" carry -1
        labels = [-1] * n
    features = datasets.Features({text_column: datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names)})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({text_column: texts, "label": labels},
                               features=features).to_parquet(str(path))


LAYOUTS = {
    # recipe: (dataset id, folder, text column, class names, {split: rows}, the split
    # without labels, --set overrides, adapted layers of the 2-layer tiny BERT)
    "bert-base-sst2-lora.toml": (
        "stanfordnlp/sst2", "data", "sentence", ["negative", "positive"],
        {"train": 80, "validation": 24, "test": 10}, "test", [], 4),
    "bert-base-imdb-lora.toml": (
        "stanfordnlp/imdb", "plain_text", "text", ["neg", "pos"],
        {"train": 80, "test": 40, "unsupervised": 10}, "unsupervised",
        ["data.max_eval_examples=24"], 8),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(LAYOUTS))
def test_hub_recipe_runs_from_a_local_cache_offline(recipe, tmp_path, tiny_bert_dir):
    repo, folder, text_column, names, rows, unlabelled, extra, adapted = LAYOUTS[recipe]
    cache = tmp_path / "hub"
    model = _snapshot(cache, "models", "google-bert/bert-base-uncased")
    for file in tiny_bert_dir.iterdir():
        shutil.copy(file, model / file.name)
    data = _snapshot(cache, "datasets", repo)
    for offset, (split, n) in enumerate(rows.items()):
        _write_split(data / folder / f"{split}-00000-of-00001.parquet", text_column, names, n,
                     offset * 1000, unlabelled=split == unlabelled)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    shrink = ["train.batch_size=8", "eval.batch_size=16", "eval.every_steps=4",
              "train.checkpoint_every=5", "data.max_length=32", "data.length_buckets=[16]",
              *extra]
    args = ["run", str(RECIPES / recipe)] + [a for s in shrink for a in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = list((tmp_path / "runs" / recipe.removesuffix(".toml")).iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["source"] == str(model)
    assert len(manifest["model"]["adapted_layers"]) == adapted
    assert manifest["data"]["train_size"] == rows["train"]
    assert manifest["data"]["eval_size"] == 24  # the recipe's eval split, labelled rows only
    assert manifest["data"]["label_counts"]["eval"] == {names[0]: 12, names[1]: 12}
    evals = json.loads((run / "eval.json").read_text())
    assert evals["before"]["examples"] == evals["after"]["examples"] == 24
    assert (run / "loss.png").is_file() and (run / "before_after.png").is_file()


def test_a_hub_datasets_classlabel_names_are_the_inferred_labels(tmp_path, monkeypatch):
    """A classifier without `labels` on a hub dataset takes its ClassLabel's
    names, in their order (not sorted), through the hub code path offline."""
    from huggingface_hub import constants

    from jaxlora.data import DataConfig, labels_of

    data = _snapshot(tmp_path / "hub", "datasets", "someone/reviews")
    for offset, split in enumerate(("train", "test")):
        _write_split(data / "data" / f"{split}-00000-of-00001.parquet", "text",
                     ["pos", "neg", "mixed"], 12, offset * 100)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(source="someone/reviews", eval_split="test")
    assert labels_of(cfg, cache_dir=tmp_path / "datasets-cache") == (
        ["pos", "neg", "mixed"], "the ClassLabel names of column 'label'")


def test_a_hub_base_models_license_reaches_the_model_card(tmp_path, monkeypatch):
    """A hub model fetch asks for the repository's README.md (a pattern, so a
    repository without one is fine); from a local cache laid out as the hub's,
    offline, the resolved folder holds it and an export's card states the
    license of its front matter (hub config.json files state none); a cached
    repository without README.md resolves too, and its card states none."""
    import fnmatch

    import huggingface_hub
    from huggingface_hub import constants

    from jaxlora import sources
    from runner.model_card import front_matter

    asked = {}

    def recorded(repo_id, repo_type, allow_patterns):
        asked[repo_id] = allow_patterns
        return str(tmp_path)

    with monkeypatch.context() as patch:
        patch.setattr(huggingface_hub, "snapshot_download", recorded)
        sources.resolve("someone/model", "model")
    patterns = asked["someone/model"]
    assert any(fnmatch.fnmatch("README.md", p) for p in patterns)
    assert not any(fnmatch.fnmatch(name, p) for p in patterns
                   for name in ("pytorch_model.bin", "docs/README.md"))

    cache = tmp_path / "hub"
    with_card = _snapshot(cache, "models", "someone/llama")
    (with_card / "config.json").write_text('{"model_type": "llama"}')
    (with_card / "README.md").write_text("---\nlanguage: en\nlicense: llama3\n---\n# Llama\n")
    without = _snapshot(cache, "models", "someone/bare")
    (without / "config.json").write_text('{"model_type": "llama"}')
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for repo, license in (("someone/llama", "llama3"), ("someone/bare", None)):
        folder = sources.resolve(repo, "model")
        assert (folder / "README.md").is_file() == (license is not None)
        manifest = {"recipe": {"model": {"source": repo, "task": "causal-lm"},
                               "data": {"source": "data.jsonl"},
                               "adapter": {"method": "lora"}},
                    "model": {"source": str(folder)}}
        fields = front_matter(manifest, "gguf", "f16")
        assert fields["base_model"] == repo and fields.get("license") == license
