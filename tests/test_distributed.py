"""Two local processes joined by `jax.distributed` (CPU collectives, gloo)
train one recipe together on a (data=2, fsdp=2) mesh of their 4 devices, as
the hosts of a TPU VM pod would: the same loss curve and figures as one
process on one device, greedy exact match included (both processes decode
the same prompts on the mesh); one run folder, named by process 0 and written
by it alone; checkpoints through orbax's multi-process path; a stop notice to
one host stops both at one step boundary, and the run goes on like one. The recipe is a
prompt/response causal LM (LoRA on every linear layer of a tiny Llama with
grouped-query attention), its frozen weights sharded FSDP-style. And hosts
that do not share the output folder stop with one message, not a hang."""

import json
import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jaxlora.models import weights
from test_causal_lm import PAIRS, RECIPE
from test_cli import runner_here
from tiny_models import qa_rows, tiny_decoder_dir
from conftest import xla_flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two(workdirs: list, **env) -> list:
    """`runner run lm.toml` as processes 0 and 1 of two, each in its folder, each
    with 2 CPU devices (and `env` in their environment)."""
    port = _free_port()
    processes = []
    extra = env
    for rank, workdir in enumerate(workdirs):
        env = dict(os.environ, **extra, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank),
                   XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"),
                   HF_DATASETS_CACHE=str(workdir / "datasets-cache"))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "runner.cli", "run", "lm.toml", "--set", "runtime.fsdp=2"],
            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def _two_processes(workdirs: list, processes: list | None = None,
                   **env) -> tuple[list, list]:
    """The two processes (started now with `env`, unless given) run to their
    end; returns them and their (stdout, stderr)."""
    processes = processes or _start_two(workdirs, **env)
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300))
    finally:
        for process in processes:
            process.kill()
    return processes, outputs


def _lm_workdir(workdir, lean: bool = False):
    """The recipe, model and data of these runs; `lean`: no evaluation before
    training, no greedy decoding, and one length bucket (the least there is
    to compile)."""
    tiny_decoder_dir(workdir / "model", "llama-gqa-rope3")
    recipe = RECIPE.format(data=PAIRS, adapter='method = "lora"\nrank = 8\n'
                                              'targets = "all-linear"')
    # 100 training examples, 8 a step over 4 devices: 13 steps, a record every 5 and at the end
    recipe = recipe.replace("epochs = 4", "epochs = 1").replace(
        "batch_size = 10", "batch_size = 8").replace("learning_rate = 5e-3", "learning_rate = 2e-2")
    # Half the prompts two words shorter (11 tokens, not 13): batches that hold only those
    # are cut to the 12-token bucket, the width agreed by both processes, each of which
    # sees only its own rows.
    rows = qa_rows()
    if not lean:
        for row in rows[::2]:
            row["prompt"] = row["prompt"].replace("what is ", "")
        recipe = recipe.replace("max_length = 16", "max_length = 16\nlength_buckets = [12]")
    else:
        recipe = recipe.replace("[eval]\n", "[eval]\nbefore = false\nexact_match_examples = 0\n")
    (workdir / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (workdir / "lm.toml").write_text(recipe)
    return workdir


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_train_together_like_one(tmp_path):
    """One run of two processes against the same recipe run by one process on
    one device: the same loss curve and eval loss; process 0 speaks for both.
    (The evaluation before training and greedy decoding on the mesh are left to
    the next test, which keeps this one under a minute.) JAX's preemption
    service is off here, so the processes vote at each step boundary on
    whether to stop (`runtime.StopVotes`): the votes' collectives run between
    the steps' and change nothing (the next test runs with the service)."""
    workdir = _lm_workdir(tmp_path, lean=True)
    processes, outputs = _two_processes([workdir, workdir], JAX_ENABLE_PREEMPTION_SERVICE="false")
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    # process 0 speaks for both (gloo prints its own connection lines)
    assert "report:" in outputs[0][0]
    assert not any(mark in outputs[1][0] for mark in ("run folder", "report:", "eval", "┃"))
    [together] = list((workdir / "runs" / "lm").iterdir())
    manifest = json.loads((together / "manifest.json").read_text())
    assert manifest["runtime"]["processes"] == 2
    assert manifest["runtime"]["mesh"] == {"data": 2, "fsdp": 2}
    # each process read and tokenized only the examples of its own batch rows
    shares = manifest["runtime"]["examples_per_process"]
    assert sum(shares["train"]) == 100 and max(shares["train"]) <= 52
    assert sum(shares["eval"]) == 20 and max(shares["eval"]) <= 12
    # hashed by process 0 alone, and shared: the files' own fingerprint
    assert manifest["model"]["fingerprint"] == weights.fingerprint(workdir / "model")
    assert [p.name for p in (together / "checkpoints").iterdir()] == ["13"]

    single = _alone(workdir, together)
    # the statistics of the shares, added up, are those of the whole data
    assert json.loads((single / "manifest.json").read_text())["data"] == manifest["data"]
    _same_curves(together, single)
    evals = [json.loads((r / "eval.json").read_text()) for r in (together, single)]
    assert evals[0]["before"] is None  # not asked for
    assert evals[0]["after"]["loss"] == pytest.approx(evals[1]["after"]["loss"], rel=2e-4)


def _alone(workdir, together):
    """The recipe run by this process on one device: its run folder."""
    alone = runner_here("run", "lm.toml", "--fresh", cwd=workdir)
    assert alone.returncode == 0, alone.stderr[-2000:]
    return next(r for r in (workdir / "runs" / "lm").iterdir() if r != together)


def _same_curves(together, single) -> None:
    curves = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()]
              for r in (together, single)]
    assert len(curves[0]) == 3 and curves[0] == pytest.approx(curves[1], rel=2e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_stop_together_and_go_on_like_one(tmp_path):
    """A Ctrl-C reaches process 1 alone, before training (as a preemption
    notice reaches a pod's hosts at different moments): through JAX's
    preemption service it is a notice to both, which stop at the same step
    boundary, the first, and write one checkpoint together (exit 130 where the
    Ctrl-C came, 143 on the other), no hang. The same command on both then goes
    on from it (orbax's multi-process restore) to the end. Both processes
    decode the same prompts greedily on the mesh, before and after: the
    completions learnt equal the references."""
    import signal
    import time

    workdir = _lm_workdir(tmp_path)
    processes = _start_two([workdir, workdir])
    end = time.monotonic() + 240
    while not list(workdir.glob("runs/lm/*/manifest.json")):  # joined; not training yet
        assert all(p.poll() is None for p in processes) and time.monotonic() < end
        time.sleep(0.01)
    processes[1].send_signal(signal.SIGINT)
    processes, outputs = _two_processes([workdir, workdir], processes)
    assert [p.returncode for p in processes] == [143, 130], outputs[1][1][-3000:]
    assert "Traceback" not in outputs[0][1] + outputs[1][1]
    [together] = list((workdir / "runs" / "lm").iterdir())
    manifest = json.loads((together / "manifest.json").read_text())
    stopped = manifest["interrupted"]["checkpoint_step"]
    assert manifest["status"] == "interrupted" and 1 <= stopped < 13
    assert [p.name for p in (together / "checkpoints").iterdir()] == [str(stopped)]
    assert f"checkpoint at step {stopped}" in " ".join(outputs[0][1].split())

    processes, outputs = _two_processes([workdir, workdir])
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    manifest = json.loads((together / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["resumed"][0]["from_step"] == stopped
    assert (together / "checkpoints" / "13").is_dir()
    curve = [json.loads(line) for line in (together / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [5, 10, 13] and curve[-1]["loss"] < curve[0]["loss"]
    evals = json.loads((together / "eval.json").read_text())
    assert evals["after"]["loss"] < evals["before"]["loss"]
    for when in ("before", "after"):
        assert evals[when]["exact_match_examples"] == 20
    assert evals["after"]["exact_match"] > evals["before"]["exact_match"]


@pytest.mark.distributed
def test_hosts_that_do_not_share_the_output_folder_stop_with_one_message(tmp_path):
    """Each process in a folder of its own, output.dir relative: as hosts that
    each write to their own disk. Both stop before training, naming the field
    and the process that cannot see the run folder; none waits forever."""
    folders = [_lm_workdir(tmp_path / "host0"), _lm_workdir(tmp_path / "host1")]
    processes, outputs = _two_processes(folders)
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 2, err[-3000:]
        assert "output.dir: process(es) 1 cannot see runs/lm/" in " ".join(err.split())
        assert "Traceback" not in err + out
    # process 0 took back the run folder it had made: nothing but empty parents
    assert list((tmp_path / "host0" / "runs" / "lm").iterdir()) == []
    assert not (tmp_path / "host1" / "runs").exists()


@pytest.mark.distributed
def test_a_bad_row_in_one_hosts_share_stops_every_host(tmp_path):
    """One bad row (a prompt that fills max_length, leaving no token to learn,
    with data.too_long = "error"): both processes stop with its message, exit
    2, before any run folder; with the default, both drop it."""
    workdir = _lm_workdir(tmp_path)
    rows = [json.loads(line) for line in (workdir / "data.jsonl").read_text().splitlines()]
    rows[57]["prompt"] = " ".join(["the cat"] * 10)
    (workdir / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = (workdir / "lm.toml").read_text()  # no greedy prompts: those every process reads
    recipe = recipe.replace("[eval]\n", "[eval]\nexact_match_examples = 0\n")
    (workdir / "lm.toml").write_text(recipe.replace("[data]\n", "[data]\ntoo_long = \"error\"\n"))
    processes, outputs = _two_processes([workdir, workdir])
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 2, err[-3000:]
        assert "data row 58 of split 'train' leaves no token to learn" in " ".join(err.split())
        assert "Traceback" not in err + out
    assert not (workdir / "runs").exists()
    # with the default (drop) both processes leave that row out before the rows
    # are dealt, and train together on the same 119 of 120
    (workdir / "lm.toml").write_text(recipe)
    processes, outputs = _two_processes([workdir, workdir])
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    [run] = (workdir / "runs" / "lm").iterdir()
    data = json.loads((run / "manifest.json").read_text())["data"]
    assert sum(data["too_long"].values()) == 1
    assert data["train_size"] + data["eval_size"] == 119


SPREAD_CHECKPOINT = """
import sys
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlora import runtime

runtime.initialize(runtime.RuntimeConfig(distributed="on"))
from jaxlora.checkpoint import Checkpointer
from jaxlora.runtime import to_host
from jaxlora.train import TrainState

mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "fsdp"))
spread, whole = NamedSharding(mesh, P(None, "fsdp")), NamedSharding(mesh, P())
host = {"w": np.arange(24, dtype=np.float32).reshape(3, 8) / 7,
        "b": (np.arange(8) / 3).astype(jax.numpy.bfloat16)[None],
        "count": np.array(5, np.int32)}


def place(tree):
    return {k: jax.make_array_from_callback(v.shape, whole if k == "count" else spread,
                                            lambda index, v=v: v[index])
            for k, v in tree.items()}


state = TrainState(trainable=place({"w": host["w"], "b": host["b"]}),
                   opt_state=place({"count": host["count"]}),
                   dropout_key=np.array([1, 2], np.uint32), step=3)
assert not state.trainable["w"].is_fully_addressable  # no process holds it whole
with Checkpointer(Path(sys.argv[1])) as checkpointer:
    checkpointer.save(state)
    meta = checkpointer.read_meta(3)
    assert meta["checksummed"] == ["['trainable']['b']", "['trainable']['w']"], meta
    back, _ = checkpointer.restore(state, shardings=replace(
        state, trainable={k: spread for k in state.trainable}, opt_state={"count": whole},
        dropout_key=whole))
for name in ("w", "b"):
    assert back.trainable[name].sharding == spread  # straight into its shards
    assert to_host(back.trainable[name]).tobytes() == host[name].tobytes()
assert int(back.opt_state["count"]) == 5 and back.step == 3
print(f"restored {jax.process_index()}")
"""


@pytest.mark.distributed
def test_an_array_spread_over_processes_is_checkpointed_in_shards(tmp_path):
    """Two processes save a state whose arrays no process holds whole: each
    writes its shards, the digest is taken where they live, and they restore
    it straight into its shards; one process then reads the same checkpoint
    back whole, digest checked on the host."""
    from jaxlora.checkpoint import Checkpointer
    from jaxlora.train import TrainState

    port = _free_port()
    processes = [subprocess.Popen(
        [sys.executable, "-c", SPREAD_CHECKPOINT, str(tmp_path / "ckpt")], cwd=tmp_path,
        env=dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(rank), XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for rank, (process, (out, err)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, err[-3000:]
        assert f"restored {rank}" in out
    import numpy as np

    host = {"w": np.arange(24, dtype=np.float32).reshape(3, 8) / 7,
            "b": (np.arange(8) / 3).astype(jnp.bfloat16)[None]}
    template = TrainState(trainable={k: np.zeros_like(v) for k, v in host.items()},
                          opt_state={"count": np.array(0, np.int32)},
                          dropout_key=np.zeros(2, np.uint32))
    with Checkpointer(tmp_path / "ckpt", read_only=True) as checkpointer:
        back, meta = checkpointer.restore(template)
    for name, value in host.items():
        assert back.trainable[name].tobytes() == value.tobytes()
    assert meta["checksummed"] and int(back.opt_state["count"]) == 5


VOTES_SCRIPT = """
import sys
from jaxlora import runtime

rank = int(sys.argv[1])
runtime.initialize(runtime.RuntimeConfig())
flag = [False]
agreement = runtime.agreed_stop(lambda: flag[0])
assert agreement is not None and not agreement.notify, agreement
for boundary in range(1, 12):
    if rank == 1 and boundary == 3:  # a signal reaches process 1 alone, before boundary 3
        flag[0] = True
    if agreement.at_boundary():
        print(f"stop at {boundary}")
        break

# (each line one write: JAX's collectives print from their own threads, and a
# print of several arguments, unbuffered, could have such a line in the middle)
# a text too long to agree on is refused on every process, not on process 0 alone
from jaxlora.errors import UserError
try:
    runtime.agree_text("x" * 5000 if rank == 0 else None)
except UserError as e:
    print(f"refused everywhere: {'longer than the 4096 bytes' in str(e)}")

# a check process 0 makes for all of them: its refusal reaches every process
def check():
    raise UserError("data.source: differs on process %d" % rank)
try:
    runtime.agree_check(check)
except UserError as e:
    print(f"checked by process 0: {e}")

# any other failure there too: as is on process 0, named on the others
def broken():
    raise KeyError("charts")
try:
    runtime.agree_check(broken)
except (KeyError, UserError) as e:
    print(f"broken on process 0: {type(e).__name__} {e}")
"""


@pytest.mark.distributed
def test_without_jaxs_preemption_service_the_processes_vote_on_where_to_stop():
    """Two processes joined by jax.distributed with JAX's preemption service
    off: a stop requested on process 1 alone is put to a vote at each step
    boundary, and both stop at the same one, `StopVotes.LAG` boundaries
    after the request, without waiting for each other in between. And a text
    too long for `agree_text`, or a refusal of a check process 0 makes for
    all (`agree_check`), or any other failure of that check, stops both, not
    process 0 alone."""
    from jaxlora.runtime import StopVotes

    port = _free_port()
    processes = [subprocess.Popen(
        [sys.executable, "-c", VOTES_SCRIPT, str(rank)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(rank), JAX_ENABLE_PREEMPTION_SERVICE="false",
                 XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2")))
        for rank in range(2)]
    outputs = [p.communicate(timeout=120) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
        assert f"stop at {3 + StopVotes.LAG}" in out, out
        assert "refused everywhere: True" in out, out
        assert "checked by process 0: data.source: differs on process 0" in out, out
    assert "broken on process 0: KeyError 'charts'" in outputs[0][0], outputs[0][0]
    assert "broken on process 0: UserError process 0: KeyError: 'charts'" in outputs[1][0], \
        outputs[1][0]


SERVICE_SCRIPT = """
import os
import signal
import jax
from jaxlora import runtime
from runner.signals import StopSignals

with StopSignals() as stop:  # as the CLI does: its handlers first, then the run joins
    assert runtime.initialize(runtime.RuntimeConfig(distributed="on")) is False  # one process
    agreement = runtime.agreed_stop(stop.requested)
    assert agreement is not None and agreement.notify, agreement
    stop.join_processes(agreement.at_boundary, agreement.notify)
    assert not stop.at_step_boundary()
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's service takes it, not Python's handler
    import time
    for boundary in range(1, 200):
        if stop.at_step_boundary():
            print(f"stopped at boundary {boundary} requested here: {stop.requested()}")
            break
        time.sleep(0.05)
"""


@pytest.mark.distributed
def test_one_process_that_joined_jax_distributed_still_stops_on_sigterm():
    """`runtime.distributed = "on"` with one process: `jax.distributed.initialize()`
    hands SIGTERM to JAX's preemption service, whose C++ handler replaces
    Python's, so the run must ask the service at each step boundary or a
    SIGTERM would be lost."""
    port = _free_port()
    done = subprocess.run(
        [sys.executable, "-c", SERVICE_SCRIPT], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="1",
                 JAX_PROCESS_ID="0"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped at boundary" in done.stdout and "requested here: False" in done.stdout


def test_a_cloud_tpu_vms_workers_come_from_its_metadata_server(tmp_path):
    """`runtime.distributed = "auto"` on a TPU VM pod: the hosts' shells carry
    no TPU variables, so the slice's workers are read from the metadata
    server, and only on a machine with Google's TPU chips."""
    import http.server
    import threading

    from jaxlora import runtime

    asked = []

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            asked.append((self.path, self.headers.get("Metadata-Flavor")))
            body = b"10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/computeMetadata/v1/instance/attributes/" \
          "worker-network-endpoints"
    try:
        pci = tmp_path / "pci"
        (pci / "0000:00:04.0").mkdir(parents=True)
        (pci / "0000:00:04.0" / "vendor").write_text("0x1af4\n")  # a virtio device
        assert runtime.tpu_pod_workers(str(pci), url) == 0 and asked == []
        (pci / "0000:00:05.0").mkdir()
        (pci / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")  # a TPU chip
        assert runtime.tpu_pod_workers(str(pci), url) == 4
        assert asked == [("/computeMetadata/v1/instance/attributes/worker-network-endpoints",
                          "Google")]
    finally:
        server.shutdown()
    assert runtime.tpu_pod_workers(str(pci), url, timeout=1.0) == 0  # no server: not a pod


@pytest.mark.distributed
def test_a_run_folder_in_use_stops_every_process_not_process_0_alone(tmp_path):
    """Process 0 takes the run folder's lock for all of them; when another
    run holds it (here this test), every process stops with the message
    naming its holder, exit 2, instead of the others going on alone."""
    from runner.run_folder import lock_run

    workdir = _lm_workdir(tmp_path, lean=True)
    folder = workdir / "runs" / "lm" / "20260101-000000"
    folder.mkdir(parents=True)
    (folder / "recipe.toml").write_text((workdir / "lm.toml").read_text())
    (folder / "manifest.json").write_text('{"status": "interrupted"}')
    with lock_run(folder):
        port = _free_port()
        processes = [subprocess.Popen(
            [sys.executable, "-m", "runner.cli", "run", str(folder)], cwd=workdir,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank)))
            for rank in range(2)]
        outputs = [p.communicate(timeout=120) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 2, err[-3000:]
        assert f"in use by pid {os.getpid()}" in " ".join(err.split()), err[-3000:]
        assert "Traceback" not in out + err
    assert json.loads((folder / "manifest.json").read_text()) == {"status": "interrupted"}


FULL_DISK_ON_PROCESS_0 = """
import errno, os, pathlib, sys
from runner.cli import main

FULL = os.environ["FULL_FILE"]

opened = pathlib.Path.open


class Full:
    # a file on a disk that has just filled up: every write fails
    def __init__(self, f, path):
        self.f, self.path = f, path

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def open_(self, *args, **kwargs):
    f = opened(self, *args, **kwargs)
    return Full(f, self) if self.name == FULL else f


pathlib.Path.open = open_
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("written, name", [("metrics.jsonl", "metrics.jsonl"),
                                           ("report.md.tmp", "report.md")])
def test_a_write_only_process_0_makes_fails_and_every_process_stops(tmp_path, written, name):
    """A file process 0 alone writes cannot be written (a full disk): both
    processes stop with the message naming it, exit 2, instead of process 1
    going on alone. metrics.jsonl: at the first record, not in the next step;
    report.md (written through report.md.tmp): the last write of the run, after
    which process 1 would have ended as if the run had finished."""
    workdir = _lm_workdir(tmp_path, lean=True)
    port = _free_port()
    processes = []
    for rank in range(2):
        command = ([sys.executable, "-c", FULL_DISK_ON_PROCESS_0] if rank == 0
                   else [sys.executable, "-m", "runner.cli"])
        processes.append(subprocess.Popen(
            [*command, "run", "lm.toml", "--set", "runtime.fsdp=2"], cwd=workdir,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank),
                     XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"),
                     HF_DATASETS_CACHE=str(workdir / "datasets-cache"), FULL_FILE=written)))
    processes, outputs = _two_processes([workdir, workdir], processes)
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 2, err[-3000:]
        message = " ".join(err.split())
        assert f"{name}: cannot write: No space left on device" in message, err[-3000:]
        assert "Traceback" not in out + err
    [run] = list((workdir / "runs" / "lm").iterdir())
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    if name == "report.md":  # everything before it stays; resuming writes it
        assert not list(run.glob("report.md*"))
        assert json.loads((run / "eval.json").read_text())["after"]["examples"] > 0
