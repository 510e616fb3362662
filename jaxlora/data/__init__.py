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
unreadable, undecodable, empty or malformed files (a file read as UTF-8 that is
not, naming the first bad byte; a UTF-8 file read as latin-1, unless insisted);
missing columns or splits; no rows left after label filtering; a single-class
training set, or a label of `labels` with no training row; an `eval_size` that
leaves no training rows. Two things are dropped, and `DataStats` counts them:
rows whose label is not in `labels` (say the tweets' `neutral`), and rows whose
text is missing or blank (with `empty = "error"` refused instead, naming the
data row and the file line). CSV cells are read as written: `NA` or `null` is
a label like any other, only an empty cell is missing. Without `labels`, a
classifier's are inferred from the train split (`labels_of`).

`datasets` takes about a second to import, so the functions that need it
import it themselves: validating a recipe's `DataConfig` stays cheap.
"""

from jaxlora.data.batches import (ORDER, TOKEN_ARRAYS, Split, held_examples, pack, slot_examples,
                                  slot_order)
from jaxlora.data.config import DataConfig
from jaxlora.data.files import SUFFIX_FORMATS, TEXT_FORMATS, Format
from jaxlora.data.prepare import (DataStats, PreparedData, chat_template, is_inline_template,
                                  labels_of, prepare, prepare_eval)
from jaxlora.data.rows import MAX_LISTED_VALUES, MISSING_LABEL, eval_rows
from jaxlora.data.tokenize import LmFormat, tokenize_batch, tokenize_lm_batch
from jaxlora.runtime import Hosting

__all__ = ["MAX_LISTED_VALUES", "MISSING_LABEL", "ORDER", "SUFFIX_FORMATS", "TEXT_FORMATS",
           "TOKEN_ARRAYS", "DataConfig", "DataStats", "Format", "Hosting", "LmFormat",
           "PreparedData", "Split", "chat_template", "eval_rows", "held_examples",
           "is_inline_template", "labels_of",
           "pack", "prepare", "prepare_eval", "slot_examples", "slot_order", "tokenize_batch",
           "tokenize_lm_batch"]
