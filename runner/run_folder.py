"""A run folder's files: where they are, how they are written whole, read
back and checked, and who may write them. No JAX here: a folder can be
listed, read and compared without starting a device.

    runs/<name>/<timestamp>/
      recipe.toml      the resolved recipe (defaults filled in): rerun it as is
      manifest.json    recipe hash, versions, devices, base-model fingerprint,
                       parameter counts, timings; status running -> finished
                       (its shape: `runner.manifest`)
      metrics.jsonl    one JSON line per `train.log_every` steps ({"step", "loss", ...})
                       and per `eval.every_steps` evaluation ({"step", "eval": {...}})
      eval.json        metrics before and after fine-tuning
      report.md        the comparison table, the charts, label counts and timings
      loss.png         train and eval loss over the steps (runner.charts)
      before_after.png the headline metrics before and after, as bars
      tensorboard/     TensorBoard events, when output.tensorboard = true
      checkpoints/     <step>/ (jaxlora.checkpoint)
      pissa.safetensors  adapter.init = "pissa": the factors A, B the adapters
                       started from, from which the frozen residual W0 - s A B is
                       rebuilt exactly (an SVD is not bit-reproducible elsewhere)
      evals/           <timestamp>.json, one per `runner eval`
      .lock            held while a process trains in the folder

Every file is replaced whole (a temporary file renamed into place), so a
killed process never leaves half a file where a good one was. With several
processes only process 0 writes them; its callers see to that.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from jaxlora.errors import UserError

CHECKPOINTS = "checkpoints"
LOCK = ".lock"
METRICS = "metrics.jsonl"
PISSA = "pissa.safetensors"


# -- writing -------------------------------------------------------------------

def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed process never leaves a
    half-written file in place of a good one."""
    replace_whole(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_whole(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the file at a temporary path, renamed to `path` once
    complete (as `write_atomic`, for files that are not text)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: the old file stays as it was
        raise OSError(e.errno, e.strerror, str(path)) from None  # named as the user knows it


def write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def stamped_names(ext: str = "") -> Iterator[str]:
    """`<UTC timestamp><ext>`, then `<timestamp>-2<ext>` ... `-999`: the names to
    try, in turn, for something new (a run folder, an evaluation file).
    `stamp_order` sorts them in the order they were made."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    yield f"{stamp}{ext}"
    for i in range(2, 1000):
        yield f"{stamp}-{i}{ext}"


def stamp_order(path: Path) -> tuple[str, int]:
    """Sort key of names from `stamped_names`, in the order they were made:
    `20261126-050000-2` after `20261126-050000`, `-10` after `-2`; an extension
    (`.json`) does not count."""
    stamp, _, suffix = path.name.split(".")[0].partition("-")
    time, _, count = suffix.partition("-")
    return (f"{stamp}-{time}", int(count) if count.isdigit() else 0)


def new_run_dir(root: Path, name: str) -> Path:
    """A fresh folder `root/name/<UTC timestamp>`; never reuses an existing one."""
    base = root / name
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output.dir: cannot create {base}: {e.strerror}") from None
    for stamped in stamped_names():
        path = base / stamped
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"output.dir: cannot create {path}: {e.strerror}") from None
    raise UserError(f"output.dir: cannot create a run folder under {base}: every name of "
                    "this second is taken")


def fresh_file(folder: Path, ext: str) -> Path:
    """A new file's path in `folder` (an evaluation of `runner eval`);
    `stamp_order` lists them in the order written."""
    for name in stamped_names(ext):
        path = folder / name
        if not path.exists():
            return path
    raise RuntimeError(f"no free file name in {folder}")


def lock_run(run_dir: Path):
    """Hold RUN_DIR/.lock (an advisory `flock`) for as long as the returned file
    stays open; the OS releases it when the process ends, however it ends. A
    UserError if another process holds it: two processes must never train in
    one run folder."""
    path = run_dir / LOCK
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot create the run folder's lock: {e.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{run_dir}: in use by {owner}; wait for it to end, or start a "
                        "new run with --fresh") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


# -- finding and reading -------------------------------------------------------

def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def runs_of(root: Path, name: str) -> list[Path]:
    """The run folders of recipe `name` under `root`, oldest first (folder
    names are UTC timestamps, so they sort in time order)."""
    base = root / name
    if not base.is_dir():
        return []
    return sorted((p for p in base.iterdir() if is_run_dir(p)), key=stamp_order)


def newest_run(root: Path, name: str) -> Path | None:
    """The most recent run folder of recipe `name` under `root`."""
    runs = runs_of(root, name)
    return runs[-1] if runs else None


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the complete checkpoints in the run folder (orbax renames a
    step's folder into place only once it is written)."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a UserError naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


# -- the shapes of its JSON files ------------------------------------------------

def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# kind: (test, what the message calls it)
KINDS = {"object": (lambda v: isinstance(v, dict), "an object"),
         "list": (lambda v: isinstance(v, list), "a list"),
         "strings": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                     "a list of strings"),
         "string": (lambda v: isinstance(v, str), "a string"),
         "number": (_number, "a number"),
         "positive": (lambda v: _number(v) and v > 0, "a positive number"),
         "null": (lambda v: v is None, "null")}


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def problem(data: dict, keys: tuple, kinds: tuple, optional: bool = False) -> str | None:
    """What is wrong with data[keys[0]][keys[1]]...: a missing key (unless
    `optional`), a value of none of `kinds` (`KINDS`), or a step on the way
    that is no object; None when nothing is."""
    value = data
    for i, key in enumerate(keys):
        if key not in value:
            return None if optional else f"{'.'.join(keys[:i + 1])}: missing"
        value = value[key]
        wanted = kinds if i == len(keys) - 1 else ("object",)
        if not any(KINDS[k][0](value) for k in wanted):
            return (f"{'.'.join(keys[:i + 1])}: expected "
                    f"{' or '.join(KINDS[k][1] for k in wanted)} (found {_shown(value)})")
    return None


def check(path: Path, data: dict, fields: list[tuple]) -> None:
    """A UserError naming `path` and the key at the first of `fields`
    ((keys, kinds[, optional])) that `data` does not hold as it should."""
    for keys, kinds, *optional in fields:
        found = problem(data, keys, kinds, bool(optional and optional[0]))
        if found:
            raise UserError(f"{path}: {found}")


# -- metrics.jsonl ---------------------------------------------------------------

def metrics_record(line: bytes) -> dict:
    """One metrics.jsonl line as a record the charts can draw: {"step", "loss"}
    (train) or {"step", "eval": {"loss"}}; a ValueError saying what is wrong."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot read it as JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object (found {_shown(record)})")
    checks = [(("step",), ("number",), False), (("loss",), ("number",), True),
              (("eval",), ("object",), True), (("eval", "loss"), ("number",), "eval" not in record)]
    for keys, kinds, optional in checks:
        found = problem(record, keys, kinds, optional)
        if found:
            raise ValueError(found)
    return record


def read_metrics(run_dir: Path, whole: bool = False) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, up to a line cut by a kill (or a
    line otherwise unreadable). `whole`: the file of a finished run, which must
    be there and whole; a UserError naming the first unreadable line otherwise."""
    path = run_dir / METRICS
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        if not whole:
            return []
        if isinstance(e, FileNotFoundError):
            raise UserError(f"{path}: missing; the loss curve of a finished run is drawn "
                            "from it") from None
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(metrics_record(line))
        except ValueError as e:
            if not whole:
                break
            raise UserError(f"{path}: line {number}: {e}; the metrics of a finished run are "
                            "whole, so the file was damaged or edited") from None
    return records


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metrics lines past the checkpoint (and a last line cut by a kill):
    the resumed run writes them again, identically. Any other unreadable line
    is damage, refused before anything is written (the lines are the run's
    record up to the checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = metrics_record(line)
        except ValueError as e:
            if number == len(lines):
                break  # cut short by a kill
            raise UserError(f"{path}: line {number} is not a metrics record ({e}); "
                            "restore the file, or remove that line, then run again") from None
        if record["step"] > step:
            break
        kept.append(line.decode("utf-8") + "\n")
    write_atomic(path, "".join(kept))
