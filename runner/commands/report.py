"""`runner report RUN_DIR`: a run's charts and report.md drawn again from its
files, and report.md rendered in the terminal. A run that has not finished
(running, interrupted, failed) gets a partial report from what its folder
holds so far, marked as such."""

from __future__ import annotations

from pathlib import Path

from rich.markdown import Markdown

from jaxlora import runtime
from jaxlora.errors import UserError
from runner import charts, run_folder
from runner import manifest as manifests
from runner.report import finished, steps_done, write_report


def main(args, console, stop) -> int:
    redraw(args.run_dir, console)
    return 0


def redraw(run_dir: Path, console) -> None:
    """Check the folder's files, then draw the charts and report.md again and show them."""
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise UserError(f"{run_dir}: no manifest.json; `runner report` needs a run folder "
                        "(runs/<name>/<timestamp>/)")
    manifest = run_folder.read_json(run_dir / "manifest.json")
    partial = not finished(manifest)
    if not partial and not (run_dir / "eval.json").is_file():
        raise UserError(f"{run_dir}: no eval.json, though manifest.json says the run finished")
    evals = run_folder.read_json(run_dir / "eval.json") if (run_dir / "eval.json").is_file() \
        else {}
    if not partial:
        manifests.check_after(run_dir, evals)
    # everything read and checked before anything is drawn: a damaged folder
    # keeps the charts and report.md it has
    manifests.check_report_files(run_dir, manifest, evals, partial)
    # a run still going may have a last line cut mid-write
    records = run_folder.read_metrics(run_dir, whole=not partial)
    if runtime.primary():  # one writer, whatever the processes
        write_report(run_dir, manifest, evals, _Quiet(), records)
    console.print(Markdown((run_dir / "report.md").read_text(encoding="utf-8")))
    train, curve = charts.curves(records, evals.get("before"), evals.get("after"),
                                 steps_done(manifest, records))
    for line in charts.terminal_lines(train, curve):
        console.print(line)
    console.print(f"charts: {run_dir / charts.LOSS_PNG}, {run_dir / charts.BARS_PNG}",
                  soft_wrap=True)


class _Quiet:
    def print(self, *args, **kwargs) -> None:
        pass
