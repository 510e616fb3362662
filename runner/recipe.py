"""The recipe: one TOML file composing the settings models of `jaxlora`.

Each section is declared beside the code that uses it; this module only
composes them and adds what belongs to a file (name, description, output,
hashing, error messages):

    [model]    jaxlora.models.ModelConfig     base model, task, dtypes, attention
    [data]     jaxlora.data.DataConfig        source, columns, labels, splits
    [adapter]  jaxlora.lora.AdapterConfig     method = "lora" | "qlora" | "full" (+ settings)
    [train]    jaxlora.train.TrainConfig      epochs, batch, optimizer, schedule
    [eval]     jaxlora.evaluate.EvalConfig    before/after evaluation
    [output]   OutputConfig                   where run folders go
    [runtime]  jaxlora.runtime.RuntimeConfig  device mesh (data, fsdp), multi-host

Every model is frozen with `extra="forbid"`; a bad recipe yields one message
per problem naming the file and the dotted field (`adapter.rank: ...`), and an
unknown key names the closest valid key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import tomllib
import typing
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jaxlora.data import DataConfig
from jaxlora.errors import UserError
from jaxlora.evaluate import EvalConfig
from jaxlora.lora import AdapterConfig, LoraConfig
from jaxlora.models.config import ModelConfig
from jaxlora.runtime import RuntimeConfig
from jaxlora.train import TrainConfig


class OutputConfig(BaseModel):
    """The recipe's [output] table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dir: str = "runs"  # run folders go to DIR/<recipe name>/<timestamp>/ (relative to the cwd)
    # also log train and eval scalars as TensorBoard events in RUN_DIR/tensorboard/
    tensorboard: bool = False


class Recipe(BaseModel):
    """A whole recipe, as validated from TOML."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)  # default: file stem
    description: str = ""  # one line for humans
    model: ModelConfig  # step 3: the base model
    data: DataConfig  # step 2: the data
    adapter: AdapterConfig = LoraConfig()  # step 1: the method
    train: TrainConfig = TrainConfig()  # step 4: fine-tuning
    eval: EvalConfig = EvalConfig()  # step 5: evaluation
    output: OutputConfig = OutputConfig()  # the run folder
    runtime: RuntimeConfig = RuntimeConfig()  # the devices: mesh axes, multi-host

    @model_validator(mode="after")
    def _data_fits_the_task(self) -> "Recipe":
        """[data] settings that make sense for the task: a classifier's, or a
        causal LM's (labels only with answers; the chat settings with chat)."""
        data = self.data
        if self.model.task == "classification":
            if data.pairs:
                raise ValueError("data.prompt_column: only for task causal-lm")
            if data.packing:
                raise ValueError("data.packing: only for task causal-lm")
            for name in ("chat", "messages_column", "chat_template", "system_prompt",
                         "train_on", "too_long"):
                if _given(data, name):
                    raise ValueError(f"data.{name}: only for task causal-lm (a classifier "
                                     "truncates its texts)")
            return self
        if data.labels is not None:
            if not data.answered:
                raise ValueError("data.labels: for causal-lm only with prompt/response pairs "
                                 "or conversations (chat = true), whose answers name a label; "
                                 "plain text has no answer to judge")
            if data.train_on == "all":
                raise ValueError('data.labels: not with train_on = "all", which counts every '
                                 "token: there is no answer to judge")
            folded = [label.lower() for label in data.labels]
            if len(set(folded)) < len(folded):
                raise ValueError("data.labels: for causal-lm, answers are matched in any case, "
                                 "so no two labels may differ in case only")
        for name in ("chat_template", "system_prompt", "messages_column", "train_on"):
            if _given(data, name) and not data.chat:
                raise ValueError(f"data.{name}: only with chat = true")
        if data.system_prompt is not None and not data.pairs:
            raise ValueError("data.system_prompt: only for prompt/response pairs (a "
                             "conversation carries its own system turn)")
        if _given(data, "template") and data.conversations:
            raise ValueError("data.template: shapes the prompt of a prompt/response pair; a "
                             "conversation is rendered by the chat template alone")
        return self


def _given(data: DataConfig, name: str) -> bool:
    """Whether a [data] field holds another value than its default."""
    return getattr(data, name) != type(data).model_fields[name].default


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read and validate a recipe file (with its `extends` chain and `--set`
    overrides); any problem is a `UserError`."""
    return load_with_provenance(path, overrides)[0]


def load_with_provenance(path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                         ) -> tuple[Recipe, dict[str, str]]:
    """The recipe and, for every field given anywhere, where its value came
    from: a file of the `extends` chain, or `--set` (fields absent from the
    map have their default)."""
    path = Path(path)
    document, provenance = _read_chain(path, ())
    for item in overrides:
        key, value = parse_override(item)
        _set(document, key, value)
        provenance[key] = "--set"
    document.setdefault("name", path.stem)
    try:
        return Recipe.model_validate(document), provenance
    except ValidationError as e:
        raise UserError(format_errors(path, e, provenance)) from None


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the recipe: {e}") from None
    try:
        return tomllib.loads(text.removeprefix("\ufeff"))  # a byte-order mark (Windows editors)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: arrays or tables nested too deeply to read") from None


def _read_chain(path: Path, seen: tuple[Path, ...]) -> tuple[dict, dict[str, str]]:
    """A recipe file merged over its `extends` parents (deep merge of tables;
    a child's value, array included, replaces the parent's)."""
    document = _read_toml(path)
    parent = document.pop("extends", None)
    merged: dict = {}
    provenance: dict[str, str] = {}
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise UserError(f"{path}: extends: expected the path of a parent recipe, "
                            f"got {parent!r}")
        folder = path.resolve().parent
        target = (folder / parent).resolve()  # links followed
        if folder not in target.parents:
            raise UserError(f"{path}: extends: {parent!r} is outside the recipe's folder "
                            f"{folder} (.. and links may not leave it)")
        if not target.is_file():
            raise UserError(f"{path}: extends: {parent!r}: no such recipe file ({target})")
        if target in seen or target == path.resolve():
            chain = " -> ".join(str(p) for p in (*seen, path.resolve(), target))
            raise UserError(f"{path}: extends: a cycle: {chain}")
        merged, provenance = _read_chain(target, (*seen, path.resolve()))
        merged = _rebased(merged, target.parent, folder)
    for key, value in _leaves(document):
        provenance[key] = str(path)
    return _merge(merged, document), provenance


# Fields a recipe may give as a path relative to its own folder.
SOURCE_FIELDS = (("model", "source"), ("data", "source"))


def _rebased(document: dict, folder: Path, top: Path) -> dict:
    """A parent recipe's relative sources that exist beside it (in `folder`),
    rewritten relative to the extending recipe's folder `top`: a path in a file
    means what it meant in that file. Others (hub ids, paths from the working
    directory) are left as they are."""
    out = dict(document)
    for table, key in SOURCE_FIELDS:
        section = out.get(table)
        value = section.get(key) if isinstance(section, dict) else None
        if (not isinstance(value, str) or "://" in value
                or Path(value).expanduser().is_absolute() or not (folder / value).exists()):
            continue
        moved = os.path.normpath(Path(os.path.relpath(folder, top)) / value)
        if (top / moved).resolve() != (folder / value).resolve():  # a link in the way
            moved = str((folder / value).resolve())
        out[table] = {**section, key: moved}
    return out


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = (_merge(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def _leaves(document: dict, prefix: str = ""):
    for key, value in document.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def parse_override(item: str) -> tuple[str, object]:
    """`train.learning_rate=3e-4` -> ("train.learning_rate", 0.0003): the value
    is read as TOML (numbers, booleans, "strings", [arrays]); anything that is
    not valid TOML is taken as a plain string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {item!r}: expected FIELD=VALUE, e.g. "
                        "train.learning_rate=3e-4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except RecursionError:
        raise UserError(f"--set {key}: a value nested too deeply to read") from None
    return key, value


def _set(document: dict, key: str, value) -> None:
    *tables, last = key.split(".")
    node = document
    for part in tables:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {part!r} is a value, not a table")
        node = child
    node[last] = value


def provenance_rows(recipe: Recipe, provenance: dict[str, str]) -> list[tuple[str, str, str]]:
    """(field, value, where from) for every field of the resolved recipe."""
    rows = []
    for key, value in _leaves(canonical(recipe)):
        source = provenance.get(key)
        if source is None and key == "name":
            source = "the file name"
        rows.append((key, json.dumps(value), source or "default"))
    return rows


def format_errors(path: Path, error: ValidationError,
                  provenance: dict[str, str] | None = None) -> str:
    """One line per problem: `FILE: dotted.field: what is wrong`, FILE being
    the file of the `extends` chain that set the field (or `--set`), per
    `provenance`, else `path`."""
    messages: dict[str, list[str]] = {}
    for err in error.errors(include_url=False):
        where, holder = _locate(err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            valid = list(holder.model_fields) if holder else []
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else (
                f"; valid keys: {', '.join(valid)}" if valid else "")
            msg = f"unknown key{hint}"
        elif err["type"] == "missing":
            msg = "required, but missing"
        elif err["type"] == "union_tag_not_found":
            msg = 'expected a table with method = "lora", "qlora" or "full"'
        elif err["type"] == "string_pattern_mismatch" and where == "name":
            msg = (f"{err['input']!r} cannot name a run folder (letters, digits, '.', '_', "
                   "'-'); set name = \"...\" in the recipe (it defaults to the file name)")
        elif err["type"] == "union_tag_invalid":
            where = f"{where}.method"
            msg = (f"unknown method {err['ctx']['tag']!r}; expected one of: "
                   f"{err['ctx']['expected_tags']}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
                msg = f"{msg} (got {err['input']!r})"
        found = messages.setdefault(where or "(top level)", [])
        if msg not in found:  # union members repeat the same complaint
            found.append(msg)
    given = provenance or {}
    lines = [f"{given.get(where, path)}: {where}: {'; or '.join(msgs)}"
             for where, msgs in messages.items()]
    return "\n".join(lines)


def _locate(loc: tuple) -> tuple[str, type[BaseModel] | None]:
    """The dotted field path a pydantic error location stands for, and the model
    class holding its last key when that key is unknown (discriminator tags and
    union members are internal to pydantic and left out)."""
    cls: type[BaseModel] | None = Recipe
    parts: list[str] = []
    i = 0
    while i < len(loc):
        item = loc[i]
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            i += 1
            continue
        if cls is None or item not in cls.model_fields:
            if cls is not None and i == len(loc) - 1:
                return ".".join(parts + [item]), cls  # an unknown key, shown as written
            break
        parts.append(item)
        variants = _model_variants(cls.model_fields[item].annotation)
        cls = variants[0] if len(variants) == 1 else None
        if len(variants) > 1 and i + 1 < len(loc):
            tags = {v.model_fields["method"].default: v for v in variants}
            if loc[i + 1] in tags:
                cls = tags[loc[i + 1]]
                i += 1  # skip the discriminator tag
        i += 1
    return ".".join(parts), None


def _model_variants(annotation) -> list[type[BaseModel]]:
    """The pydantic model classes inside an annotation (through Annotated/Union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _model_variants(arg)
    return found


def canonical(recipe: Recipe) -> dict:
    """The resolved recipe as plain data (defaults filled in, no None values)."""
    return recipe.model_dump(mode="json", exclude_none=True)


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the canonical JSON of the resolved recipe: same hash, same run."""
    text = json.dumps(canonical(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML, loadable again with `load_recipe`."""
    return tomli_w.dumps(canonical(recipe))
