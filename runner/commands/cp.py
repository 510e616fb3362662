"""`runner cp NAME DEST`: copy a shipped recipe to a file of the user's, to
edit (as torchtune's `tune cp`). DEST may be a folder (the copy is then
DEST/NAME.toml); an existing file is never overwritten. A relative local
source of the shipped recipe (`../.tiny/llama`) is written as the absolute
path it meant, so the copy reads the same files wherever it lives."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from jaxlora.errors import UserError
from jaxlora.sources import where_from
from runner.recipe import SOURCE_FIELDS, load_recipe, shipped_recipe


def main(args, console, stop) -> int:
    source = shipped_recipe(args.name)
    dest = args.dest / source.name if args.dest.is_dir() else args.dest
    if not dest.parent.is_dir():
        raise UserError(f"{dest.parent}: no such folder (make it first)")
    text, moved = _sources_made_absolute(source)
    try:
        with open(dest, "x", encoding="utf-8") as f:  # never over an existing file or link
            f.write(text)
    except FileExistsError:
        raise UserError(f"{dest}: already exists; runner cp never overwrites a file "
                        "(remove it, or give another DEST)") from None
    except OSError as e:
        raise UserError(f"{dest}: cannot write the copy: {e.strerror or e}") from None
    lines = [f"wrote {dest} (a copy of the shipped recipe {source.stem})"]
    lines += [f"  {field}: {before} -> {after} (it was relative to {source.parent})"
              for field, before, after in moved]
    shown = shlex.quote(str(dest))
    lines.append(f"next: edit it, check it with `runner validate {shown}`, "
                 f"then `runner run {shown}`")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0


def _sources_made_absolute(source: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """The shipped recipe's text, its relative local sources replaced by the
    absolute paths they meant, and (field, before, after) for each."""
    text = source.read_text(encoding="utf-8")
    recipe = load_recipe(source)
    moved = []
    for table, key in SOURCE_FIELDS:
        value = getattr(getattr(recipe, table), key)
        if (where_from(value, source.parent) == "hub" or "://" in value
                or Path(value).expanduser().is_absolute()):
            continue
        quoted = f'"{value}"'
        if text.count(quoted) != 1:
            continue  # written some other way: left as it is
        absolute = os.path.normpath(source.parent / value)
        lines = text.splitlines(keepends=True)
        [at] = [i for i, line in enumerate(lines) if quoted in line]
        lines[at] = (lines[at][:lines[at].index(quoted)] + f'"{absolute}"'
                     + f"  # {value} beside the shipped recipe\n")
        text = "".join(lines)
        moved.append((f"{table}.{key}", value, absolute))
    return text, moved
