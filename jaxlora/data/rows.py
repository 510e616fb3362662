"""Which rows of which split: the rows that go on to be tokenized.

Stage 2 of `jaxlora.data`, one path for both tasks (`select_rows`): the text
columns are present and every kept row's text is a non-blank string (refused,
never dropped); for classification the labels become class ids, and rows whose
label is not in `labels` are the one thing dropped, and counted (`read_labels`);
causal-lm reads no labels and keeps every row (`_read_texts`). Then the eval
rows: a named split, or `eval_size` rows carved out of train; then the seeded
caps; then, for classification, at least two classes to train on. The draws
are seeded streams of `DataConfig.seed`, so the same settings pick the same
rows, and a larger cap keeps every row of a smaller one.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.answers import first_label, normalized
from jaxlora.data import chat
from jaxlora.data.config import DataConfig
from jaxlora.data.files import get_split
from jaxlora.errors import UserError

# How many distinct label values an error message lists.
MAX_LISTED_VALUES = 20
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
    too_long: dict[str, int] = dataclasses.field(  # causal-lm: rows dropped for max_length
        default_factory=lambda: {"train": 0, "eval": 0})


def select_rows(cfg: DataConfig, splits: Any, train_ds: Any, path: Path, *,
                labelled: bool) -> ChosenRows:
    """The train and eval rows of `splits` (`train_ds` is its train split), checked:
    with `labelled` (classification) rows of a label outside `cfg.labels` are
    dropped and counted, without (causal-lm) every row is kept."""
    read = read_labels if labelled else _read_texts
    train_ids, dropped = read(train_ds, cfg, path, cfg.train_split)
    if cfg.eval_split is not None:
        eval_ds = get_split(splits, cfg.eval_split, path)
        eval_ids, eval_dropped = read(eval_ds, cfg, path, cfg.eval_split)
        dropped.update(eval_dropped)
        train_rows, eval_rows = np.flatnonzero(train_ids >= 0), np.flatnonzero(eval_ids >= 0)
    else:  # eval rows are carved out of the train split
        eval_ds, eval_ids = train_ds, train_ids
        train_rows, eval_rows = _carve(np.flatnonzero(train_ids >= 0), cfg, path)
    train_rows = _cap(train_rows, cfg.max_train_examples, [cfg.seed, _TRAIN_CAP_STREAM])
    eval_rows = _cap(eval_rows, cfg.max_eval_examples, [cfg.seed, _EVAL_CAP_STREAM])
    if labelled:
        _check_two_classes(train_ids[train_rows], cfg.labels, path)
    return ChosenRows(train=SplitRows(train_ds, train_rows, train_ids, cfg.train_split),
                      eval=SplitRows(eval_ds, eval_rows, eval_ids,
                                     cfg.eval_split or cfg.train_split),
                      dropped=dropped)


def _check_column(ds: Any, name: str, column: str, path: Path, split: str) -> None:
    """Refuse a split without `column` (the setting `name`), listing its columns."""
    if column not in ds.column_names:
        raise UserError(f"{path}: no column {column!r} ({name}) in split {split!r}; "
                        f"columns: {', '.join(ds.column_names)}")


def _read_texts(ds: Any, cfg: DataConfig, path: Path,
                split: str) -> tuple[np.ndarray, Counter[str]]:
    """`read_labels` for causal-lm: check a split's text columns (one text, a
    prompt and a response, or conversations) and every row's texts. Without
    `labels` every row is kept, with class id 0; with them each row's answer
    (the response, or the last assistant turn) names its label, and a row
    whose answer names none is dropped and counted under the answer."""
    if cfg.conversations:
        _check_column(ds, "messages_column", cfg.messages_column, path, split)
        answers = [chat.answer(m) for m in conversations(ds, cfg, path, split)]
    else:
        columns = ([("prompt_column", cfg.prompt_column),
                    ("response_column", cfg.response_column)]
                   if cfg.pairs else [("text_column", cfg.text_column)])
        for name, column in columns:
            _check_column(ds, name, column, path, split)
            _check_texts(ds, np.arange(len(ds)), column, path, split, name)
        answers = ds.data.column(cfg.response_column).to_pylist() if cfg.pairs else None
    if cfg.labels is None:
        return np.zeros(len(ds), np.int32), Counter()
    ids = np.array([first_label(a, cfg.labels) if a is not None else -1 for a in answers],
                   np.int32)
    dropped = Counter(normalized(a or "")[:40] for a, i in zip(answers, ids) if i < 0)
    if not (ids >= 0).any():
        found = ", ".join(f"{v!r} ({n})" for v, n in dropped.most_common(MAX_LISTED_VALUES))
        raise UserError(f"{path}: no answer in split {split!r} names a label in {cfg.labels}; "
                        f"answers found: {found}")
    return ids, dropped


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
                split: str) -> tuple[np.ndarray, Counter[str]]:
    """Check a split's columns, labels and texts; return the class id per row
    (-1 for a label outside `cfg.labels`) and the dropped label values with
    their row counts."""
    import datasets

    for name, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        _check_column(ds, name, column, path, split)
    # A freshly loaded split has no indices mapping, so its Arrow table is its rows.
    raw = ds.data.column(cfg.label_column).to_pylist()
    feature = ds.features[cfg.label_column]
    if isinstance(feature, datasets.ClassLabel):
        # Hub sets store class indices; -1 marks an unlabelled row (e.g. GLUE test).
        values = [feature.names[v] if v is not None and 0 <= v < len(feature.names) else str(v)
                  for v in raw]
    elif type(feature).__name__ == "Json":
        # A JSON column of mixed kinds ("positive" in most rows, 1 in one) is kept
        # as each value's JSON text: the strings are labels, the rest are values
        # outside `labels`, dropped and counted like any other.
        values = [_json_value(v) for v in raw]
    else:
        values = [str(v) for v in raw]
    class_id = {name: i for i, name in enumerate(cfg.labels)}
    ids = np.array([class_id.get(v, -1) for v in values], np.int32)
    dropped = Counter(v for v, i in zip(values, ids) if i < 0)
    if not (ids >= 0).any():
        found = ", ".join(f"{v!r} ({n})" for v, n in dropped.most_common(MAX_LISTED_VALUES))
        raise UserError(f"{path}: no row of split {split!r} has a label in {cfg.labels} "
                        f"(column {cfg.label_column!r}); values found: {found}")
    _check_texts(ds, np.flatnonzero(ids >= 0), cfg.text_column, path, split)
    return ids, dropped


def _json_value(text: Any) -> str:
    """A label of a mixed-kind JSON column (stored as JSON text): a string as
    itself, anything else as its JSON."""
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return str(text)
    return value if isinstance(value, str) else json.dumps(value)


def _check_texts(ds: Any, rows: np.ndarray, column: str, path: Path, split: str,
                 field_name: str = "text_column") -> None:
    """Refuse a missing, blank or non-string text in any of `rows`."""
    import datasets

    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        odd = next(((i, v) for i, v in enumerate(ds[column])
                    if v is not None and not isinstance(v, str)), None)
        where = (f": data row {odd[0] + 1} of split {split!r} holds {odd[1]!r}" if odd
                 else f" ({feature})")
        raise UserError(f"{path}: column {column!r} ({field_name}) must hold text{where}")
    texts = ds.data.column(column).to_pylist()
    bad = [int(r) for r in rows if texts[r] is None or not texts[r].strip()]
    if bad:
        raise UserError(f"{path}: column {column!r} is empty in {len(bad)} row(s) of split "
                        f"{split!r}, first at data row {bad[0] + 1} (1-based, header not "
                        "counted); fill or remove them")


def _carve(rows: np.ndarray, cfg: DataConfig, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Split the kept train rows into (train, eval) with `eval_size` random eval rows."""
    assert cfg.eval_size is not None
    if cfg.eval_size >= len(rows):
        which = f"with labels in {cfg.labels}" if cfg.labels else "usable"
        raise UserError(f"{path}: eval_size {cfg.eval_size} leaves no training rows: split "
                        f"{cfg.train_split!r} has {len(rows)} rows {which}")
    shuffled = np.random.default_rng([cfg.seed, _SPLIT_STREAM]).permutation(rows)
    return np.sort(shuffled[cfg.eval_size:]), np.sort(shuffled[:cfg.eval_size])


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


def label_counts(ids: np.ndarray, labels: list[str]) -> dict[str, int]:
    """Rows per label name, of class ids `ids`."""
    return {name: int((ids == i).sum()) for i, name in enumerate(labels)}
