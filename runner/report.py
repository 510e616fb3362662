"""What a run leaves behind and shows: the run folder's files and the
before/after comparison, as a rich table in the terminal and as Markdown.

    runs/<name>/<timestamp>/
      recipe.toml      the resolved recipe (defaults filled in): rerun it as is
      manifest.json    recipe hash, versions, devices, base-model fingerprint,
                       parameter counts, timings; status running -> finished
      metrics.jsonl    one JSON line per `train.log_every` steps ({"step", "loss", ...})
                       and per `eval.every_steps` evaluation ({"step", "eval": {...}})
      eval.json        metrics before and after fine-tuning
      report.md        the comparison table, the charts, label counts and timings
      loss.png         train and eval loss over the steps (runner.charts)
      before_after.png the headline metrics before and after, as bars
      tensorboard/     TensorBoard events, when output.tensorboard = true
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from rich.table import Table

from jaxlora.errors import UserError
from runner import charts

PACKAGES = ["jaxlora", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers",
            "tokenizers", "datasets", "safetensors", "pydantic", "numpy", "matplotlib",
            "tensorboardX"]
HEADLINE = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("loss", "eval loss")]
LM_HEADLINE = [("loss", "eval loss"), ("perplexity", "perplexity"),
               ("exact_match", "exact match")]


def primary() -> bool:
    """Whether this process writes the run folder's files: the only one, or
    process 0 of several (multi-host); the others compute, and write nothing
    but their part of the checkpoints (through orbax)."""
    import jax

    return jax.process_index() == 0


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed process never leaves a
    half-written file in place of a good one. Only the primary process writes."""
    if not primary():
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: the old file stays as it was
        raise OSError(e.errno, e.strerror, str(path)) from None  # named as the user knows it


def write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def stamped_names(ext: str = ""):
    """`<UTC timestamp><ext>`, then `<timestamp>-2<ext>` ... `-999`: the names to
    try, in turn, for something new (a run folder, an evaluation file).
    `runs.stamp_order` sorts them in the order they were made."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    yield f"{stamp}{ext}"
    for i in range(2, 1000):
        yield f"{stamp}-{i}{ext}"


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


def environment() -> dict:
    """Package versions, Python, platform and devices, for the manifest."""
    import jax

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "packages": versions, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}


def peak_memory() -> dict:
    """Peak memory of this run: the accelerator's peak bytes in use where it
    reports them, else the process's peak resident set (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_memory_mb": stats["peak_bytes_in_use"] / 2**20,
                "peak_memory_kind": f"{jax.default_backend()} peak bytes in use"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_mb": rss_kib / 2**10, "peak_memory_kind": "process peak RSS"}


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if key in ("loss", "perplexity") else f"{value:.3f}"


def _delta(before: float | None, after: float, key: str) -> str:
    if before is None:
        return "-"
    return f"{after - before:+.4f}" if key in ("loss", "perplexity") else f"{after - before:+.3f}"


def comparison_rows(before: dict | None, after: dict) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, change) rows: headline metrics, then per-class F1
    (classification), or loss and perplexity (causal-lm)."""
    headline = HEADLINE if "accuracy" in after else [
        (key, label) for key, label in LM_HEADLINE if after.get(key) is not None]
    rows = [(label, _fmt(before and before[key], key), _fmt(after[key], key),
             _delta(before and before[key], after[key], key)) for key, label in headline]
    for name, scores in after.get("per_class", {}).items():
        b = before["per_class"][name]["f1"] if before else None
        rows.append((f"F1 {name}", _fmt(b, "f1"), _fmt(scores["f1"], "f1"),
                     _delta(b, scores["f1"], "f1")))
    return rows


def comparison_table(before: dict | None, after: dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("metric", "before", "after", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in comparison_rows(before, after):
        table.add_row(*row)
    return table


def scalars(metrics: dict) -> dict:
    """The plain numbers of a metrics dict (no per-class tables), for metrics.jsonl."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_metrics(run_dir: Path, whole: bool = False) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, up to a line cut by a kill (or a
    line otherwise unreadable). `whole`: the file of a finished run, which must
    be there and whole; a UserError naming the first unreadable line otherwise."""
    path = run_dir / "metrics.jsonl"
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
        problem = _problem(record, keys, kinds, optional)
        if problem:
            raise ValueError(problem)
    return record


# What each file of a finished run must hold for `runner report` and `runner
# compare` to show it: (keys, kinds, optional). A hand-edited or damaged file
# gets one message naming the file and the key, never a traceback.
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# kind: (test, what the message calls it)
_KINDS = {"object": (lambda v: isinstance(v, dict), "an object"),
          "list": (lambda v: isinstance(v, list), "a list"),
          "strings": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                      "a list of strings"),
          "string": (lambda v: isinstance(v, str), "a string"),
          "number": (_number, "a number"),
          "positive": (lambda v: _number(v) and v > 0, "a positive number"),
          "null": (lambda v: v is None, "null")}
_NUMBER_OR_NULL = ("number", "null")


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _problem(data: dict, keys: tuple, kinds: tuple, optional: bool = False) -> str | None:
    """What is wrong with data[keys[0]][keys[1]]...: a missing key (unless
    `optional`), a value of none of `kinds`, or a step on the way that is no
    object; None when nothing is."""
    value = data
    for i, key in enumerate(keys):
        if key not in value:
            return None if optional else f"{'.'.join(keys[:i + 1])}: missing"
        value = value[key]
        wanted = kinds if i == len(keys) - 1 else ("object",)
        if not any(_KINDS[k][0](value) for k in wanted):
            return (f"{'.'.join(keys[:i + 1])}: expected "
                    f"{' or '.join(_KINDS[k][1] for k in wanted)} (found {_shown(value)})")
    return None


def check(path: Path, data: dict, fields: list[tuple]) -> None:
    """A UserError naming `path` and the key at the first of `fields`
    ((keys, kinds[, optional])) that `data` does not hold as it should."""
    for keys, kinds, *optional in fields:
        problem = _problem(data, keys, kinds, bool(optional and optional[0]))
        if problem:
            raise UserError(f"{path}: {problem}")


def check_after(run_dir: Path, evals: dict) -> None:
    """A finished run's eval.json holds the evaluation after training."""
    if evals.get("after") is None:
        raise UserError(f"{run_dir / 'eval.json'}: no \"after\" evaluation, though "
                        "manifest.json says the run finished; the file was damaged or edited")


def eval_fields(evals: dict) -> list[tuple]:
    """The fields of eval.json that the comparison and the charts read: "after"
    and, where there is one, "before" with the same metrics."""
    fields = [(("after",), ("object",)), (("before",), ("object", "null"), True)]
    after = evals.get("after")
    if not isinstance(after, dict):
        return fields
    before = evals.get("before") if isinstance(evals.get("before"), dict) else None
    classification = "accuracy" in after
    fields += [(("after", "examples"), ("number",)), (("after", "loss"), ("number",))]
    if before is not None:
        fields.append((("before", "loss"), ("number",)))
    for key in ("accuracy", "macro_f1", "perplexity", "exact_match"):
        required = classification and key in ("accuracy", "macro_f1")
        fields.append((("after", key), ("number",) if required else _NUMBER_OR_NULL,
                       not required))
        if before is not None:  # a headline row reads the "before" of what "after" has
            fields.append((("before", key), _NUMBER_OR_NULL,
                           not (required or after.get(key) is not None)))
    fields.append((("after", "per_class"), ("object",), True))
    if isinstance(after.get("per_class"), dict):
        for name in after["per_class"]:
            fields.append((("after", "per_class", name, "f1"), ("number",)))
            if before is not None:
                fields.append((("before", "per_class", name, "f1"), ("number",)))
    return fields


def manifest_fields(manifest: dict) -> list[tuple]:
    """The fields of manifest.json that report.md reads."""
    fields = [(("recipe", "name"), ("string",)),
              (("recipe", "description"), ("string", "null"), True),
              (("recipe", "model", "source"), ("string",)),
              (("recipe", "adapter", "method"), ("string",)),
              (("recipe_hash",), ("string",)),
              (("environment", "devices"), ("strings",)),
              (("model", "fingerprint"), ("string",)),
              (("model", "trainable_params"), ("number",)),
              (("model", "total_params"), ("positive",)),
              (("model", "adapted_layers"), ("list",)),
              (("model", "frozen_bytes"), ("number",)),
              (("model", "bits_per_quantized_param"), _NUMBER_OR_NULL, True)]
    model = manifest.get("model")
    if isinstance(model, dict) and model.get("bits_per_quantized_param"):
        fields.append((("model", "quantized_bytes"), ("number",)))
    fields += [(("train", key), ("number",)) for key in (
        "steps", "compile_seconds", "train_seconds", "median_step_ms", "peak_memory_mb")]
    fields += [(("train", "peak_memory_kind"), ("string",)),
               (("data", "source"), ("string",)),
               (("data", "label_names"), ("strings",)),
               (("data", "dropped"), ("object", "null"), True),
               (("data", "truncated"), ("object",), True)]
    data = manifest.get("data")
    if isinstance(data, dict) and isinstance(data.get("label_names"), list) and \
            data["label_names"]:
        fields += [(("data", "label_counts", split), ("object",)) for split in ("train", "eval")]
    else:
        fields += [(("data", "train_size"), ("number",)), (("data", "eval_size"), ("number",)),
                   (("data", "target_tokens"), ("object",), True)]
    return fields


def check_report_files(run_dir: Path, manifest: dict, evals: dict) -> None:
    """manifest.json and eval.json hold what report.md and the charts read; a
    UserError naming the file and the key otherwise."""
    check(run_dir / "manifest.json", manifest, manifest_fields(manifest))
    check(run_dir / "eval.json", evals, eval_fields(evals))


def write_report(run_dir: Path, manifest: dict, before: dict | None, after: dict,
                 console, records: list[dict] | None = None) -> None:
    """Draw the charts, write report.md, and show the comparison, the loss
    sparklines and where the report is in the terminal. `records`: those of
    metrics.jsonl, when already read."""
    name = manifest["recipe"]["name"]
    if records is None:
        records = read_metrics(run_dir)
    train, evals = charts.curves(records, before, after, manifest["train"]["steps"])
    try:
        images = charts.write_pngs(run_dir, train, evals, before, after, name)
    except Exception as e:  # noqa: BLE001 - a chart must never cost a finished run its report
        images = []
        console.print(f"[yellow]warning:[/] the charts were not drawn: {e}")
    write_atomic(run_dir / "report.md",
                 markdown_report(manifest, before, after, manifest["data"], images))
    console.print(comparison_table(before, after, f"{name}: {after['examples']} eval examples"))
    for line in charts.terminal_lines(train, evals):
        console.print(line)
    done = manifest["train"]
    console.print(f"train {done['train_seconds']:.0f} s ({done['steps']} steps); "
                  f"report: {run_dir / 'report.md'}")


def redraw(run_dir: Path, console) -> None:
    """`runner report RUN_DIR`: the charts and report.md of a finished run drawn
    again from its files, and report.md rendered in the terminal."""
    from rich.markdown import Markdown

    from runner.runs import read_json

    run_dir = Path(run_dir)
    for name in ("manifest.json", "eval.json"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir}: no {name}; `runner report` needs a run folder "
                            "(runs/<name>/<timestamp>/) whose run finished")
    manifest = read_json(run_dir / "manifest.json")
    evals = read_json(run_dir / "eval.json")
    if manifest.get("status") != "finished":
        raise UserError(f"{run_dir}: the run has not finished (status "
                        f"{manifest.get('status')!r}); its report is written when it does")
    check_after(run_dir, evals)
    # everything read and checked before anything is drawn: a damaged folder
    # keeps the charts and report.md it has
    check_report_files(run_dir, manifest, evals)
    records = read_metrics(run_dir, whole=True)
    write_report(run_dir, manifest, evals.get("before"), evals["after"], _Quiet(), records)
    console.print(Markdown((run_dir / "report.md").read_text(encoding="utf-8")))
    train, curve = charts.curves(records, evals.get("before"), evals["after"],
                                 manifest["train"]["steps"])
    for line in charts.terminal_lines(train, curve):
        console.print(line)
    console.print(f"charts: {run_dir / charts.LOSS_PNG}, {run_dir / charts.BARS_PNG}")


class _Quiet:
    def print(self, *args, **kwargs) -> None:
        pass


def markdown_report(manifest: dict, before: dict | None, after: dict, stats: dict,
                    images: list[str] = ()) -> str:
    """report.md: the comparison, the charts, the data, the model and the timings."""
    out = [f"# {manifest['recipe']['name']}", ""]
    if manifest["recipe"].get("description"):
        out += [manifest["recipe"]["description"], ""]
    n = after["examples"]
    out += [f"## Before and after fine-tuning ({n} held-out examples)", "",
            "| metric | before | after | change |", "|---|---:|---:|---:|"]
    out += [f"| {' | '.join(row)} |" for row in comparison_rows(before, after)]
    captions = {charts.LOSS_PNG: "train and eval loss", charts.BARS_PNG: "before and after"}
    if images:
        out += ["", "## Charts", ""] + [f"![{captions[name]}]({name})" for name in images]
    out += ["", "## Data", "", f"Source: `{stats['source']}`", ""]
    if stats["label_names"]:
        out += ["| label | train | eval |", "|---|---:|---:|"]
        for name in stats["label_names"]:
            out.append(f"| {name} | {stats['label_counts']['train'].get(name, 0)} "
                       f"| {stats['label_counts']['eval'].get(name, 0)} |")
    else:
        tokens = stats.get("target_tokens", {})
        out += ["| split | examples | target tokens |", "|---|---:|---:|",
                f"| train | {stats['train_size']} | {tokens.get('train', '-')} |",
                f"| eval | {stats['eval_size']} | {tokens.get('eval', '-')} |"]
        if stats.get("packed_rows"):
            out += ["", f"Training examples packed into {stats['packed_rows']} rows."]
    if stats.get("dropped"):
        dropped = ", ".join(f"`{k}`: {v}" for k, v in stats["dropped"].items())
        out += ["", f"Rows dropped for labels outside `labels`: {dropped}."]
    if any(stats.get("truncated", {}).values()):
        cut = ", ".join(f"{split} {n}" for split, n in stats["truncated"].items())
        out += ["", f"Examples cut to max_length: {cut}."]
    model = manifest["model"]
    train = manifest["train"]
    out += ["", "## Model and method", "",
            f"- base model: `{manifest['recipe']['model']['source']}` "
            f"(fingerprint `{model['fingerprint'][:16]}`)",
            f"- method: `{manifest['recipe']['adapter']['method']}`; trainable parameters "
            f"{model['trainable_params']:,} of {model['total_params']:,} "
            f"({100 * model['trainable_params'] / model['total_params']:.2f}%)",
            f"- adapted layers: {len(model['adapted_layers'])}",
            f"- frozen weights: {model['frozen_bytes'] / 2**20:.1f} MiB"
            + (f", of which 4-bit linear weights {model['quantized_bytes'] / 2**20:.1f} MiB at "
               f"{model['bits_per_quantized_param']:.3f} bits per parameter (embeddings, norms "
               "and the head stay unquantized)" if model.get("bits_per_quantized_param") else ""),
            "", "## Training", "",
            f"- steps: {train['steps']}, compile {train['compile_seconds']:.1f} s, "
            f"train {train['train_seconds']:.1f} s, median step {train['median_step_ms']:.1f} ms",
            f"- peak memory: {train['peak_memory_mb']:.0f} MiB ({train['peak_memory_kind']})",
            f"- devices: {', '.join(manifest['environment']['devices'])}",
            f"- recipe hash: `{manifest['recipe_hash'][:16]}`", ""]
    return "\n".join(out)
