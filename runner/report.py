"""What a finished run shows: the before/after comparison, as a rich table in
the terminal and as report.md with its charts (the run folder's files:
`runner.run_folder`; what the report reads of them: `runner.manifest`).
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from runner import charts, run_folder

HEADLINE = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("loss", "eval loss")]
LM_HEADLINE = [("loss", "eval loss"), ("perplexity", "perplexity"),
               ("exact_match", "exact match")]
COUNT = "answered_no_label"  # judged answers that named no label (an integer)


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    if key == COUNT:
        return f"{value:d}"
    return f"{value:.4f}" if key in ("loss", "perplexity") else f"{value:.3f}"


def _delta(before: float | None, after: float, key: str) -> str:
    if before is None:
        return "-"
    if key == COUNT:
        return f"{after - before:+d}"
    return f"{after - before:+.4f}" if key in ("loss", "perplexity") else f"{after - before:+.3f}"


def comparison_rows(before: dict | None, after: dict) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, change) rows: headline metrics (a classifier's,
    or a causal LM's: loss, perplexity and exact match; both for judged
    answers that name labels, with how many named none), then per-class F1."""
    headline = HEADLINE if "accuracy" in after else []
    headline = headline + [(key, label) for key, label in LM_HEADLINE
                           if after.get(key) is not None and (key, label) not in headline]
    if after.get(COUNT) is not None:
        headline.append((COUNT, "answers naming no label"))
    rows = [(label, _fmt(before and before.get(key), key), _fmt(after[key], key),
             _delta(before and before.get(key), after[key], key)) for key, label in headline]
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


def write_report(run_dir: Path, manifest: dict, before: dict | None, after: dict,
                 console, records: list[dict] | None = None) -> None:
    """Draw the charts, write report.md, and show the comparison, the loss
    sparklines and where the report is in the terminal. `records`: those of
    metrics.jsonl, when already read."""
    name = manifest["recipe"]["name"]
    if records is None:
        records = run_folder.read_metrics(run_dir)
    train, evals = charts.curves(records, before, after, manifest["train"]["steps"])
    try:
        images = charts.write_pngs(run_dir, train, evals, before, after, name)
    except Exception as e:  # noqa: BLE001 - a chart must never cost a finished run its report
        images = []
        console.print(f"[yellow]warning:[/] the charts were not drawn: {e}")
    run_folder.write_atomic(run_dir / "report.md",
                            markdown_report(manifest, before, after, manifest["data"], images))
    console.print(comparison_table(before, after, f"{name}: {after['examples']} eval examples"))
    for line in charts.terminal_lines(train, evals):
        console.print(line)
    done = manifest["train"]
    console.print(f"train {done['train_seconds']:.0f} s ({done['steps']} steps); "
                  f"report: {run_dir / 'report.md'}")


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
    if after.get("exact_match_examples"):
        out += ["", f"Greedy answers judged: the first {after['exact_match_examples']} eval "
                    "examples" + (f"; {after[COUNT]} of them (after) named no label"
                                  if after.get(COUNT) is not None else "") + "."]
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
