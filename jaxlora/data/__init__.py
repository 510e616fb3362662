"""Step 2, prepare the data: a labelled text file or hub dataset -> fixed-shape
numpy batches for sequence classification (or, for causal-lm, texts or
prompt/response pairs with a loss mask; no labels).

One module per stage, each testable alone; imports point down (prepare ->
tokenize -> rows -> files, tokenize -> batches, and rows, tokenize, prepare
-> config; files, batches and config import no other stage):

    config.py    `DataConfig`: where the texts come from, how to cut them
    files.py     source -> splits with `datasets`, and the checks of the files
    rows.py      which rows of which split: columns, texts, labels -> class ids,
                 eval split or carved rows, seeded caps (both tasks, one path)
    tokenize.py  rows -> token arrays (a cached `Dataset.map`), this process's share
    batches.py   `Split`: examples -> fixed-shape batches (rows dealt, buckets, packing)
    prepare.py   `prepare`, `prepare_eval`: the stages in order, and `DataStats`

    source --resolve--> local file/folder --datasets.load_dataset--> splits   files
        -> label names -> class ids (rows with other labels dropped and counted)  rows
        -> train / eval (a named split, or `eval_size` rows carved out of train)
        -> optional seeded caps
        -> Dataset.map(fast tokenizer), cached by `datasets`                  tokenize
        -> numpy arrays, once: `Split(input_ids, attention_mask, labels)`      batches

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

from jaxlora.data.batches import (ORDER, TOKEN_ARRAYS, Split, held_examples, pack, slot_examples,
                                  slot_order)
from jaxlora.data.config import DataConfig
from jaxlora.data.files import SUFFIX_FORMATS, TEXT_FORMATS, Format
from jaxlora.data.prepare import DataStats, PreparedData, chat_template, prepare, prepare_eval
from jaxlora.data.rows import MAX_LISTED_VALUES
from jaxlora.data.tokenize import LmFormat, tokenize_batch, tokenize_lm_batch
from jaxlora.runtime import Hosting

__all__ = ["MAX_LISTED_VALUES", "ORDER", "SUFFIX_FORMATS", "TEXT_FORMATS", "TOKEN_ARRAYS",
           "DataConfig", "DataStats", "Format", "Hosting", "LmFormat", "PreparedData", "Split",
           "chat_template", "held_examples", "pack", "prepare", "prepare_eval", "slot_examples", "slot_order",
           "tokenize_batch", "tokenize_lm_batch"]
