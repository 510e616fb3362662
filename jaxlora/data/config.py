"""The data settings: `DataConfig`, the `[data]` table of a recipe.

Stage 0 of `jaxlora.data`, below every other: what to read and how to cut it,
checked when the recipe is validated (unknown keys, repeated labels, an unknown
text encoding, an eval_size fraction of 1 or more, bad length buckets, prompt
without response, not exactly one eval source). Imports neither `datasets` nor any other stage, so validating a
recipe stays cheap.
"""

from __future__ import annotations

import codecs
from collections import Counter
from typing import Literal

import pydantic
from pydantic import ConfigDict, Field


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
    # Classification without them: inferred from the data (a ClassLabel column's names,
    # else the sorted distinct values of the train split; the runner records them).
    # For causal-lm, optional: the answers (the response, or the last assistant turn)
    # each name one of them; rows whose answer names none are dropped and counted, and
    # evaluation judges the generated answers by label.
    labels: list[str] | None = Field(None, min_length=2)
    # causal-lm prompt/response pairs: the two columns (instead of text_column); the
    # loss counts response tokens only.
    prompt_column: str | None = None
    response_column: str | None = None
    # How a prompt is shown to the model; "{prompt}" is replaced by the prompt text.
    template: str = "{prompt}"
    # causal-lm: render each example with the model's chat template: the rows of
    # messages_column (conversations), or each prompt/response pair as one user turn
    # (the template applied) and one assistant turn, after system_prompt if given.
    chat: bool = False
    # Conversations: a list of {role, content} per row (system / user / assistant), or
    # ShareGPT's {from, value} (system / human / gpt).
    messages_column: str = "messages"
    # A chat template (Jinja) for a model without one, or to replace its own: the
    # template itself, or the path of a file holding it (relative to the recipe).
    chat_template: str | None = None
    # Pairs rendered with chat: the system turn before each prompt (none if unset).
    system_prompt: str | None = None
    # The tokens the loss counts with chat: every assistant turn (with its end-of-turn
    # token), the last assistant turn only, or every token.
    train_on: Literal["assistant", "last", "all"] = "assistant"
    # causal-lm rows longer than max_length: drop (those whose targets would be cut:
    # a response cut away, or for conversations any counted assistant turn cut;
    # counted in the report), truncate (cut from the left, keeping the response),
    # or error (refuse the run, naming the row). Classification always truncates.
    too_long: Literal["drop", "truncate", "error"] = "drop"
    # causal-lm: pack several training examples into each max_length row (attention
    # and positions stay within each example); evaluation is never packed.
    packing: bool = False
    # Text encoding of CSV and JSON files; parquet ignores it. auto: UTF-8, and a file
    # that is not is refused, naming its first bad byte. Another encoding (latin-1,
    # cp1252) refuses a file that is valid UTF-8 with non-ASCII characters (it would
    # read "café" as "cafÃ©") unless the name ends in "!" ("latin-1!": read it so anyway).
    encoding: str = "auto"
    # Rows whose text is missing or blank: drop them (counted per split), or error
    # (refuse the run, naming the data row and the file line).
    empty: Literal["drop", "error"] = "drop"
    # Tokens per example; every example is padded or truncated to it.
    max_length: int = Field(128, gt=0, le=8192)
    # Split to train on (a single file is one split named "train").
    train_split: str = "train"
    # Split to evaluate on; give this or eval_size.
    eval_split: str | None = None
    # Carve this many random rows out of the train split for eval, or a fraction of its
    # usable rows (0 < x < 1, rounded up); give this or eval_split.
    eval_size: int | float | None = Field(None, gt=0)
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

    @pydantic.field_validator("eval_size")
    @classmethod
    def _count_or_fraction(cls, size: int | float | None) -> int | float | None:
        if isinstance(size, float) and not size < 1:
            raise ValueError(f"a fraction of the train split must lie between 0 and 1, a "
                             f"number of rows is a whole number (got {size})")
        return size

    @pydantic.field_validator("encoding")
    @classmethod
    def _known_encoding(cls, setting: str) -> str:
        encoding = setting.removesuffix("!")
        if encoding == "auto":
            if setting != encoding:
                raise ValueError('"auto!" insists on nothing: write "auto", or the '
                                 'encoding to insist on (e.g. "latin-1!")')
            return setting
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
        return setting

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

    @property
    def conversations(self) -> bool:
        """Conversation data: the rows of `messages_column`, rendered with chat."""
        return self.chat and not self.pairs

    @property
    def answered(self) -> bool:
        """Data with an answer to judge: prompt/response pairs or conversations."""
        return self.pairs or self.chat

    @pydantic.model_validator(mode="after")
    def _one_eval_source(self) -> DataConfig:
        if (self.eval_split is None) == (self.eval_size is None):
            raise ValueError("give exactly one of eval_split (a named split, e.g. 'test') "
                             "and eval_size (rows carved out of the train split)")
        if self.eval_split == self.train_split:
            raise ValueError(f"eval_split and train_split are both {self.train_split!r}; "
                             "use eval_size to carve eval rows out of it")
        return self

