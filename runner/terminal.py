"""What the commands read from the terminal and show on it, beyond their own
tables: texts from the command line or standard input, progress bars, and
the note that a run used before it finished."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from jaxlora.errors import UserError


def read_texts(args: list[str]) -> list[str]:
    """The texts of `predict` and the prompts of `generate`: the arguments, and
    for "-" the lines of stdin, each of which must be UTF-8."""
    texts = []
    for number, arg in enumerate(args, 1):
        if arg != "-":
            try:
                arg.encode("utf-8")  # undecodable bytes reach argv as lone surrogates
            except UnicodeEncodeError:
                raise UserError(f"text {number} of the command line is not valid utf-8") from None
            texts.append(arg)
            continue
        for line_number, line in enumerate(sys.stdin.buffer.read().splitlines(), 1):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"stdin line {line_number} is not valid utf-8") from None
            if line.strip():
                texts.append(line)
    if not texts or any(not t.strip() for t in texts):
        raise UserError("every text or prompt must be non-empty")
    return texts


def progress_bars(console: Console) -> Progress:
    """The bars of tokenization, training and evaluation."""
    return Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    transient=False)


def note_unfinished(opened) -> None:
    """On stderr: a command uses a run (a `runner.build.OpenedRun`) that has
    not finished, at its latest checkpoint."""
    if opened.finished:
        return
    Console(stderr=True).print(
        f"note: {opened.run_dir} has not finished (status "
        f"{opened.manifest.get('status')!r}): using its checkpoint at step {opened.step}"
        + (f" of {opened.total_steps}" if opened.total_steps else ""))


def print_path(console: Console, prefix: str, path) -> None:
    """`prefix path` on one line where it fits the terminal, else the path on
    a line of its own, whole: rich would cut a path longer than the width,
    the terminal wraps it and a copy and paste still gets it. Both are shown
    as they are, never read as markup (a point's name may hold brackets)."""
    text = f"{prefix} {path}"
    if len(text) <= console.width:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(prefix, markup=False, highlight=False)
        console.print(str(path), markup=False, highlight=False, soft_wrap=True)
