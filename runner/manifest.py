"""manifest.json, the record of a run: its shape, declared once, the checks
each reader of a run folder makes against it, and the functions that write
its parts. (eval.json's shape is here too: the report reads both.)

    status          running -> finished (or interrupted, failed, diverged)
    recipe          the resolved recipe; recipe_hash its sha256; recipe_file,
                    base_dir where it was read and its sources resolved from
    model           source folder, fingerprint, parameter counts, adapted
                    layers, frozen and 4-bit bytes
    data            what step 2 read and kept (`jaxlora.data.DataStats`)
    train           steps, timings, peak memory, compilation cache
    runtime         processes, mesh, devices; per-device bytes once finished
    environment     Python, platform, package versions, devices
    resumed         one entry per session that went on from a checkpoint
    timings         wall, train, compile and eval seconds summed over every
                    session, and how many (optional: older runs lack it)

A hand-edited or damaged manifest gets one message naming the file and the
key, never a traceback further on. Every reader names the keys it needs and
how strictly (`Need`); what kind of value each key holds is `SHAPE`'s.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from jaxlora.errors import UserError
from runner import run_folder

# The kind of value each key holds (`run_folder.KINDS`), by dotted path.
SHAPE = {
    "status": "string",
    "recipe": "object",
    "recipe.name": "string",
    "recipe.description": "string",
    "recipe.model.source": "string",
    "recipe.adapter.method": "string",
    "recipe_hash": "string",
    "recipe_file": "string",
    "base_dir": "string",
    "model": "object",
    "model.source": "string",
    "model.fingerprint": "string",
    "model.trainable_params": "number",
    "model.total_params": "positive",
    "model.adapted_layers": "list",
    "model.frozen_bytes": "number",
    "model.quantized_bytes": "number",
    "model.bits_per_quantized_param": "number",
    "data": "object",
    "data.source": "string",
    "data.label_names": "strings",
    "data.label_counts.train": "object",
    "data.label_counts.eval": "object",
    "data.train_size": "number",
    "data.eval_size": "number",
    "data.target_tokens": "object",
    "data.dropped": "object",
    "data.empty_texts": "object",
    "data.labels_inferred": "string",
    "data.truncated": "object",
    "train": "object",
    "train.total_steps": "number",
    "train.steps": "number",
    "train.compile_seconds": "number",
    "train.train_seconds": "number",
    "train.median_step_ms": "number",
    "train.peak_memory_mb": "number",
    "train.peak_memory_kind": "string",
    "runtime": "object",
    "environment": "object",
    "environment.devices": "strings",
    "resumed": "list",
    "timings": "object",
    "timings.sessions": "number",
    "timings.wall_seconds": "number",
    "timings.train_seconds": "number",
    "timings.compile_seconds": "number",
    "timings.eval_seconds": "number",
}

PACKAGES = ["jaxlora", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers",
            "tokenizers", "datasets", "safetensors", "pydantic", "numpy", "matplotlib",
            "tensorboardX"]


@dataclass(frozen=True)
class Need:
    """A reader's need of one key: it may be missing (`optional`) or null (`null`)."""

    key: str
    optional: bool = False
    null: bool = False

    def field(self) -> tuple:
        """The (keys, kinds, optional) that `run_folder.check` takes."""
        kinds = (SHAPE[self.key],) + (("null",) if self.null else ())
        return tuple(self.key.split(".")), kinds, self.optional


def fields(needs: list[Need]) -> list[tuple]:
    return [need.field() for need in needs]


# What reading a run folder relies on (resuming it, rebuilding its model).
TO_REOPEN = [Need(key, optional=True) for key in (
    "status", "recipe", "recipe_hash", "recipe_file", "base_dir", "model", "model.source")]
TO_REOPEN += [Need("model.fingerprint", optional=True, null=True), Need("data", optional=True),
              Need("train", optional=True), Need("train.total_steps", optional=True, null=True)]
TO_REOPEN += [Need(key, optional=True) for key in
              ("runtime", "environment", "environment.devices", "resumed")]

# What `runner compare` shows: the figures may be missing or null (a run made
# by an older version), never of another kind.
TO_COMPARE = [Need("recipe.name"), Need("recipe.adapter.method")]
TO_COMPARE += [Need(f"model.{key}", optional=True, null=True)
               for key in ("trainable_params", "frozen_bytes", "bits_per_quantized_param")]
TO_COMPARE += [Need(f"train.{key}", optional=True, null=True)
               for key in ("peak_memory_mb", "median_step_ms", "train_seconds")]


def to_report(manifest: dict, partial: bool = False) -> list[Need]:
    """What report.md reads of a run's manifest; `partial`: a run that has not
    finished, whose training figures may not be there yet."""
    needs = [Need("recipe.name"), Need("recipe.description", optional=True, null=True),
             Need("recipe.model.source"), Need("recipe.adapter.method"), Need("recipe_hash"),
             Need("environment.devices"), Need("model.fingerprint"),
             Need("model.trainable_params"), Need("model.total_params"),
             Need("model.adapted_layers"), Need("model.frozen_bytes"),
             Need("model.bits_per_quantized_param", optional=True, null=True)]
    model = manifest.get("model")
    if isinstance(model, dict) and model.get("bits_per_quantized_param"):
        needs.append(Need("model.quantized_bytes"))
    needs += [Need(f"train.{key}", optional=partial) for key in (
        "steps", "compile_seconds", "train_seconds", "median_step_ms", "peak_memory_mb")]
    needs += [Need(f"timings.{key}", optional=True) for key in (
        "sessions", "wall_seconds", "train_seconds", "compile_seconds", "eval_seconds")]
    needs += [Need("train.peak_memory_kind", optional=partial), Need("data.source"),
              Need("data.label_names"), Need("resumed", optional=True),
              Need("data.dropped", optional=True, null=True),
              Need("data.truncated", optional=True)]
    data = manifest.get("data")
    if isinstance(data, dict) and isinstance(data.get("label_names"), list) and \
            data["label_names"]:
        needs += [Need(f"data.label_counts.{split}") for split in ("train", "eval")]
    else:
        needs += [Need("data.train_size"), Need("data.eval_size"),
                  Need("data.target_tokens", optional=True)]
    return needs


def read_manifest(run_dir: Path) -> dict:
    """RUN_DIR/manifest.json, with the shape every reader of a run folder relies
    on (`TO_REOPEN`); a UserError naming the file and the key otherwise."""
    path = Path(run_dir) / "manifest.json"
    manifest = run_folder.read_json(path)
    run_folder.check(path, manifest, fields(TO_REOPEN))
    if not all(isinstance(entry, dict) for entry in manifest.get("resumed", [])):
        raise UserError(f"{path}: resumed: expected a list of objects")
    return manifest


def source_folder(manifest: dict, run_dir: Path) -> Path:
    """The folder the run's relative sources were resolved from (the recipe's)."""
    if manifest.get("base_dir"):
        return Path(manifest["base_dir"])
    recipe_file = manifest.get("recipe_file")
    return Path(recipe_file).resolve().parent if recipe_file else run_dir


# -- eval.json -------------------------------------------------------------------

_NUMBER_OR_NULL = ("number", "null")


def check_after(run_dir: Path, evals: dict) -> None:
    """A finished run's eval.json holds the evaluation after training."""
    if evals.get("after") is None:
        raise UserError(f"{run_dir / 'eval.json'}: no \"after\" evaluation, though "
                        "manifest.json says the run finished; the file was damaged or edited")


def eval_fields(evals: dict, partial: bool = False) -> list[tuple]:
    """The fields of eval.json that the comparison and the charts read: "after"
    (not yet there in a `partial` run's), "before" with the same metrics, and
    the optional majority-class "baseline"."""
    out = [(("after",), ("object", "null") if partial else ("object",), partial),
           (("before",), ("object", "null"), True), (("baseline",), ("object", "null"), True)]
    if isinstance(evals.get("baseline"), dict):
        out += [(("baseline", "label"), ("string",)), (("baseline", "accuracy"), ("number",)),
                (("baseline", "macro_f1"), ("number",))]
    after = evals.get("after")
    if partial and not isinstance(after, dict) and isinstance(evals.get("before"), dict):
        after = evals["before"]  # a partial report shows "before" alone
        return out + [(("before", *keys[1:]), *rest) for keys, *rest in
                      eval_fields({"after": after})[3:] if keys[0] == "after"]
    if not isinstance(after, dict):
        return out
    before = evals.get("before") if isinstance(evals.get("before"), dict) else None
    classification = "accuracy" in after
    out += [(("after", "examples"), ("number",)), (("after", "loss"), ("number",))]
    if before is not None:
        out.append((("before", "loss"), ("number",)))
    for key in ("accuracy", "macro_f1", "perplexity", "exact_match"):
        required = classification and key in ("accuracy", "macro_f1")
        out.append((("after", key), ("number",) if required else _NUMBER_OR_NULL,
                    not required))
        if before is not None:  # a headline row reads the "before" of what "after" has
            out.append((("before", key), _NUMBER_OR_NULL,
                        not (required or after.get(key) is not None)))
    out.append((("after", "per_class"), ("object",), True))
    if isinstance(after.get("per_class"), dict):
        for name in after["per_class"]:
            out.append((("after", "per_class", name, "f1"), ("number",)))
            if before is not None:
                out.append((("before", "per_class", name, "f1"), ("number",)))
    return out


def check_report_files(run_dir: Path, manifest: dict, evals: dict,
                       partial: bool = False) -> None:
    """manifest.json and eval.json hold what report.md and the charts read
    (`partial`: of a run that has not finished); a UserError naming the file
    and the key otherwise."""
    run_folder.check(run_dir / "manifest.json", manifest, fields(to_report(manifest, partial)))
    run_folder.check(run_dir / "eval.json", evals, eval_fields(evals, partial))


# -- writing its parts -------------------------------------------------------------

def now() -> str:
    """A UTC time stamp for the manifest's records."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def runtime_record(placement, shares) -> dict:
    """The record of the devices this session runs on (`placement`, a
    `jaxlora.runtime.Placement`); with several processes also how many train
    and eval examples each one read (`shares`: every process's (train, eval)
    counts)."""
    import jax

    record = {"processes": jax.process_count(), "mesh": dict(placement.mesh.shape),
              "devices": placement.devices}
    if len(shares) > 1:
        record["examples_per_process"] = {"train": [int(n) for n in shares[:, 0]],
                                          "eval": [int(n) for n in shares[:, 1]]}
    return record


def data_record(stats) -> dict:
    """`jaxlora.data.DataStats` as the plain JSON the manifest records (and
    resuming compares)."""
    return json.loads(json.dumps(asdict(stats), default=str))


def training_record(earlier: dict, result, peak: dict, cache: dict) -> dict:
    """The `train` record once a session has trained (`result`, a
    `jaxlora.train.TrainResult`; `peak`, the memory figures; `cache`, the
    compilation cache's record). A session that trained nothing (resumed after
    the last step, stopped during "eval after") keeps the timings of the one
    that did; peak memory is the highest of every session."""
    figures = {"steps": result.steps, "total_steps": earlier["total_steps"],
               "compile_seconds": result.compile_seconds, "train_seconds": result.train_seconds,
               "median_step_ms": result.median_step_ms, **peak, "compilation_cache": cache}
    timings = ("compile_seconds", "train_seconds", "median_step_ms")
    if not result.history:
        figures.update({key: earlier[key] for key in timings if key in earlier})
    if earlier.get("peak_memory_mb", 0) > figures["peak_memory_mb"]:
        figures.update({key: earlier[key] for key in ("peak_memory_mb", "peak_memory_kind")})
    return figures


def mark(manifest: dict, status: str, record: dict | None = None) -> None:
    """Set the manifest's status, and the record of why under that name
    (`failed`, `diverged`, `interrupted`)."""
    manifest["status"] = status
    if record is not None:
        manifest[status] = record


def write(run_dir: Path, manifest: dict[str, Any]) -> None:
    """RUN_DIR/manifest.json, replaced whole."""
    run_folder.write_json(run_dir / "manifest.json", manifest)


def begin(recipe: dict, recipe_hash: str, recipe_file: Path, base: Path, runtime: dict) -> dict:
    """A new run's manifest (`recipe`: the canonical recipe), before the
    records of its model and data."""
    return {"status": "running", "recipe_hash": recipe_hash, "recipe_file": str(recipe_file),
            "base_dir": str(base), "recipe": recipe, "environment": environment(),
            "runtime": runtime}


def resumed(manifest: dict, step: int, runtime: dict, layout: list[str]) -> None:
    """Add to `resumed` the entry of a session that goes on from the
    checkpoint of `step` (the manifest's top-level records stay the first
    session's environment and take the current device layout)."""
    manifest["runtime"] = runtime
    entry = {"from_step": step, "at": now(), "runtime": dict(runtime)}  # a copy: the run adds to its own
    here = environment()
    if here != manifest.get("environment"):
        entry["environment"] = here
    if layout:  # the run goes on under another device layout
        entry["layout_changes"] = layout
    manifest.setdefault("resumed", []).append(entry)
