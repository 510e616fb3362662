"""A sweep: one recipe run at several points, each an ordinary run folder,
and the table and chart that compare them (`runner sweep`, `runner compare
SWEEP_DIR`).

The points. `--set FIELD=V1,V2,...` gives a list of values (split on the
commas outside brackets, braces and quotes; each value read as `runner run
--set` reads one); the lists multiply into a grid. `--point 'NAME: FIELD=V
FIELD=V'` gives points that are no product; each point is run at every
grid position (points x grid). A point's recipe is the file's, with the
grid's settings, then the point's own, set over it; the fields its
`adapter.method` does not take are then dropped, whoever set them
(`rank` for full, `quant` for lora, `train.lr_ratio_b` for full), except
those the point's own text sets, which validation refuses. Every point is
validated before anything is written, and points whose recipes are equal
(name and output aside) are one point. The order of the --set flags and of
their values is the order of the points, and part of the sweep: the
default folder's hash, and what a folder given again must hold.

    <output.dir>/<name>-sweep-<hash of the points>/
      sweep.json          the points: name, settings, folder, recipe hash
                          (written first; the same command finds it again)
      NN-<point>.toml     each point's resolved recipe: `runner run` it alone
      NN-<point>/<timestamp>/   its run folder (`runner report/export` it)
      sweep.md, sweep.png the comparison, drawn from the run folders only

The comparison: a row per finished point with its scores (the task's
headline metrics after training), costs (train time, peak memory) and
sizes; the best value of each column starred; a point is dominated when
another scores no worse and costs no more on every count, and better on
one (`dominates`), both judged on the figures as the table rounds them.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from jaxlora.errors import UserError
from runner import charts, report, run_folder, tables
from runner import manifest as manifests
from runner.recipe import (ADAPTER_ONLY_TRAIN_FIELDS, PATH_FIELDS, Recipe, adapter_variants,
                           canonical, is_local_relative, parse_override, read_document,
                           recipe_hash, set_fields, to_toml, validate_document)
from runner.resume import recipe_changes
from runner.terminal import print_path

SWEEP_JSON, SWEEP_MD, SWEEP_PNG = "sweep.json", "sweep.md", charts.SWEEP_PNG
STAR = "★"
# What two points' recipes may differ in and still train the same model.
NOT_THE_MODEL = ("name", "output")


# -- the points --------------------------------------------------------------------------

def split_top_level(text: str, separator: str | None = ",") -> list[str]:
    """`text` cut at each `separator` (None: each run of whitespace) that is
    outside [brackets], {braces} and "quoted" or 'quoted' strings, so that
    `["query","value"],all-linear` is two values. The parts are stripped;
    split on whitespace, empty parts are left out."""
    parts, current, depth, quote, escaped = [], [], 0, None, False
    for ch in text:
        if quote is not None:  # inside a string: only its end counts
            current.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if depth == 0 and (ch == separator if separator else ch.isspace()):
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
        if ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(depth - 1, 0)
    parts.append("".join(current))
    stripped = [part.strip() for part in parts]
    return stripped if separator else [part for part in stripped if part]


def grid_lists(sets: list[str]) -> list[tuple[str, list[object]]]:
    """(field, values) of each `--set FIELD=V1,V2,...`, each value read as
    `runner run --set` reads one (`parse_override`)."""
    lists = []
    for item in sets:
        field = parse_override(item)[0]  # FIELD=VALUE, or a message saying what is expected
        raw = item.partition("=")[2]
        pieces = split_top_level(raw)
        if len(pieces) > 1 and not all(pieces):
            raise UserError(f"--set {item!r}: an empty value in the list (values are "
                            "separated by single commas)")
        lists.append((field, [parse_override(f"{field}={piece}")[1] for piece in pieces]))
    return lists


def parse_point(text: str) -> tuple[str | None, list[tuple[str, object]]]:
    """`--point 'NAME: FIELD=VALUE FIELD=VALUE'` -> (NAME or None, settings);
    NAME is what comes before the first ':' when that holds no '='."""
    head, colon, rest = text.partition(":")
    name, settings = (head.strip() or None, rest) if colon and "=" not in head else (None, text)
    assignments = []
    for item in split_top_level(settings, None):
        if not item.partition("=")[0].strip() or "=" not in item:
            raise UserError(f"--point {text!r}: {item!r} is not FIELD=VALUE (e.g. "
                            "'rsLoRA: adapter.rank=16 train.learning_rate=2e-4')")
        assignments.append(parse_override(item))
    return name, assignments


def shown(value) -> str:
    """A setting's value as a label shows it: strings bare, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _settings_text(settings: list[tuple[str, object]]) -> str:
    return " ".join(f"{field}={shown(value)}" for field, value in settings) or "(the recipe)"


@dataclass(frozen=True)
class Point:
    """One point of a sweep: its name, the settings it was given, its
    recipe (validated; the file's name and output until `in_folder`), its
    run folder's name, the values of the settings that vary, and what
    `merged` into it (points with the same recipe)."""

    name: str
    settings: tuple[tuple[str, object], ...]
    recipe: Recipe
    folder: str
    values: dict
    merged: tuple[str, ...] = ()

    def in_folder(self, sweep_dir: Path) -> Recipe:
        """The point's recipe as it runs: named after its folder, its run
        folder inside the sweep folder."""
        output = self.recipe.output.model_copy(update={"dir": str(sweep_dir.resolve())})
        return self.recipe.model_copy(update={"name": self.folder, "output": output})

    def record(self, sweep_dir: Path) -> dict:
        """The point's entry in sweep.json."""
        return {"name": self.name, "folder": self.folder,
                "settings": [[field, value] for field, value in self.settings],
                "values": self.values, "recipe_hash": recipe_hash(self.in_folder(sweep_dir)),
                "merged": list(self.merged)}


@dataclass(frozen=True)
class Plan:
    """The points of a sweep, in the order they run, the fields whose values
    differ between them, and the notes planning made (dropped fields,
    merged points)."""

    recipe_path: Path
    points: list[Point]
    varying: list[str]
    notes: list[str]

    def default_folder(self) -> Path:
        """<output.dir>/<name>-sweep-<hash of the points' names and recipes>:
        the same command finds the same folder again."""
        first = self.points[0].recipe
        key = json.dumps([[p.name, recipe_hash(p.recipe, NOT_THE_MODEL)] for p in self.points])
        short = hashlib.sha256(key.encode()).hexdigest()[:8]
        return Path(first.output.dir) / f"{first.name}-sweep-{short}"


def plan(recipe_path: Path, base: Path, sets: list[str], points: list[str]) -> Plan:
    """The sweep's points: every --point (or the recipe as written) at every
    position of the --set grid, validated, with equal recipes merged; the
    first bad point is a UserError naming it, its field and its value.
    `base`: the folder the recipe's relative sources are read from."""
    document, provenance = read_document(recipe_path)
    lists = grid_lists(sets)
    given = [parse_point(text) for text in points] or [(None, [])]
    combined = [(name, list(zip([field for field, _ in lists], values)), own)
                for name, own in given
                for values in itertools.product(*(values for _, values in lists))]
    notes: list[str] = []
    recipes = [_point_recipe(recipe_path, document, provenance, (grid, own),
                             (n, len(combined)), notes)
               for n, (_, grid, own) in enumerate(combined, 1)]
    combined = [(name, [*grid, *own]) for name, grid, own in combined]
    merged = _merged([settings for _, settings in combined], recipes, notes)
    fields = list(dict.fromkeys(field for _, settings in combined for field, _ in settings))
    effective = {i: {f: _leaf(canonical(recipes[i]), f) for f in fields} for i in merged}
    varying = [f for f in fields if len({json.dumps(effective[i][f]) for i in merged}) > 1]
    names = _names(combined, effective, varying, {f for f, _ in lists}, recipes[0].name)
    chosen = [Point(names[i], tuple(combined[i][1]), _absolute_sources(recipes[i], base),
                    _folder_name(n, names[i]),
                    {f: effective[i][f] for f in varying if effective[i][f] is not None},
                    merged[i])
              for n, i in enumerate(merged, 1)]
    return Plan(recipe_path, chosen, varying, notes)


def _merged(settings: list[list], recipes: list[Recipe], notes: list[str]
            ) -> dict[int, tuple[str, ...]]:
    """The points kept (by index, in order), each with the settings of the
    later points whose recipe equals its own, which are left out (said in
    `notes`)."""
    kept: dict[str, int] = {}  # content hash -> the index of its first point
    merged: dict[int, tuple[str, ...]] = {}
    for i, recipe in enumerate(recipes):
        first = kept.setdefault(recipe_hash(recipe, NOT_THE_MODEL), i)
        if first == i:
            merged[i] = ()
            continue
        merged[first] += (_settings_text(settings[i]),)
        notes.append(f"{_settings_text(settings[i])} is the same recipe as "
                     f"{_settings_text(settings[first])}: run once")
    return merged


def _point_recipe(path: Path, document: dict, provenance: dict, settings: tuple[list, list],
                  at: tuple[int, int], notes: list[str]) -> Recipe:
    """One point's recipe: the grid's settings, then the point's own
    (`settings`: both), over a copy of the file's document; the fields its
    method does not take dropped (said once in `notes`) unless the point's
    own text set them; validated. A UserError names the point (`at`: n of
    total)."""
    grid, own = settings
    doc, given, explicit = copy.deepcopy(document), dict(provenance), {}
    where = f"point {at[0]} of {at[1]} ({_settings_text([*grid, *own])})"
    set_fields(doc, given, grid, source=where)
    set_fields(doc, explicit, own, source=where)  # `explicit`: the leaves the point set
    given.update(explicit)
    dropped = _drop_foreign_fields(doc, set(explicit))
    if dropped:
        note = (f'adapter.method = "{doc["adapter"]["method"]}" takes no '
                f"{', '.join(dropped)}: left out of its points")
        notes.extend([note] if note not in notes else [])
    try:
        return validate_document(path, doc, given)
    except UserError as e:
        message = str(e)
        raise UserError(message if message.startswith(where) else f"{where}: {message}") from None


def _drop_foreign_fields(doc: dict, explicit: set[str]) -> list[str]:
    """Remove the fields the point's adapter.method does not take: other
    methods' adapter fields, and for "full" the train fields of adapters;
    those in `explicit` (set by the point's own text) are kept, for
    validation to refuse. Returns the fields removed (dotted)."""
    adapter, variants = doc.get("adapter"), adapter_variants()
    method = adapter.get("method", "lora") if isinstance(adapter, dict) else None
    if not isinstance(method, str) or method not in variants:
        return []  # no [adapter] table, or a method validation refuses
    known = {name for variant in variants.values() for name in variant.model_fields}
    foreign = [("adapter", key) for key in adapter
               if key in known and key not in variants[method].model_fields]
    train = doc.get("train")
    if method == "full" and isinstance(train, dict):
        foreign += [("train", key) for key in ADAPTER_ONLY_TRAIN_FIELDS if key in train]
    dropped = [(table, key) for table, key in foreign
               if not any(e == f"{table}.{key}" or e.startswith(f"{table}.{key}.")
                          for e in explicit)]
    for table, key in dropped:
        del doc[table][key]
    return [f"{table}.{key}" for table, key in dropped]


def _leaf(document: dict, field: str):
    """The value at a dotted field of a canonical recipe; None where absent."""
    value = document
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _short_names(fields: list[str]) -> dict[str, str]:
    """Each field by its last part, where no other field ends the same way."""
    last = [f.rsplit(".", 1)[-1] for f in fields]
    return {f: (end if last.count(end) == 1 else f) for f, end in zip(fields, last)}


def _names(combined: list, effective: dict, varying: list[str], grid: set[str],
           fallback: str) -> dict[int, str]:
    """Each kept point's name (`effective`: its values of the settings, by
    index): the name given, followed by its values of the varying `grid`
    fields; unnamed, its values of the varying fields it was given (or
    `fallback`, the recipe's name). Two points of one name are refused."""
    short = _short_names(varying)
    names = {}
    for i in effective:
        name, settings = combined[i]
        own = grid if name else {field for field, _ in settings}
        label = " ".join(f"{short[f]}={shown(effective[i][f])}" for f in varying
                         if f in own and effective[i][f] is not None)
        names[i] = f"{name} {label}".strip() if name else (label or fallback)
    twice = [n for n in names.values() if list(names.values()).count(n) > 1]
    if twice:
        raise UserError(f"--point: two points are named {twice[0]!r}; give each its own NAME")
    return names


def _folder_name(n: int, name: str) -> str:
    """`NN-<name>` with the characters a recipe name cannot hold as '-'."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:60] or "point"
    return f"{n:02d}-{slug}"


def _absolute_sources(recipe: Recipe, base: Path) -> Recipe:
    """The recipe with its local files relative to `base` made absolute (its
    sources, and data.chat_template where it names a file): a point's recipe
    lives in the sweep folder and reads the same files."""
    update = {}
    for table, key in PATH_FIELDS:
        section = update.get(table, getattr(recipe, table))
        value = getattr(section, key)
        if is_local_relative(value, base):
            update[table] = section.model_copy(update={key: os.path.normpath(base / value)})
    return recipe.model_copy(update=update)


# -- the folder ----------------------------------------------------------------------------

def is_sweep_dir(path: Path) -> bool:
    return (path / SWEEP_JSON).is_file()


def open_folder(sweep_dir: Path, chosen: Plan, command: str) -> None:
    """Make the sweep folder (or find it again): sweep.json first, then each
    point's recipe file. A folder holding another sweep (the first
    difference named), or other files, is refused before anything is
    written. `command`, the command that runs the whole sweep, is recorded
    each time (sweep.md shows the last one)."""
    record = {"recipe": str(chosen.recipe_path.resolve()), "command": command,
              "varying": chosen.varying, "notes": chosen.notes,
              "points": [point.record(sweep_dir) for point in chosen.points]}
    if is_sweep_dir(sweep_dir):
        found = run_folder.read_json(sweep_dir / SWEEP_JSON)
        difference = _first_difference(sweep_dir, found.get("points"), chosen.points)
        if difference:
            raise UserError(f"{sweep_dir}: holds another sweep ({difference}); give another "
                            "--out, or remove it")
        if found.get("command") != command:
            run_folder.write_json(sweep_dir / SWEEP_JSON, {**found, "command": command})
    else:
        if sweep_dir.is_dir() and any(sweep_dir.iterdir()):
            raise UserError(f"{sweep_dir}: a folder that is not empty and holds no "
                            f"{SWEEP_JSON}; give another --out")
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{sweep_dir}: cannot create the sweep folder: {e.strerror}") \
                from None
        run_folder.write_json(sweep_dir / SWEEP_JSON, record)
    for point in chosen.points:
        run_folder.write_atomic(recipe_file(sweep_dir, point.folder),
                                to_toml(point.in_folder(sweep_dir)))


def _first_difference(sweep_dir: Path, found, points: list[Point]) -> str | None:
    """What first differs between the points sweep.json holds (`found`) and
    these, in words ("point 2 (02-rank-8): adapter.alpha: 16.0 there, 32.0
    here"); None where they are the same sweep."""
    if not isinstance(found, list):
        return f"{SWEEP_JSON} has no list of points"
    for n, (old, point) in enumerate(zip(found, points), 1):
        folder = old.get("folder") if isinstance(old, dict) else None
        if folder != point.folder:
            return f"point {n} is {folder!r} there, {point.folder!r} here"
        recipe = point.in_folder(sweep_dir)
        if old.get("recipe_hash") != recipe_hash(recipe):
            try:  # the point's recipe as the folder wrote it
                written = tomllib.loads(recipe_file(sweep_dir, folder).read_text("utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
                return f"point {n} ({folder}): another recipe"
            changes = recipe_changes(written, canonical(recipe))
            field, there, here = changes[0] if changes else ("its recipe", "one", "another")
            return f"point {n} ({folder}): {field}: {there!r} there, {here!r} here"
    if len(found) != len(points):
        return f"{len(found)} points there, {len(points)} here"
    return None


def recipe_file(sweep_dir: Path, folder: str) -> Path:
    return sweep_dir / f"{folder}.toml"


def finished(sweep_dir: Path, point: Point) -> bool:
    """Whether the point's newest run folder says it finished."""
    run = run_folder.newest_run(sweep_dir, point.folder)
    return run is not None and report.finished(run_folder.read_json(run / "manifest.json"))


# -- the comparison ------------------------------------------------------------------------

# The figures of a row: (key, column, format, better: max or min). Scores are
# the task's headline metrics after training; costs what a point spends.
SCORES = [("accuracy", "accuracy", ".3f", max), ("macro_f1", "macro-F1", ".3f", max),
          ("perplexity", "perplexity", ".3f", min), ("exact_match", "exact match", ".3f", max)]
COSTS = [("train_seconds", "train s", ".1f", min), ("peak_memory_mb", "peak MiB", ".0f", min)]
SIZES = [("steps_per_second", "steps/s", ".1f", max), ("trainable_params", "trainable", ",", min),
         ("frozen_bytes", "frozen", "size", min), ("checkpoint_bytes", "checkpoint", "size", min)]

FOOTNOTE = f"""\
{STAR} marks the best value of each column as shown (every point that ties
for it). **Score**: the task's headline metrics after fine-tuning, on the
eval split: accuracy and macro-F1 for a classifier (higher is better),
perplexity (lower) and exact match (higher) for a causal LM. **Cost**:
train time and peak memory (the device's, or the process's on CPU). Train
time is the seconds of training summed over the run's sessions less their
compilation (manifest.json's timings.train_seconds - timings.compile_seconds:
each session's first step, which compiles, is left out; evaluation during
training is never counted). A point is **dominated** when another point is
no worse on every score and every cost and better on at least one, compared
as the table shows them: the last column gives those points' numbers.
steps/s is the run's steps over that train time; trainable is the number of
trained parameters; frozen the bytes of the frozen base weights (4-bit codes
and scales for QLoRA); checkpoint the size on disk of the run's latest
checkpoint."""


@dataclass(frozen=True)
class Summary:
    """What sweep.md shows: the table, the lines beside it, and the points'
    figures and the numbers of the points that dominate each (for the chart).
    No rows: no point finished (`skipped` says why), nothing to compare."""

    names: list[str]
    cells: list[list[str]]
    left: int  # the name and settings columns
    lines: list[str]
    rows: list[dict]
    dominated_by: list[list[int]]  # a list per row
    skipped: list[str]  # the points not in the table, and why


def summarize(sweep_dir: Path) -> Summary:
    """The comparison of a sweep folder's finished points, from its
    sweep.json and the points' run folders only (no rows where none
    finished)."""
    record = _read_sweep(sweep_dir)
    rows, skipped = [], []
    for number, point in enumerate(record["points"], 1):
        run = run_folder.newest_run(sweep_dir, point["folder"])
        found = report.read_run(run) if run is not None else {"skipped": "no run folder"}
        if "skipped" in found:
            status = (run_folder.read_json(run / "manifest.json").get("status")
                      if run is not None else None)
            skipped.append(f"#{number} {point['name']}: " + (
                f"did not finish (status {status!r})" if status else
                "no run folder (not run yet, or refused before its run began)"))
            continue
        rows.append({"number": number, "point": point, "run": found, "figures": figures(found)})
    names, cells, dominated_by = comparison_table(rows, record["varying"])
    scores = scored(rows)
    lines = _shared_line("before fine-tuning (the base model)", rows, "before", scores)
    lines += _shared_line("majority class (its most frequent training label)", rows,
                          "baseline", scores)
    lines += [f"not in the table: {line}" for line in skipped]
    lines += [f"note: {note}" for note in record.get("notes", [])]
    return Summary(names, cells, 2 + len(record["varying"]), lines, rows, dominated_by, skipped)


def _read_sweep(sweep_dir: Path) -> dict:
    """sweep.json, with what the comparison reads of it; a UserError naming
    the file and the key otherwise."""
    path = sweep_dir / SWEEP_JSON
    record = run_folder.read_json(path)
    run_folder.check(path, record, [(("points",), ("list",)), (("varying",), ("strings",))])
    for n, point in enumerate(record["points"]):
        if not isinstance(point, dict):
            raise UserError(f"{path}: points[{n}]: expected an object")
        run_folder.check(path, point, [(("name",), ("string",)), (("folder",), ("string",)),
                                       (("values",), ("object",))])
        if Path(point["folder"]).name != point["folder"]:
            raise UserError(f"{path}: points[{n}].folder: not a folder name")
    return record


def figures(run: dict) -> dict:
    """A finished run's scores, costs and sizes (None where it lacks one)."""
    m, after = run["manifest"], run["eval"]["after"]
    run_folder.check(run["dir"] / "manifest.json", m, manifests.fields(
        [manifests.Need(f"timings.{key}", optional=True)
         for key in ("train_seconds", "compile_seconds")]))
    train, model = m.get("train", {}), m.get("model", {})
    seconds = train_seconds(m)
    out = {key: after.get(key) for key, *_ in SCORES}
    out.update(train_seconds=seconds, peak_memory_mb=train.get("peak_memory_mb"),
               steps_per_second=train["steps"] / seconds
               if seconds and isinstance(train.get("steps"), int) else None,
               trainable_params=model.get("trainable_params"),
               frozen_bytes=model.get("frozen_bytes"),
               checkpoint_bytes=checkpoint_bytes(run["dir"]))
    return out


def train_seconds(manifest: dict) -> float | None:
    """The run's seconds of training less its compilation, summed over its
    sessions (`timings`; a run made before timings were recorded has one
    session's in `train`); None where either is missing."""
    timings, train = manifest.get("timings") or {}, manifest.get("train", {})
    total = timings.get("train_seconds", train.get("train_seconds"))
    compiled = timings.get("compile_seconds", train.get("compile_seconds"))
    if total is None or compiled is None:
        return None
    return max(total - compiled, 0.0)


def checkpoint_bytes(run_dir: Path) -> int | None:
    """The size on disk of the run's latest checkpoint."""
    steps = run_folder.checkpoint_steps(run_dir)
    if not steps:
        return None
    folder = run_dir / run_folder.CHECKPOINTS / str(steps[-1])
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def dominates(a: dict, b: dict, criteria: list[tuple]) -> bool:
    """Whether figures `a` are no worse than `b` on every criterion
    ((key, _, _, max or min)) and better on one; a criterion either lacks
    decides nothing, so neither dominates."""
    better = False
    for key, _, _, best in criteria:
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            return False
        if x != y and best(x, y) == y:
            return False
        better = better or x != y
    return better


def scored(rows: list[dict]) -> list[tuple]:
    """The SCORES some row has (a classifier's, or a causal LM's)."""
    return [s for s in SCORES if any(r["figures"][s[0]] is not None for r in rows)]


def comparison_table(rows: list[dict], varying: list[str]
                     ) -> tuple[list[str], list[list[str]], list[list[int]]]:
    """The column names and the cells: number and name, the varying
    settings, the figures (the best of each column as shown starred), and
    the numbers of the points that dominate each, also returned alone, a
    list per row (for the chart). Stars and dominance compare the figures
    as the table shows them, so equal-looking numbers are equal."""
    criteria = scored(rows) + COSTS
    short, columns = _short_names(varying), criteria + SIZES
    shown_ = [{key: _figure(r["figures"][key], fmt) for key, _, fmt, _ in columns} for r in rows]
    as_shown = [{key: number for key, (_, number) in texts.items()} for texts in shown_]
    dominated_by = [[other["number"] for other, theirs in zip(rows, as_shown)
                     if dominates(theirs, mine, criteria)] for mine in as_shown]
    best = {key: better(values) if values else None
            for key, _, _, better in columns
            for values in [[f[key] for f in as_shown if f[key] is not None]]}
    cells = []
    for row, texts, by in zip(rows, shown_, dominated_by):
        values = row["point"]["values"]
        cell = [f"#{row['number']}", row["point"]["name"]]
        cell += [shown(values[f]) if f in values else "-" for f in varying]
        for key, *_ in columns:
            text, number = texts[key]
            cell.append(f"{text} {STAR}" if number is not None and number == best[key] else text)
        cells.append(cell + [", ".join(f"#{n}" for n in by) or "-"])
    names = (["#", "point"] + [short[f] for f in varying] + [name for _, name, _, _ in columns]
             + ["dominated by"])
    return names, cells, dominated_by


def _figure(value: float | None, fmt: str) -> tuple[str, float | None]:
    """A figure as the table shows it ('-' where missing) and the number
    that text stands for (the value rounded as shown)."""
    if value is None:
        return "-", None
    if fmt != "size":
        text = format(value, fmt)
        return text, float(text.replace(",", ""))
    scale = 1
    for unit in ("B", "KiB", "MiB"):
        if value < scale * 1024:
            digits = 0 if unit == "B" else 1
            return f"{value / scale:.{digits}f} {unit}", round(value / scale, digits) * scale
        scale *= 1024
    return f"{value / scale:.2f} GiB", round(value / scale, 2) * scale


def _shared_line(what: str, rows: list[dict], key: str, scores: list[tuple]) -> list[str]:
    """One line with the points' `key` evaluation (eval.json's "before" or
    "baseline"): once where every point has the same, else point by point
    (a new head's seed, another model or other data); none where no point
    has one."""
    found = {r["number"]: {k: e[k] for k, *_ in scores if e.get(k) is not None}
             for r in rows for e in [r["run"]["eval"].get(key)] if isinstance(e, dict)}
    if not found:
        return []
    shown_ = lambda figures: ", ".join(f"{name} {figures[k]:{fmt}}"  # noqa: E731
                                       for k, name, fmt, _ in scores if k in figures)
    first = next(iter(found.values()))
    if all(figures == first for figures in found.values()):
        return [f"{what}, the same for every point: {shown_(first)}"]
    return [f"{what}, per point: " + "; ".join(f"#{n} {shown_(figures)}"
                                              for n, figures in found.items())]


def markdown(sweep_dir: Path, summary: Summary, chart: bool) -> str:
    """sweep.md: the table, the lines beside it, the chart, the footnote."""
    record = run_folder.read_json(sweep_dir / SWEEP_JSON)
    name = Path(record.get("recipe", "sweep")).stem
    parts = [f"# Sweep of {name}: {len(summary.rows)} of {len(record['points'])} points "
             "finished", "", f"`{record.get('command', '')}`", "",
             tables.markdown(summary.names, summary.cells, summary.left), ""]
    parts += [f"- {line}" for line in summary.lines]
    if chart:
        parts += ["", f"![score against cost]({SWEEP_PNG})", "",
                  "Each dot is labelled with its point's number (the table's # column)."]
    parts += ["", FOOTNOTE, ""]
    return "\n".join(parts)


def score_axis(score: tuple) -> str:
    """The chart's score axis: the score (SCORES' entry) and which way is better."""
    _, name, _, better = score
    return f"{name} after fine-tuning ({'higher' if better is max else 'lower'} is better)"


def write_summary(sweep_dir: Path, errors: Console) -> Summary:
    """Draw sweep.png and write sweep.md from the sweep folder; returns what
    they show (a chart that cannot be drawn is a warning on `errors`, not a
    failure). Where no point finished, nothing is written and the summary
    has no rows."""
    summary = summarize(sweep_dir)
    if not summary.rows:
        return summary
    scores = scored(summary.rows)
    drawn = False
    if scores:
        dots = [charts.Dot(f"#{r['number']}", r["figures"][scores[0][0]],
                           r["figures"]["train_seconds"], r["figures"]["peak_memory_mb"],
                           bool(by)) for r, by in zip(summary.rows, summary.dominated_by)]
        try:
            charts.write_sweep_png(sweep_dir / SWEEP_PNG, dots, score_axis(scores[0]))
            drawn = True
        except Exception as e:  # noqa: BLE001 - the table is worth having without the chart
            errors.print(f"[yellow]warning:[/] the chart was not drawn: {escape(str(e))}")
    run_folder.write_atomic(sweep_dir / SWEEP_MD, markdown(sweep_dir, summary, drawn))
    return summary


def show(summary: Summary, sweep_dir: Path, console: Console, table: bool = True) -> None:
    """The comparison in the terminal: the table (fitting its width), the
    lines beside it, and where sweep.md is."""
    if table:
        for part in tables.fitted(f"sweep {sweep_dir.name}", summary.names, summary.cells,
                                  console.width, summary.left):
            console.print(part)
    for line in summary.lines:  # wrapped at the terminal's width
        console.print(line, markup=False, highlight=False)
    print_path(console, "sweep.md:", sweep_dir / SWEEP_MD)
