"""`runner report RUN_DIR`: a finished run's charts and report.md drawn again
from its files, and report.md rendered in the terminal."""

from __future__ import annotations

from pathlib import Path

from rich.markdown import Markdown

from jaxlora import runtime
from jaxlora.errors import UserError
from runner import charts, run_folder
from runner import manifest as manifests
from runner.report import write_report


def main(args, console, stop) -> int:
    redraw(args.run_dir, console)
    return 0


def redraw(run_dir: Path, console) -> None:
    """Check the folder's files, then draw the charts and report.md again and show them."""
    run_dir = Path(run_dir)
    for name in ("manifest.json", "eval.json"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir}: no {name}; `runner report` needs a run folder "
                            "(runs/<name>/<timestamp>/) whose run finished")
    manifest = run_folder.read_json(run_dir / "manifest.json")
    evals = run_folder.read_json(run_dir / "eval.json")
    if manifest.get("status") != "finished":
        raise UserError(f"{run_dir}: the run has not finished (status "
                        f"{manifest.get('status')!r}); its report is written when it does")
    manifests.check_after(run_dir, evals)
    # everything read and checked before anything is drawn: a damaged folder
    # keeps the charts and report.md it has
    manifests.check_report_files(run_dir, manifest, evals)
    records = run_folder.read_metrics(run_dir, whole=True)
    if runtime.primary():  # one writer, whatever the processes
        write_report(run_dir, manifest, evals.get("before"), evals["after"], _Quiet(), records)
    console.print(Markdown((run_dir / "report.md").read_text(encoding="utf-8")))
    train, curve = charts.curves(records, evals.get("before"), evals["after"],
                                 manifest["train"]["steps"])
    for line in charts.terminal_lines(train, curve):
        console.print(line)
    console.print(f"charts: {run_dir / charts.LOSS_PNG}, {run_dir / charts.BARS_PNG}")


class _Quiet:
    def print(self, *args, **kwargs) -> None:
        pass
