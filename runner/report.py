"""What a run shows: the before/after comparison, as a rich table in the
terminal and as report.md with its charts (the run folder's files:
`runner.run_folder`; what the report reads of them: `runner.manifest`).

Each comparison has a baseline beside "before" and "after": for a classifier
the majority class (always answering the most frequent label of the training
rows, `jaxlora.tasks.majority_baseline`), for a causal LM the base model
itself, which is the "before" column. A run that has not finished (running,
interrupted, failed) gets a partial report, drawn from what its folder holds.
`read_run` reads a finished run's figures for the comparisons of `runner
compare` and `runner sweep`.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from jaxlora.errors import UserError
from jaxlora.lora import variant_names
from jaxlora.tasks import majority_baseline
from runner import charts, run_folder
from runner import manifest as manifests

HEADLINE = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("loss", "eval loss")]
LM_HEADLINE = [("loss", "eval loss"), ("perplexity", "perplexity"),
               ("exact_match", "exact match")]
COUNT = "answered_no_label"  # judged answers that named no label (an integer)
LM_BASELINE = "baseline: the base model itself, before fine-tuning (the before column)"


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    if key == COUNT:
        return f"{value:d}"
    return f"{value:.4f}" if key in ("loss", "perplexity") else f"{value:.3f}"


def _delta(before: float | None, after: float | None, key: str) -> str:
    if before is None or after is None:
        return "-"
    if key == COUNT:
        return f"{after - before:+d}"
    return f"{after - before:+.4f}" if key in ("loss", "perplexity") else f"{after - before:+.3f}"


def task_of(manifest: dict) -> str:
    """The run's task, from its recipe (classification for older manifests)."""
    model = manifest.get("recipe", {}).get("model", {})
    return model.get("task", "classification") if isinstance(model, dict) else "classification"


def baseline_of(manifest: dict, evals: dict) -> dict | None:
    """A classification run's majority-class baseline: eval.json's, else (a
    run made before it was recorded) computed from the manifest's label
    counts; None for a causal LM, whose baseline is its base model."""
    if task_of(manifest) != "classification":
        return None
    if isinstance(evals.get("baseline"), dict):
        return evals["baseline"]
    data = manifest.get("data", {})
    counts = data.get("label_counts") if isinstance(data, dict) else None
    if not isinstance(counts, dict) or not data.get("label_names"):
        return None
    return majority_baseline(counts.get("train", {}), counts.get("eval", {}),
                             data["label_names"])


def read_run(run_dir: Path) -> dict:
    """The manifest and evaluation of one finished run; {"skipped": why} for a
    run that has not finished; a clear error for what is not a run folder."""
    if not (run_dir / "manifest.json").is_file():
        raise UserError(f"{run_dir}: no manifest.json; not a run folder "
                        "(runs/<name>/<timestamp>/ after `runner run`)")
    manifest = run_folder.read_json(run_dir / "manifest.json")
    if not finished(manifest):
        return {"skipped": f"{run_dir}: the run did not finish (status "
                           f"{manifest.get('status')!r})"}
    if not (run_dir / "eval.json").is_file():
        raise UserError(f"{run_dir}: no eval.json, though manifest.json says the run finished")
    evals = run_folder.read_json(run_dir / "eval.json")
    manifests.check_after(run_dir, evals)
    run_folder.check(run_dir / "manifest.json", manifest, manifests.fields(manifests.TO_COMPARE))
    run_folder.check(run_dir / "eval.json", evals, manifests.eval_fields(evals))
    return {"dir": run_dir, "manifest": manifest, "eval": evals,
            "baseline": baseline_of(manifest, evals)}


def baseline_note(baseline: dict | None, task: str) -> str | None:
    """One line saying what the baseline column is."""
    if task != "classification":
        return LM_BASELINE
    if baseline is None:
        return None
    return (f"baseline: always answering {baseline['label']!r}, the most frequent label of "
            "the training rows")


def comparison_rows(before: dict | None, after: dict | None,
                    baseline: dict | None = None) -> list[tuple[str, str, str, str, str]]:
    """(metric, baseline, before, after, change) rows: headline metrics (a
    classifier's, or a causal LM's: loss, perplexity and exact match; both
    for judged answers that name labels, with how many named none), then
    per-class F1. `after` is None for a run that has not evaluated it yet."""
    shown = after if after is not None else before
    if shown is None:
        return []
    headline = HEADLINE if "accuracy" in shown else []
    headline = headline + [(key, label) for key, label in LM_HEADLINE
                           if shown.get(key) is not None and (key, label) not in headline]
    if shown.get(COUNT) is not None:
        headline.append((COUNT, "answers naming no label"))
    base = baseline or {}
    rows = []
    for key, label in headline:
        b, a = (before or {}).get(key), (after or {}).get(key)
        rows.append((label, _fmt(base.get(key), key), _fmt(b, key), _fmt(a, key),
                     _delta(b, a, key)))
    for name in shown.get("per_class", {}):
        b = before["per_class"][name]["f1"] if before else None
        a = after["per_class"][name]["f1"] if after else None
        m = base.get("per_class", {}).get(name, {}).get("f1")
        rows.append((f"F1 {name}", _fmt(m, "f1"), _fmt(b, "f1"), _fmt(a, "f1"),
                     _delta(b, a, "f1")))
    return rows


def _headers(baseline: dict | None, task: str) -> list[str]:
    """The comparison's columns: a causal LM's "before" is its baseline."""
    if task != "classification":
        return ["metric", "before (baseline)", "after", "change"]
    return ["metric"] + (["majority"] if baseline else []) + ["before", "after", "change"]


def _cells(row: tuple, baseline: dict | None, task: str) -> tuple:
    metric, base, before, after, change = row
    if task == "classification" and baseline:
        return row
    return metric, before, after, change


def comparison_table(before: dict | None, after: dict | None, title: str,
                     baseline: dict | None = None, task: str = "classification") -> Table:
    """The comparison as a rich table, with the baseline column and caption."""
    table = Table(title=title, caption=baseline_note(baseline, task))
    for column in _headers(baseline, task):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in comparison_rows(before, after, baseline):
        table.add_row(*_cells(row, baseline, task))
    return table


def scalars(metrics: dict) -> dict:
    """The plain numbers of a metrics dict (no per-class tables), for metrics.jsonl."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def finished(manifest: dict) -> bool:
    """Whether the run's manifest says it finished."""
    return manifest.get("status") == "finished"


def write_report(run_dir: Path, manifest: dict, evals: dict, console,
                 records: list[dict] | None = None) -> None:
    """Draw the charts, write report.md, and show the comparison, the loss
    sparklines and where the report is in the terminal. `evals`: eval.json's
    "before", "after" (missing in a partial report) and "baseline";
    `records`: those of metrics.jsonl, when already read."""
    name = manifest["recipe"]["name"]
    before, after = evals.get("before"), evals.get("after")
    baseline, task = baseline_of(manifest, evals), task_of(manifest)
    if records is None:
        records = run_folder.read_metrics(run_dir)
    train, curve = charts.curves(records, before, after, steps_done(manifest, records))
    try:
        images = charts.write_pngs(run_dir, train, curve, before, after, name)
    except Exception as e:  # noqa: BLE001 - a chart must never cost a finished run its report
        images = []
        console.print(f"[yellow]warning:[/] the charts were not drawn: {e}")
    run_folder.write_atomic(run_dir / "report.md",
                            markdown_report(manifest, evals, images, run_dir, records))
    shown = after or before
    if shown is not None:
        console.print(comparison_table(before, after, f"{name}: {shown['examples']} eval "
                                       "examples", baseline, task))
    for line in charts.terminal_lines(train, curve):
        console.print(line)
    done = manifest.get("train", {})
    if "train_seconds" in done:
        console.print(f"train {done['train_seconds']:.0f} s ({done['steps']} steps)")
    console.print(f"report: {run_dir / 'report.md'}", soft_wrap=True)


def steps_done(manifest: dict, records: list[dict]) -> int:
    """The steps a run has trained: the manifest's, else (a run still in its
    first session) the last step metrics.jsonl logged."""
    train = manifest.get("train", {})
    if isinstance(train.get("steps"), int):
        return train["steps"]
    return max((r["step"] for r in records), default=0)


def markdown_report(manifest: dict, evals: dict, images: list[str] = (),
                    run_dir: Path | None = None, records: list[dict] = ()) -> str:
    """report.md: the comparison with its baseline, the confusion matrix, the
    charts, the data, the model, method and hyperparameters, and the timings
    (with interruptions and resumes); a partial report says so first."""
    before, after = evals.get("before"), evals.get("after")
    baseline, task = baseline_of(manifest, evals), task_of(manifest)
    out = [f"# {manifest['recipe']['name']}" + ("" if finished(manifest) else " (partial)"), ""]
    if not finished(manifest):
        out += [partial_note(manifest, run_dir, records), ""]
    if manifest["recipe"].get("description"):
        out += [manifest["recipe"]["description"], ""]
    out += comparison_section(before, after, baseline, task)
    out += _confusion_section(after or before, "after" if after else "before")
    captions = {charts.LOSS_PNG: "train and eval loss", charts.BARS_PNG: "before and after"}
    if images:
        out += ["", "## Charts", ""] + [f"![{captions[name]}]({name})" for name in images]
    out += data_section(manifest["data"], after or before or {})
    out += model_section(manifest)
    out += training_section(manifest)
    return "\n".join(out + [""])


def partial_note(manifest: dict, run_dir: Path | None, records: list[dict]) -> str:
    """What a partial report is drawn from: the run's status and how far it got."""
    status = manifest.get("status")
    total = manifest.get("train", {}).get("total_steps")
    steps = run_folder.checkpoint_steps(run_dir) if run_dir is not None else []
    logged = max((r["step"] for r in records), default=None)
    if steps:
        where = f"its latest checkpoint is step {steps[-1]}" + (f" of {total}" if total else "")
    else:
        where = "no checkpoint yet" + (f", {total} steps planned" if total else "")
    where += f", metrics logged up to step {logged}" if logged is not None else ""
    again = f"`runner run {run_dir}` goes on" if run_dir is not None else ""
    return (f"**Partial report**: the run is {status} ({where}); this report shows what its "
            f"folder holds so far" + (f". {again}." if status != "running" and again else "."))


def comparison_section(before, after, baseline, task) -> list[str]:
    shown = after or before
    if shown is None:
        return ["## Before and after fine-tuning", "", "No evaluation yet."]
    headers = _headers(baseline, task)
    out = [f"## Before and after fine-tuning ({shown['examples']} held-out examples)", "",
           "| " + " | ".join(headers) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"]
    out += [f"| {' | '.join(_cells(row, baseline, task))} |"
            for row in comparison_rows(before, after, baseline)]
    note = baseline_note(baseline, task)
    return out + (["", note[0].upper() + note[1:] + "."] if note else [])


def _confusion_section(metrics: dict | None, which: str) -> list[str]:
    """The confusion matrix of a classifier (or of judged answers' labels):
    rows the true labels, columns the predicted ones."""
    if not metrics or not isinstance(metrics.get("confusion"), list) or \
            not isinstance(metrics.get("per_class"), dict):
        return []
    names = list(metrics["per_class"])
    matrix = metrics["confusion"]
    columns = names + (["(no label)"] if matrix and len(matrix[0]) > len(names) else [])
    out = ["", f"## Confusion matrix ({which} fine-tuning)", "",
           "| true \\ predicted | " + " | ".join(columns) + " |",
           "|---" + "|---:" * len(columns) + "|"]
    out += [f"| {name} | " + " | ".join(str(n) for n in row) + " |"
            for name, row in zip(names, matrix)]
    return out


def data_section(stats: dict, shown: dict) -> list[str]:
    """The data: label counts per split (or examples and target tokens), what was dropped."""
    out = ["", "## Data", "", f"Source: `{stats['source']}`", ""]
    if stats["label_names"]:
        out += ["| label | train | eval |", "|---|---:|---:|"]
        for name in stats["label_names"]:
            out.append(f"| {name} | {stats['label_counts']['train'].get(name, 0)} "
                       f"| {stats['label_counts']['eval'].get(name, 0)} |")
    if not stats["label_names"] or stats.get("target_tokens"):
        tokens = stats.get("target_tokens", {})
        out += [""] if stats["label_names"] else []
        out += ["| split | examples | target tokens |", "|---|---:|---:|",
                f"| train | {stats['train_size']} | {tokens.get('train', '-')} |",
                f"| eval | {stats['eval_size']} | {tokens.get('eval', '-')} |"]
        if stats.get("packed_rows"):
            out += ["", f"Training examples packed into {stats['packed_rows']} rows."]
    if stats.get("dropped"):
        dropped = ", ".join(f"`{k}`: {v}" for k, v in stats["dropped"].items())
        out += ["", f"Rows dropped for labels outside `labels`: {dropped}."]
    if any(stats.get("too_long", {}).values()):
        long = ", ".join(f"{split} {n}" for split, n in stats["too_long"].items())
        out += ["", f"Rows dropped as their targets would not fit max_length: {long}."]
    if any(stats.get("empty_texts", {}).values()):
        empty = ", ".join(f"{split} {n}" for split, n in stats["empty_texts"].items())
        out += ["", f"Rows dropped as their text is empty or missing: {empty}."]
    if shown.get("exact_match_examples"):
        out += ["", f"Greedy answers judged: the first {shown['exact_match_examples']} eval "
                    "examples" + (f"; {shown[COUNT]} of them named no label"
                                  if shown.get(COUNT) is not None else "") + "."]
    if any(stats.get("truncated", {}).values()):
        cut = ", ".join(f"{split} {n}" for split, n in stats["truncated"].items())
        out += ["", f"Examples cut to max_length: {cut}."]
    return out


def method_label(adapter: dict) -> str:
    """The [adapter] table's method and the LoRA variants it turns on, e.g.
    `qlora (DoRA)`: what the plan, reports, cards and exports call it."""
    variants = variant_names(adapter)
    return f"{adapter.get('method')}" + (f" ({', '.join(variants)})" if variants else "")


def hyperparameters(recipe: dict) -> str:
    """The method and the training settings of a run, in one line."""
    adapter, train = recipe.get("adapter", {}), recipe.get("train", {})
    parts = [f"method `{method_label(adapter)}`"]
    if adapter.get("method") in ("lora", "qlora"):
        targets = adapter.get("targets")
        parts += [f"rank {adapter.get('rank')}", f"alpha {adapter.get('alpha')}",
                  "targets " + (", ".join(f"`{t}`" for t in targets)
                                if isinstance(targets, list) else f"`{targets or 'default'}`")]
    if adapter.get("method") == "qlora" and isinstance(adapter.get("quant"), dict):
        parts.append(f"4-bit `{adapter['quant'].get('type')}` (block "
                     f"{adapter['quant'].get('block_size')})")
    parts.append(f"learning rate {train.get('learning_rate')} ({train.get('schedule')}, "
                 f"warmup {train.get('warmup_ratio')})")
    if train.get("lr_ratio_b") is not None:
        parts.append(f"LoRA+: B at {train['lr_ratio_b']}x the learning rate")
    epochs = train.get("epochs")
    parts.append(f"max {train['max_steps']} steps" if train.get("max_steps")
                 else f"{epochs} epoch" + ("" if epochs == 1 else "s"))
    batch = f"batch {train.get('batch_size')}"
    if train.get("grad_accum", 1) > 1:
        batch += f" x {train['grad_accum']} accumulated"
    return "; ".join(parts + [batch])


def model_section(manifest: dict) -> list[str]:
    model = manifest["model"]
    return ["", "## Model and method", "",
            f"- base model: `{manifest['recipe']['model']['source']}` "
            f"(fingerprint `{model['fingerprint'][:16]}`)",
            f"- hyperparameters: {hyperparameters(manifest['recipe'])}",
            f"- trainable parameters {model['trainable_params']:,} of "
            f"{model['total_params']:,} "
            f"({100 * model['trainable_params'] / model['total_params']:.2f}%)",
            f"- adapted layers: {len(model['adapted_layers'])}",
            f"- frozen weights: {model['frozen_bytes'] / 2**20:.1f} MiB"
            + (f", of which 4-bit linear weights {model['quantized_bytes'] / 2**20:.1f} MiB at "
               f"{model['bits_per_quantized_param']:.3f} bits per parameter (embeddings, norms "
               "and the head stay unquantized)" if model.get("bits_per_quantized_param") else "")]


def _times(timings: dict, train: dict) -> str:
    """'wall 12.0 s, train 8.1 s, ...': the figures the run recorded (an older
    run recorded train and compile seconds only)."""
    figures = [("wall", timings.get("wall_seconds")),
               ("train", timings.get("train_seconds", train.get("train_seconds"))),
               ("compile", timings.get("compile_seconds", train.get("compile_seconds"))),
               ("eval", timings.get("eval_seconds"))]
    return ", ".join(f"{name} {value:.1f} s" for name, value in figures
                     if isinstance(value, (int, float))) or "not recorded"


def training_section(manifest: dict) -> list[str]:
    """Steps, timings summed over every session of the run, its stops and
    resumes, peak memory and devices."""
    train = manifest.get("train", {})
    timings = manifest.get("timings") or {}
    out = ["", "## Training", ""]
    if "steps" in train:
        out.append(f"- steps: {train['steps']}"
                   + (f" of {train['total_steps']}" if train.get("total_steps") else "")
                   + (f", median step {train['median_step_ms']:.1f} ms"
                      if isinstance(train.get("median_step_ms"), (int, float)) else ""))
    sessions = timings.get("sessions", 1)
    over = f" (summed over {sessions} sessions)" if sessions > 1 else ""
    out.append(f"- time{over}: {_times(timings, train)}")
    out += _stops_and_resumes(manifest)
    if "peak_memory_mb" in train:
        out.append(f"- peak memory: {train['peak_memory_mb']:.0f} MiB "
                   f"({train.get('peak_memory_kind', '-')})")
    out += [f"- devices: {', '.join(manifest['environment']['devices'])}",
            f"- recipe hash: `{manifest['recipe_hash'][:16]}`"]
    return out


def _stops_and_resumes(manifest: dict) -> list[str]:
    """Lines for the interruption on record and each resume (the manifest's `resumed`)."""
    out = []
    stopped = manifest.get("interrupted")
    if isinstance(stopped, dict):
        out.append(f"- interrupted by {stopped.get('signal', 'a signal')}"
                   + (f" at {stopped['at']}" if stopped.get("at") else "")
                   + (f" (checkpoint at step {stopped['checkpoint_step']})"
                      if stopped.get("checkpoint_step") is not None else ""))
    for entry in manifest.get("resumed", []):
        out.append(f"- resumed from step {entry.get('from_step')}"
                   + (f" at {entry['at']}" if entry.get("at") else "")
                   + (f" ({'; '.join(entry['layout_changes'])})"
                      if entry.get("layout_changes") else ""))
    return out
