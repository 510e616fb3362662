"""The data preparation in order: `prepare` (train and eval) and `prepare_eval`.

Stage 5 of `jaxlora.data`, the top, imported by no other stage: resolve the
source, read it (`files`), choose the rows (`rows`), tokenize them
(`tokenize`) into `Split`s (`batches`), and count what was read and kept
(`DataStats`). One sequence for both tasks: they differ only in what the rows
stage reads (labels or not) and how the rows are tokenized. With several
processes, each reads its share and the statistics are summed over all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.data.batches import ORDER, Split
from jaxlora.data.config import DataConfig
from jaxlora.data.files import detect_format, get_split, load, quiet_datasets
from jaxlora.data.rows import SplitRows, infer_labels, label_counts, read_labels, select_rows
from jaxlora.data.tokenize import (LmFormat, fitting_rows, tokenize_causal_lm,
                                   tokenize_classification)
from jaxlora.errors import UserError
from jaxlora.runtime import Hosting
from jaxlora.sources import resolve


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
    # causal-lm: rows dropped because their targets would not fit max_length
    too_long: dict[str, int] = field(default_factory=dict)
    # rows dropped for a missing or blank text, by split of the source (none: {})
    empty_texts: dict[str, int] = field(default_factory=dict)
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
    """Load, filter, split, cap and tokenize `cfg.source` (see `jaxlora.data`).

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
        packed = int(data.train._deal(train_hosting.rows).counts.sum())
    return dataclasses.replace(data, stats=dataclasses.replace(stats, **counts,
                                                               packed_rows=packed))


def _read(cfg: DataConfig, tokenizer: Any, task: str, base_dir: Path | None,
          cache_dir: Path | None, train_hosting: Hosting | None, eval_hosting: Hosting | None,
          prompts: int) -> PreparedData:
    """`prepare` up to what needs the other processes: the statistics count
    this process's share only. Classification reads labels (`labelled`);
    causal-lm reads texts only, and holds the first `prompts` eval examples."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{type(tokenizer).__name__} is not a fast tokenizer; the model folder "
                        "needs a tokenizer.json")
    labelled = task != "causal-lm"
    path = resolve(cfg.source, "dataset", base_dir)
    fmt = detect_format(path, cfg.format)
    with quiet_datasets():
        splits = load(path, fmt, cfg.encoding, cache_dir)
        train_ds = get_split(splits, cfg.train_split, path)
        if labelled and cfg.labels is None:
            cfg = cfg.model_copy(update={"labels": infer_labels(
                train_ds, cfg.label_column, path, cfg.train_split)[0]})
        if not labelled and cfg.pairs and not cfg.chat and tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no eos token, which ends every response")
        lm = None if labelled else LmFormat.of(cfg, chat_template(cfg, tokenizer, base_dir))
        chosen = select_rows(cfg, splits, train_ds, path, labelled=labelled)
        head = None
        if labelled:
            train, train_cut = tokenize_classification(chosen.train, tokenizer, cfg, path,
                                                       train_hosting)
            eval_, eval_cut = tokenize_classification(chosen.eval, tokenizer, cfg, path,
                                                      eval_hosting)
        else:
            (train_rows, train_long), (eval_rows, eval_long) = (
                fitting_rows(part, tokenizer, cfg, path, fmt=lm)
                for part in (chosen.train, chosen.eval))
            chosen = dataclasses.replace(chosen, train=train_rows, eval=eval_rows,
                                         too_long={"train": train_long, "eval": eval_long})
            train, train_cut = tokenize_causal_lm(chosen.train, tokenizer, cfg, path,
                                                  train_hosting, fmt=lm, packing=cfg.packing)
            eval_, eval_cut = tokenize_causal_lm(chosen.eval, tokenizer, cfg, path, eval_hosting,
                                                 fmt=lm)
            if prompts:  # the prompts greedy decoding compares, held by every process
                first = dataclasses.replace(chosen.eval, rows=chosen.eval.rows[:prompts])
                head = (eval_.head(prompts) if eval_.index is None else
                        tokenize_causal_lm(first, tokenizer, cfg, path, fmt=lm)[0])
    named = cfg.labels is not None  # classification, or answers that name labels
    stats = DataStats(
        source=str(path), format=fmt, label_names=list(cfg.labels) if named else [],
        train_size=len(train), eval_size=len(eval_),
        label_counts={"train": label_counts(chosen.train.labels, cfg.labels),
                      "eval": label_counts(chosen.eval.labels, cfg.labels)} if named else {},
        dropped=dict(sorted(chosen.dropped.items())),
        truncated={"train": train_cut, "eval": eval_cut},
        # causal-lm: the first token of an example is never predicted
        target_tokens={} if labelled else {"train": int(train.loss_mask[:, 1:].sum()),
                                           "eval": int(eval_.loss_mask[:, 1:].sum())},
        too_long={} if labelled else chosen.too_long, empty_texts=chosen.empty)
    return PreparedData(train=train, eval=eval_, stats=stats, prompts=head)


def labels_of(cfg: DataConfig, *, base_dir: Path | None = None,
              cache_dir: Path | None = None) -> tuple[list[str], str]:
    """The labels a classification `cfg` trains on: `cfg.labels`, else
    inferred from its train split (`rows.infer_labels`: a ClassLabel column's
    names, or the sorted distinct values); and how they were found, in words.
    Reading the same data gives the same list, on any process."""
    if cfg.labels is not None:
        return list(cfg.labels), "the recipe's labels"
    path = resolve(cfg.source, "dataset", base_dir)
    with quiet_datasets():
        splits = load(path, detect_format(path, cfg.format), cfg.encoding, cache_dir)
        return infer_labels(get_split(splits, cfg.train_split, path), cfg.label_column, path,
                            cfg.train_split)


def is_inline_template(text: str) -> bool:
    """Whether `data.chat_template` holds the Jinja text itself, not the name
    of a file holding it."""
    return "{{" in text or "{%" in text


def chat_template(cfg: DataConfig, tokenizer: Any, base_dir: Path | None) -> str | None:
    """The chat template `cfg.chat` renders with: `data.chat_template` (its text,
    or the file it names, relative to `base_dir`), else None for the
    tokenizer's own; a UserError when there is neither."""
    if not cfg.chat:
        return None
    given = cfg.chat_template
    if given is None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("data.chat: the model's tokenizer has no chat template; give one "
                            "as data.chat_template (the Jinja text, or a file holding it)")
        return None
    if is_inline_template(given):
        return given
    file = Path(given).expanduser()
    if not file.is_absolute() and base_dir is not None:
        file = base_dir / file
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"data.chat_template: {given!r} is neither a Jinja template nor a "
                        f"readable file ({getattr(e, 'strerror', None) or e})") from None


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
    fmt = detect_format(path, cfg.format)
    with quiet_datasets():
        splits = load(path, fmt, cfg.encoding, cache_dir)
        name = split or ("test" if "test" in splits else "train")
        ds = get_split(splits, name, path)
        ids, dropped, empty = read_labels(ds, cfg, path, name)
        rows = np.flatnonzero(ids >= 0)
        examples, cut = tokenize_classification(SplitRows(ds, rows, ids, name), tokenizer,
                                              cfg, path)
    return examples, {"source": str(path), "split": name, "rows": len(examples),
                      "label_counts": label_counts(examples.labels, cfg.labels),
                      "dropped": dict(sorted(dropped.items())),
                      **({"empty_texts": empty} if empty else {}), "truncated": cut}


def _summed(hosting: Hosting | None, *counts: int) -> list[int]:
    """Counts of every process, added up."""
    if hosting is None:
        return list(counts)
    return [int(n) for n in hosting.combine(np.array(counts, np.int64))]
