"""Charts of a run: PNG files for report.md (matplotlib) and one-line
sparklines for the terminal, both from what the run folder holds; and the
chart of a sweep.

    loss.png           train loss per logged interval, and eval loss before
                       training (step 0), every `eval.every_steps` steps and
                       after training (the last step)
    before_after.png   the headline metrics before and after fine-tuning
    sweep.png          a sweep's points: score against train time and against
                       peak memory, one dot per point labelled with its number

Everything is drawn from `metrics.jsonl` and `eval.json` (a sweep's: from its
points' run folders), so `runner report RUN_DIR` and `runner compare
SWEEP_DIR` can draw them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

LOSS_PNG, BARS_PNG, SWEEP_PNG = "loss.png", "before_after.png", "sweep.png"
SPARKS = "▁▂▃▄▅▆▇█"


def curves(records: list[dict], before: dict | None, after: dict | None,
           last_step: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) loss curves as (step, loss) points from the metrics
    records (train records have "loss", eval records have "eval")."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval"]["loss"]) for r in records if "eval" in r]
    if before is not None:
        evals.insert(0, (0, before["loss"]))
    if after is not None:
        evals.append((last_step, after["loss"]))
    return train, evals


def sparkline(values: list[float], width: int = 48) -> str:
    """`values` as one line of block characters (at most `width`, averaged)."""
    if not values:
        return ""
    if len(values) > width:  # mean of equal slices
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:])]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARKS[min(int((v - low) / span * len(SPARKS)), len(SPARKS) - 1)]
                   for v in values)


def terminal_lines(train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> list[str]:
    """'train loss 0.6931 ▇▆▅▃▂▁ 0.3012' lines for the end of a run."""
    lines = []
    for name, points in (("train loss", train), ("eval loss", evals)):
        if len(points) >= 2:
            values = [v for _, v in points]
            lines.append(f"{name:<10} {values[0]:.4f} {sparkline(values)} {values[-1]:.4f}")
    return lines


def bar_metrics(before: dict | None,
                after: dict | None) -> list[tuple[str, float | None, float | None]]:
    """(label, before, after) for the bar chart: the scores in [0, 1] (accuracy,
    macro-F1, per-class F1, exact match), then the eval loss. `after` is None
    in a partial report (a run that has not evaluated it yet)."""
    shown = after if after is not None else before
    if shown is None:
        return []
    rows = []
    pick = lambda metrics, key: None if metrics is None else metrics.get(key)  # noqa: E731
    keys = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("exact_match", "exact match")]
    for key, label in keys:
        if shown.get(key) is not None:
            rows.append((label, pick(before, key), pick(after, key)))
    for name in shown.get("per_class", {}):
        rows.append((f"F1 {name}", before["per_class"][name]["f1"] if before else None,
                     after["per_class"][name]["f1"] if after else None))
    rows.append(("eval loss", pick(before, "loss"), pick(after, "loss")))
    return rows


def eval_style(evals: list[tuple[int, float]]) -> dict:
    """How loss.png draws the eval losses: a line through the evaluations
    during training, but points alone where there are only "before" and
    "after" (a line between two points would invent the steps between)."""
    if len(evals) <= 2:
        return {"linestyle": "none", "marker": "o", "markersize": 7}
    return {"linestyle": "-", "marker": "o", "linewidth": 1.4}


def write_pngs(run_dir: Path, train, evals, before: dict | None, after: dict,
               title: str) -> list[str]:
    """Draw loss.png and before_after.png into `run_dir`; returns their names."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.4)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="tab:orange", **eval_style(evals))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, run_dir / LOSS_PNG)
    plt.close(fig)
    written.append(LOSS_PNG)

    rows = bar_metrics(before, after)
    if not rows:  # nothing evaluated yet (a partial report)
        return written
    scores, loss = rows[:-1], rows[-1:]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=110,
                             gridspec_kw={"width_ratios": [max(len(scores), 1), 1]})
    for ax, group, name in ((axes[0], scores, "score"), (axes[1], loss, "loss")):
        xs = range(len(group))
        width = 0.38
        ax.bar([x - width / 2 for x in xs], [b if b is not None else 0 for _, b, _ in group],
               width, label="before", color="tab:gray")
        ax.bar([x + width / 2 for x in xs], [a if a is not None else 0 for _, _, a in group],
               width, label="after",
               color="tab:green")
        for x, (_, b, a) in zip(xs, group):
            for dx, value in ((-width / 2, b), (width / 2, a)):
                if value is not None:
                    ax.annotate(f"{value:.3f}", (x + dx, value), ha="center", va="bottom",
                                fontsize=7)
        ax.set_xticks(list(xs), [label for label, _, _ in group], rotation=20, ha="right")
        ax.set_ylabel(name)
        if name == "score":
            ax.set_ylim(0, 1.25)  # room for the legend above the bars
            ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left", ncol=2)
    fig.suptitle(f"{title}: before and after fine-tuning")
    fig.tight_layout()
    _save(fig, run_dir / BARS_PNG)
    plt.close(fig)
    written.append(BARS_PNG)
    return written


class Dot(NamedTuple):
    """One point of a sweep on its chart; None where the run lacks a figure."""

    label: str  # short: the point's number, which sweep.md's table keys
    score: float | None
    train_seconds: float | None
    peak_mb: float | None
    dominated: bool


def write_sweep_png(path: Path, dots: list[Dot], score_axis: str) -> None:
    """sweep.png: each point's score (`score_axis` names it and which way is
    better) against train time (left) and against peak memory (right), a dot
    each with its label beside it (no legend, so any number of points fits);
    dominated points hollow. A point lacking a cost is left out of that
    plot only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), dpi=110, sharey=True)
    for ax, cost, label in ((axes[0], "train_seconds", "train time (s)"),
                            (axes[1], "peak_mb", "peak memory (MiB)")):
        for dot in dots:
            x = getattr(dot, cost)
            if dot.score is None or x is None:
                continue
            ax.scatter(x, dot.score, s=50, edgecolors="tab:blue", linewidths=1.5,
                       facecolors="none" if dot.dominated else "tab:blue")
            ax.annotate(dot.label, (x, dot.score), xytext=(5, 4), textcoords="offset points",
                        fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(score_axis)
    fig.suptitle("sweep: score against cost (hollow: dominated; labels: the table's #)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: Path) -> None:
    """Write via a temporary file and rename, like every file of a run folder."""
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
