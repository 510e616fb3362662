"""A stop is a stop everywhere: Ctrl-C and SIGTERM, once or twice, at many
points of a run (loading the model, reading a checkpoint back, evaluating,
compiling, mid-step, each phase of a checkpoint write), through the real
`runner` command; each stop exits 130/143 with "stopped: ...", the manifest
says `interrupted` with the latest complete checkpoint, and the run then
finishes equal to a run never stopped. Also: a changed recipe starts a new run instead of being refused,
and a broken generation_config.json is one message.

The signals are sent deterministically: the process runs `runner` through
SIGNALS_AT (below), which wraps a few functions so that the process sends
itself a signal when one of them is called the n-th time."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.run_folder import checkpoint_steps, stamp_order
from runner.signals import Interrupted, StopSignals
from test_cli import TINY_RECIPE
from test_cli import runner_here as _runner
from test_resume import _loss_lines, _meta, _workdir

# `python signals_at.py ARGS...` is `runner ARGS...`, except that the process
# sends itself SIG (SIGINT: INT) when POINT is reached the N-th time, for each POINT:N:SIG of
# the environment variable SIGNALS_AT (comma-separated, in order; two entries
# at the same point and count send two signals, the handler running between).
SIGNALS_AT = r'''
import asyncio, os, signal, sys, threading, time
import jax._src.compiler as compiler
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity, deleter
from transformers import AutoConfig
from jaxlora.checkpoint import Checkpointer
from runner import session
from runner.cli import main

PLAN = [entry.split(":") for entry in os.environ["SIGNALS_AT"].split(",")]
COUNTS, TRAINING = {}, []


def settle():  # the handler of a signal just sent to the main thread runs by the end
    time.sleep(0.01)


def fire(point):
    if point in ("compile", "wait") and not TRAINING:  # those of training only
        return
    COUNTS[point] = COUNTS.get(point, 0) + 1
    stop = None
    for name, n, sig in PLAN:
        if name == point and int(n) == COUNTS[point]:
            try:  # a second signal is sent while the first one's stop is on its way
                # to the main thread, where Python runs handlers: delivered at once
                signal.pthread_kill(threading.main_thread().ident, getattr(signal, "SIG" + sig))
                settle()
            except BaseException as e:
                stop = stop or e
    if stop is not None:
        raise stop


def before(point, original):
    if asyncio.iscoroutinefunction(original):
        async def wrapped(*args, **kwargs):
            fire(point)
            return await original(*args, **kwargs)
    else:
        def wrapped(*args, **kwargs):
            fire(point)
            return original(*args, **kwargs)
    return wrapped


config = AutoConfig.from_pretrained.__func__
AutoConfig.from_pretrained = classmethod(before("config", config))
compile_ = compiler.compile_or_get_cached
compiler.compile_or_get_cached = before("compile", compile_)
fit = session.fit
session.fit = lambda *a, **k: (TRAINING.append(1), fit(*a, **k))[1]
session.Session.log = before("log", session.Session.log)
Checkpointer.save = before("save", Checkpointer.save)
TemporaryPath, Deleter = atomicity.AtomicRenameTemporaryPath, deleter.StandardCheckpointDeleter
TemporaryPath.create = before("tmp", TemporaryPath.create)  # the temporary folder
TemporaryPath.finalize = before("rename", TemporaryPath.finalize)  # renamed into place
Deleter.delete = before("delete", Deleter.delete)  # the checkpoint beyond keep_checkpoints
ocp.CheckpointManager.restore = before("restore", ocp.CheckpointManager.restore)
ocp.CheckpointManager.wait_until_finished = before(
    "wait", ocp.CheckpointManager.wait_until_finished)
evaluate = session.evaluate
session.evaluate = lambda *a, **k: (fire(k["bar"].description), evaluate(*a, **k))[1]
sys.exit(main(sys.argv[1:]))
'''

# 18 steps (3 epochs of 6 batches), a metrics line every 2, a checkpoint every 4
# (--set, so that the stop message must repeat it), 2 kept
SETS = ("--set", "train.checkpoint_every=4")
STEPS = 18

# (SIGNALS_AT, exit code, checkpoint step the stop keeps): one after the other,
# each run going on from where the one before stopped
STOPS = [
    ("config:1:INT", 130, None),  # loading the model: no run folder yet
    ("eval before:1:TERM", 143, None),  # evaluating the base model: nothing to resume
    ("compile:1:INT", 130, 1),  # deferred: a checkpoint at the first step boundary
    ("log:1:INT,log:1:INT", 130, 1),  # twice mid-step: at once, no checkpoint written
    ("restore:1:INT", 130, 1),  # reading the checkpoint back: a stop, not a damaged one
    ("log:1:INT,save:1:INT", 130, 2),  # the second during a checkpoint write: it ends first
    ("log:1:INT,tmp:1:INT", 130, 4),
    ("log:1:INT,rename:1:INT", 130, 6),
    ("log:1:INT,delete:1:INT", 130, 8),
    ("log:1:INT,wait:1:INT", 130, 10),
    ("rename:1:TERM", 143, 13),  # once, during the scheduled checkpoint of step 12
    ("eval after:1:INT,eval after:1:INT", 130, STEPS),  # the final evaluation, twice
]


def _signalled(workdir: Path, plan: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", SIGNALS_AT=plan,
               HF_DATASETS_CACHE=str(workdir / "hf-datasets-cache"))
    return subprocess.run([sys.executable, "signals_at.py", "run", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


def _runs(workdir: Path) -> list[Path]:
    folder = workdir / "runs" / "tiny"
    return sorted(folder.iterdir(), key=stamp_order) if folder.is_dir() else []


def test_a_stop_at_any_point_once_or_twice_then_the_run_finishes_as_if_never_stopped(
        tmp_path, tiny_bert_dir):
    reference = _workdir(tmp_path / "straight", tiny_bert_dir, TINY_RECIPE)
    assert _runner("run", "tiny.toml", *SETS, cwd=reference).returncode == 0
    [straight] = _runs(reference)

    workdir = _workdir(tmp_path / "stopped", tiny_bert_dir, TINY_RECIPE)
    (workdir / "signals_at.py").write_text(SIGNALS_AT)
    for plan, code, kept in STOPS:
        done = _signalled(workdir, plan, "tiny.toml", *SETS)
        said = " ".join(done.stderr.split())
        assert done.returncode == code, f"{plan}: {done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, plan
        assert "stopped: interrupted by SIG" in said and "error" not in said, f"{plan}: {said}"
        runs = _runs(workdir)
        if plan.startswith("config"):
            assert runs == [], plan  # stopped before a run folder was made
            continue
        run = runs[-1]
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "interrupted" and "failed" not in manifest, plan
        assert manifest["interrupted"]["checkpoint_step"] == kept, plan
        steps = checkpoint_steps(run)
        assert (steps or [None])[-1] == kept, f"{plan}: {steps}"
        assert not list((run / "checkpoints").glob("*tmp*")), plan  # no write left half-done
        if kept is None:
            assert "`runner run tiny.toml --set train.checkpoint_every=4` starts again" in said
        else:
            assert f"checkpoint at step {kept} saved" in said, plan
            assert "`runner run tiny.toml --set train.checkpoint_every=4` (without" in said
            assert _meta(run, kept)["step"] == kept

    done = _runner("run", str(run), cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert _meta(run, STEPS)["sha256"] == _meta(straight, STEPS)["sha256"]
    assert _loss_lines(run) == _loss_lines(straight)
    evals = [json.loads((r / "eval.json").read_text()) for r in (run, straight)]
    assert evals[0] == evals[1]


# -- the handler itself, in process ---------------------------------------------


def _send_and_settle(signum: int) -> None:
    os.kill(os.getpid(), signum)
    for _ in range(100):  # the handler runs within these bytecodes
        pass


def test_a_stop_during_a_guarded_write_is_raised_when_it_ends():
    with StopSignals() as stop:
        written = []
        with pytest.raises(Interrupted) as stopped:
            with stop.guarded():
                _send_and_settle(signal.SIGTERM)
                written.append("whole")
        assert written == ["whole"] and stopped.value.exit_code == 143
        _send_and_settle(signal.SIGINT)  # a stop on its way: further signals change nothing


def test_a_write_that_fails_during_a_stop_is_reported_as_itself():
    with StopSignals() as stop:
        with pytest.raises(OSError):
            with stop.guarded():
                _send_and_settle(signal.SIGINT)
                raise OSError(28, "No space left on device")


def test_a_second_signal_stops_at_once_while_the_first_is_deferred():
    with StopSignals() as stop, stop.deferred():
        _send_and_settle(signal.SIGINT)
        assert stop.requested()
        with pytest.raises(Interrupted):
            _send_and_settle(signal.SIGINT)


def test_a_signal_that_lands_in_a_finalizer_is_raised_after_it(monkeypatch):
    """Raised inside `__del__` (or a weakref callback), the stop would be
    printed as "Exception ignored in ..." and lost: it is raised after."""
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)

    class Dropped:
        def __del__(self):
            _send_and_settle(signal.SIGINT)

    with StopSignals(), pytest.raises(Interrupted):
        Dropped()  # dropped at once: the signal lands in its __del__
        end = time.monotonic() + 5
        while time.monotonic() < end:
            time.sleep(0.01)
    assert ignored == []


def test_interrupted_is_no_exception_that_a_broad_except_swallows():
    try:
        raise Interrupted(signal.SIGINT)
    except Exception:  # noqa: BLE001 - what a file reader's broad except does
        pytest.fail("a stop was taken for an error")
    except Interrupted as e:
        assert e.exit_code == 130


# -- a changed recipe is a new run -------------------------------------------------


def test_a_changed_recipe_starts_a_new_run_and_resume_insists_on_the_same(
        tmp_path, tiny_bert_dir):
    workdir = _workdir(tmp_path, tiny_bert_dir, TINY_RECIPE.replace("epochs = 3", "epochs = 1"))
    assert _runner("run", "tiny.toml", cwd=workdir).returncode == 0
    [unfinished] = _runs(workdir)  # as if stopped after its last checkpoint:
    manifest = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    kept = {p: p.read_bytes() for p in unfinished.rglob("*") if p.is_file()}

    # the changed recipe's own error is the one reported, not "the recipe differs"
    done = _runner("run", "tiny.toml", "--set", "data.source=gone.csv", cwd=workdir)
    assert done.returncode == 2 and "gone.csv" in done.stderr, done.stderr[-2000:]
    assert "differs" not in done.stderr and "Traceback" not in done.stderr
    said = " ".join(done.stdout.split())
    assert (f"not resuming the unfinished run {unfinished.relative_to(workdir)} (checkpoint at "
            f"step 6): its recipe differs (data.source: 'tweets.csv' -> 'gone.csv')") in said

    # --resume insists: the difference, field by field
    done = _runner("run", "tiny.toml", "--resume", "--set", "train.learning_rate=0.02",
                   cwd=workdir)
    assert done.returncode == 2 and "train.learning_rate: 0.01 -> 0.02" in done.stderr

    done = _runner("run", "tiny.toml", "--set", "train.learning_rate=0.02", cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    said = " ".join(done.stdout.split())
    assert "its recipe differs (train.learning_rate: 0.01 -> 0.02); this is a new run" in said
    runs = _runs(workdir)
    assert len(runs) == 2 and runs[0] == unfinished  # a folder of its own
    assert json.loads((runs[1] / "manifest.json").read_text())["recipe"]["train"][
        "learning_rate"] == 0.02
    assert {p: p.read_bytes() for p in unfinished.rglob("*") if p.is_file()} == kept

    # the first recipe again goes on with its own unfinished run, past the newer variant
    done = _runner("run", "tiny.toml", cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _runs(workdir) == runs and "not resuming" not in done.stdout
    assert json.loads((unfinished / "manifest.json").read_text())["status"] == "finished"
    done = _runner("run", "tiny.toml", "--resume", cwd=workdir)  # nothing left to go on with
    assert done.returncode == 2 and "no unfinished run with a checkpoint" in done.stderr


# -- one message, not a traceback ----------------------------------------------------


def test_a_generation_config_that_is_not_utf8_is_one_message(tmp_path):
    from tiny_models import qa_rows, tiny_decoder_dir

    tiny_decoder_dir(tmp_path / "model", "llama-gqa-rope3")
    config = tmp_path / "model" / "generation_config.json"
    config.write_bytes(b'{"eos_token_id": 2, "note": "caf\xe9"}')  # latin-1
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in qa_rows(10)) + "\n")
    (tmp_path / "r.toml").write_text(
        '[model]\nsource = "model"\ntask = "causal-lm"\n[data]\nsource = "x.jsonl"\n'
        'prompt_column = "prompt"\nresponse_column = "response"\neval_size = 2\n'
        'max_length = 16\n[adapter]\ntargets = ["q_proj", "v_proj"]\n')
    for args in (["generate", "r.toml", "--prompt", "the cat", "--max-new-tokens", "3"],
                 ["run", "r.toml"]):  # training reads it for its exact-match answers
        done = _runner(*args, cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        message = " ".join(done.stderr.split())
        assert message.startswith("error:") and "model/generation_config.json: not a JSON " \
            "file in UTF-8 ('utf-8' codec can't decode byte 0xe9" in message, message
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made
