"""`runner export RUN_DIR --format peft|merged|gguf [--quant TYPE] [--out PATH]`:
a finished run's model for the tools people run it with (see
`jaxlora.export` for the PyTorch formats, `jaxlora.gguf_export` for GGUF),
each with its model card (`runner.model_card`).

A folder export is written under a hidden temporary name beside the target
(`.NAME.tmp-HOST-PID-XXXX`) and renamed into place when complete; a GGUF
export is written in such a folder too, and its two files (the .gguf and its
README.md) moved beside each other, the .gguf last: there, the export is
complete; where its move fails, the README.md just moved is removed again, so
that no card is left without its file. Nothing existing is ever overwritten. An export killed outright (SIGKILL) leaves its temporary
folder: the next export to the same place removes it, once its writer
(HOST, PID) is gone, never a live export's.
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

from jaxlora import gguf_export
from jaxlora.data import chat_template
from jaxlora.errors import UserError
from jaxlora.export import (generation_config, merged_tensors, peft_config, peft_tensors,
                            write_safetensors)
from jaxlora.generate import stop_ids
from jaxlora.models import family, gguf
from runner import libraries
from runner import manifest as manifests
from runner.build import OpenedRun, open_run
from runner.model_card import Exported, model_card, one_line
from runner.model_card import check as check_card
from runner.report import method_label

FORMATS = ("peft", "merged", "gguf")
CARD = "README.md"


def main(args, console, stop) -> int:
    check_format(args.format, args.quant)
    libraries.set_up()
    export(open_run(args.run_dir), args.format, args.out, console, quant=args.quant)
    return 0


def check_format(fmt: str, quant: str | None = None) -> None:
    """The format and --quant: known, and --quant with gguf only."""
    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not an export format; choose one of "
                        f"{', '.join(FORMATS)}")
    if quant is not None and fmt != "gguf":
        raise UserError(f"--quant: only for --format gguf (the {fmt} export is float32)")
    if quant is not None:
        gguf_export.check_quant(quant)


def export(opened: OpenedRun, fmt: str, out: Path | None, console: Console,
           quant: str | None = None) -> Path:
    """Write the export (a folder; for gguf the .gguf file and its card beside
    it); returns its path."""
    check_format(fmt, quant)
    check_card(opened.run_dir, opened.manifest)  # what the model card reads is there
    method = opened.recipe.adapter.method
    if fmt == "peft" and method == "full":
        raise UserError(f"{opened.run_dir}: method 'full' trains every weight, so there is no "
                        "adapter to export; use --format merged")
    if fmt == "gguf":
        return _export_gguf(opened, out, console, quant or gguf_export.DEFAULT_QUANT)
    if fmt == "merged" and getattr(opened.loaded.hf_config, gguf.FREQUENCY_FACTORS, None):
        raise UserError(f"{opened.run_dir}: --format merged: the base model's rope frequency "
                        "factors (its GGUF file's rope_freqs) have no place in a transformers "
                        "config (transformers would rotate without them); use --format gguf")
    out = Path(out) if out else opened.run_dir / "export" / fmt
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists; remove it or pass --out to another folder")
    _check_above(out)
    fam = family(opened.model_dir)
    model = opened.model()
    notes = _notes(opened, fmt)
    tmp = _temporary(out)
    try:
        _write(tmp, opened, fmt, fam, model, notes)
        (tmp / CARD).write_text(model_card(opened.run_dir, opened.manifest,
                                           Exported(fmt, out, opened.step, notes=notes)),
                                encoding="utf-8")
        _publish(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except OSError as e:
        raise UserError(f"{out}: cannot write the export: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed
    _said(console, opened, Exported(fmt, out, opened.step, notes=notes), out / CARD)
    return out


def _check_above(out: Path) -> None:
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{out}: {above} is a file, not a folder; pass --out to a folder path")


def _temporary(out: Path) -> Path:
    """A fresh hidden folder beside `out` (stale ones of killed exports removed first)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=_tmp_prefix(out)))
    except OSError as e:
        raise UserError(f"{out}: cannot create the folder: {e.strerror}") from None


def _publish(tmp: Path) -> None:
    """mkdtemp makes the folder private; the export is not."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for path in tmp.iterdir():
        path.chmod(0o666 & ~umask)


def _said(console: Console, opened: OpenedRun, exported: Exported, card: Path) -> None:
    """Where the export went, its notes, its card, and one line on using it."""
    method = method_label(opened.recipe.adapter.model_dump())
    console.print(f"exported {exported.fmt}" + (f" {exported.quant}" if exported.quant else "")
                  + f" ({method}, step {opened.step}) to "
                    f"[bold]{exported.path}[/]", soft_wrap=True)
    for note in exported.notes:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(f"model card: {card}", soft_wrap=True)
    console.print(f"use it: {one_line(opened.manifest, exported)}", soft_wrap=True,
                  markup=False, highlight=False)


def _export_gguf(opened: OpenedRun, out: Path | None, console: Console, quant: str) -> Path:
    """The merged causal LM as one GGUF file, its model card beside it; refused
    for a classifier and for what the writer does not take (its config and
    tokenizer, `gguf_export.check`), before the model is merged or anything
    is written."""
    if opened.recipe.model.task != "causal-lm":
        raise UserError(f"{opened.run_dir}: --format gguf: a {opened.recipe.model.task} run's "
                        "model has a classification head, which GGUF (llama.cpp) does not "
                        "carry; use --format merged or peft")
    keys = gguf_export.check(opened.loaded.hf_config, opened.tokenizer, _gguf_source(opened))
    name = opened.recipe.name
    out = Path(out) if out else opened.run_dir / "export" / f"gguf-{quant}" / f"{name}-{quant}.gguf"
    if out.suffix.lower() != gguf.SUFFIX:
        raise UserError(f"--out: {out} must name a .gguf file")
    for path in (out, out.parent / CARD):
        if path.exists() or path.is_symlink():
            raise UserError(f"{path}: already exists; remove it or pass --out to a file in "
                            "another folder (a GGUF export writes the file and its README.md)")
    _check_above(out)
    notes = _notes(opened, "gguf") + gguf_export.notes(opened.loaded.hf_config, opened.tokenizer)
    exported = Exported("gguf", out, opened.step, quant=quant, notes=notes)
    tmp = _temporary(out)
    try:
        gguf_export.write(tmp / out.name, _gguf_model(opened, notes, keys), quant)
        (tmp / CARD).write_text(model_card(opened.run_dir, opened.manifest, exported),
                                encoding="utf-8")
        _publish(tmp)
        _place_both(tmp, out)
    except OSError as e:
        raise UserError(f"{out}: cannot write the export: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _said(console, opened, exported, out.parent / CARD)
    return out


def _place_both(tmp: Path, out: Path) -> None:
    """The card, then the .gguf (there, the export is complete) moved from
    `tmp` into place; the card removed again where the .gguf's move fails."""
    card = out.parent / CARD
    _place(tmp / CARD, card)
    try:
        _place(tmp / out.name, out)
    except BaseException:
        card.unlink(missing_ok=True)  # ours: _place never takes an existing name
        raise


def _gguf_source(opened: OpenedRun) -> Path | None:
    """The base model's GGUF file, whose tokenizer keys are copied (None: a folder)."""
    return opened.model_dir if gguf.is_gguf(opened.model_dir) else None


def _end_of_turn(opened: OpenedRun, template: str | None) -> int | None:
    """A chat run's end-of-turn id, for tokenizer.ggml.eot_token_id: the first
    of its stop ids (`stop_ids`, chat: EOS, then the end-of-turn tokens) that
    its chat template writes, where that is not EOS; None where it is EOS, or
    no stop token is in the template (a vocabulary may hold several kinds'
    end-of-turn tokens: the template says which ends a turn)."""
    if not opened.recipe.data.chat or not isinstance(template, str):
        return None
    tokenizer = opened.tokenizer
    for token_id in stop_ids(tokenizer, opened.model_dir, chat=True):
        token = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(token, str) and token and token in template:
            return None if token_id == tokenizer.eos_token_id else token_id
    return None


def _place(src: Path, dst: Path) -> None:
    """Move a finished file into place, never over an existing one (a hard
    link fails where the name is taken; a file system without links gets a
    rename after the check made before writing)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise UserError(f"{dst}: appeared while the export was written; nothing was "
                        "overwritten") from None
    except OSError:
        src.rename(dst)


def _gguf_model(opened: OpenedRun, notes: list[str],
                keys: dict[str, tuple]) -> gguf_export.GgufModel:
    """What the GGUF file holds: the merged weights (float32 before their
    --quant rounding), the config, the tokenizer (its `keys` as
    `gguf_export.check` found them) and the chat template the run trained
    with, and a description saying how it was made."""
    recipe = opened.recipe
    base = manifests.source_folder(opened.manifest, opened.run_dir)
    merged = ("every weight trained" if recipe.adapter.method == "full"
              else "the adapter merged into the base weights")
    method = method_label(recipe.adapter.model_dump())
    description = (f"{recipe.description + ': ' if recipe.description else ''}fine-tuned "
                   f"from {recipe.model.source} by jaxlora (method {method}, "
                   f"step {opened.step}), {merged}" + "".join(f"; {note}" for note in notes))
    tensors = merged_tensors(opened.model(), family(opened.model_dir), np.float32,
                             task="causal-lm")
    template = chat_template(recipe.data, opened.tokenizer, base)
    return gguf_export.GgufModel(
        name=recipe.name, description=description, tensors=tensors,
        config=opened.loaded.hf_config, tokenizer=opened.tokenizer, chat_template=template,
        source=_gguf_source(opened), tokenizer_keys=keys,
        end_of_turn=_end_of_turn(opened, template or getattr(opened.tokenizer, "chat_template",
                                                             None)))


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
        write_safetensors(tmp / "adapter_model.safetensors",
                          peft_tensors(model, fam, opened.parts.start), {"format": "pt"})
        config = peft_config(opened.recipe.adapter, model, fam, task=opened.recipe.model.task,
                             base_model=_base_name(opened), start=opened.parts.start)
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


def _notes(opened: OpenedRun, fmt: str) -> list[str]:
    notes = []
    if not opened.finished:
        notes.append(f"the run has not finished: this is its checkpoint at step {opened.step}"
                     + (f" of {opened.total_steps}" if opened.total_steps else ""))
    if fmt == "peft" and opened.parts.start is not None:
        notes.append(f"PiSSA: converted, as PEFT's path_initial_model_for_weight_conversion "
                     f"does, to a plain LoRA adapter of rank {2 * opened.recipe.adapter.rank} "
                     "for the original base weights (the update since the start of training)")
    if opened.recipe.adapter.method == "qlora":
        quant = opened.recipe.adapter.quant
        if fmt in ("merged", "gguf"):
            notes.append(f"QLoRA: the adapter was merged into the dequantized "
                         f"{quant.type.upper()} (block {quant.block_size}) base weights it was "
                         "trained against, not into the original full-precision weights")
        else:
            notes.append(f"QLoRA: the adapter was trained against {quant.type.upper()}-quantized "
                         f"base weights (block {quant.block_size}); on the full-precision base "
                         "its outputs differ slightly")
    if fmt == "peft" and getattr(opened.loaded.hf_config, gguf.FREQUENCY_FACTORS, None):
        notes.append("the base model's GGUF file has rope_freqs (per-frequency rope factors), "
                     "which transformers' GGUF loader ignores: the base the code above loads "
                     "rotates without them, so the adapted model's outputs are wrong there. "
                     "Use it with jaxlora (`runner generate` / `runner chat` on this run), or "
                     "export the merged model with --format gguf for llama.cpp")
    return notes
