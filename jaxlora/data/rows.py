"""Which rows of which split: the rows that go on to be tokenized.

Stage 2 of `jaxlora.data`, one path for both tasks (`select_rows`): the text
columns are present and hold strings; a row whose text is missing or blank is
dropped and counted per split (or, with `empty = "error"`, refused naming the
data row and the file line); for classification the labels become class ids,
and rows whose label is not in `labels` are dropped and counted
(`read_labels`); without `labels` they are the train split's (`infer_labels`);
causal-lm reads no labels and keeps every row with text (`_read_texts`). Then
the eval rows: a named split, or `eval_size` rows (or a fraction) carved out of
train; then the seeded caps; then, for classification, a training row for every
label. The draws are seeded streams of `DataConfig.seed`, so the same settings
pick the same rows, and a larger cap keeps every row of a smaller one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.answers import first_label, normalized
from jaxlora.data import chat
from jaxlora.data.config import DataConfig
from jaxlora.data.files import detect_format, file_line, get_split
from jaxlora.errors import UserError

# How many distinct label values an error message lists.
MAX_LISTED_VALUES = 20
# How a missing label (an empty CSV cell, a JSON or parquet null) is counted.
MISSING_LABEL = "(empty)"
# Independent random streams under one seed, so that changing one cap does not
# reshuffle the eval carve or the other cap.
_SPLIT_STREAM, _TRAIN_CAP_STREAM, _EVAL_CAP_STREAM = 0, 1, 2


@dataclass(frozen=True, eq=False)
class SplitRows:
    """The rows chosen from one split, in file order."""

    ds: Any  # the split (a `datasets.Dataset`)
    rows: np.ndarray  # the chosen rows' numbers in it
    ids: np.ndarray  # every row's class id (-1: label dropped; causal-lm: all 0)
    name: str  # the split's name, for messages

    @property
    def labels(self) -> np.ndarray:
        """The class ids of the chosen rows."""
        return self.ids[self.rows]


@dataclass(frozen=True, eq=False)
class ChosenRows:
    """What `select_rows` chose: the train and eval rows, and the dropped labels."""

    train: SplitRows
    eval: SplitRows
    dropped: Counter[str]  # label value outside `labels`, as str -> rows (both splits)
    empty: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> rows of no text
    too_long: dict[str, int] = dataclasses.field(  # causal-lm: rows dropped for max_length
        default_factory=lambda: {"train": 0, "eval": 0})


def select_rows(cfg: DataConfig, splits: Any, train_ds: Any, path: Path, *,
                labelled: bool) -> ChosenRows:
    """The train and eval rows of `splits` (`train_ds` is its train split), checked:
    with `labelled` (classification) rows of a label outside `cfg.labels` are
    dropped and counted, without (causal-lm) every row is kept; rows without
    text are dropped and counted (`cfg.empty`)."""
    read = read_labels if labelled else _read_texts
    train_ids, dropped, empty = read(train_ds, cfg, path, cfg.train_split)
    empty = {cfg.train_split: empty}
    if cfg.eval_split is not None:
        eval_ds = get_split(splits, cfg.eval_split, path)
        eval_ids, eval_dropped, empty[cfg.eval_split] = read(eval_ds, cfg, path, cfg.eval_split)
        dropped.update(eval_dropped)
        train_rows, eval_rows = np.flatnonzero(train_ids >= 0), np.flatnonzero(eval_ids >= 0)
    else:  # eval rows are carved out of the train split
        eval_ds, eval_ids = train_ds, train_ids
        train_rows, eval_rows = _carve(np.flatnonzero(train_ids >= 0), cfg, path)
    train_rows = _cap(train_rows, cfg.max_train_examples, [cfg.seed, _TRAIN_CAP_STREAM])
    eval_rows = _cap(eval_rows, cfg.max_eval_examples, [cfg.seed, _EVAL_CAP_STREAM])
    if labelled:
        _check_two_classes(train_ids[train_rows], cfg.labels, path)
        _check_every_label(train_ids[train_rows], cfg, path)
    return ChosenRows(train=SplitRows(train_ds, train_rows, train_ids, cfg.train_split),
                      eval=SplitRows(eval_ds, eval_rows, eval_ids,
                                     cfg.eval_split or cfg.train_split),
                      dropped=dropped, empty={k: n for k, n in empty.items() if n})


def _check_column(ds: Any, name: str, column: str, path: Path, split: str) -> None:
    """Refuse a split without `column` (the setting `name`), listing its columns."""
    if column not in ds.column_names:
        raise UserError(f"{path}: no column {column!r} ({name}) in split {split!r}; "
                        f"columns: {', '.join(ds.column_names)}")


def _read_texts(ds: Any, cfg: DataConfig, path: Path,
                split: str) -> tuple[np.ndarray, Counter[str], int]:
    """`read_labels` for causal-lm: check a split's text columns (one text, a
    prompt and a response, or conversations) and every row's texts; a row
    without text is dropped (class id -1) and counted. Without `labels` every
    other row is kept, with class id 0; with them each row's answer (the
    response, or the last assistant turn) names its label, and a row whose
    answer names none is dropped and counted under the answer."""
    empty = np.zeros(len(ds), bool)
    if cfg.conversations:
        _check_column(ds, "messages_column", cfg.messages_column, path, split)
        answers = [chat.answer(m) for m in conversations(ds, cfg, path, split)]
    else:
        columns = ([("prompt_column", cfg.prompt_column),
                    ("response_column", cfg.response_column)]
                   if cfg.pairs else [("text_column", cfg.text_column)])
        for name, column in columns:
            _check_column(ds, name, column, path, split)
            empty[_empty_texts(ds, np.arange(len(ds)), column, path, split, name, cfg)] = True
        answers = ds.data.column(cfg.response_column).to_pylist() if cfg.pairs else None
    if cfg.labels is None:
        ids = np.where(empty, -1, 0).astype(np.int32)
        _check_some_text(ids, cfg.text_column if not cfg.pairs else "prompt/response", path,
                         split)
        return ids, Counter(), int(empty.sum())
    ids = np.array([first_label(a, cfg.labels) if a is not None and not e else -1
                    for a, e in zip(answers, empty)], np.int32)
    dropped = Counter(normalized(a or "")[:40] for a, i, e in zip(answers, ids, empty)
                      if i < 0 and not e)
    if not (ids >= 0).any():
        found = ", ".join(f"{v!r} ({n})" for v, n in dropped.most_common(MAX_LISTED_VALUES))
        raise UserError(f"{path}: no answer in split {split!r} names a label in {cfg.labels}; "
                        f"answers found: {found}")
    return ids, dropped, int(empty.sum())


def conversations(ds: Any, cfg: DataConfig, path: Path,
                  split: str) -> list[list[dict[str, str]]]:
    """Every row's conversation (`chat.messages_of`), checked: a list of role and
    content objects with something to learn; a UserError naming the row."""
    out = []
    for row, value in enumerate(ds.data.column(cfg.messages_column).to_pylist()):
        try:
            messages = chat.messages_of(value)
            chat.check_trainable(messages, cfg.train_on)
        except ValueError as e:
            raise UserError(f"{path}: data row {row + 1} of split {split!r}, column "
                            f"{cfg.messages_column!r} (messages_column): {e}") from None
        out.append(messages)
    return out


def read_labels(ds: Any, cfg: DataConfig, path: Path,
                split: str) -> tuple[np.ndarray, Counter[str], int]:
    """Check a split's columns, labels and texts; return the class id per row
    (-1 for a label outside `cfg.labels`, or no text), the dropped label
    values with their row counts, and how many rows of a kept label had no
    text (dropped, or refused with `cfg.empty = "error"`)."""
    for name, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        _check_column(ds, name, column, path, split)
    values = label_values(ds, cfg.label_column)
    class_id = {name: i for i, name in enumerate(cfg.labels)}
    ids = np.array([class_id.get(v, -1) for v in values], np.int32)
    dropped = Counter(v for v, i in zip(values, ids) if i < 0)
    if not (ids >= 0).any():
        found = ", ".join(f"{v!r} ({n})" for v, n in dropped.most_common(MAX_LISTED_VALUES))
        raise UserError(f"{path}: no row of split {split!r} has a label in {cfg.labels} "
                        f"(column {cfg.label_column!r}); values found: {found}")
    empty = _empty_texts(ds, np.flatnonzero(ids >= 0), cfg.text_column, path, split,
                         "text_column", cfg)
    ids[empty] = -1
    _check_some_text(ids, cfg.text_column, path, split)
    return ids, dropped, len(empty)


def label_values(ds: Any, column: str) -> list[str]:
    """Every row's label as the string `labels` names it by: a ClassLabel's
    name, a string as written, a number as its text (`1`), a missing one as
    `MISSING_LABEL`."""
    import datasets

    # A freshly loaded split has no indices mapping, so its Arrow table is its rows.
    raw = ds.data.column(column).to_pylist()
    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        # Hub sets store class indices; -1 marks an unlabelled row (e.g. GLUE test).
        return [feature.names[v] if v is not None and 0 <= v < len(feature.names) else str(v)
                for v in raw]
    if type(feature).__name__ == "Json":
        # A JSON column of mixed kinds ("positive" in most rows, 1 in one) is kept
        # as each value's JSON text: the strings are labels, the rest are values
        # outside `labels`, dropped and counted like any other.
        return [MISSING_LABEL if v is None else _json_value(v) for v in raw]
    return [MISSING_LABEL if v is None else str(v) for v in raw]


def infer_labels(ds: Any, column: str, path: Path, split: str) -> tuple[list[str], str]:
    """The labels of a split that names none: a ClassLabel column's names, else
    the distinct values of the split (missing and blank ones left out),
    numbers in numeric order, text in code-point order; and how they were
    found, in words. Fewer than two is refused."""
    import datasets

    _check_column(ds, "label_column", column, path, split)
    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), f"the ClassLabel names of column {column!r}"
    raw = ds.data.column(column).to_pylist()
    named = {}
    for value, name in zip(raw, label_values(ds, column)):
        if value is not None and name.strip() and name not in named:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number and re.fullmatch(r"[-+]?\d+(\.\d+)?", name.strip()):
                number, value = True, float(name)  # a CSV cell of digits, kept as written
            named[name] = (0, value, name) if number else (1, 0, name)
    labels = sorted(named, key=named.__getitem__)
    if len(labels) < 2:
        found = f"only {labels[0]!r}" if labels else "no label"
        raise UserError(f"{path}: cannot infer labels: column {column!r} of split {split!r} "
                        f"holds {found}; a classifier needs two or more (give labels)")
    return labels, f"the sorted distinct values of column {column!r} in split {split!r}"


def _json_value(text: Any) -> str:
    """A label of a mixed-kind JSON column (stored as JSON text): a string as
    itself, anything else as its JSON."""
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return str(text)
    return value if isinstance(value, str) else json.dumps(value)


def _empty_texts(ds: Any, rows: np.ndarray, column: str, path: Path, split: str,
                 field_name: str, cfg: DataConfig) -> np.ndarray:
    """The `rows` whose text in `column` is missing or blank: dropped, or with
    `cfg.empty = "error"` refused, naming the first one's data row and the line
    of the file where it begins. A value that is not text is refused."""
    import datasets

    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        odd = next(((i, v) for i, v in enumerate(ds[column])
                    if v is not None and not isinstance(v, str)), None)
        where = (f": data row {odd[0] + 1} of split {split!r} holds {odd[1]!r}" if odd
                 else f" ({feature})")
        raise UserError(f"{path}: column {column!r} ({field_name}) must hold text{where}")
    texts = ds.data.column(column).to_pylist()
    bad = np.array([int(r) for r in rows if texts[r] is None or not texts[r].strip()], np.int64)
    if len(bad) and cfg.empty == "error":
        line = file_line(path, detect_format(path, cfg.format), cfg.encoding, int(bad[0]))
        at = f", line {line} of the file" if line is not None else ""
        raise UserError(f"{path}: column {column!r} is empty in {len(bad)} row(s) of split "
                        f"{split!r}, first at data row {bad[0] + 1} (1-based, header not "
                        f"counted{at}); fill or remove them, or set empty = \"drop\"")
    return bad


def _check_some_text(ids: np.ndarray, column: str, path: Path, split: str) -> None:
    """Refuse a split whose every row that would be kept has no text."""
    if not (ids >= 0).any():
        raise UserError(f"{path}: column {column!r} is empty in every row of split "
                        f"{split!r} that would be kept; nothing to train on")


def _carve(rows: np.ndarray, cfg: DataConfig, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Split the kept train rows into (train, eval) with `eval_size` random eval rows."""
    assert cfg.eval_size is not None
    size = eval_rows(cfg.eval_size, len(rows))
    if size >= len(rows):
        which = f"with labels in {cfg.labels}" if cfg.labels else "usable"
        what = f" ({size} rows)" if isinstance(cfg.eval_size, float) else ""
        raise UserError(f"{path}: eval_size {cfg.eval_size}{what} leaves no training rows: "
                        f"split {cfg.train_split!r} has {len(rows)} rows {which}")
    shuffled = np.random.default_rng([cfg.seed, _SPLIT_STREAM]).permutation(rows)
    return np.sort(shuffled[size:]), np.sort(shuffled[:size])


def eval_rows(eval_size: int | float, usable: int) -> int:
    """How many of `usable` rows `eval_size` carves out: a count as it is, a
    fraction rounded up (as scikit-learn's train_test_split does), so that a
    fraction always carves at least one row."""
    return math.ceil(eval_size * usable) if isinstance(eval_size, float) else eval_size


def _cap(rows: np.ndarray, cap: int | None, seed: list[int]) -> np.ndarray:
    """A random subset of at most `cap` rows (the same seed gives nested subsets
    for growing caps), in file order."""
    if cap is None or len(rows) <= cap:
        return rows
    return np.sort(np.random.default_rng(seed).permutation(rows)[:cap])


def _check_two_classes(ids: np.ndarray, labels: list[str], path: Path) -> None:
    present = np.unique(ids)
    if len(present) < 2:
        raise UserError(f"{path}: the training set has only one class, "
                        f"{labels[int(present[0])]!r} ({len(ids)} rows); a classifier needs "
                        "at least two (check labels, label_column and max_train_examples)")


def _check_every_label(ids: np.ndarray, cfg: DataConfig, path: Path) -> None:
    """Refuse a label of `labels` that no training row has: the class would
    train on nothing and could never be predicted for a reason."""
    missing = [name for i, name in enumerate(cfg.labels) if not (ids == i).any()]
    if missing:
        raise UserError(f"{path}: label(s) {', '.join(map(repr, missing))} of labels have no "
                        f"training row in split {cfg.train_split!r} (column "
                        f"{cfg.label_column!r}, after eval rows and max_train_examples); "
                        "check the values there, or leave them out of labels")


def label_counts(ids: np.ndarray, labels: list[str]) -> dict[str, int]:
    """Rows per label name, of class ids `ids`."""
    return {name: int((ids == i).sum()) for i, name in enumerate(labels)}
