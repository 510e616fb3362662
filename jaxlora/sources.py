"""Where models and data come from: a hub id, a local path, or a file inside an
installed Python package.

    pkg://PACKAGE/path/inside   a file or folder shipped inside an installed
                                package, found on sys.path level by level with
                                importlib.machinery.PathFinder (no package, nor
                                any parent of a dotted one, is ever imported, so
                                a recipe runs no package's code; the path may
                                not leave the package's folder)
    ./local/path, /abs/path     a local file or folder
    org/name                    a Hugging Face hub repository; only
                                safetensors, configs, tokenizer files and (for
                                the license an export's model card states) the
                                model's own README.md are fetched, those the
                                repository has (honours HF_HUB_OFFLINE and the
                                local Hugging Face cache)

`resolve(location, kind)` returns a local `Path`; every failure is a
`UserError` naming the location.
"""

from __future__ import annotations

import importlib.machinery
import re
import sys
from pathlib import Path
from typing import Literal

from jaxlora.errors import UserError

PKG_SCHEME = "pkg://"
# A hub repo id: "name" or "org/name" of letters, digits, '-', '_', '.'.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# Files a model needs (allow_patterns: a repository without one of them is
# fine), and its card, whose front matter states the license that an export's
# model card repeats; pickle weights (*.bin, *.pt) are never fetched.
MODEL_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.txt", "vocab.json", "merges.txt", "*.model",
               "generation_config.json", "added_tokens.json", "README.md"]
# A location ending like a file is a local file that is missing, not a hub id.
LOCAL_SUFFIXES = {".csv", ".json", ".jsonl", ".parquet", ".txt", ".tsv", ".safetensors",
                  ".gguf"}
DATA_FILES = ["*.csv", "*.json", "*.jsonl", "*.parquet", "*.md", "**/*.csv",
              "**/*.json", "**/*.jsonl", "**/*.parquet"]


def resolve_package_path(location: str) -> Path:
    """`pkg://PACKAGE/path/inside` -> the absolute path, without importing PACKAGE."""
    rest = location[len(PKG_SCHEME):]
    package, _, inner = rest.partition("/")
    if not package:
        raise UserError(f"{location}: expected pkg://PACKAGE/path/inside")
    try:
        spec = _find_without_importing(package)
    except (ImportError, ValueError, OSError) as e:
        raise UserError(f"{location}: cannot look up package {package!r}: {e}") from None
    if spec is None:
        raise UserError(f"{location}: package {package!r} is not installed "
                        f"(pip install {package.replace('_', '-')}, or `make run` installs "
                        "the offline data extras)")
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        root = Path(spec.origin).parent
    else:
        raise UserError(f"{location}: package {package!r} has no folder on disk")
    try:
        root = root.resolve()
        target = (root / inner).resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise UserError(f"{location}: cannot follow this path: {e}") from None
    if target != root and root not in target.parents:
        raise UserError(f"{location}: the path leaves the package folder {root}")
    if not target.exists():
        raise UserError(f"{location}: no such file or folder in package {package!r} ({target})")
    return target


def _find_without_importing(name: str):
    """The module spec of NAME (dotted or not) from sys.path, or None.
    `importlib.util.find_spec("a.b")` imports `a` to learn where `b` lives,
    running `a/__init__.py`; here each level is looked up in the folders of
    the level above, and nothing is imported."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        raise ValueError("not a package name")
    search, spec = None, None  # None: sys.path
    for depth in range(1, len(parts) + 1):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth]), search)
        if spec is None and depth == 1:  # an editable install's finder (setuptools'), say:
            spec = _from_meta_path(parts[0])  # finders locate, they run no module code
        if spec is None:
            return None
        if depth < len(parts):
            if not spec.submodule_search_locations:
                raise ValueError(f"{spec.name!r} is a module, not a package")
            search = list(spec.submodule_search_locations)
    return spec


def _from_meta_path(name: str):
    """The spec of the top-level NAME from the import system's other finders
    (`sys.meta_path`), or None: asked where it is, a finder runs no module."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if finder is importlib.machinery.PathFinder or find is None:
            continue
        try:
            spec = find(name, None)
        except Exception:  # a third-party finder's own trouble: not found by it
            continue
        if spec is not None and (spec.origin or spec.submodule_search_locations):
            return spec
    return None


def _from_hub(repo_id: str, kind: Literal["model", "dataset"], patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=kind, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise UserError(f"{repo_id}: not in the local Hugging Face cache and the hub cannot be "
                        "reached (offline?). Download it once with network, or point to a "
                        "local folder") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"{repo_id}: cannot fetch this {kind} from the Hugging Face hub: "
                        f"{str(e).splitlines()[0]}") from None


def resolve(location: str, kind: Literal["model", "dataset"], base_dir: Path | None = None) -> Path:
    """Turn a recipe location into a local path (see the module docstring).

    Relative local paths are taken relative to `base_dir` (the recipe's folder)
    when given, else the working directory.
    """
    if location.startswith(PKG_SCHEME):
        return resolve_package_path(location)
    try:
        local = Path(location).expanduser()
        if not local.is_absolute() and base_dir is not None and (base_dir / local).exists():
            local = base_dir / local
        if local.exists():
            return local.resolve()
    except RuntimeError:  # ~user of a user this machine does not know
        raise UserError(f"{location}: no such user's home folder") from None
    except OSError as e:  # a name longer than the filesystem takes, a loop of links
        raise UserError(f"{location}: {e.strerror or e}") from None
    if not _hub_id(location):
        raise UserError(f"{location}: no such file or folder")
    return _from_hub(location, kind, MODEL_FILES if kind == "model" else DATA_FILES)


def _hub_id(location: str) -> bool:
    """Whether a location that is no local file reads as a hub repository id
    (not as a local path that is missing)."""
    looks_local = (location.startswith((".", "/", "~"))
                   or Path(location).suffix.lower() in LOCAL_SUFFIXES)
    return not looks_local and bool(HUB_ID.match(location))


def where_from(location: str, base_dir: Path | None = None
               ) -> Literal["package", "local", "missing", "hub"]:
    """Where `resolve` would find LOCATION, without fetching or importing
    anything: inside an installed package, a local file or folder, a local
    path that is not there (yet), or the Hugging Face hub (the network, unless
    the local cache holds it)."""
    if location.startswith(PKG_SCHEME):
        return "package"
    try:
        local = Path(location).expanduser()
        if local.exists() or (base_dir is not None and not local.is_absolute()
                              and (base_dir / local).exists()):
            return "local"
    except (OSError, RuntimeError):
        return "missing"
    return "hub" if _hub_id(location) else "missing"
