"""Optional TensorBoard event logging (`output.tensorboard = true`) through
tensorboardX, into RUN_DIR/tensorboard/:

    train/loss, train/learning_rate, train/grad_norm, train/update_norm,
    train/examples_per_s, train/tokens_per_s     every `train.log_every` steps
    eval/loss, eval/accuracy, eval/macro_f1, eval/perplexity, eval/exact_match
                                                 before (step 0), every
                                                 `eval.every_steps`, after

A resumed run opens a new event file with `purge_step` at its checkpoint's
step + 1, so TensorBoard drops what the interrupted session logged past the
checkpoint (the resumed session logs those steps again, identically).

    tensorboard --logdir runs/       # compare every run of every recipe
"""

from __future__ import annotations

from pathlib import Path

FOLDER = "tensorboard"
TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "update_norm", "examples_per_s",
              "tokens_per_s")


class EventLog:
    """Writes the run's scalars as TensorBoard events."""

    def __init__(self, run_dir: Path, *, resumed_from: int | None = None):
        from tensorboardX import SummaryWriter

        purge = resumed_from + 1 if resumed_from is not None else None
        self._writer = SummaryWriter(str(run_dir / FOLDER), purge_step=purge, flush_secs=30)

    def train(self, record: dict) -> None:
        for key in TRAIN_KEYS:
            if key in record:
                self._writer.add_scalar(f"train/{key}", record[key], record["step"])

    def eval(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key not in ("examples", "tokens"):
                self._writer.add_scalar(f"eval/{key}", value, step)

    def close(self) -> None:
        self._writer.close()
