"""What a run leaves behind and shows: the run folder's files and the
before/after comparison, as a rich table in the terminal and as Markdown.

    runs/<name>/<timestamp>/
      recipe.toml      the resolved recipe (defaults filled in): rerun it as is
      manifest.json    recipe hash, versions, devices, base-model fingerprint,
                       parameter counts, timings; status running -> finished
      metrics.jsonl    one JSON line per `train.log_every` steps
      eval.json        metrics before and after fine-tuning
      report.md        the comparison table, label counts and timings
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

PACKAGES = ["jaxlora", "jax", "jaxlib", "flax", "optax", "transformers", "tokenizers",
            "datasets", "safetensors", "pydantic", "numpy"]
HEADLINE = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("loss", "eval loss")]
LM_HEADLINE = [("loss", "eval loss"), ("perplexity", "perplexity"),
               ("exact_match", "exact match")]


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed process never leaves a
    half-written file in place of a good one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def new_run_dir(root: Path, name: str) -> Path:
    """A fresh folder `root/name/<UTC timestamp>`; never reuses an existing one."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = root / name
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output.dir: cannot create {base}: {e.strerror}") from None
    for suffix in [""] + [f"-{i}" for i in range(2, 1000)]:
        path = base / f"{stamp}{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run folder under {base}")


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

    stats = jax.devices()[0].memory_stats() or {}
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


def markdown_report(manifest: dict, before: dict | None, after: dict, stats: dict) -> str:
    """report.md: the comparison, the data, the model and the timings."""
    out = [f"# {manifest['recipe']['name']}", ""]
    if manifest["recipe"].get("description"):
        out += [manifest["recipe"]["description"], ""]
    n = after["examples"]
    out += [f"## Before and after fine-tuning ({n} held-out examples)", "",
            "| metric | before | after | change |", "|---|---:|---:|---:|"]
    out += [f"| {' | '.join(row)} |" for row in comparison_rows(before, after)]
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
