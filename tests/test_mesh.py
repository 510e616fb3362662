"""One recipe on one device and on a (data=4, fsdp=2) mesh of 8 devices (XLA's
host-platform device count: 8 CPU devices in one process) gives the same loss
curve within float32 tolerance, for LoRA, QLoRA (4-bit frozen weights sharded
FSDP-style) and full fine-tuning (weights and optimizer state sharded); a LoRA
run stopped on one device goes on on the mesh with its adapters sharded too
(`shard_adapters`) and ends where the uninterrupted run ended; the mesh
steps gather whole weights, not activations. Then the refusals of [runtime]
settings that do not fit."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from jaxlora import runtime
from jaxlora.runtime import memory, processes
from jaxlora.errors import UserError

from test_cli import TINY_RECIPE, _tweets_csv, runner_here, workdir  # noqa: F401
from conftest import xla_flags

SCRIPT = r"""
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
    # a batch the run would refuse, the plan refuses too, by name
    assert main(["plan", recipe, *sets, "--set", "eval.batch_size=12"]) == 2

# The one-device LoRA run, as if stopped after its checkpoint of step 10, goes on
# on the mesh, its adapters sharded too: a run may change its device layout
# when it resumes.
import json, shutil
from pathlib import Path

one = sorted(Path("runs", "lora").iterdir())[0]
stopped = Path("stopped") / one.name
shutil.copytree(one, stopped)
last = max((p for p in (stopped / "checkpoints").iterdir() if p.name.isdigit()),
           key=lambda p: int(p.name))
shutil.rmtree(last)
manifest = json.loads((stopped / "manifest.json").read_text())
(stopped / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
assert main(["run", str(stopped), "--set", "runtime.data=4", "--set", "runtime.fsdp=2",
             "--set", "runtime.shard_adapters=true"]) == 0
# the run folder reads back consistently: its recipe.toml has the manifest's hash
assert main(["eval", str(stopped)]) == 0

# FSDP proper: in each method's compiled mesh step (as `fit` traces it) every
# all-gather gathers a whole weight where it is read, never activations, and
# nothing is resharded all-to-all.
import re
from runner.commands.plan import build_as_run, lowered_step
from runner.recipe import load_recipe

for name in sys.argv[1:]:
    recipe = load_recipe(name, ["runtime.data=4", "runtime.fsdp=2"])
    placement, _, parts, opt_state = build_as_run(recipe, Path(name))
    graphdef, trainable, frozen = parts.graphdef, parts.trainable, parts.frozen
    text = lowered_step(recipe, graphdef, trainable, frozen, opt_state,
                        placement).compile().as_text()
    weights = {tuple(x.shape) for x in jax.tree.leaves((trainable, frozen))}
    gathered = [tuple(int(n) for n in dims.split(",") if n) for dims in
                re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", text)]
    assert gathered and not set(gathered) - weights, (name, set(gathered) - weights)
    assert "all-to-all" not in text, name
    print("collectives", name, len(gathered), "all-gathers", text.count(" all-reduce("),
          "all-reduces")
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
        recipe = TINY_RECIPE.replace("epochs = 3", "epochs = 2\ncheckpoint_every = 5").replace(
            'description = "tiny end-to-end"', f'name = "{method}"')
        if adapter:
            recipe = recipe.replace('method = "lora"\nrank = 4\ntargets = ["query", "value"]\n',
                                    adapter)
        (tmp_path / f"{method}.toml").write_text(recipe)
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
               HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    done = subprocess.run([sys.executable, "-c", SCRIPT, *(f"{m}.toml" for m in METHODS)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    plans = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(plans) == 3
    for method, planned in zip(METHODS, plans):
        _check(method, sorted((tmp_path / "runs" / method).iterdir()), json.loads(planned))
    assert "data 4 x fsdp 2 over 8" in done.stdout
    assert [line.split()[1] for line in done.stdout.splitlines()
            if line.startswith("collectives ")] == [f"{m}.toml" for m in METHODS]
    _check_resumed_on_the_mesh(sorted((tmp_path / "runs" / "lora").iterdir())[0],
                               next((tmp_path / "stopped").iterdir()))


def _check_resumed_on_the_mesh(one, resumed) -> None:
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["runtime"]["mesh"] == {"data": 4, "fsdp": 2}
    [entry] = manifest["resumed"]
    assert entry["from_step"] == 10
    assert entry["runtime"] == {"processes": 1, "mesh": {"data": 4, "fsdp": 2}, "devices": 8}
    assert "environment" not in entry  # the same machine as the first session
    assert entry["layout_changes"] == ["runtime.data: 1 -> 4", "runtime.fsdp: 1 -> 2",
                                       "runtime.shard_adapters: False -> True"]
    # shard_adapters: the LoRA factors, the head and their AdamW state go over fsdp too
    held = [json.loads((r / "manifest.json").read_text())["runtime"]["per_device_bytes"]
            for r in (one, resumed)]
    assert held[1]["trainable"] < 0.6 * held[0]["trainable"]
    assert held[1]["optimizer"] < 0.6 * held[0]["optimizer"]
    assert manifest["recipe"]["runtime"]["fsdp"] == 2 and "fsdp = 2" in (
        resumed / "recipe.toml").read_text()
    assert manifest["recipe_hash"] != json.loads((one / "manifest.json").read_text())[
        "recipe_hash"]
    curves = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()]
              for r in (one, resumed)]
    assert len(curves[1]) == 6
    assert curves[1][:5] == curves[0][:5]  # kept from the one-device session
    assert curves[1] == pytest.approx(curves[0], rel=2e-4, abs=1e-5)
    evals = [json.loads((r / "eval.json").read_text())["after"] for r in (one, resumed)]
    assert evals[1]["loss"] == pytest.approx(evals[0]["loss"], rel=2e-4)
    [again] = (resumed / "evals").iterdir()  # `runner eval` of the resumed run folder
    assert json.loads(again.read_text())["metrics"]["loss"] == pytest.approx(evals[1]["loss"],
                                                             rel=2e-4)


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
    monkeypatch.setattr(runtime, "device_memory", lambda free=False: 16 * 2**30)
    roomy = runner_here("plan", "tiny.toml", "--json", cwd=workdir)
    assert roomy.returncode == 0, roomy.stderr
    figures = json.loads(roomy.stdout.strip().splitlines()[-1])
    assert figures["total"] == sum(figures[k] for k in ("frozen", "trainable", "optimizer",
                                                          "activations"))
    assert "fits:" in roomy.stdout and "warning" not in roomy.stdout
    monkeypatch.setattr(runtime, "device_memory", lambda free=False: figures["total"] // 2)
    tight = runner_here("plan", "tiny.toml", cwd=workdir)
    assert tight.returncode == 0 and "will not fit" in " ".join(tight.stdout.split())
    # remat keeps less: the estimate falls
    remat = runner_here("plan", "tiny.toml", "--json", "--set", "train.remat=full", cwd=workdir)
    assert json.loads(remat.stdout.strip().splitlines()[-1])["activations"] \
        < figures["activations"]
    assert not (workdir / "runs").exists()  # a plan runs nothing


def test_plan_on_the_cpu_weighs_the_run_against_the_hosts_ram(workdir, monkeypatch):  # noqa: F811
    import jax

    ram = runtime.host_memory()
    assert ram and ram > 2**30
    assert runtime.device_memory() == ram // len(jax.local_devices())
    assert 0 < runtime.device_memory(free=True) <= runtime.device_memory()
    roomy = runner_here("plan", "tiny.toml", cwd=workdir)
    assert roomy.returncode == 0 and "host RAM" in roomy.stdout and "fits:" in roomy.stdout
    monkeypatch.setattr(memory, "host_memory", lambda available=False: 2**20)  # 1 MiB of RAM
    tight = runner_here("plan", "tiny.toml", cwd=workdir)
    assert tight.returncode == 0 and "will not fit" in " ".join(tight.stdout.split())


# Bad [runtime] settings: one message naming the field, exit code 2, nothing run.

@pytest.mark.parametrize("sets, expected", [
    (["runtime.data=0"], "runtime.data"),
    (["runtime.fsdp=3"], "runtime.fsdp: 3 devices asked for, 1 present"),
    (["runtime.data=2"], "runtime: data 2 x fsdp 1 = 2 devices asked for, 1 present"),
    (["runtime.distributed=on"], "runtime.distributed: jax.distributed.initialize() failed"),
])
@pytest.mark.parametrize("command", ["run", "plan"])
def test_bad_runtime_settings_exit_2_naming_the_field(workdir, monkeypatch, command,  # noqa: F811
                                                      sets, expected):
    for name in runtime.MULTI_PROCESS_ENV:
        monkeypatch.delenv(name, raising=False)
    done = runner_here(command, "tiny.toml", *[a for s in sets for a in ("--set", s)],
                       cwd=workdir)
    assert done.returncode == 2, done.stderr
    assert expected in " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (workdir / "runs").exists()


def test_mesh_shape_refusals_name_the_field():
    cfg = runtime.RuntimeConfig
    assert runtime.mesh_shape(cfg(), 8) == (8, 1)
    assert runtime.mesh_shape(cfg(fsdp=2), 8) == (4, 2)
    assert runtime.mesh_shape(cfg(data=2, fsdp=2), 8) == (2, 2)  # one process may use fewer
    with pytest.raises(UserError, match=r"runtime.fsdp: 3 does not divide the 8 devices"):
        runtime.mesh_shape(cfg(fsdp=3), 8)
    with pytest.raises(UserError, match=r"runtime: data 4 x fsdp 2 = 8 devices asked for, 4"):
        runtime.mesh_shape(cfg(data=4, fsdp=2), 4)
    # several processes: a mesh leaving devices out would leave a host without rows
    assert runtime.mesh_shape(cfg(fsdp=2), 8, processes=2) == (4, 2)
    with pytest.raises(UserError, match=r"4 of the 8 devices of 2 processes"):
        runtime.mesh_shape(cfg(data=2, fsdp=2), 8, processes=2)
    with pytest.raises(UserError, match=r"runtime.fsdp: 3 does not divide the 8 devices present; "
                                        r"a mesh over several processes takes every device"):
        runtime.mesh_shape(cfg(fsdp=3), 8, processes=2)


def test_a_batch_the_mesh_does_not_divide_is_refused_by_name():
    mesh = types.SimpleNamespace(shape={"data": 4, "fsdp": 2})
    placement = types.SimpleNamespace(devices=8, fsdp=2, mesh=mesh)
    runtime.Placement.check_batch(placement, "train.batch_size", 16)
    with pytest.raises(UserError, match=r"eval.batch_size: 12 rows do not split evenly over "
                                        r"the 8 devices .* use a multiple of 8"):
        runtime.Placement.check_batch(placement, "eval.batch_size", 12)


@pytest.mark.parametrize("name, value", [("JAX_NUM_PROCESSES", "two"),
                                         ("JAX_PROCESS_ID", "-1")])
def test_process_numbers_that_are_not_whole_numbers_are_refused(monkeypatch, name, value):
    for other in runtime.MULTI_PROCESS_ENV:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=rf"runtime.distributed: {name}='{value}' is not a whole"):
        runtime.initialize(runtime.RuntimeConfig(distributed="on"))


@pytest.mark.parametrize("value, seconds", [("", 0.5), ("2", 2.0), ("0", 0.0), ("soon", None),
                                            ("-1", None), ("nan", None)])
def test_cache_min_seconds_is_a_number_or_a_clear_refusal(monkeypatch, value, seconds):
    from runner import xla_cache

    monkeypatch.setenv("JAXLORA_CACHE_MIN_SECONDS", value)
    if seconds is None:
        with pytest.raises(UserError, match="JAXLORA_CACHE_MIN_SECONDS"):
            xla_cache.min_seconds()
    else:
        assert xla_cache.min_seconds() == seconds


def test_a_run_folder_takes_no_set_outside_runtime(tmp_path):
    """(The mesh test resumes a run folder with runtime.* sets.)"""
    run = tmp_path / "runs" / "tiny" / "20261127-000000"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    done = runner_here("run", str(run), "--set", "runtime.fsdp=2", "--set", "train.epochs=9",
                       cwd=tmp_path)
    assert done.returncode == 2
    assert "--set train.epochs=9: a run folder resumes with its own recipe; only runtime.* (the device layout) and train.remat" \
        in " ".join(done.stderr.split())
    assert (run / "manifest.json").read_text() == "{}"


def test_the_mesh_takes_jaxs_topology_aware_layout(monkeypatch):
    from jax.experimental import mesh_utils

    devices = [f"chip{i}" for i in range(10)]
    calls = []

    def laid_out(shape, chosen, *, allow_split_physical_axes=False):  # as a TPU slice's
        calls.append((shape, list(chosen), allow_split_physical_axes))
        return np.array(chosen[::-1], dtype=object).reshape(shape)

    monkeypatch.setattr(mesh_utils, "create_device_mesh", laid_out)
    grid = runtime.device_grid(4, 2, devices)
    # the first data x fsdp devices; a slice's axes may be split to fit any shape
    assert calls == [((4, 2), devices[:8], True)]
    assert grid.tolist() == np.array(devices[7::-1], dtype=object).reshape(4, 2).tolist()

    def refuses(shape, chosen, **kwargs):  # a part of a slice it cannot lay out
        raise ValueError("cannot")

    monkeypatch.setattr(mesh_utils, "create_device_mesh", refuses)
    assert runtime.device_grid(2, 2, devices).tolist() == [["chip0", "chip1"],
                                                           ["chip2", "chip3"]]
    monkeypatch.undo()
    # CPU devices: in order, as before
    assert runtime.device_grid(1, 1).tolist() == [[processes.jax.devices()[0]]]


def test_process_0s_choice_of_run_folder_or_its_failure_reaches_every_process(tmp_path,
                                                                              monkeypatch):
    """`agree_path` as processes 0 and 1 of two, the broadcast and the gather
    stood in for: whatever process 0 meets reaches process 1 as one message."""
    said = []
    monkeypatch.setattr(processes.jax, "process_count", lambda: 2)
    monkeypatch.setattr(processes, "agree_text", lambda text: said.append(text) or text)
    seen = [True, True]
    monkeypatch.setattr(processes, "every_process", lambda flag: seen)

    def process(index, make, **kwargs):
        monkeypatch.setattr(processes.jax, "process_index", lambda: index)
        return runtime.agree_path(make, **kwargs)

    def refused():
        raise PermissionError(13, "Permission denied")

    with pytest.raises(PermissionError):  # process 0 raises what it met...
        process(0, refused)
    assert json.loads(said[-1]) == ["write", 13, "Permission denied", "",
                                    "process 0: PermissionError: [Errno 13] Permission denied"]
    monkeypatch.setattr(processes, "agree_text", lambda text: said[-1])
    with pytest.raises(UserError, match="process 0: PermissionError"):  # ...1 hears of it
        process(1, lambda: pytest.fail("only process 0 makes the folder"))
    monkeypatch.setattr(processes, "agree_text", lambda text: text or "none:")
    assert process(0, lambda: None) is None  # no run to go on with
    made = tmp_path / "runs" / "20261127-000000"
    made.mkdir(parents=True)
    assert process(0, lambda: made, new=True) == made
    seen = [True, False]  # process 1 cannot see it: a new folder is taken back
    with pytest.raises(UserError, match=r"output.dir: process\(es\) 1 cannot see .* made"):
        process(0, lambda: made, new=True)
    assert not made.exists()
