"""`runner sweep RECIPE --set FIELD=V1,V2 ... --point 'NAME: FIELD=V ...'`:
run a recipe at several points (`runner.sweep` plans them), one after
another, and compare them in the sweep folder's sweep.md and sweep.png.

Each point runs as its own `runner run POINT.toml`, a child process of the
same interpreter with its output streamed through: its peak memory is its
own, and its failure too (said, and the sweep goes on; the end names the
failed points and exits 1). Given again, the same command finds the same
folder, skips the points that finished and resumes a stopped one (`runner
run` goes on from its checkpoint).

Stops: the child runs in a process group of its own, so a terminal's Ctrl-C
reaches the sweep alone, which passes each signal on to the child. The
child checkpoints at its next step boundary and exits as `runner run`
does, and the sweep then ends with one message saying that the same
command goes on; a second signal stops the child at once, as it would
stop `runner run`.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from jaxlora.errors import UserError
from runner import build
from runner import sweep as sweeps
from runner.recipe import recipe_named
from runner.signals import SIGNALS, Interrupted, StopSignals
from runner.terminal import print_path

EXIT_POINTS_FAILED = 1
POLL_SECONDS = 0.1  # how often the sweep looks for a signal while a point runs


def main(args, console: Console, stop: StopSignals) -> int:
    """Plan, check every point, make the folder, run the points, compare them."""
    again = _command(args)
    try:
        return _sweep(args, console, stop, again)
    except Interrupted as e:
        if str(e) != f"interrupted by {e.name}":
            raise  # a point's stop, which says it already
        raise Interrupted(e.signum, f"interrupted by {e.name}; `{again}` goes on with the "
                                    "sweep") from None


def _sweep(args, console: Console, stop: StopSignals, again: str) -> int:
    """The sweep, a point at a time; the exit code."""
    if args.max is not None and args.max < 1:
        raise UserError(f"--max {args.max}: expected a positive number of points")
    path = recipe_named(args.recipe)
    chosen = sweeps.plan(path, build.base_folder(path), args.set, args.point)
    folder = args.out or chosen.default_folder()
    say = lambda line: console.print(escape(line), highlight=False)  # noqa: E731 - wrapped
    for note in chosen.notes:
        say(f"note: {note}")
    sweeps.open_folder(folder, chosen, again)  # nothing is written before this
    todo = chosen.points[:args.max] if args.max else chosen.points
    print_path(console, f"sweep: {len(todo)} of {len(chosen.points)} points in", folder)
    failed = [f for n, point in enumerate(todo, 1)
              for f in _run_point(folder, point, (n, len(todo)), console, stop, again)]
    errors = Console(stderr=True, soft_wrap=True, highlight=False)
    if any(sweeps.finished(folder, point) for point in chosen.points):  # else nothing to compare
        sweeps.show(sweeps.write_summary(folder, errors), folder, console)
    if len(todo) < len(chosen.points):
        say(f"--max {args.max}: {len(chosen.points) - len(todo)} more point(s) not run; the "
            "same command without --max runs them")
    if failed:
        errors.print(f"failed: {escape('; '.join(failed))}; the same command runs them again")
        return EXIT_POINTS_FAILED
    return 0


def _run_point(folder: Path, point: sweeps.Point, at: tuple[int, int], console: Console,
               stop: StopSignals, again: str) -> list[str]:
    """Run one point (`at`: n of total), unless it finished already; what
    failed, in words (none or one)."""
    n, total = at
    say = lambda line: console.print(escape(line), highlight=False)  # noqa: E731
    if sweeps.finished(folder, point):
        say(f"[{n}/{total}] {point.name}: finished already, skipped")
        return []
    recipe = sweeps.recipe_file(folder, point.folder)
    print_path(console, f"[{n}/{total}] {point.name}: runner run", recipe)
    code = _child([sys.executable, "-m", "runner.cli", "run", str(recipe)], stop)
    stopped = _stop_signal(code)
    if stopped is not None:
        raise Interrupted(stopped, f"interrupted by {signal.Signals(stopped).name} during point "
                                   f"{n} of {total} ({point.name}); `{again}` goes on: "
                                   "finished points are skipped, this one resumes from its "
                                   "checkpoint (where it wrote one)")
    if stop.requested():  # the signal came as the point ended
        raise Interrupted(stop.signum, f"interrupted by {signal.Signals(stop.signum).name} "
                                       f"after point {n} of {total}; `{again}` goes on with "
                                       "the next point")
    if code != 0:
        say(f"[{n}/{total}] {point.name}: failed (exit {code}); the sweep goes on")
        return [f"{point.name} (exit {code})"]
    return []


def _child(command: list[str], stop: StopSignals) -> int:
    """Run `command` in its own process group, passing on each signal the
    sweep gets (the first is only recorded here, as training defers it);
    its exit code."""
    sys.stdout.flush()  # what the sweep said comes before what the child says
    sys.stderr.flush()
    child = subprocess.Popen(command, process_group=0)
    passed = False
    try:
        with stop.deferred():
            while True:
                try:
                    return child.wait(timeout=POLL_SECONDS)
                except subprocess.TimeoutExpired:
                    if stop.requested() and not passed:
                        child.send_signal(stop.signum)
                        passed = True
    except Interrupted as e:  # a second signal: the child stops at once too
        child.send_signal(e.signum)
        child.wait()
        raise


def _stop_signal(code: int) -> int | None:
    """The signal a point's exit code says it stopped for (128 + N, as `runner
    run` exits after a stop; -N, killed by it), if it is a stop's."""
    for signum in SIGNALS:
        if code in (128 + signum, -signum):
            return signum
    return None


def _command(args) -> str:
    """The command line that goes on with this sweep."""
    words = ["runner", "sweep", str(args.recipe)]
    words += [word for s in args.set for word in ("--set", s)]
    words += [word for p in args.point for word in ("--point", p)]
    words += ["--max", str(args.max)] if args.max is not None else []
    words += ["--out", str(args.out)] if args.out is not None else []
    return shlex.join(words)
