"""The model card (README.md) of an export, drawn from the run folder's own
files: manifest.json, eval.json, recipe.toml (and, for the license only, the
base model's own card or GGUF metadata).

    ---                         YAML front matter, as the Hugging Face hub reads it:
    base_model: ...             the base's hub id (only where it is one)
    library_name: peft          peft (adapter), transformers (merged), gguf
    pipeline_tag: ...           text-generation (causal-lm), text-classification
    tags: [...]                 jaxlora, the method, its variants (`hub_tag`),
                                the format (and GGUF type)
    datasets: [...]             the data's hub id (only where it is one)
    license: ...                where the base model's card or file says it
    ---
    what it is for (the recipe's description), how to load it, the method and
    its settings, the data, the before/after table, the training, the recipe
    as TOML, its hash and the package versions

The front matter is written by hand (PyYAML is not a dependency of ours):
every string JSON-quoted, which YAML reads as a double-quoted scalar.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from jaxlora import sources
from jaxlora.lora import variant_names
from jaxlora.models import gguf
from runner import manifest as manifests
from runner import report, run_folder

PIPELINES = {"causal-lm": "text-generation", "classification": "text-classification"}
LIBRARIES = {"peft": "peft", "merged": "transformers", "gguf": "gguf"}
COUNTED = ("dropped", "too_long", "empty_texts", "truncated")  # what counts_line says
_LICENSE = re.compile(r"^license:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)


@dataclass(frozen=True)
class Exported:
    """One export of a run: its format, where it is, what it holds."""

    fmt: str  # peft, merged, gguf
    path: Path  # the folder (peft, merged) or the .gguf file
    step: int  # the checkpoint's step
    quant: str | None = None  # the GGUF type
    notes: list[str] = field(default_factory=list)  # what the export command said


def front_matter(manifest: dict, fmt: str, quant: str | None = None) -> dict:
    """The card's YAML fields, in the order written (absent ones left out)."""
    recipe = manifest["recipe"]
    source, data = recipe["model"]["source"], recipe["data"].get("source", "")
    method = recipe["adapter"]["method"]
    fields: dict = {}
    if _from_hub(source, manifest):
        fields["base_model"] = source
    fields["library_name"] = LIBRARIES[fmt]
    fields["pipeline_tag"] = PIPELINES[report.task_of(manifest)]
    tags = ["jaxlora", method] + [hub_tag(v) for v in variant_names(recipe["adapter"])]
    tags += ["peft"] if fmt == "peft" else []
    tags += ["gguf", quant] if fmt == "gguf" and quant else []
    fields["tags"] = tags + ([] if fmt == "peft" or method in ("full", "none")
                             else ["merged"])
    if data and _from_hub(data, manifest):
        fields["datasets"] = [data]
    found = base_license(Path(manifest["model"]["source"]))
    if found:
        fields["license"] = found
    return fields


def hub_tag(label: str) -> str:
    """A label as a hub tag: lower case, each run of other characters than
    letters and digits one dash (`gaussian init` -> `gaussian-init`)."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _from_hub(location: str, manifest: dict) -> bool:
    """Whether a recipe source is a Hugging Face hub id (as the run resolved
    it: relative paths from the recipe's folder)."""
    base_dir = Path(manifest["base_dir"]) if manifest.get("base_dir") else None
    return sources.where_from(location, base_dir) == "hub"


def base_license(model_source: Path) -> str | None:
    """The license the base model states: a GGUF file's general.license, or its
    folder's README.md front matter or config.json; None where none does."""
    try:
        if gguf.is_gguf(model_source):
            value = gguf.open_gguf(model_source).metadata.get("general.license")
            return str(value) if value else None
        card = model_source / "README.md"
        if card.is_file():
            text = card.read_text(encoding="utf-8", errors="replace")
            if text.startswith("---"):
                found = _LICENSE.search(text.split("---", 2)[1])
                if found:
                    return found.group(1)
        config = model_source / "config.json"
        if config.is_file():
            value = json.loads(config.read_text(encoding="utf-8")).get("license")
            return str(value) if isinstance(value, str) and value else None
    except (OSError, ValueError):
        return None
    return None


def yaml_block(fields: dict) -> list[str]:
    """The front matter lines: strings JSON-quoted (a YAML double-quoted scalar),
    lists of strings as YAML flow sequences of them."""
    out = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            out.append(f"{key}: [{', '.join(json.dumps(str(v)) for v in value)}]")
        else:
            out.append(f"{key}: {json.dumps(str(value))}")
    return out + ["---"]


def usage(manifest: dict, exported: Exported) -> list[str]:
    """How to load the export: a Python snippet (peft, merged) or the llama.cpp
    command (gguf), as Markdown lines; the first line of code is what the
    export command prints."""
    task = report.task_of(manifest)
    auto = "AutoModelForSequenceClassification" if task == "classification" \
        else "AutoModelForCausalLM"
    labels = manifest["recipe"]["data"].get("labels") or []
    extra = f", num_labels={len(labels)}" if task == "classification" else ""
    path = str(exported.path)
    if exported.fmt == "gguf":
        return ["```bash", f"llama-cli -m {shlex.quote(path)}", "```", "",
                "Ollama: a Modelfile with `FROM ./" + exported.path.name + "`, then `ollama "
                "create NAME -f Modelfile`; LM Studio: import the file."]
    if exported.fmt == "merged":
        return ["```python", f"from transformers import {auto}",
                f"model = {auto}.from_pretrained({path!r})", "```"]
    return ["```python", "from peft import PeftModel", f"from transformers import {auto}", "",
            f"base = {auto}.from_pretrained({_base_args(manifest)}{extra})",
            f"model = PeftModel.from_pretrained(base, {path!r}).eval()", "```"]


def _base_args(manifest: dict) -> str:
    """from_pretrained's arguments for the base model: a hub id as the recipe
    wrote it; a local folder or a `pkg://` source as the folder it was on the
    exporting machine (transformers reads neither the scheme nor a path
    relative to the recipe); a GGUF file's folder and name (transformers
    dequantizes it)."""
    source = manifest["recipe"]["model"]["source"]
    resolved = Path(manifest["model"]["source"])
    if source.lower().endswith(gguf.SUFFIX):
        return f"{str(resolved.parent)!r}, gguf_file={resolved.name!r}"
    return repr(source if _from_hub(source, manifest) else str(resolved))


def one_line(manifest: dict, exported: Exported) -> str:
    """The single line `runner export` prints on how to use the result."""
    lines = usage(manifest, exported)
    code = [line for line in lines[1:lines.index("```", 1)] if line and "import" not in line]
    return "; ".join(code)


def counts_line(stats: dict) -> str:
    """The rows the data step dropped, by reason, and the examples it cut, zeros
    included (the report shows only what is not zero)."""
    def total(key: str) -> int:
        value = stats.get(key) or {}
        return sum(int(n) for n in value.values()) if isinstance(value, dict) else 0

    return (f"Rows dropped: {total('dropped')} for labels outside `labels`, "
            f"{total('too_long')} as too long for max_length, {total('empty_texts')} for an "
            f"empty text; examples cut to max_length: {total('truncated')}.")


def _where_the_base_is(source: str) -> list[str]:
    """A line where the base model's name is not a hub id to load as is."""
    if source.startswith("pkg://"):
        package, _, inside = source.removeprefix("pkg://").partition("/")
        return [f"The base model `{source}` is `{inside}` inside the installed Python "
                f"package `{package}` (the path below is where it was on the machine that "
                "exported).", ""]
    if Path(source).expanduser().is_absolute() or source.startswith("."):
        return [f"The base model `{source}` is a local path (relative paths are relative to "
                "the recipe's folder).", ""]
    return []


def check(run_dir: Path, manifest: dict) -> dict:
    """The run's eval.json ({} before its first evaluation), once it and the
    manifest hold what the card reads (the report's needs); a UserError naming
    the file and the key otherwise."""
    path = Path(run_dir) / "eval.json"
    evals = run_folder.read_json(path) if path.is_file() else {}
    manifests.check_report_files(Path(run_dir), manifest, evals,
                                 partial=manifest.get("status") != "finished")
    return evals


def model_card(run_dir: Path, manifest: dict, exported: Exported) -> str:
    """README.md of an export of the run in `run_dir` (`manifest`: its
    manifest.json, read and checked): front matter, then what the model is
    for, how to load it, the method, the data, the before/after table, the
    training, the recipe (TOML), its hash and the package versions."""
    run_dir = Path(run_dir)
    recipe = manifest["recipe"]
    evals = check(run_dir, manifest)
    before, after = evals.get("before"), evals.get("after")
    task = report.task_of(manifest)
    kind = {"peft": "LoRA adapter", "merged": "merged model",
            "gguf": f"GGUF, {exported.quant}"}[exported.fmt]
    out = yaml_block(front_matter(manifest, exported.fmt, exported.quant))
    out += ["", f"# {recipe['name']} ({kind})", ""]
    if recipe.get("description"):
        out += [recipe["description"], ""]
    total = manifest.get("train", {}).get("total_steps")
    method = report.method_label(recipe["adapter"])
    out += [f"Fine-tuned from `{recipe['model']['source']}` by jaxlora (task `{task}`, method "
            f"`{method}`), run `{run_dir.name}` at step {exported.step}"
            + (f" of {total}" if total else "")
            + ("" if manifest.get("status") == "finished" else
               f" (the run is {manifest.get('status')}: this is its latest checkpoint)") + ".",
            "", "## How to use it", ""]
    if exported.fmt == "peft":
        out += _where_the_base_is(recipe["model"]["source"])
    out += usage(manifest, exported)
    if exported.notes:
        out += [""] + [f"Note: {note}." for note in exported.notes]
    out += [""] + report.model_section(manifest)[1:]
    # the rows dropped and examples cut once, zeros included: in counts_line
    data = {k: v for k, v in manifest["data"].items() if k not in COUNTED}
    out += report.data_section(data, after or before or {})
    out += ["", counts_line(manifest["data"])]
    out += [""] + report.comparison_section(before, after, report.baseline_of(manifest, evals),
                                            task)
    out += report.training_section(manifest)
    out += _provenance(run_dir, manifest)
    return "\n".join(out) + "\n"


def _provenance(run_dir: Path, manifest: dict) -> list[str]:
    """The recipe as TOML (the run folder's recipe.toml), its hash and the
    package versions the run was made with."""
    toml = (run_dir / "recipe.toml").read_text(encoding="utf-8").rstrip("\n")
    fence = "````" if "```" in toml else "```"
    out = ["", "## Recipe", "", f"{fence}toml", toml, fence, "",
           f"Recipe hash (sha256): `{manifest['recipe_hash']}`", "", "## Package versions", "",
           "| package | version |", "|---|---|"]
    env = manifest.get("environment", {})
    if env.get("python"):
        out.append(f"| python | {env['python']} |")
    for name, version in (env.get("packages") or {}).items():
        out.append(f"| {name} | {version or '-'} |")
    return out
