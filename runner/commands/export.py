"""`runner export RUN_DIR --format peft|merged [--out FOLDER]`: a finished
run's weights as a folder PyTorch users load (see `jaxlora.export` for the
formats).

The folder is written under a hidden temporary name beside the target
(`.NAME.tmp-HOST-PID-XXXX`) and renamed into place when complete; an
existing folder is never overwritten. An export killed outright (SIGKILL)
leaves its temporary folder: the next export to the same place removes it,
once its writer (HOST, PID) is gone, never a live export's.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console

from jaxlora.errors import UserError
from jaxlora.export import (generation_config, merged_tensors, peft_config, peft_tensors,
                            write_safetensors)
from jaxlora.generate import stop_ids
from jaxlora.models import family
from runner import libraries
from runner.build import OpenedRun, open_run

FORMATS = ("peft", "merged")


def main(args, console, stop) -> int:
    check_format(args.format)
    libraries.set_up()
    export(open_run(args.run_dir), args.format, args.out, console)
    return 0


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not an export format; choose one of "
                        f"{', '.join(FORMATS)}")


def export(opened: OpenedRun, fmt: str, out: Path | None, console: Console) -> Path:
    """Write the export folder; returns its path."""
    check_format(fmt)
    method = opened.recipe.adapter.method
    if fmt == "peft" and method == "full":
        raise UserError(f"{opened.run_dir}: method 'full' trains every weight, so there is no "
                        "adapter to export; use --format merged")
    out = Path(out) if out else opened.run_dir / "export" / fmt
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists; remove it or pass --out to another folder")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{out}: {above} is a file, not a folder; pass --out to a folder path")
    fam = family(opened.model_dir)
    model = opened.model()
    notes = _notes(opened, fmt)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        # A fresh hidden folder beside the target, renamed into place when complete.
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_tmp_prefix(out)))
    except OSError as e:
        raise UserError(f"{out}: cannot create the folder: {e.strerror}") from None
    try:
        _write(tmp, opened, fmt, fam, model, notes)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is not
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except OSError as e:
        raise UserError(f"{out}: cannot write the export: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed
    console.print(f"exported {fmt} ({method}, step {opened.step}) to [bold]{out}[/]")
    for note in notes:
        console.print(f"note: {note}")
    return out


def _host() -> str:
    """This machine's name as it goes into a file name (no dashes: they separate)."""
    return "".join(c for c in socket.gethostname() if c.isalnum()) or "host"


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-{_host()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary folders that exports to `out` killed outright left
    beside it: named by this machine and a process that is gone (an export
    still writing keeps its own, and so does one of another machine sharing
    the folder). Returns those removed."""
    removed = []
    prefix = f".{out.name}.tmp-{_host()}-"
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        pid = path.name[len(prefix):].split("-")[0] if path.name.startswith(prefix) else ""
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _write(tmp: Path, opened: OpenedRun, fmt: str, fam, model, notes: list[str]) -> None:
    if fmt == "peft":
        write_safetensors(tmp / "adapter_model.safetensors", peft_tensors(model, fam),
                          {"format": "pt"})
        config = peft_config(opened.recipe.adapter, model, fam, task=opened.recipe.model.task,
                             base_model=_base_name(opened))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    else:
        # float32 whatever the training dtype: a LoRA update is small next to the
        # weight it is added to, and bfloat16 would round much of it away.
        write_safetensors(tmp / "model.safetensors",
                          merged_tensors(model, fam, np.float32, task=opened.recipe.model.task),
                          {"format": "pt"})
        _hf_config(opened, fam).save_pretrained(tmp)
        if opened.recipe.model.task == "causal-lm":  # every id that ends an answer
            chat = bool(opened.recipe.data.chat)
            config = generation_config(_base_generation(opened.model_dir), opened.tokenizer,
                                       stop_ids(opened.tokenizer, opened.model_dir, chat=chat))
            (tmp / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")
    opened.tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(_readme(opened, fmt, notes))


def _base_generation(model_dir: Path) -> dict:
    """The base model folder's generation_config.json ({} without a readable one)."""
    try:
        found = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _base_name(opened: OpenedRun) -> str:
    """What base_model_name_or_path says: the recipe's model.source as the
    user wrote it (a hub id, a path relative to the recipe, a pkg:// source),
    not where it resolved to (a cache or site-packages folder of this machine)."""
    return opened.recipe.model.source


def _hf_config(opened: OpenedRun, fam):
    config = copy.deepcopy(opened.loaded.hf_config)
    config.dtype = "float32"
    if opened.recipe.model.task != "classification":
        named = [a for a in (config.architectures or []) if a.endswith("ForCausalLM")]
        config.architectures = named or [fam.CAUSAL_LM_ARCHITECTURE]
        return config
    labels = list(opened.recipe.data.labels)
    config.architectures = [fam.CLASSIFIER_ARCHITECTURE]
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    return config


def _where_the_base_is(source: str) -> list[str]:
    """A line for the README where the base model's name is not a hub id to
    load as is: a pkg:// source, or a path relative to the recipe's folder."""
    if source.startswith("pkg://"):
        package, _, inside = source.removeprefix("pkg://").partition("/")
        return [f"The base model `{source}` is the folder `{inside}` of the installed Python "
                f"package `{package}`: pass that folder's path below.", ""]
    if Path(source).expanduser().is_absolute() or source.startswith("."):
        return [f"The base model `{source}` is a local folder (relative paths are relative to "
                "the recipe's folder).", ""]
    return []


def _notes(opened: OpenedRun, fmt: str) -> list[str]:
    notes = []
    if not opened.finished:
        notes.append(f"the run has not finished: this is its checkpoint at step {opened.step}"
                     + (f" of {opened.total_steps}" if opened.total_steps else ""))
    if opened.recipe.adapter.method == "qlora":
        quant = opened.recipe.adapter.quant
        if fmt == "merged":
            notes.append(f"QLoRA: the adapter was merged into the dequantized "
                         f"{quant.type.upper()} (block {quant.block_size}) base weights it was "
                         "trained against, not into the original full-precision weights")
        else:
            notes.append(f"QLoRA: the adapter was trained against {quant.type.upper()}-quantized "
                         f"base weights (block {quant.block_size}); on the full-precision base "
                         "its outputs differ slightly")
    return notes


def _readme(opened: OpenedRun, fmt: str, notes: list[str]) -> str:
    labels = list(opened.recipe.data.labels or [])
    classify = opened.recipe.model.task == "classification"
    auto = "AutoModelForSequenceClassification" if classify else "AutoModelForCausalLM"
    extra = f", num_labels={len(labels)}" if classify else ""
    lines = [f"# {opened.recipe.name} ({fmt} export)", "",
             f"Exported by jaxlora from run `{opened.run_dir}` at step {opened.step}; "
             f"task `{opened.recipe.model.task}`; method `{opened.recipe.adapter.method}`"
             + (f"; labels {labels} (class id = position)." if classify else "."), ""]
    if fmt == "peft":
        lines += _where_the_base_is(opened.recipe.model.source)
        lines += ["```python", "from peft import PeftModel", f"from transformers import {auto}",
                  "", f"base = {auto}.from_pretrained({_base_name(opened)!r}{extra})",
                  "model = PeftModel.from_pretrained(base, 'THIS_FOLDER').eval()", "```"]
    else:
        lines += ["```python", f"from transformers import {auto}",
                  f"model = {auto}.from_pretrained('THIS_FOLDER')", "```"]
    lines += [""] + [f"Note: {note}" for note in notes]
    return "\n".join(lines) + "\n"
