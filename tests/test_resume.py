"""Runs that survive: checkpoints, exact resume after a real signal, crash
safety under SIGKILL while a checkpoint is being written, and the refusals
(changed recipe, base model or data; corrupted or missing checkpoint) that
must leave the run folder exactly as it was."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlora.checkpoint import Checkpointer
from runner.run_folder import checkpoint_steps
from jaxlora.train import Hook, Hooks, TrainConfig, fit, init_state
from jaxlora.tasks import classification_step_loss
from test_cli import TINY_RECIPE, _workdir, read_events
from test_cli import runner_here as _runner
from test_train import _adapted, _toy_split

TIMING = ("step_ms", "examples_per_s", "tokens_per_s")


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_bitwise_equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


# -- in process: the loop and the checkpointer ---------------------------------


def test_fit_stopped_and_resumed_from_a_checkpoint_is_bitwise_exact(tiny_bert_dir, tmp_path):
    graphdef, trainable, frozen = _adapted(tiny_bert_dir)
    split = _toy_split(n=40)  # 5 batches an epoch: the stop falls mid-epoch
    cfg = TrainConfig(epochs=4, batch_size=8, learning_rate=1e-2, log_every=3, seed=3)
    records = []
    full = fit(graphdef, trainable, frozen, split, cfg, classification_step_loss,
               hooks=Hooks(log=records.append))

    graphdef, trainable, frozen = _adapted(tiny_bert_dir)
    part_records, calls = [], []
    with Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
        part = fit(graphdef, trainable, frozen, split, cfg, classification_step_loss,
                   hooks=Hooks(log=part_records.append, checkpoint=Hook(ckpt.save, every=4),
                               stop=lambda: calls.append(1) or len(calls) == 7))  # after step 7
        assert part.stopped and part.steps == 7
        assert ckpt.steps() == [4, 7]  # on schedule, then at the stop; keep 2
        template = init_state(_adapted(tiny_bert_dir)[1], cfg, split)
        restored, meta = ckpt.restore(template)
    assert restored.step == 7 and len(restored.pending) == 1  # step 7 awaits its record
    graphdef, trainable, frozen = _adapted(tiny_bert_dir)
    rest = fit(graphdef, restored, frozen, split, cfg, classification_step_loss,
               hooks=Hooks(log=part_records.append))
    assert rest.steps == full.steps == 20
    _assert_bitwise_equal(rest.trainable, full.trainable)
    _assert_bitwise_equal(rest.opt_state, full.opt_state)
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in part_records]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_checkpointer_refuses_another_structure(tiny_bert_dir, tmp_path):
    graphdef, trainable, frozen = _adapted(tiny_bert_dir)
    cfg = TrainConfig(batch_size=8)
    state = init_state(trainable, cfg, _toy_split(n=16))
    with Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(state)
        other = init_state({"x": np.zeros(3, np.float32)}, cfg, _toy_split(n=16))
        with pytest.raises(Exception, match="other weights than this run trains"):
            ckpt.restore(other)


# -- the real command, stopped by real signals ---------------------------------

LONG = (TINY_RECIPE.replace("epochs = 3", "epochs = 80\ncheckpoint_every = 50\nwarmup_ratio = 0.1")
        .replace("log_every = 2", "log_every = 5")
        .replace('targets = ["query", "value"]', 'targets = ["query", "value"]\ndropout = 0.1')
        .replace("learning_rate = 1e-2", "learning_rate = 1e-3"))
STEPS = 80 * 6  # 44 training rows, batches of 8
# with an evaluation every 40 steps and TensorBoard events: a resumed run writes
# neither twice nor leaves one out
REPORTED = LONG.replace("[eval]", "[eval]\nevery_steps = 40") + "[output]\ntensorboard = true\n"


def _start(cwd: Path, *args) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(cwd / "hf-datasets-cache"))
    return subprocess.Popen([sys.executable, "-m", "runner.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, process: subprocess.Popen, timeout=300.0):
    end = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the run ended first (exit {process.returncode}): {err[-2000:]}")
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def _run_dir(workdir: Path) -> Path:
    [run] = list((workdir / "runs" / "tiny").iterdir())
    return run


def _metrics_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _loss_lines(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _final_state(run: Path):
    from runner.build import open_run

    return open_run(run).trainable


def _meta(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def _stop_with(workdir: Path, signum: int, after_lines: int) -> subprocess.CompletedProcess:
    process = _start(workdir, "run", "tiny.toml")
    metrics = lambda: workdir / "runs" / "tiny"  # noqa: E731
    _wait_for(lambda: metrics().is_dir() and any(
        _metrics_lines(r / "metrics.jsonl") >= after_lines for r in metrics().iterdir()), process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert_dir):
    """The same recipe run straight through, in its own folder."""
    workdir = _workdir(tmp_path_factory.mktemp("straight"), tiny_bert_dir, REPORTED)
    done = _runner("run", "tiny.toml", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return _run_dir(workdir)


def test_sigterm_then_resume_is_exact(tmp_path, tiny_bert_dir, reference):
    workdir = _workdir(tmp_path, tiny_bert_dir, REPORTED)
    stopped = _stop_with(workdir, signal.SIGTERM, after_lines=2)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    run = _run_dir(workdir)
    manifest = json.loads((run / "manifest.json").read_text())
    step = manifest["interrupted"]["checkpoint_step"]
    assert manifest["status"] == "interrupted" and 10 <= step < STEPS
    assert f"checkpoint at step {step}" in stopped.stderr and "runner run" in stopped.stderr
    assert all(line["step"] <= step for line in _loss_lines(run))

    resumed = _runner("run", "tiny.toml", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from its checkpoint at step {step}" in resumed.stdout
    assert list((workdir / "runs" / "tiny").iterdir()) == [run]  # went on in the same folder
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["resumed"][0]["from_step"] == step
    # the report says so, with the time of both sessions added up
    timings = manifest["timings"]
    assert timings["sessions"] == 2 and timings["wall_seconds"] > timings["train_seconds"] > 0
    report = (run / "report.md").read_text()
    assert f"- interrupted by SIGTERM at {manifest['interrupted']['at']}" in report
    assert f"- resumed from step {step} at {manifest['resumed'][0]['at']}" in report
    assert "time (summed over 2 sessions)" in report
    # bitwise: the digests cover trainable weights, optimizer state and the dropout key
    assert _meta(run, STEPS)["sha256"] == _meta(reference, STEPS)["sha256"]
    _assert_bitwise_equal(_final_state(run), _final_state(reference))
    assert _loss_lines(run) == _loss_lines(reference)
    assert [x["step"] for x in _loss_lines(run) if "eval" in x] == list(range(40, STEPS, 40))
    evals = [json.loads((r / "eval.json").read_text()) for r in (run, reference)]
    assert evals[0] == evals[1]
    # TensorBoard, read with the resumed session's purge mark, holds exactly the
    # uninterrupted run's losses and evaluations (timings aside)
    events = [{k: v for k, v in read_events(r / "tensorboard").items()
               if k[0] in ("train/loss", "train/learning_rate") or k[0].startswith("eval/")}
              for r in (run, reference)]
    assert len(list((run / "tensorboard").iterdir())) == 2  # one event file per session
    assert events[0] == events[1] and ("eval/loss", 40) in events[0]


def test_stopped_during_eval_after_then_resumed_keeps_the_training_figures(
        tmp_path, tiny_bert_dir, monkeypatch):
    """Stopped after the last step, during "eval after": the resumed session
    trains nothing, evaluates, and the finished manifest keeps the
    timings of the session that trained."""
    from runner.session import Session
    from runner.signals import Interrupted

    workdir = _workdir(tmp_path, tiny_bert_dir, TINY_RECIPE)
    evaluate = Session.evaluate

    def stopped_after(session, trainable, description, **kwargs):
        if description == "eval after":
            raise Interrupted(signal.SIGTERM)
        return evaluate(session, trainable, description, **kwargs)

    monkeypatch.setattr(Session, "evaluate", stopped_after)
    stopped = _runner("run", "tiny.toml", cwd=workdir)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    run = _run_dir(workdir)
    trained = json.loads((run / "manifest.json").read_text())["train"]
    assert trained["median_step_ms"] > 0 and trained["compile_seconds"] > 0
    monkeypatch.setattr(Session, "evaluate", evaluate)
    resumed = _runner("run", "tiny.toml", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and (run / "eval.json").is_file()
    assert manifest["resumed"][0]["from_step"] == trained["steps"] == manifest["train"]["steps"]
    for key in ("compile_seconds", "median_step_ms", "train_seconds"):
        assert manifest["train"][key] == trained[key], key


def test_sigkill_while_writing_checkpoints_leaves_the_last_one_usable(tmp_path, tiny_bert_dir):
    """Full fine-tuning (12 MB checkpoints) with a checkpoint after every step:
    the process spends most of its time writing them, so kills land mid-write."""
    recipe = (TINY_RECIPE.replace('method = "lora"\nrank = 4\ntargets = ["query", "value"]\n',
                                  'method = "full"\n')
              .replace("epochs = 3", "epochs = 5\ncheckpoint_every = 1\nkeep_checkpoints = 2")
              .replace("learning_rate = 1e-2", "learning_rate = 1e-4"))
    steps = 5 * 6
    straight = _workdir(tmp_path / "straight", tiny_bert_dir, recipe)
    assert _runner("run", "tiny.toml", cwd=straight).returncode == 0
    workdir = _workdir(tmp_path / "killed", tiny_bert_dir, recipe)
    mid_write = 0
    folder = workdir / "runs" / "tiny"

    def checkpoints(pattern):
        return [p for run in folder.iterdir() for p in (run / "checkpoints").glob(pattern)]

    for delay in [0.0, 0.004, 0.012]:  # at several points of a write
        process = _start(workdir, "run", "tiny.toml")
        # a complete checkpoint exists, and orbax is writing the next one
        _wait_for(lambda: folder.is_dir() and any(p.name.isdigit() for p in checkpoints("*"))
                  and checkpoints("*tmp*"), process)
        time.sleep(delay)
        process.kill()
        process.wait()
        run = _run_dir(workdir)
        mid_write += bool(checkpoints("*tmp*"))  # the half-written one is still there
        assert checkpoint_steps(run), "no complete checkpoint survived"
    assert mid_write >= 2, f"only {mid_write} of 3 kills landed while a checkpoint was written"
    done = _runner("run", "tiny.toml", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "from its checkpoint at step" in done.stdout
    run = _run_dir(workdir)
    assert _meta(run, steps)["sha256"] == _meta(_run_dir(straight), steps)["sha256"]
    assert _loss_lines(run) == _loss_lines(_run_dir(straight))


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_refusals_leave_the_stopped_run_as_it_was(tmp_path, tiny_bert_dir):
    workdir = _workdir(tmp_path, tiny_bert_dir, LONG)
    stopped = _stop_with(workdir, signal.SIGINT, after_lines=1)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    run = _run_dir(workdir)
    snapshot = _snapshot(run)

    def refused(*args, expected: str):
        done = _runner(*args, cwd=workdir)
        assert done.returncode == 2, done.stderr[-2000:]
        assert expected in done.stderr and "Traceback" not in done.stderr
        assert done.stderr.strip().startswith("error:")
        assert _snapshot(run) == snapshot  # nothing written, nothing lost
        assert list((workdir / "runs" / "tiny").iterdir()) == [run]

    recipe = workdir / "tiny.toml"
    recipe.write_text(LONG.replace("learning_rate = 1e-3", "learning_rate = 2e-3"))
    refused("run", "tiny.toml", "--resume", expected="train.learning_rate: 0.001 -> 0.002")
    recipe.write_text(LONG)

    edited = run / "recipe.toml"
    original = edited.read_text()
    edited.write_text(original.replace("rank = 4", "rank = 5"))
    snapshot = _snapshot(run)
    refused("run", str(run), expected="adapter.rank: 4 -> 5")
    edited.write_text(original)
    snapshot = _snapshot(run)

    data = workdir / "tweets.csv"
    kept = data.read_bytes()
    data.write_bytes(kept + b"positive,0.9,one more\n")
    refused("run", "tiny.toml", expected="the data differ from what run")
    data.write_bytes(kept)

    # a run made before examples were dealt to batch rows: its batches came otherwise
    manifest_path = run / "manifest.json"
    kept = manifest_path.read_bytes()
    manifest = json.loads(kept)
    del manifest["data"]["order"]
    manifest_path.write_text(json.dumps(manifest))
    snapshot = _snapshot(run)
    refused("run", str(run), expected="made by an earlier jaxlora, which ordered the batches")
    manifest_path.write_bytes(kept)
    snapshot = _snapshot(run)

    # damage inside the metrics record (not a last line cut by a kill): its lines are kept
    metrics = run / "metrics.jsonl"
    kept = metrics.read_bytes()
    for damage in (b"42\n", b"\xff\n"):
        metrics.write_bytes(damage + kept)
        snapshot = _snapshot(run)
        refused("run", str(run), expected="metrics.jsonl: line 1 is not a metrics record")
    metrics.write_bytes(kept)
    snapshot = _snapshot(run)

    # a damaged eval.json: refused before the manifest or the metrics are touched
    evals = run / "eval.json"
    kept = evals.read_bytes() if evals.is_file() else None
    evals.write_text("[1]")
    snapshot = _snapshot(run)
    refused("run", str(run), expected="eval.json: expected a JSON object")
    evals.unlink()
    if kept is not None:
        evals.write_bytes(kept)
    snapshot = _snapshot(run)

    config = workdir / "model" / "config.json"
    kept = config.read_bytes()
    config.write_bytes(kept + b"\n")
    refused("run", "tiny.toml", expected="the base model's files differ")
    config.write_bytes(kept)

    [latest] = sorted((run / "checkpoints").iterdir(), key=lambda p: int(p.name))[-1:]
    for path in (latest / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(path.read_bytes()[:40])  # truncated on disk
    snapshot = _snapshot(run)
    refused("run", "tiny.toml", expected=f"{latest.relative_to(workdir)}: the checkpoint")

    shutil.rmtree(run / "checkpoints")
    snapshot = _snapshot(run)
    refused("run", str(run), expected="no checkpoint in checkpoints/ (nothing to resume")
    refused("eval", str(run), expected="no checkpoint")
    # with nothing to resume, the recipe starts afresh (and --fresh always does)
    done = _runner("run", "tiny.toml", "--resume", cwd=workdir)
    assert done.returncode == 2 and "no unfinished run with a checkpoint" in done.stderr


def test_a_run_in_progress_is_not_resumed_by_a_second_process(tmp_path, tiny_bert_dir):
    workdir = _workdir(tmp_path, tiny_bert_dir, LONG.replace("checkpoint_every = 50",
                                                             "checkpoint_every = 5"))
    process = _start(workdir, "run", "tiny.toml")
    try:
        folder = workdir / "runs" / "tiny"
        _wait_for(lambda: folder.is_dir() and any(checkpoint_steps(r) for r in folder.iterdir()),
                  process)
        done = _runner("run", "tiny.toml", cwd=workdir)
        assert done.returncode == 2 and "in use by pid" in done.stderr, done.stderr[-2000:]
        assert process.poll() is None  # the first run goes on undisturbed
    finally:
        process.kill()
        process.wait()
    # killed: the lock went with the process, so the run can be resumed now
    assert "in use" not in _runner("run", "tiny.toml", "--resume", cwd=workdir).stderr


FILL_THE_DISK = """
import resource, signal, sys
from jaxlora.checkpoint import Checkpointer
from runner.cli import main

original = Checkpointer.save

def save_then_fill_the_disk(self, state, extra=None):
    where = original(self, state, extra)
    print("saved", state.step, file=sys.stderr)
    # A full-model checkpoint is several MB: later ones no longer fit.
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return where

Checkpointer.save = save_then_fill_the_disk
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a kill
sys.exit(main(sys.argv[1:]))
"""


def test_a_write_failure_while_checkpointing_keeps_the_previous_checkpoint(
        tmp_path, tiny_bert_dir):
    """The disk fills up after the first checkpoint: a real failed write, made
    by a file-size limit on the `runner` process (writes past it fail with
    EFBIG, as they fail with ENOSPC on a full disk), through orbax's own write
    path. The real command: one message, no traceback, exit 2."""
    recipe = (TINY_RECIPE.replace('method = "lora"\nrank = 4\ntargets = ["query", "value"]',
                                  'method = "full"')
              .replace("epochs = 3", "epochs = 1\ncheckpoint_every = 2"))
    workdir = _workdir(tmp_path, tiny_bert_dir, recipe)
    (workdir / "fill.py").write_text(FILL_THE_DISK)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(workdir / "hf-datasets-cache"))
    done = subprocess.run([sys.executable, "fill.py", "run", "tiny.toml"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert "saved 2" in done.stderr and "saved 4" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    message = " ".join(done.stderr.split())
    assert "cannot write the checkpoint of step 4" in message and "File too large" in message
    assert "the previous checkpoint, step 2, is intact and the latest" in message
    run = _run_dir(workdir)
    assert checkpoint_steps(run) == [2]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["failed"]["checkpoint_step"] == 2
    assert manifest["failed"]["reason"] == "File too large"

    resumed = _runner("run", "tiny.toml", cwd=workdir)  # space again: it goes on from step 2
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "from its checkpoint at step 2" in resumed.stdout  # read back, checksum checked
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"


def test_a_failed_write_is_reported_by_its_operating_system_reason():
    from jaxlora.checkpoint import _write_failure

    tensorstore = ValueError("OUT_OF_RANGE: Error writing \"x\" in OCDBT database: Failed to "
                             "write 42 bytes to file 16: No space left [os_error_code='28']")
    assert _write_failure(tensorstore) == "No space left on device"
    assert _write_failure(OSError(122, "Disk quota exceeded")) == "Disk quota exceeded"
    assert _write_failure(RuntimeError("something else\nmore")) == "something else"


@pytest.mark.parametrize("dtype, shape", [("float32", (3, 5)), ("bfloat16", (4, 2, 3)),
                                          ("int32", ()), ("uint32", (2,)), ("float16", (7,))])
def test_the_checksum_of_spread_arrays_is_the_same_on_the_host_and_on_devices(dtype, shape):
    import jax.numpy as jnp

    from jaxlora.checkpoint import _checksums

    def _checksum(x):
        return _checksums([x])[0]

    rng = np.random.default_rng(0)
    host = (rng.normal(size=shape) * 100).astype(jnp.dtype(dtype))
    assert _checksum(host) == _checksum(jnp.asarray(host))
    if host.size > 1:  # a changed value, two swapped ones, two negated ones change it
        changed = host.copy()
        changed.flat[1] = changed.flat[1] + np.array(1, changed.dtype)
        swapped = host.copy()
        swapped.flat[0], swapped.flat[1] = host.flat[1], host.flat[0]
        negated = host.copy()
        negated.flat[:2] = -host.flat[:2]
        assert len({_checksum(x) for x in (host, changed, swapped, negated)}) == 4


def test_the_digest_of_a_state_is_what_checkpoints_have_always_recorded():
    """Pinned: a checkpoint written by an earlier version (a scalar leaf
    included, such as AdamW's step count) must still verify."""
    import jax.numpy as jnp

    from jaxlora.checkpoint import _digest

    arrays = {"['a']": np.arange(6, dtype=np.float32).reshape(2, 3),
              "['count']": np.array(3, np.int32), "['h']": np.ones((2,), jnp.bfloat16)}
    meta = {"step": 4, "pending": [{"loss": 0.5}], "tokens": 10}
    assert _digest(arrays, meta) == \
        "48a295d7e44625c2269242db196ad15b684484512fa3add0abbba14c0c4eda7d"
    # the same arrays on a device (what a save sees before its host copy)
    assert _digest({k: jnp.asarray(v) for k, v in arrays.items()}, meta) == _digest(arrays, meta)


def test_a_run_resumes_with_another_remat_policy(tmp_path, tiny_bert_dir):
    """`train.remat` may change when a run resumes (a run that no longer fits
    its devices goes on with "full"): the resumed run folder records the
    change and trains on to the same losses; any other recipe field stays
    refused."""
    recipe = TINY_RECIPE.replace("epochs = 3", "epochs = 3\ncheckpoint_every = 10\nkeep_checkpoints = 5")
    workdir = _workdir(tmp_path, tiny_bert_dir, recipe)
    assert _runner("run", "tiny.toml", cwd=workdir).returncode == 0
    reference = _run_dir(workdir)
    # the finished run as if stopped after its checkpoint of step 10
    stopped = tmp_path / "stopped" / reference.name
    shutil.copytree(reference, stopped)
    for later in [p for p in (stopped / "checkpoints").iterdir() if p.name.isdigit()
                  and int(p.name) > 10]:
        shutil.rmtree(later)
    manifest = json.loads((stopped / "manifest.json").read_text())
    (stopped / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))

    refused = _runner("run", str(stopped), "--set", "train.remat=full", "--set",
                      "train.learning_rate=1", cwd=workdir)
    assert refused.returncode == 2 and "--set train.learning_rate=1" in refused.stderr
    assert "only runtime.* (the device layout) and train.remat may change" in " ".join(
        refused.stderr.split())
    resumed = _runner("run", str(stopped), "--set", "train.remat=full", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "layout changed: train.remat: 'none' -> 'full'" in resumed.stdout
    manifest = json.loads((stopped / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["recipe"]["train"]["remat"] == "full"
    assert 'remat = "full"' in (stopped / "recipe.toml").read_text()
    [entry] = manifest["resumed"]
    assert entry["from_step"] == 10 and entry["layout_changes"] == ["train.remat: 'none' -> 'full'"]
    ours, theirs = _loss_lines(stopped), _loss_lines(reference)
    assert [x["step"] for x in ours] == [x["step"] for x in theirs]
    for a, b in zip(ours, theirs):
        for key in ("loss", "eval_loss"):
            if key in b:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=f"{key} {b['step']}")
