"""One recipe on one device and on a (data=4, fsdp=2) mesh of 8 devices (XLA's
host-platform device count: 8 CPU devices in one process) gives the same loss
curve within float32 tolerance, for LoRA, QLoRA (4-bit frozen weights sharded
FSDP-style) and full fine-tuning (weights and optimizer state sharded)."""

import json
import os
import subprocess
import sys

import pytest

from test_cli import TINY_RECIPE, _tweets_csv, runner_here, workdir  # noqa: F401

SCRIPT = """
import sys
import jax
assert jax.device_count() == 8, jax.devices()
from runner.cli import main

for recipe in sys.argv[1:]:
    for mesh in (["runtime.data=1"], ["runtime.data=4", "runtime.fsdp=2"]):
        sets = [a for s in mesh for a in ("--set", s)]
        assert main(["run", recipe, "--fresh", *sets]) == 0
    # the plan of the mesh run, before running it (its last line: the figures as JSON)
    assert main(["plan", recipe, "--json", *sets]) == 0
"""

METHODS = {
    "lora": "",
    "qlora": 'method = "qlora"\nrank = 4\ntargets = ["query", "value"]\n[adapter.quant]\nblock_size = 32\n',
    "full": 'method = "full"\n',
}


@pytest.mark.slow
def test_a_mesh_of_eight_devices_trains_like_one(tmp_path, tiny_bert_dir):
    """One process with 8 devices runs each method on one device, then on the
    mesh, then plans the mesh run."""
    import shutil

    shutil.copytree(tiny_bert_dir, tmp_path / "model")
    _tweets_csv(tmp_path / "tweets.csv")
    for method, adapter in METHODS.items():
        recipe = TINY_RECIPE.replace("epochs = 3", "epochs = 2").replace(
            'description = "tiny end-to-end"', f'name = "{method}"')
        if adapter:
            recipe = recipe.replace('method = "lora"\nrank = 4\ntargets = ["query", "value"]\n',
                                    adapter)
        (tmp_path / f"{method}.toml").write_text(recipe)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    done = subprocess.run([sys.executable, "-c", SCRIPT, *(f"{m}.toml" for m in METHODS)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    plans = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(plans) == 3
    for method, planned in zip(METHODS, plans):
        _check(method, sorted((tmp_path / "runs" / method).iterdir()), json.loads(planned))
    assert "data 4 x fsdp 2 over 8" in done.stdout


def _check(method: str, runs: list, planned: dict) -> None:
    one, mesh = runs
    manifests = [json.loads((r / "manifest.json").read_text()) for r in (one, mesh)]
    assert manifests[0]["runtime"]["mesh"] == {"data": 1, "fsdp": 1}
    assert manifests[1]["runtime"]["mesh"] == {"data": 4, "fsdp": 2}
    # FSDP really shards: a device of the mesh holds about half the frozen weights
    # (what no dimension of 2 divides stays whole), and for full fine-tuning half
    # the trainable weights and optimizer state too
    held = [m["runtime"]["per_device_bytes"] for m in manifests]
    if method == "full":  # nothing is frozen
        assert held[0]["frozen"] == held[1]["frozen"] == 0
        assert held[1]["trainable"] < 0.6 * held[0]["trainable"]
        assert held[1]["optimizer"] < 0.6 * held[0]["optimizer"]
    else:  # adapters and head replicated
        assert held[1]["frozen"] < 0.6 * held[0]["frozen"]
        assert held[1]["trainable"] == held[0]["trainable"]
    # `runner plan` foresaw exactly what the mesh run held
    for what in ("frozen", "trainable", "optimizer"):
        assert planned[what] == held[1][what], (method, what)
    assert planned["activations"] > 0
    curves = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()]
              for r in (one, mesh)]
    assert len(curves[0]) == 6, method
    assert curves[1] == pytest.approx(curves[0], rel=2e-4, abs=1e-5), method
    evals = [json.loads((r / "eval.json").read_text()) for r in (one, mesh)]
    for when in ("before", "after"):
        assert evals[1][when]["loss"] == pytest.approx(evals[0][when]["loss"], rel=2e-4)
        assert evals[1][when]["examples"] == evals[0][when]["examples"] == 20


def test_plan_warns_when_a_device_cannot_hold_the_run(workdir, monkeypatch):  # noqa: F811
    import runner.plan

    monkeypatch.setattr(runner.plan, "device_memory", lambda: 16 * 2**30)
    roomy = runner_here("plan", "tiny.toml", "--json", cwd=workdir)
    assert roomy.returncode == 0, roomy.stderr
    figures = json.loads(roomy.stdout.strip().splitlines()[-1])
    assert figures["total"] == sum(figures[k] for k in ("frozen", "trainable", "optimizer",
                                                          "activations"))
    assert "fits:" in roomy.stdout and "warning" not in roomy.stdout
    monkeypatch.setattr(runner.plan, "device_memory", lambda: figures["total"] // 2)
    tight = runner_here("plan", "tiny.toml", cwd=workdir)
    assert tight.returncode == 0 and "will not fit" in " ".join(tight.stdout.split())
    # remat keeps less: the estimate falls
    remat = runner_here("plan", "tiny.toml", "--json", "--set", "train.remat=full", cwd=workdir)
    assert json.loads(remat.stdout.strip().splitlines()[-1])["activations"] \
        < figures["activations"]
    assert not (workdir / "runs").exists()  # a plan runs nothing
