"""Rows -> token arrays: the tokenizing stage.

Stage 3 of `jaxlora.data`: the chosen rows of a split (`rows.SplitRows`) ->
a `Split`, right-padded to `max_length` tokens, by a batched fast tokenizer in
a `Dataset.map` that `datasets` caches (the mapped function is a module-level
function with bound, picklable arguments, so the same inputs hash alike and a
second run reuses the cache). A process that feeds only some rows of each
batch tokenizes only their examples (`_share`). Classification: one text ->
ids and mask (`tokenize_batch`); causal-lm: a text, or a templated prompt and
a response with EOS, -> ids, mask and a loss mask of the target tokens
(`tokenize_lm_batch`). Refused: an example that gives no tokens, or (causal-lm)
no token to learn within `max_length`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.data.batches import Split, held_examples, slot_order
from jaxlora.data.config import DataConfig
from jaxlora.data.rows import SplitRows
from jaxlora.errors import UserError
from jaxlora.runtime import Hosting


@dataclass(frozen=True)
class LmColumns:
    """Where a causal-lm example's text is: one text column, or a prompt and a
    response column and the template a prompt is shown in ("{prompt}" is
    replaced by the prompt text). One small frozen value, hashed by `datasets`
    into the cache key of `tokenize_lm_batch`'s `Dataset.map`."""

    text_column: str = "text"
    prompt_column: str | None = None  # with response_column: prompt/response pairs
    response_column: str | None = None
    template: str = "{prompt}"

    @classmethod
    def of(cls, cfg: DataConfig) -> LmColumns:
        """The columns and template `cfg` names."""
        return cls(text_column=cfg.text_column, prompt_column=cfg.prompt_column,
                   response_column=cfg.response_column, template=cfg.template)


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


def tokenize_classification(part: SplitRows, tokenizer: Any, cfg: DataConfig, path: Path,
                            hosting: Hosting | None = None) -> tuple[Split, int]:
    """Tokenize this process's share (`_share`) of the rows of `part` with a cached
    `Dataset.map`; returns the Split and how many examples were truncated."""
    import datasets

    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32"), length=cfg.max_length),
        "attention_mask": datasets.Sequence(datasets.Value("int32"), length=cfg.max_length),
        "truncated": datasets.Value("bool")})
    ds = part.ds
    rows, share = _share(ds, part.rows, hosting, cfg, [cfg.text_column])
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
                  labels=part.ids[rows], buckets=tuple(cfg.length_buckets), **share)
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


def tokenize_causal_lm(part: SplitRows, tokenizer: Any, cfg: DataConfig, path: Path,
                       hosting: Hosting | None = None, *,
                       packing: bool = False) -> tuple[Split, int]:
    """Tokenize this process's share (`_share`) of the rows of `part` for causal-lm
    with a cached `Dataset.map`: token ids with a loss mask (1 where a token is a
    target); the Split packs each row's examples with `packing`. Returns the
    Split and how many examples were truncated."""
    import datasets

    width = datasets.Sequence(datasets.Value("int32"), length=cfg.max_length)
    features = datasets.Features({"input_ids": width, "attention_mask": width,
                                  "loss_mask": width, "truncated": datasets.Value("bool")})
    columns = [cfg.prompt_column, cfg.response_column] if cfg.pairs else [cfg.text_column]
    ds = part.ds
    rows, share = _share(ds, part.rows, hosting, cfg, columns)
    subset = ds.select(rows)
    fn = functools.partial(tokenize_lm_batch, tokenizer=tokenizer, columns=LmColumns.of(cfg),
                           max_length=cfg.max_length, pad_id=tokenizer.pad_token_id or 0,
                           eos_id=tokenizer.eos_token_id)
    arrays = _mapped(subset, fn, features)
    loss_mask = arrays["loss_mask"].astype(np.int32)
    if (empty := np.flatnonzero(loss_mask[:, 1:].sum(axis=1) == 0)).size:
        raise UserError(f"{path}: data row {int(rows[empty[0]]) + 1} of split {part.name!r} "
                        f"leaves no token to learn within max_length {cfg.max_length} (a text "
                        "of one token, or a prompt that fills max_length); raise max_length or "
                        "remove the row")
    split = Split(input_ids=arrays["input_ids"].astype(np.int32),
                  attention_mask=arrays["attention_mask"].astype(np.int32),
                  labels=np.zeros(len(rows), np.int32), buckets=tuple(cfg.length_buckets),
                  loss_mask=loss_mask, packing=packing, **share)
    return split, int(arrays["truncated"].sum())


def tokenize_lm_batch(batch: dict[str, list], *, tokenizer: Any, columns: LmColumns,
                      max_length: int, pad_id: int, eos_id: int | None) -> dict[str, list]:
    """Token ids and loss masks for causal-lm: a text is all targets; a pair is
    the templated prompt (the tokenizer's special tokens, e.g. BOS, included;
    no targets) followed by the response and EOS (targets). Cut to max_length,
    right-padded."""
    if columns.prompt_column is None:
        sequences = [(ids, [1] * len(ids))
                     for ids in tokenizer(batch[columns.text_column])["input_ids"]]
    else:
        prompts = tokenizer([columns.template.replace("{prompt}", p)
                             for p in batch[columns.prompt_column]])["input_ids"]
        responses = tokenizer(batch[columns.response_column],
                              add_special_tokens=False)["input_ids"]
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
