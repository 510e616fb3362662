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
import re
import stat
import tomllib
import typing
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jaxlora.data import DataConfig, is_inline_template
from jaxlora.errors import UserError
from jaxlora.evaluate import EvalConfig
from jaxlora.lora import AdapterConfig, LoraConfig
from jaxlora.models.config import ModelConfig
from jaxlora.runtime import RuntimeConfig
from jaxlora.train import TrainConfig


# The [train] fields that tune adapters, and what each does: full fine-tuning
# takes none of them (a sweep's full points drop them, a recipe may not set them).
ADAPTER_ONLY_TRAIN_FIELDS = {
    "lr_ratio_b": "LoRA+ sets the learning rate of the LoRA B factors",
}


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
    def _adapter_only_train_fields(self) -> "Recipe":
        """The ADAPTER_ONLY_TRAIN_FIELDS are refused under full fine-tuning."""
        if self.adapter.method != "full":
            return self
        for name, what in ADAPTER_ONLY_TRAIN_FIELDS.items():
            if getattr(self.train, name) is not None:
                raise ValueError(f'train.{name}: {what}; method "full" has no adapters (use '
                                 f"lora or qlora, or leave {name} unset)")
        return self

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
    map have their default).

    Validation is strict (pydantic's strict mode, for the whole recipe): a
    string is never read as a number or a boolean (`rank = "8"` is refused),
    whether it comes from a file or from `--set`. A whole number stands for a
    float (`learning_rate = 1`): that is no conversion from text."""
    path = Path(path)
    document, provenance = read_document(path)
    set_fields(document, provenance, [parse_override(item) for item in overrides])
    return validate_document(path, document, provenance), provenance


def read_document(path: Path) -> tuple[dict, dict[str, str]]:
    """A recipe file's TOML document merged over its `extends` chain, its
    `name` defaulted to the file's stem, not yet validated; and where each
    field was given (the files of the chain)."""
    document, provenance = _read_chain(path, (), _confinement(path))
    document.setdefault("name", path.stem)
    return document, provenance


def set_fields(document: dict, provenance: dict[str, str],
               assignments: list[tuple[str, object]], source: str = "--set") -> None:
    """Set (field, value) pairs, as `parse_override` reads them, over the
    document (an inline table merges into its table); `source` is where the
    messages of a bad value say it was given."""
    for key, value in assignments:
        for leaf, leaf_value in _override_leaves(key, value):
            _set(document, leaf, leaf_value)
            provenance[leaf] = source


def validate_document(path: Path, document: dict, provenance: dict[str, str]) -> Recipe:
    """The recipe a document stands for (strict validation), or a UserError
    with one line per problem (`format_errors`)."""
    try:
        return Recipe.model_validate(document, strict=True)
    except ValidationError as e:
        raise UserError(format_errors(path, e, provenance, document)) from None


# A recipe is a few KiB; anything much larger is not one (/dev/zero, a data file).
MAX_RECIPE_BYTES = 4 * 2**20
# Tables nested deeper than this are no recipe (the deepest field is adapter.quant.type).
MAX_TABLE_DEPTH = 16


def _read_toml(path: Path) -> dict:
    """The TOML document of a recipe file: only a regular file, at most
    MAX_RECIPE_BYTES, its tables at most MAX_TABLE_DEPTH deep."""
    text = _read_text(path)
    try:
        document = tomllib.loads(text.removeprefix("\ufeff"))  # a byte-order mark (Windows)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: arrays or tables nested too deeply to read") from None
    _check_depth(document, str(path))
    return document


def _read_text(path: Path) -> str:
    """A recipe file's text. Opened without blocking (a FIFO would wait for a
    writer forever) and read only when it is a regular file (/dev/zero never
    ends), with a size limit."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except OSError as e:  # a loop of links, no permission, a name too long
        raise UserError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise UserError(f"{path}: a folder, not a recipe file")
        raise UserError(f"{path}: not a regular file (a device, a pipe or a socket); "
                        "a recipe is read only from a file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_RECIPE_BYTES + 1)
        except OSError as e:
            raise UserError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise UserError(f"{path}: larger than {MAX_RECIPE_BYTES // 2**20} MiB: not a recipe")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: cannot read the recipe: not UTF-8 text ({e})") from None


def _check_depth(document: dict, where: str) -> None:
    """Refuse tables nested deeper than MAX_TABLE_DEPTH (a dotted key thousands
    of levels deep parses fine, then breaks every recursive walk)."""
    stack = [(document, ())]
    while stack:
        table, keys = stack.pop()
        for key, value in table.items():
            if not isinstance(value, dict):
                continue
            if len(keys) + 1 > MAX_TABLE_DEPTH:
                shown = ".".join((*keys, key)[:4])
                raise UserError(f"{where}: {shown}...: tables nested more than "
                                f"{MAX_TABLE_DEPTH} levels deep; no recipe field is")
            stack.append((value, (*keys, key)))


# The recipes shipped with jaxlora (what `runner recipes` lists and `runner cp`
# copies); `extends = "NAME"` names one of them.
SHIPPED = Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipe(name: str) -> Path:
    """The shipped recipe called NAME (with or without .toml)."""
    stem = name.removesuffix(".toml")
    target = SHIPPED / f"{stem}.toml"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", stem) or not target.is_file():
        names = ", ".join(p.stem for p in sorted(SHIPPED.glob("*.toml")))
        raise UserError(f"{name!r}: no shipped recipe of that name; shipped: {names}")
    return target


def names_shipped_recipe(text: str) -> bool:
    """Whether `text` looks like a shipped recipe's name rather than a path:
    no '/' or '\\', no .toml."""
    return "/" not in text and "\\" not in text and not text.endswith(".toml")


def recipe_named(target: Path) -> Path:
    """A recipe given on the command line: the file at `target`, or, where
    there is no such file and `target` looks like a name
    (`names_shipped_recipe`), the shipped recipe of that name (a folder of
    that name in the working directory does not hide it)."""
    if target.is_file() or not names_shipped_recipe(str(target)):
        return target
    return shipped_recipe(str(target))


def _confinement(path: Path) -> Path | None:
    """The folder a recipe's `extends` chain may not leave, if any: a run
    folder's (its recipe.toml sits beside manifest.json; a run is replayed
    from what it holds), or the shipped library's (a shipped recipe is read
    by every user). A user's own recipe extends whatever file it names."""
    try:
        folder = path.resolve().parent
    except (OSError, RuntimeError):
        return None  # the file itself cannot be read: _read_toml says so
    if (folder / "manifest.json").is_file():
        return folder
    return SHIPPED if folder == SHIPPED.resolve() else None


def _parent_file(path: Path, parent, confine: Path | None) -> Path:
    """The file `extends = PARENT` in the recipe at `path` names: a shipped
    recipe's name (no '/', no .toml), or a path relative to the recipe's
    folder (or absolute), links followed; inside `confine` when given."""
    if not isinstance(parent, str) or not parent:
        raise UserError(f"{path}: extends: expected the name of a shipped recipe or the "
                        f"path of a recipe file, got {parent!r}")
    try:
        if names_shipped_recipe(parent):
            try:
                target = shipped_recipe(parent).resolve()
            except UserError as e:
                raise UserError(f"{path}: extends: {e}") from None
        else:
            target = (path.resolve().parent / Path(parent).expanduser()).resolve()
    except (OSError, RuntimeError) as e:  # a loop of links; ~user of no such user
        raise UserError(f"{path}: extends: {parent!r}: cannot follow this path "
                        f"({getattr(e, 'strerror', None) or e})") from None
    if confine is not None and confine.resolve() not in target.parents:
        raise UserError(f"{path}: extends: {parent!r} is outside {confine.resolve()}; a "
                        "recipe of a run folder or of the shipped library extends only "
                        "recipes beside it (.. and links may not leave that folder)")
    if not target.is_file():
        raise UserError(f"{path}: extends: {parent!r}: no such recipe file ({target})")
    return target


def _read_chain(path: Path, seen: tuple[Path, ...], confine: Path | None = None
                ) -> tuple[dict, dict[str, str]]:
    """A recipe file merged over its `extends` parent (deep merge of tables;
    a child's value, array included, replaces the parent's), after removing
    the inherited fields its `unset` array names."""
    document = _read_toml(path)
    parent = document.pop("extends", None)
    unset = document.pop("unset", None)
    merged: dict = {}
    provenance: dict[str, str] = {}
    if parent is not None:
        target = _parent_file(path, parent, confine)
        here = path.resolve()
        if target in seen or target == here:
            chain = " -> ".join(str(p) for p in (*seen, here, target))
            raise UserError(f"{path}: extends: a cycle: {chain}")
        merged, provenance = _read_chain(target, (*seen, here),
                                         confine or _confinement(target))
        merged = _rebased(merged, target.parent, here.parent)
    if unset is not None:
        _unset(merged, provenance, unset, path)
    for key, value in _leaves(document):
        provenance[key] = str(path)
    return _merge(merged, document), provenance


def _unset(merged: dict, provenance: dict[str, str], unset, path: Path) -> None:
    """Remove the inherited fields (or whole tables) named by the recipe's
    `unset = ["data.eval_size", ...]`: they take their default again, unless
    the recipe itself sets them."""
    if not merged:
        raise UserError(f"{path}: unset: only in a recipe that extends another (it removes "
                        "fields the parent set)")
    if not isinstance(unset, list) or not all(isinstance(k, str) and k for k in unset):
        raise UserError(f"{path}: unset: expected an array of dotted field names, e.g. "
                        f'unset = ["data.eval_size"], got {unset!r}')
    for key in unset:
        *tables, last = key.split(".")
        node = merged
        for part in tables:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            raise UserError(f"{path}: unset: {key!r} is not set by the recipe it extends")
        del node[last]
        for field in [f for f in provenance if f == key or f.startswith(f"{key}.")]:
            del provenance[field]


# Fields a recipe may give as a path relative to its own folder: its sources,
# and (PATH_FIELDS) a chat template file.
SOURCE_FIELDS = (("model", "source"), ("data", "source"))
PATH_FIELDS = (*SOURCE_FIELDS, ("data", "chat_template"))


def is_local_relative(value, folder: Path) -> bool:
    """Whether a PATH_FIELDS value is a relative path to something that
    exists in `folder`: not a hub id, a pkg:// file, a template's own text,
    an absolute path, or a path that only the working directory holds."""
    return (isinstance(value, str) and "://" not in value and not is_inline_template(value)
            and not Path(value).expanduser().is_absolute() and (folder / value).exists())


def _rebased(document: dict, folder: Path, top: Path) -> dict:
    """A parent recipe's relative sources (and a chat template file) that exist
    beside it (in `folder`), rewritten relative to the extending recipe's
    folder `top`: a path in a file means what it meant in that file. Others
    (hub ids, paths from the working directory, a template's own text) are
    left as they are."""
    out = dict(document)
    for table, key in PATH_FIELDS:
        section = out.get(table)
        value = section.get(key) if isinstance(section, dict) else None
        if not is_local_relative(value, folder):
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
    """(dotted key, value) of every non-table value, depth first, without
    recursion (a document's depth is checked on reading, but a walk that
    cannot overflow needs no such promise)."""
    stack = [(iter(document.items()), prefix)]
    while stack:
        items, at = stack[-1]
        for key, value in items:
            if isinstance(value, dict):
                stack.append((iter(value.items()), f"{at}{key}."))
                break
            yield f"{at}{key}", value
        else:
            stack.pop()


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
    nested: object = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    _check_depth(nested, "--set" if len(key) > 60 else f"--set {key}")  # the key shown cut
    return key, value


def _override_leaves(key: str, value) -> list[tuple[str, object]]:
    """What `--set KEY=VALUE` sets: an inline table merges into the table
    (`eval={batch_size=2}` sets eval.batch_size and keeps the file's other
    eval fields), anything else is one field."""
    if isinstance(value, dict) and value:
        return list(_leaves(value, f"{key}."))
    return [(key, value)]


def _set(document: dict, key: str, value) -> None:
    *tables, last = key.split(".")
    node = document
    for part in tables:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {part!r} is a value, not a table")
        node = child
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        return  # an empty inline table: the table as it is
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
                  provenance: dict[str, str] | None = None, document: dict | None = None
                  ) -> str:
    """One line per problem: `FILE: dotted.field: what is wrong`, FILE being
    the file of the `extends` chain that set the field (or `--set`), per
    `provenance`, else `path`. `document`, the raw recipe, shows labels given
    as numbers rewritten whole."""
    given = provenance or {}
    messages: dict[tuple[str, str], list[str]] = {}
    unquoted: dict[str, list] = {}  # labels given as numbers or booleans, by source
    for err in error.errors(include_url=False):
        where, holder = _locate(err["loc"])
        if err["type"] == "union_tag_invalid":
            where = f"{where}.method"
        msg = _message(err, where, holder)
        source = _source(where, given, path, msg)
        if (err["type"] == "string_type" and re.fullmatch(r"data\.labels\[\d+\]", where)
                and not isinstance(err["input"], str)):
            unquoted.setdefault(source, []).append(err["input"])  # one message for them all
            continue
        found = messages.setdefault((source, where or "(top level)"), [])
        if msg not in found:  # union members repeat the same complaint
            found.append(msg)
    data = (document or {}).get("data")
    labels = data.get("labels") if isinstance(data, dict) else None
    for source, values in unquoted.items():
        messages[(source, "data.labels")] = [_labels_message(values, labels, source)]
    return "\n".join(f"{source}: {where}: {'; or '.join(msgs)}"
                     for (source, where), msgs in messages.items())


def _source(where: str, provenance: dict[str, str], path: Path, msg: str = "") -> str:
    """Where the value a problem is about was given: the field's own entry
    (an item of an array, `data.labels[0]`, is its array's), else the nearest
    table above it that was given whole. A problem of a table (two fields that
    disagree) is blamed on where the fields its message names were given; an
    unknown key in a table that only `--set` filled on `--set`; else the
    recipe."""
    key = re.sub(r"\[\d+\]", "", where)
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in provenance:
            return provenance[".".join(parts[:n])]
    below = {field.removeprefix(f"{key}."): source for field, source in provenance.items()
             if field.startswith(f"{key}.")}
    named = [source for field, source in below.items()
             if re.search(rf"\b{re.escape(field.split('.')[0])}\b", msg)]
    if named:
        return " and ".join(dict.fromkeys(named))
    return "--set" if below and set(below.values()) == {"--set"} else str(path)


# What a strict type check expected, in the recipe's words.
EXPECTED = {"int_type": "an integer", "int_from_float": "a whole number",
            "float_type": "a number", "bool_type": "true or false",
            "string_type": "a string (in quotes)", "list_type": "an array [...]",
            "dict_type": "a table", "model_type": "a table", "model_attributes_type": "a table"}


def _message(err: dict, where: str, holder: type[BaseModel] | None) -> str:
    """The words for one pydantic error at the dotted field `where`."""
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        owners = _methods_with(where.rpartition(".")[0], key)
        if owners:
            return f"only for method {' or '.join(json.dumps(m) for m in owners)}"
        valid = list(holder.model_fields) if holder else []
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else (
            f"; valid keys: {', '.join(valid)}" if valid else "")
        return f"unknown key{hint}"
    if kind == "missing":
        return "required, but missing"
    if kind == "union_tag_not_found":
        return 'expected a table with method = "lora", "qlora" or "full"'
    if kind == "string_pattern_mismatch" and where == "name":
        return (f"{err['input']!r} cannot name a run folder (letters, digits, '.', '_', "
                "'-'); set name = \"...\" in the recipe (it defaults to the file name)")
    if kind == "union_tag_invalid":
        return (f"unknown method {err['ctx']['tag']!r}; expected one of: "
                f"{err['ctx']['expected_tags']}")
    if kind in EXPECTED:
        return _type_message(kind, err["input"])
    msg = err["msg"].removeprefix("Value error, ")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        msg = f"{msg} (got {err['input']!r})"
    return msg


def _type_message(kind: str, value) -> str:
    """`expected an integer, got the string "8"; write it without quotes: 8`:
    the schema is strict, so the message says what to write instead."""
    msg = f"expected {EXPECTED[kind]}, got {_describe(value)}"
    if isinstance(value, str) and kind != "string_type":
        try:
            meant = tomllib.loads(f"v = {value.strip()}")["v"]
        except (tomllib.TOMLDecodeError, RecursionError):
            meant = None
        if meant is not None and not isinstance(meant, (str, dict, list)):
            msg += f"; write it without quotes: {value.strip()}"
    return msg


def _labels_message(values: list, labels, source: str) -> str:
    """Labels given as numbers (`--set 'data.labels=[1,3,5]'`): labels are
    names, strings in quotes, wherever they are given."""
    shown = ", ".join(_describe(v).removeprefix("the number ") for v in values)
    whole = labels if isinstance(labels, list) else values
    quoted = json.dumps([v if isinstance(v, str) else _describe(v).removeprefix("the number ")
                         for v in whole])
    fix = f"--set 'data.labels={quoted}'" if source == "--set" else f"labels = {quoted}"
    return f"labels are strings, each in quotes; got {shown}: write {fix}"


def _describe(value) -> str:
    """A value as the recipe's author wrote it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


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
            tags = _by_method(variants)
            if loc[i + 1] in tags:
                cls = tags[loc[i + 1]]
                i += 1  # skip the discriminator tag
        i += 1
    return ".".join(parts), None


def _methods_with(table: str, key: str) -> list[str]:
    """The methods whose variant of the recipe's table `table` (dotted, e.g.
    `adapter`, a union chosen by `method`) has the field `key`: a field that
    another method's variant declares is not unknown, only misplaced."""
    variants: list[type[BaseModel]] = [Recipe]
    for part in table.split(".") if table else []:
        if len(variants) != 1 or part not in variants[0].model_fields:
            return []
        variants = _model_variants(variants[0].model_fields[part].annotation)
    if len(variants) < 2:
        return []
    return [v.model_fields["method"].default for v in variants if key in v.model_fields]


def adapter_variants() -> dict[str, type[BaseModel]]:
    """The [adapter] table's settings model of each `method`."""
    return _by_method(_model_variants(Recipe.model_fields["adapter"].annotation))


def _by_method(variants: list[type[BaseModel]]) -> dict[str, type[BaseModel]]:
    return {v.model_fields["method"].default: v for v in variants}


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


def recipe_hash(recipe: Recipe, exclude: tuple[str, ...] = ()) -> str:
    """sha256 of the canonical JSON of the resolved recipe, less its
    top-level fields in `exclude`: same hash, same run."""
    content = {k: v for k, v in canonical(recipe).items() if k not in exclude}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML, loadable again with `load_recipe`."""
    return tomli_w.dumps(canonical(recipe))
