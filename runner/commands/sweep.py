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
reaches the sweep alone, which passes each signal on to the child (SIGHUP
as SIGTERM). The child checkpoints at its next step boundary and exits as
`runner run` does, and the sweep then ends with one message saying what
the same command will do (resume the point, run it again, or go on with
the next) and naming the points that failed before; a second signal stops
the child at once, as it would stop `runner run`. Should the sweep die
(SIGKILL), the child gets SIGTERM and checkpoints (Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
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
from runner.signals import Interrupted, StopSignals, stop_signal
from runner.terminal import print_path

EXIT_POINTS_FAILED = 1
POLL_SECONDS = 0.1  # how often the sweep looks for a signal while a point runs
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def main(args, console: Console, stop: StopSignals) -> int:
    """Plan, check every point, make the folder, run the points, compare them."""
    again = _command(args)
    try:
        with _hangup_stops():
            return _sweep(args, console, stop, again)
    except Interrupted as e:
        if not e.plain:
            raise  # a point's stop, which says it already
        raise Interrupted(e.signum, _said(e, again)) from None


def _said(e: Interrupted, again: str) -> str:
    """What the sweep's stop says: a point's stop says it already; a plain
    one (between points) is told that `again` goes on with the sweep."""
    return f"interrupted by {e.name}; `{again}` goes on with the sweep" if e.plain else str(e)


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
    sweeps.open_folder(folder, chosen, _command(args, with_max=False))  # the first write
    todo = chosen.points[:args.max] if args.max else chosen.points
    print_path(console, f"sweep: {len(todo)} of {len(chosen.points)} points in", folder)
    failed = _run_points(folder, todo, console, stop, again)
    errors = Console(stderr=True, soft_wrap=True, highlight=False)
    summary = sweeps.write_summary(folder, errors)
    if summary.rows:  # else nothing to compare
        sweeps.show(summary, folder, console)
    if len(todo) < len(chosen.points):
        say(f"--max {args.max}: {len(chosen.points) - len(todo)} more point(s) not run; the "
            "same command without --max runs them")
    if failed:
        errors.print(f"failed: {escape('; '.join(failed))}; the same command runs them again")
        return EXIT_POINTS_FAILED
    return 0


def _run_points(folder: Path, todo: list[sweeps.Point], console: Console, stop: StopSignals,
                again: str) -> list[str]:
    """Run the points in turn; what failed, in words. A stop names the
    points that failed before it too (the same command runs them again)."""
    failed: list[str] = []
    try:
        for n, point in enumerate(todo, 1):
            failed += _run_point(folder, point, (n, len(todo)), console, stop, again)
    except Interrupted as e:
        if not failed:
            raise
        said = f"{_said(e, again)}; failed before the stop: {'; '.join(failed)}"
        raise Interrupted(e.signum, f"{said} (the same command runs them again)") from None
    return failed


def _run_point(folder: Path, point: sweeps.Point, at: tuple[int, int], console: Console,
               stop: StopSignals, again: str) -> list[str]:
    """Run one point (`at`: n of total), unless it finished already; what
    failed, in words (none or one). A stop during the point is an
    `Interrupted` saying what the same command will do with it."""
    n, total = at
    say = lambda line: console.print(escape(line), highlight=False)  # noqa: E731
    if sweeps.finished(folder, point):
        say(f"[{n}/{total}] {point.name}: finished already, skipped")
        return []
    recipe = sweeps.recipe_file(folder, point.folder)
    print_path(console, f"[{n}/{total}] {point.name}: runner run", recipe)
    code = _child([sys.executable, "-m", "runner.cli", "run", str(recipe)], stop)
    stopped = stop_signal(code)
    signum = stopped or stop.signum
    if signum is None:
        if code != 0:
            say(f"[{n}/{total}] {point.name}: failed (exit {code}); the sweep goes on")
            return [f"{point.name} (exit {code})"]
        return []
    which = f"point {n} of {total} ({point.name})"
    if sweeps.finished(folder, point):  # the stop came as the point ended
        goes_on = f"{which} finished; `{again}` goes on with the next point"
    elif stopped is not None:
        goes_on = (f"during {which}; `{again}` goes on: finished points are skipped, this "
                   "one resumes from its checkpoint (where it wrote one)")
    else:
        goes_on = f"during {which}, which failed (exit {code}); `{again}` runs it again"
    raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name} {goes_on}")


def _child(command: list[str], stop: StopSignals) -> int:
    """Run `command` in its own process group, passing on each signal the
    sweep gets (the first is only recorded here, as training defers it);
    its exit code. The child is started inside the deferring block, so no
    signal finds it unwatched; a second signal that comes before the first
    was passed on sends both (a pause between, so the child counts two);
    and on Linux the child gets SIGTERM should the sweep die."""
    sys.stdout.flush()  # what the sweep said comes before what the child says
    sys.stderr.flush()
    child, passed = None, False
    try:
        with stop.deferred():
            child = subprocess.Popen(command, process_group=0, preexec_fn=_dies_with_parent())
            while True:
                if stop.requested() and not passed:
                    child.send_signal(stop.signum)
                    passed = True
                try:
                    return child.wait(timeout=POLL_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
    except Interrupted as e:  # a second signal: the child stops at once too
        if child is not None:
            if not passed:
                child.send_signal(e.signum)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=POLL_SECONDS)  # one signal at a time: not merged
            if child.poll() is None:
                child.send_signal(e.signum)
            child.wait()
        raise


def _dies_with_parent():
    """For Popen's preexec_fn, on Linux: the child gets SIGTERM (and
    checkpoints) when the sweep dies, killed or crashed, instead of training
    on unwatched; elsewhere None. libc is looked up here, before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the sweep died before the call
            os.kill(os.getpid(), signal.SIGTERM)
    return set_death_signal


@contextlib.contextmanager
def _hangup_stops():
    """SIGHUP (the terminal closed) stops the sweep as SIGTERM does: passed
    on to the running point as SIGTERM, which checkpoints (the point, in its
    own process group, gets no SIGHUP of its own). Not where SIGHUP is
    ignored (`nohup`)."""
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def _command(args, with_max: bool = True) -> str:
    """The command line that goes on with this sweep (`with_max`: its --max
    too; without, the command that runs the whole sweep, as sweep.md shows)."""
    words = ["runner", "sweep", str(args.recipe)]
    words += [word for s in args.set for word in ("--set", s)]
    words += [word for p in args.point for word in ("--point", p)]
    words += ["--max", str(args.max)] if args.max is not None and with_max else []
    words += ["--out", str(args.out)] if args.out is not None else []
    return shlex.join(words)
