"""A sweep: one recipe run at several points, each an ordinary run folder,
and the table and chart that compare them (`runner sweep`, `runner compare
SWEEP_DIR`).

The points. `--set FIELD=V1,V2,...` gives a list of values (split on the
commas outside brackets, braces and quotes; each value read as `runner run
--set` reads one); the lists multiply into a grid. `--point 'NAME: FIELD=V
FIELD=V'` gives points that are no product; each point is run at every
grid position (points x grid). A point's recipe is the file's, with the
grid's settings, then the point's own, set over it; where that switches
`adapter.method`, the adapter fields the new method does not take are
dropped (`rank` for full, `quant` for lora). Every point is validated before
anything is written, and points whose recipes are equal (name and output
aside) are one point.

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
one (`dominators`).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from jaxlora.errors import UserError
from runner import charts, run_folder, tables
from runner import manifest as manifests
from runner.recipe import (SOURCE_FIELDS, Recipe, adapter_variants, canonical, parse_override,
                           read_document, recipe_hash, set_fields, to_toml, validate_document)
from runner.report import read_run
from runner.terminal import print_path

SWEEP_JSON, SWEEP_MD, SWEEP_PNG = "sweep.json", "sweep.md", charts.SWEEP_PNG
STAR = "★"


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
        key = json.dumps([[p.name, _content_hash(p.recipe)] for p in self.points])
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
    combined = [(name, [*zip([field for field, _ in lists], values), *own])
                for name, own in given
                for values in itertools.product(*(values for _, values in lists))]
    notes: list[str] = []
    recipes = [_point_recipe(recipe_path, document, provenance, settings, (n, len(combined)),
                             notes)
               for n, (_, settings) in enumerate(combined, 1)]
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
        first = kept.setdefault(_content_hash(recipe), i)
        if first == i:
            merged[i] = ()
            continue
        merged[first] += (_settings_text(settings[i]),)
        notes.append(f"{_settings_text(settings[i])} is the same recipe as "
                     f"{_settings_text(settings[first])}: run once")
    return merged


def _point_recipe(path: Path, document: dict, provenance: dict, settings: list,
                  at: tuple[int, int], notes: list[str]) -> Recipe:
    """One point's recipe: the settings over a copy of the file's document,
    the adapter fields its method does not take dropped (said once in
    `notes`), validated; a UserError naming the point (`at`: n of total)."""
    doc, given = copy.deepcopy(document), dict(provenance)
    where = f"point {at[0]} of {at[1]} ({_settings_text(settings)})"
    set_fields(doc, given, settings, source=where)
    dropped = _drop_foreign_adapter_fields(doc, document)
    if dropped:
        note = (f'adapter.method = "{doc["adapter"]["method"]}" takes no '
                f"{', '.join(dropped)}: left out of its points")
        notes.extend([note] if note not in notes else [])
    try:
        return validate_document(path, doc, given)
    except UserError as e:
        message = str(e)
        raise UserError(message if message.startswith(where) else f"{where}: {message}") from None


def _drop_foreign_adapter_fields(doc: dict, original: dict) -> list[str]:
    """Where the point switches adapter.method: remove the adapter fields of
    other methods that the new one does not take; returns them (dotted)."""
    adapter, before = doc.get("adapter"), original.get("adapter")
    if not isinstance(adapter, dict):
        return []
    method = adapter.get("method", "lora")
    old = before.get("method", "lora") if isinstance(before, dict) else "lora"
    variants = adapter_variants()
    if method == old or method not in variants:
        return []  # the same method, or one validation names as unknown
    known = {name for variant in variants.values() for name in variant.model_fields}
    dropped = [key for key in adapter if key in known
               and key not in variants[method].model_fields]
    for key in dropped:
        del adapter[key]
    return [f"adapter.{key}" for key in dropped]


def _content_hash(recipe: Recipe) -> str:
    """The recipe's hash, its name and output aside: points with the same one
    train the same model."""
    content = {k: v for k, v in canonical(recipe).items() if k not in ("name", "output")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


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
    """The recipe with its local sources relative to `base` made absolute: a
    point's recipe lives in the sweep folder and reads the same files."""
    update = {}
    for table, key in SOURCE_FIELDS:
        section = getattr(recipe, table)
        value = getattr(section, key)
        if ("://" in value or Path(value).expanduser().is_absolute()
                or not (base / value).exists()):
            continue  # a hub id, a pkg:// file, an absolute path
        update[table] = section.model_copy(update={key: os.path.normpath(base / value)})
    return recipe.model_copy(update=update)


# -- the folder ----------------------------------------------------------------------------

def is_sweep_dir(path: Path) -> bool:
    return (path / SWEEP_JSON).is_file()


def open_folder(sweep_dir: Path, chosen: Plan, command: str) -> None:
    """Make the sweep folder (or find it again): sweep.json first, then each
    point's recipe file. A folder holding another sweep, or other files, is
    refused before anything is written."""
    record = {"recipe": str(chosen.recipe_path.resolve()), "command": command,
              "varying": chosen.varying, "notes": chosen.notes,
              "points": [point.record(sweep_dir) for point in chosen.points]}
    if is_sweep_dir(sweep_dir):
        found = run_folder.read_json(sweep_dir / SWEEP_JSON).get("points")
        pairs = lambda points: [(p.get("folder"), p.get("recipe_hash"))  # noqa: E731
                                for p in points if isinstance(p, dict)]
        if not isinstance(found, list) or pairs(found) != pairs(record["points"]):
            raise UserError(f"{sweep_dir}: holds another sweep (other points or recipes); "
                            "give another --out, or remove it")
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


def recipe_file(sweep_dir: Path, folder: str) -> Path:
    return sweep_dir / f"{folder}.toml"


def finished(sweep_dir: Path, point: Point) -> bool:
    """Whether the point's newest run folder says it finished."""
    run = run_folder.newest_run(sweep_dir, point.folder)
    return run is not None and run_folder.read_json(run / "manifest.json").get(
        "status") == "finished"


# -- the comparison ------------------------------------------------------------------------

# The figures of a row: (key, column, format, better: max or min). Scores are
# the task's headline metrics after training; costs what a point spends.
SCORES = [("accuracy", "accuracy", ".3f", max), ("macro_f1", "macro-F1", ".3f", max),
          ("perplexity", "perplexity", ".3f", min), ("exact_match", "exact match", ".3f", max)]
COSTS = [("train_seconds", "train s", ".1f", min), ("peak_memory_mb", "peak MiB", ".0f", min)]
SIZES = [("steps_per_second", "steps/s", ".1f", max), ("trainable_params", "trainable", ",", min),
         ("frozen_bytes", "frozen", "size", min), ("checkpoint_bytes", "checkpoint", "size", min)]

FOOTNOTE = f"""\
{STAR} marks the best value of each column (every point that ties for it).
**Score**: the task's headline metrics after fine-tuning, on the eval split:
accuracy and macro-F1 for a classifier (higher is better), perplexity (lower)
and exact match (higher) for a causal LM. **Cost**: train time (seconds of
training summed over the run's sessions, compilation and evaluation aside)
and peak memory (the device's, or the process's on CPU). A point is
**dominated** when another point is no worse on every score and every cost
and better on at least one: the last column gives those points' numbers. steps/s is
1000 / the median step time; trainable is the number of trained parameters;
frozen the bytes of the frozen base weights (4-bit codes and scales for
QLoRA); checkpoint the size on disk of the run's latest checkpoint."""


@dataclass(frozen=True)
class Summary:
    """What sweep.md shows: the table, the lines beside it, and the points'
    figures (for the chart)."""

    names: list[str]
    cells: list[list[str]]
    left: int  # the name and settings columns
    lines: list[str]
    rows: list[dict]


def summarize(sweep_dir: Path) -> Summary:
    """The comparison of a sweep folder's finished points, from its
    sweep.json and the points' run folders only."""
    record = _read_sweep(sweep_dir)
    rows, skipped = [], []
    for number, point in enumerate(record["points"], 1):
        run = run_folder.newest_run(sweep_dir, point["folder"])
        found = read_run(run) if run is not None else {"skipped": "no run folder"}
        if "skipped" in found:
            status = (run_folder.read_json(run / "manifest.json").get("status")
                      if run is not None else None)
            skipped.append(f"#{number} {point['name']}: " + (
                f"did not finish (status {status!r})" if status else
                "no run folder (not run yet, or refused before its run began)"))
            continue
        rows.append({"number": number, "point": point, "run": found, "figures": figures(found)})
    if not rows:
        raise UserError(f"{sweep_dir}: no finished point to compare: " + "; ".join(skipped))
    scores = [s for s in SCORES if any(r["figures"][s[0]] is not None for r in rows)]
    for row in rows:
        row["dominated_by"] = [other["number"] for other in rows
                               if dominates(other["figures"], row["figures"], scores + COSTS)]
    names, cells = _table(rows, record["varying"], scores)
    lines = _shared_line("before fine-tuning (the base model)", rows, "before", scores)
    lines += _shared_line("majority class (its most frequent training label)", rows,
                          "baseline", scores)
    lines += [f"not in the table: {line}" for line in skipped]
    lines += [f"note: {note}" for note in record.get("notes", [])]
    return Summary(names, cells, 2 + len(record["varying"]), lines, rows)


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
    run_folder.check(run["dir"] / "manifest.json", m,
                     manifests.fields([manifests.Need("timings.train_seconds", optional=True)]))
    train, model = m.get("train", {}), m.get("model", {})
    step_ms = train.get("median_step_ms")
    out = {key: after.get(key) for key, *_ in SCORES}
    out.update(train_seconds=m.get("timings", {}).get("train_seconds",
                                                      train.get("train_seconds")),
               peak_memory_mb=train.get("peak_memory_mb"),
               steps_per_second=1000 / step_ms if step_ms else None,
               trainable_params=model.get("trainable_params"),
               frozen_bytes=model.get("frozen_bytes"),
               checkpoint_bytes=checkpoint_bytes(run["dir"]))
    return out


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


def _table(rows: list[dict], varying: list[str], scores: list[tuple]
           ) -> tuple[list[str], list[list[str]]]:
    """The column names and the cells: number and name, the varying
    settings, the figures (the best starred), and the numbers of the points
    that dominate each."""
    short = _short_names(varying)
    columns = scores + COSTS + SIZES
    best = {key: better(values) if values else None
            for key, _, _, better in columns
            for values in [[r["figures"][key] for r in rows if r["figures"][key] is not None]]}
    cells = []
    for row in rows:
        values = row["point"]["values"]
        cell = [f"#{row['number']}", row["point"]["name"]]
        cell += [shown(values[f]) if f in values else "-" for f in varying]
        for key, _, fmt, _ in columns:
            value = row["figures"][key]
            text = "-" if value is None else _size(value) if fmt == "size" else format(value, fmt)
            cell.append(f"{text} {STAR}" if value is not None and value == best[key] else text)
        cells.append(cell + [", ".join(f"#{n}" for n in row["dominated_by"]) or "-"])
    names = (["#", "point"] + [short[f] for f in varying] + [name for _, name, _, _ in columns]
             + ["dominated by"])
    return names, cells


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


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
        parts += ["", f"![score against cost]({SWEEP_PNG})"]
    parts += ["", FOOTNOTE, ""]
    return "\n".join(parts)


def write_summary(sweep_dir: Path, errors: Console) -> Summary:
    """Draw sweep.png and write sweep.md from the sweep folder; returns what
    they show (a chart that cannot be drawn is a warning on `errors`, not a
    failure)."""
    summary = summarize(sweep_dir)
    score = next((s for s in SCORES if any(r["figures"][s[0]] is not None
                                           for r in summary.rows)), None)
    drawn = False
    if score is not None:
        dots = [(f"#{r['number']} {r['point']['name']}", r["figures"][score[0]], r["figures"]["train_seconds"],
                 r["figures"]["peak_memory_mb"], bool(r["dominated_by"])) for r in summary.rows]
        try:
            charts.write_sweep_png(sweep_dir / SWEEP_PNG, dots, score[1])
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
