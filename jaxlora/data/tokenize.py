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

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.data import chat
from jaxlora.data.batches import Split, held_examples, slot_order
from jaxlora.data.config import DataConfig
from jaxlora.data.rows import SplitRows
from jaxlora.errors import UserError
from jaxlora.runtime import Hosting


@dataclass(frozen=True)
class LmFormat:
    """How a causal-lm example is read and shown: one text column, a prompt and
    a response column (the prompt shown through `template`, "{prompt}"
    replaced), or with `chat` a conversation rendered by the chat template
    (`chat_template`: its text, None for the tokenizer's own) whose
    `train_on` turns are the targets; and what becomes of a row longer than
    max_length (`too_long`). One small frozen value, hashed by `datasets`
    into the cache key of `tokenize_lm_batch`'s `Dataset.map`."""

    text_column: str = "text"
    prompt_column: str | None = None  # with response_column: prompt/response pairs
    response_column: str | None = None
    template: str = "{prompt}"
    chat: bool = False
    messages_column: str = "messages"
    chat_template: str | None = None
    system_prompt: str | None = None
    train_on: str = "assistant"
    too_long: str = "drop"

    @classmethod
    def of(cls, cfg: DataConfig, chat_template: str | None = None) -> LmFormat:
        """What `cfg` says, with the chat template resolved to its text."""
        return cls(text_column=cfg.text_column, prompt_column=cfg.prompt_column,
                   response_column=cfg.response_column, template=cfg.template, chat=cfg.chat,
                   messages_column=cfg.messages_column, chat_template=chat_template,
                   system_prompt=cfg.system_prompt, train_on=cfg.train_on,
                   too_long=cfg.too_long)

    @property
    def conversations(self) -> bool:
        return self.chat and self.prompt_column is None


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
        if cfg.conversations:  # the characters of every turn's text
            values = ds.data.column(cfg.messages_column).to_pylist()
            sizes += np.array([sum(len(str(m.get("content") or m.get("value") or ""))
                                   for m in values[r]) for r in rows], np.int64)
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
                       hosting: Hosting | None = None, *, fmt: LmFormat,
                       packing: bool = False) -> tuple[Split, int]:
    """Tokenize this process's share (`_share`) of the rows of `part` for causal-lm
    with a cached `Dataset.map`: token ids with a loss mask (1 where a token is a
    target), each row cut to max_length as `fmt.too_long` says (the rows are
    those `fitting_rows` kept); the Split packs each row's examples with
    `packing`. Returns the Split and how many examples were cut."""
    ds = part.ds
    rows, share = _share(ds, part.rows, hosting, cfg, _text_columns(fmt))
    arrays = _lm_arrays(ds.select(rows), tokenizer, fmt, cfg.max_length)
    loss_mask = arrays["loss_mask"].astype(np.int32)
    if (empty := np.flatnonzero(loss_mask[:, 1:].sum(axis=1) == 0)).size:
        raise UserError(_nothing_to_learn(path, int(rows[empty[0]]), part.name, cfg))
    split = Split(input_ids=arrays["input_ids"].astype(np.int32),
                  attention_mask=arrays["attention_mask"].astype(np.int32),
                  labels=part.ids[rows], buckets=tuple(cfg.length_buckets),
                  loss_mask=loss_mask, packing=packing, **share)
    return split, int(arrays["truncated"].sum())


def fitting_rows(part: SplitRows, tokenizer: Any, cfg: DataConfig, path: Path, *,
                 fmt: LmFormat) -> tuple[SplitRows, int]:
    """The rows of `part` that fit max_length as `cfg.too_long` says, and how
    many were dropped: every chosen row is tokenized once here (the same
    cached `Dataset.map` as `tokenize_causal_lm`'s), so that a conversation
    the chat template cannot render is refused naming its row, and so that
    every process deals the same rows to the batches. A row whose targets
    would be cut (`_cut`) is dropped ("drop"), refused ("error"); "truncate"
    keeps every row that has something to learn."""
    arrays = _lm_arrays(part.ds.select(part.rows), tokenizer, fmt, cfg.max_length)
    for i, problem in enumerate(arrays["problem"]):
        if problem:
            raise UserError(f"{path}: data row {int(part.rows[i]) + 1} of split "
                            f"{part.name!r}: {problem}")
    fits = np.asarray(arrays["fits"], bool)
    if cfg.too_long == "error" and not fits.all():
        raise UserError(_nothing_to_learn(path, int(part.rows[np.argmin(fits)]), part.name, cfg))
    if not fits.any() and len(fits):
        raise UserError(f"{path}: no row of split {part.name!r} fits max_length {cfg.max_length} "
                        "with its targets whole; raise max_length")
    return dataclasses.replace(part, rows=part.rows[fits]), int((~fits).sum())


def _nothing_to_learn(path: Path, row: int, split: str, cfg: DataConfig) -> str:
    """Why a row does not fit max_length, and what to do about it."""
    if cfg.conversations and cfg.train_on != "all":
        return (f"{path}: data row {row + 1} of split {split!r}: an assistant turn the loss "
                f"counts is cut by max_length {cfg.max_length}; raise max_length, or set "
                "data.too_long = \"drop\" (or \"truncate\")")
    return (f"{path}: data row {row + 1} of split {split!r} leaves no token to learn within "
            f"max_length {cfg.max_length} (a text of one token, or a prompt that fills "
            "max_length); raise max_length or remove the row, or set data.too_long = \"drop\"")


def _text_columns(fmt: LmFormat) -> list[str]:
    """The columns whose characters size an example (length buckets deal by them)."""
    if fmt.conversations:
        return []
    return [fmt.prompt_column, fmt.response_column] if fmt.prompt_column else [fmt.text_column]


def _lm_arrays(subset: Any, tokenizer: Any, fmt: LmFormat, max_length: int
               ) -> dict[str, np.ndarray]:
    """`tokenize_lm_batch` over `subset` (a cached `Dataset.map`), as numpy arrays."""
    import datasets

    width = datasets.Sequence(datasets.Value("int32"), length=max_length)
    features = datasets.Features({"input_ids": width, "attention_mask": width,
                                  "loss_mask": width, "truncated": datasets.Value("bool"),
                                  "fits": datasets.Value("bool"),
                                  "problem": datasets.Value("string")})
    fn = functools.partial(tokenize_lm_batch, tokenizer=tokenizer, fmt=fmt,
                           max_length=max_length, pad_id=tokenizer.pad_token_id or 0,
                           eos_id=tokenizer.eos_token_id)
    return _mapped(subset, fn, features)


def tokenize_lm_batch(batch: dict[str, list], *, tokenizer: Any, fmt: LmFormat,
                      max_length: int, pad_id: int, eos_id: int | None) -> dict[str, list]:
    """Token ids and loss masks for causal-lm: a text is all targets; a pair is
    the templated prompt (the tokenizer's special tokens, e.g. BOS, included;
    no targets) followed by the response and EOS (targets); with `fmt.chat` a
    conversation (or a pair as one) as the chat template writes it, its
    `train_on` turns the targets. Cut to max_length (`_cut`), right-padded;
    `fits` says whether the row keeps its targets, `problem` why a
    conversation could not be rendered ("" when it could)."""
    problems = [""] * len(next(iter(batch.values())))
    if fmt.chat:
        sequences = _chat_sequences(batch, tokenizer, fmt, problems)
    elif fmt.prompt_column is None:
        sequences = [(ids, [1] * len(ids)) for ids in tokenizer(batch[fmt.text_column])["input_ids"]]
    else:
        prompts = tokenizer([fmt.template.replace("{prompt}", p)
                             for p in batch[fmt.prompt_column]])["input_ids"]
        responses = tokenizer(batch[fmt.response_column], add_special_tokens=False)["input_ids"]
        sequences = [(p + r + [eos_id], [0] * len(p) + [1] * (len(r) + 1))
                     for p, r in zip(prompts, responses)]
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "loss_mask": [],
                            "truncated": [], "fits": [], "problem": problems}
    for ids, mask in sequences:
        out["truncated"].append(len(ids) > max_length)
        ids, mask, fits = _cut(ids, mask, fmt, max_length)
        pad = max_length - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["attention_mask"].append([1] * len(ids) + [0] * pad)
        out["loss_mask"].append(mask + [0] * pad)
        out["fits"].append(fits)
    return out


def _cut(ids: list[int], mask: list[int], fmt: LmFormat,
         max_length: int) -> tuple[list[int], list[int], bool]:
    """One example cut to `max_length`, and whether it keeps its targets: with
    "truncate" pairs and conversations lose tokens from the left (the answer
    kept), texts from the right; otherwise everything past max_length goes, and
    the row fits where something is left to learn, for a conversation only
    where no counted turn is cut."""
    if len(ids) > max_length and fmt.too_long == "truncate" and \
            (fmt.prompt_column is not None or fmt.chat):
        ids, mask = ids[-max_length:], mask[-max_length:]
    kept = mask[:max_length]
    fits = sum(kept[1:]) > 0
    if fmt.conversations and fmt.train_on != "all":
        fits = fits and sum(mask[max_length:]) == 0
    return ids[:max_length], kept, bool(fits)


def _chat_sequences(batch: dict[str, list], tokenizer: Any, fmt: LmFormat,
                    problems: list[str]) -> list[tuple[list[int], list[int]]]:
    """Each row as its chat-rendered token ids and loss mask (the tokens that
    overlap a counted span, as transformers' assistant masks count them: a
    token " positive" whose space is the template's still counts); a row that
    cannot be rendered gets no tokens and its `problems` entry."""
    texts, spans = [], []
    for i in range(len(problems)):
        try:
            if fmt.conversations:
                messages = chat.messages_of(batch[fmt.messages_column][i])
            else:
                messages = chat.pair_messages(batch[fmt.prompt_column][i],
                                              batch[fmt.response_column][i], fmt.template,
                                              fmt.system_prompt)
            text, counted = chat.render(tokenizer, messages, fmt.chat_template, fmt.train_on)
        except ValueError as e:
            problems[i], text, counted = str(e), "", []
        texts.append(text)
        spans.append(counted)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    sequences = []
    for ids, offsets, counted in zip(enc["input_ids"], enc["offset_mapping"], spans):
        mask = [int(any(start < b and end > a for a, b in counted)) for start, end in offsets]
        sequences.append((ids, mask))
    return sequences
