"""Reading a source into splits, and the checks of its files.

Stage 1 of `jaxlora.data`: a resolved local file or folder -> the `datasets`
splits (`load`; a file is one split, "train"; a folder's splits are named by
its files). Guarantees that what comes out parsed as the format it claims, or
else a `UserError` naming the file and what to change: the format told from
the suffixes (`detect_format`), an empty file, a UTF-16/32 byte-order mark
under another encoding, a CSV header naming a column twice, bytes that are not
UTF-8 read as UTF-8 (the first one, with its offset and line), a UTF-8 file
read with a single-byte encoding (unless insisted), the first line of a JSON-lines file that is not
an object, CSV files of one folder with other columns, the root cause of a
reader's error, and a missing split (`get_split`). `quiet_datasets` silences
`datasets`' own bars and logs, as these messages say it better.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from jaxlora.errors import UserError

Format = Literal["csv", "json", "parquet"]
# File suffix -> `datasets` builder; `.jsonl` is JSON lines, read by the same builder.
SUFFIX_FORMATS: dict[str, Format] = {".csv": "csv", ".json": "json", ".jsonl": "json",
                                     ".parquet": "parquet"}
# Builders that decode text themselves and so take an `encoding`.
TEXT_FORMATS = ("csv", "json")


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
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


def detect_format(path: Path, fmt: str) -> Format:
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


def codec_of(setting: str) -> tuple[str, bool]:
    """The codec of the `encoding` setting (auto: UTF-8), and whether it is
    insisted on (a name ending in "!")."""
    codec = setting.removesuffix("!")
    return ("utf-8" if codec == "auto" else codec), setting.endswith("!")


def load(path: Path, fmt: Format, setting: str, cache_dir: Path | None) -> Any:
    """`datasets.load_dataset` on a file (one split, "train") or a folder (splits
    named by the files, e.g. train.csv / test.csv), with read errors turned into
    `UserError`s. `setting` is the `encoding` of CSV and JSON files (see
    `codec_of`): auto or UTF-8 refuses bytes that are not UTF-8; another
    encoding refuses a file that is valid UTF-8 with non-ASCII bytes, unless
    insisted on. CSV cells are text as written (`NA`, `null` stay strings);
    only an empty cell is missing."""
    import datasets
    import pyarrow

    encoding, insisted = codec_of(setting)
    if path.is_file() and path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    where = {"data_dir": str(path)} if path.is_dir() else {"data_files": str(path)}
    reader = {"encoding": encoding} if fmt in TEXT_FORMATS else {}
    if fmt == "csv":  # pandas would read NA, n/a, null, None, nan, ... as missing
        reader.update(keep_default_na=False, na_values=[""])
    # Checks of the text files the readers below do not make (or make badly):
    # bytes that are not UTF-8, UTF-8 read as latin-1, a column named twice in a CSV header.
    files = [] if fmt not in TEXT_FORMATS else [path] if path.is_file() else [
        p for p in _data_files(path) if SUFFIX_FORMATS[p.suffix.lower()] == fmt]
    json_files = files if fmt == "json" else []
    for file in files:
        _check_byte_order_mark(file, encoding)
        if codecs.lookup(encoding).name in _UTF8:
            _check_utf8(file, setting)
        elif not insisted:
            _check_not_utf8(file, encoding)
        if fmt == "csv":
            _check_header(file, encoding)
    if files and fmt == "csv":
        reader.update(_as_written(files[0], encoding))
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


def _as_written(file: Path, encoding: str) -> dict:
    """The CSV reader's setting that keeps every cell a string as written
    (pandas would read 01 and 1.50 as the numbers 1 and 1.5): every column of
    the header typed as a string (`datasets` hands the types to pandas). None
    where a column has no name (pandas names it itself)."""
    import datasets

    header = _csv_header(file, encoding)
    if not header or not all(name.strip() for name in header):
        return {}
    return {"features": datasets.Features({name: datasets.Value("string") for name in header})}


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


# Bytes read at a time by the encoding checks, so that a big file costs little memory.
_CHUNK = 1 << 22


# Codec names (`codecs.lookup(...).name`) that read UTF-8.
_UTF8 = ("utf-8", "utf-8-sig")


def _check_utf8(file: Path, setting: str) -> None:
    """Refuse bytes that are not UTF-8, naming the first one, its offset and
    line, and the setting: read chunk by chunk, cheap on a big file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with file.open("rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # the decoder may hold back the first bytes of a character cut by
                # the chunk: the bad byte's offset counts from what it held
                held = len(e.object) - len(chunk)
                at = offset - held + e.start
                line += chunk.count(b"\n", 0, max(e.start - held, 0))
                byte = e.object[e.start]
                raise UserError(f"{file}: byte 0x{byte:02x} at offset {at} (line {line}) is "
                                f"not UTF-8 ({e.reason}), which encoding = \"{setting}\" "
                                "reads; set encoding to the file's one, e.g. "
                                "latin-1 or cp1252") from None
            if not chunk:
                return
            offset += len(chunk)
            line += chunk.count(b"\n")


def _check_not_utf8(file: Path, encoding: str) -> None:
    """Refuse a file read with another `encoding` (latin-1, cp1252, ...) that is
    valid UTF-8 with non-ASCII characters: it is almost surely UTF-8, and read
    so every accent would be garbled ("café" as "cafÃ©"). Stops at the first
    byte that is not UTF-8 (in a real latin-1 file, usually early)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    first, offset = None, 0  # the first non-ASCII byte's offset
    with file.open("rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError:
                return  # not UTF-8: the encoding may well be right
            if first is None:
                found = next((i for i, b in enumerate(chunk) if b >= 0x80), None) \
                    if not chunk.isascii() else None
                first = None if found is None else offset + found
            if not chunk:
                break
            offset += len(chunk)
    if first is None:
        return  # ASCII only: every such encoding reads it alike
    with file.open("rb") as f:
        head = f.read(first + 64)
    line = head.count(b"\n", 0, first) + 1
    # from its line's start, or 24 bytes before it (all ASCII: it is the first)
    start = max(head.rfind(b"\n", 0, first) + 1, first - 24)
    word = head[start:].split(b"\n")[0][:60]
    text = word.decode("utf-8", errors="ignore")
    raise UserError(f"{file}: encoding is {encoding}, but the file is valid UTF-8 with "
                    f"non-ASCII characters (line {line}: {text!r}, which {encoding} reads as "
                    f"{word.decode(encoding, errors='replace')!r}); set encoding = \"auto\" "
                    f"(UTF-8, the default), or write encoding = \"{encoding}!\" to read it as "
                    f"{encoding} anyway")


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


def get_split(splits: Any, name: str, path: Path) -> Any:
    """The split `name` of `splits`; a missing one is refused, listing those there are."""
    if name not in splits:
        raise UserError(f"{path}: no split {name!r}; splits: {', '.join(splits)}")
    return splits[name]


def file_line(path: Path, fmt: str, setting: str, row: int) -> int | None:
    """The line of file `path` where data row `row` (0-based) begins, for
    messages: a CSV row counted as the csv module reads it (a quoted field may
    hold newlines; blank lines hold no row), a JSON-lines row by its line;
    None for anything else (a folder, parquet, a JSON document)."""
    if not path.is_file() or fmt not in TEXT_FORMATS:
        return None
    encoding = codec_of(setting)[0]
    with path.open(encoding=encoding, errors="replace", newline="") as f:
        if fmt == "csv":
            reader = csv.reader(f)
            if next(reader, None) is None:  # the header
                return None
            start, seen = reader.line_num + 1, 0
            for record in reader:
                if record:
                    if seen == row:
                        return start
                    seen += 1
                start = reader.line_num + 1
            return None
        seen = 0
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if seen == 0 and not _json_object(line):
                return None  # one JSON document, not an object per line
            if seen == row:
                return number
            seen += 1
    return None


def _json_object(line: str) -> bool:
    """Whether `line` is one JSON object."""
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False
