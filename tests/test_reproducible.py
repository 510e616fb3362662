"""Runs another team can trust: the same resolved recipe with the same seed
gives the same numbers on CPU (also when run again from a run folder's own
recipe.toml), reporting options change nothing of the training, and two runs
started at once on the same output folder each finish in their own folder."""

import json
import subprocess
from pathlib import Path

from test_cli import runner_here, workdir  # noqa: F401 - the fixture

TIMING = ("step_ms", "examples_per_s", "tokens_per_s")


def _runs(workdir: Path) -> list[Path]:
    return sorted((workdir / "runs" / "tiny").iterdir())


def _lines(run: Path, kind: str = "loss") -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING}
            for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if kind in record]


def _final_digest(run: Path) -> str:
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    meta = run / "checkpoints" / str(steps[-1]) / "meta" / "metadata"
    return json.loads(meta.read_text())["sha256"]


def _same_run(a: Path, b: Path) -> None:
    assert a != b
    manifests = [json.loads((r / "manifest.json").read_text()) for r in (a, b)]
    assert manifests[0]["recipe_hash"] == manifests[1]["recipe_hash"]
    assert manifests[0]["model"]["fingerprint"] == manifests[1]["model"]["fingerprint"]
    assert manifests[0]["data"] == manifests[1]["data"]
    assert _lines(a) == _lines(b) and len(_lines(a)) == 9
    assert json.loads((a / "eval.json").read_text()) == json.loads((b / "eval.json").read_text())
    # trainable weights, optimizer state and dropout key, bit for bit
    assert _final_digest(a) == _final_digest(b)


def test_the_same_resolved_recipe_reproduces_its_run(workdir):  # noqa: F811
    first = runner_here("run", "tiny.toml", cwd=workdir)
    assert first.returncode == 0, first.stderr[-2000:]
    [a] = _runs(workdir)
    manifest = json.loads((a / "manifest.json").read_text())
    env = manifest["environment"]
    assert env["packages"]["jax"] and env["packages"]["flax"] and env["devices"]
    # again from the run folder's resolved recipe: its relative sources are read
    # from where the first run found them
    again = runner_here("run", str(a / "recipe.toml"), "--fresh", cwd=workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    [_, b] = _runs(workdir)
    _same_run(a, b)
    # reporting options (an evaluation every 6 steps, TensorBoard) change no number
    # of the training
    reported = runner_here("run", "tiny.toml", "--fresh", "--set", "eval.every_steps=6",
                           "--set", "output.tensorboard=true", cwd=workdir)
    assert reported.returncode == 0, reported.stderr[-2000:]
    c = _runs(workdir)[-1]
    assert _lines(c) == _lines(a) and _final_digest(c) == _final_digest(a)
    assert json.loads((c / "eval.json").read_text()) == json.loads((a / "eval.json").read_text())
    assert len(_lines(c, "eval")) == 2


def test_two_runs_started_at_once_then_a_third_from_the_cache(workdir, tmp_path):  # noqa: F811
    """Two processes start the same recipe in the same second, sharing the
    output folder, the datasets cache and a fresh compilation cache: each gets
    its own run folder (an exclusive mkdir, never a shared one), and both
    finish with complete, identical results. A third run then compiles
    nothing: every compiled function comes from the persistent cache."""
    import os
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(workdir / "shared-datasets-cache"),
               JAXLORA_CACHE_DIR=str(tmp_path / "cache"), JAXLORA_CACHE_MIN_SECONDS="0")
    processes = [subprocess.Popen([sys.executable, "-m", "runner.cli", "run", "tiny.toml",
                                   "--fresh"], cwd=workdir, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
    results = [p.communicate(timeout=600) for p in processes]
    for process, (out, err) in zip(processes, results):
        assert process.returncode == 0, err[-2000:]
    a, b = _runs(workdir)
    for run in (a, b):
        assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
    # each process names its own folder
    named = {" ".join(out.split()).split("run folder: ")[1].split()[0] for out, _ in results}
    assert named == {str(run.relative_to(workdir)) for run in (a, b)}
    _same_run(a, b)
    caches = [json.loads((r / "manifest.json").read_text())["train"]["compilation_cache"]
              for r in (a, b)]
    assert caches[0]["dir"] == str(tmp_path / "cache" / "xla")
    assert max(c["entries_added"] for c in caches) > 0

    third = subprocess.run([sys.executable, "-m", "runner.cli", "run", "tiny.toml", "--fresh"],
                           cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    c = _runs(workdir)[-1]
    assert json.loads((c / "manifest.json").read_text())["train"]["compilation_cache"] == {
        "dir": str(tmp_path / "cache" / "xla"), "entries_added": 0}
    _same_run(a, c)
