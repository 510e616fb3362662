"""Two local processes joined by `jax.distributed` (CPU collectives, gloo)
train one recipe together on a (data=2, fsdp=2) mesh of their 4 devices, as
the hosts of a TPU VM pod would: the same loss curve and figures as one
process on one device; one run folder, named by process 0 and written by it
alone; checkpoints through orbax's multi-process path."""

import json
import os
import socket
import subprocess
import sys

import pytest

from test_cli import runner_here, workdir  # noqa: F401 - the fixture


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_train_together_like_one(workdir):  # noqa: F811
    port = _free_port()
    processes = []
    for rank in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank),
                   XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   HF_DATASETS_CACHE=str(workdir / "datasets-cache"))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "runner.cli", "run", "tiny.toml", "--set", "runtime.fsdp=2",
             "--set", "train.epochs=1"],
            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300))
    finally:
        for process in processes:
            process.kill()
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    # process 0 speaks for both (gloo prints its own connection lines)
    assert "report:" in outputs[0][0]
    assert not any(mark in outputs[1][0] for mark in ("run folder", "report:", "eval", "┃"))
    [together] = list((workdir / "runs" / "tiny").iterdir())
    manifest = json.loads((together / "manifest.json").read_text())
    assert manifest["runtime"]["processes"] == 2
    assert manifest["runtime"]["mesh"] == {"data": 2, "fsdp": 2}
    assert (together / "checkpoints" / "6").is_dir()

    alone = runner_here("run", "tiny.toml", "--fresh", "--set", "train.epochs=1", cwd=workdir)
    assert alone.returncode == 0, alone.stderr[-2000:]
    single = [r for r in (workdir / "runs" / "tiny").iterdir() if r != together][0]
    curves = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()]
              for r in (together, single)]
    assert len(curves[0]) == 3 and curves[0] == pytest.approx(curves[1], rel=2e-4, abs=1e-5)
    evals = [json.loads((r / "eval.json").read_text()) for r in (together, single)]
    for when in ("before", "after"):
        assert evals[0][when]["loss"] == pytest.approx(evals[1][when]["loss"], rel=2e-4)
        assert evals[0][when]["accuracy"] == evals[1][when]["accuracy"]
