"""Multi-process jobs on one machine (processes of simulated CPU devices joined by jax.distributed, as
the hosts of a pod are): the same losses as one process, elastic resume across process counts, data
prepared once, a gs:// workdir, a dead process stopping the job, SIGTERM, the local launcher."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from lightjax.cloud.launch import free_port
from tests.fake_gcs import fake_gcs
from tests.helpers import ROOT, SHAKESPEARE, script_env

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy

# The multi-host example of docs/tpu.md, shortened to 8 steps, evaluated at the end.
SMOKE = ["--config", "configs/smoke.py", f"--config.data.local_path={SHAKESPEARE}", "--config.train.max_steps=8",
         "--config.optim.warmup_steps=2", "--config.train.log_every=1", "--config.train.eval_every=8",
         "--config.train.eval_batches=2", "--config.logging.progress=False", "--config.logging.tensorboard=False"]
FSDP8 = ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.mesh.tensor=1"]
MESH222 = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
ONE_DEVICE = ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]


def run(workdir, processes, devices, *flags, timeout=300):
    """scripts/train.py as `processes` joined processes of `devices` CPU devices each (through
    scripts/launch.py when several); returns the combined output, failing on a non-zero exit."""
    train = ["scripts/train.py", f"--workdir={workdir}", *SMOKE, *flags]
    if processes == 1:
        cmd = [sys.executable, *train, f"--host_devices={devices}"]
    else:
        cmd = [sys.executable, "scripts/launch.py", f"--processes={processes}", f"--devices_per_process={devices}",
               "--", *train]
    out = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def rows(workdir):
    lines = epath.Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(workdir):
    """(training loss per step, validation loss at step 8); fails if a step's row appears twice."""
    all_rows = rows(workdir)
    train = [r["step"] for r in all_rows if "loss" in r]
    assert train == sorted(set(train)), train
    return ([r["loss"] for r in all_rows if "loss" in r], [r["val_loss"] for r in all_rows if r.get("step") == 8
                                                            and "val_loss" in r])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run on one device."""
    workdir = tmp_path_factory.mktemp("one-device") / "run"
    run(workdir, 1, 1, *ONE_DEVICE, f"--config.data.data_dir={workdir.parent / 'tfds'}")
    got = losses(workdir)
    assert len(got[0]) == 8 and len(got[1]) == 1
    return got


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory):
    """Two processes of 4 devices, FSDP over all 8, stopped after step 4, on a fresh data_dir."""
    root = tmp_path_factory.mktemp("two-processes")
    out = run(root / "run", 2, 4, *FSDP8, f"--config.data.data_dir={root / 'tfds'}", "--config.train.stop_after=4")
    return root, out


def assert_same(got, want):
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=0)


def test_one_process_of_8_devices_matches_one_device(reference, tmp_path):
    run(tmp_path / "run", 1, 8, *FSDP8, f"--config.data.data_dir={tmp_path / 'tfds'}")
    assert_same(losses(tmp_path / "run"), reference)


def test_two_processes_prepare_the_data_once(stopped_at_4):
    root, out = stopped_at_4
    assert out.count("Prepared Tiny Shakespeare (TFDS, ArrayRecord)") == 1
    assert out.count("Prepared 1,003,854 train tokens") == 1 and out.count("Prepared 55,770 validation tokens") == 1
    assert out.count("[0] step      4 | loss") == 1 and "[1] step" not in out  # process 0 alone prints
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["4"]


@pytest.mark.parametrize("processes,devices,mesh", [(2, 4, FSDP8), (1, 8, FSDP8), (1, 1, ONE_DEVICE),
                                                    (4, 2, FSDP8)])
def test_resume_on_any_process_count_continues_the_same_run(stopped_at_4, reference, tmp_path, processes,
                                                            devices, mesh):
    root, _ = stopped_at_4
    shutil.copytree(root / "run", tmp_path / "run")
    out = run(tmp_path / "run", processes, devices, *mesh, f"--config.data.data_dir={root / 'tfds'}")
    assert f"(step 4) on {processes} process(es)" in out and out.count("Resumed from") == 1  # process 0 alone
    assert_same(losses(tmp_path / "run"), reference)


def test_two_processes_on_a_3d_mesh_with_a_gcs_workdir(reference, tmp_path, monkeypatch):
    import gcsfs

    with fake_gcs() as variables:
        for k, v in variables.items():
            monkeypatch.setenv(k, v)
        gcsfs.GCSFileSystem.clear_instance_cache()
        run("gs://bucket/run", 2, 4, *MESH222, f"--config.data.data_dir={tmp_path / 'tfds'}")
        assert_same(losses("gs://bucket/run"), reference)
        run_dir = epath.Path("gs://bucket/run")
        names = {p.name for p in run_dir.iterdir()}
        assert {"config.json", "metrics.jsonl", "metrics.csv", "loss.png", "tokenizer", "data", "checkpoints"} <= names
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["8"]
    assert not (ROOT / "gs:").exists()


def _start(workdir, index, port, *flags):
    cmd = [sys.executable, "scripts/train.py", f"--workdir={workdir}", *SMOKE, *FSDP8, *flags,
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={index}"]
    env = script_env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_rows(workdir, n, procs, timeout=180):
    deadline = time.time() + timeout
    path = workdir / "metrics.jsonl"
    while time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.stdout.read() for p in procs]
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError("no progress")


def test_kill_9_of_one_process_stops_the_other(tmp_path):
    port = free_port()
    flags = ["--config.train.max_steps=100000", f"--config.data.data_dir={tmp_path / 'tfds'}",
             "--heartbeat_timeout_s=10"]  # the default 60 s would only make the test wait longer
    procs = [_start(tmp_path / "run", i, port, *flags) for i in (0, 1)]
    try:
        _wait_for_rows(tmp_path / "run", 2, procs)
        procs[1].kill()
        killed = time.time()
        out, _ = procs[0].communicate(timeout=150)
        waited = time.time() - killed
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0 and waited < 40, (procs[0].returncode, waited)
    assert "another task died" in out  # JAX's coordination service names what happened


def test_sigterm_to_the_job_saves_once_and_exits_zero(tmp_path):
    cmd = [sys.executable, "scripts/launch.py", "--processes=2", "--devices_per_process=4", "--", "scripts/train.py",
           f"--workdir={tmp_path / 'run'}", *SMOKE, *FSDP8, "--config.train.max_steps=100000",
           "--config.checkpoint.save_every=0", f"--config.data.data_dir={tmp_path / 'tfds'}"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    _wait_for_rows(tmp_path / "run", 3, [launcher])
    launcher.send_signal(signal.SIGTERM)  # passed on to both processes, as a pod's preemption notice
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, out[-3000:]
    steps = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0] >= 3
    assert f"saved step {steps[0]} to " in out
    assert max(r["step"] for r in rows(tmp_path / "run")) == steps[0]


def test_launcher_stops_the_others_when_one_fails():
    child = ("import os, sys, time; i = int([a for a in sys.argv if a.startswith('--process_id=')][0].split('=')[1]); "
             "print('started', i, os.getpid(), flush=True); time.sleep(1 if i == 1 else 600); sys.exit(3)")
    start = time.time()
    out = subprocess.run([sys.executable, "scripts/launch.py", "--processes=3", "--devices_per_process=0", "--",
                          "-c", child], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and time.time() - start < 60
    started = [line.split() for line in out.stdout.splitlines() if " started " in line]
    assert sorted(f"{w[0]} {w[2]}" for w in started) == ["[0] 0", "[1] 1", "[2] 2"]
    assert out.stderr.strip().splitlines()[-1] == "launch: process 1 exited with status 3; stopped the other processes."
    for words in started:  # the sleeping processes are gone, not left running
        with pytest.raises(ProcessLookupError):
            os.kill(int(words[3]), 0)


def _skypilot_env(rank, nodes="2", ips="127.0.0.1\n127.0.0.1", port=None):
    """The environment SkyPilot gives node `rank` of a job (both nodes on this machine, 4 devices each)."""
    env = script_env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env.update(SKYPILOT_NODE_RANK=str(rank), SKYPILOT_NUM_NODES=nodes, SKYPILOT_NODE_IPS=ips,
               SKYPILOT_NUM_GPUS_PER_NODE="0", LIGHTJAX_COORDINATOR_PORT=str(port or free_port()))
    return env


def test_two_processes_join_from_a_skypilot_node_environment(reference, tmp_path):
    """scripts/train.py --distributed on the two nodes of a SkyPilot job (its node rank, count and IPs in
    the environment, no coordinator flags): one job, the losses of one process."""
    port = free_port()
    cmd = [sys.executable, "scripts/train.py", f"--workdir={tmp_path / 'run'}", *SMOKE, *FSDP8, "--distributed",
           f"--config.data.data_dir={tmp_path / 'tfds'}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_skypilot_env(rank, port=port), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    assert_same(losses(tmp_path / "run"), reference)


def test_a_malformed_skypilot_environment_is_one_line(tmp_path):
    cmd = [sys.executable, "scripts/train.py", f"--workdir={tmp_path / 'run'}", *SMOKE, "--distributed"]
    out = subprocess.run(cmd, cwd=ROOT, env=_skypilot_env(2, ips="10.0.0.1\n10.0.0.2"), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train: The SkyPilot node environment is not one of a job: SKYPILOT_NODE_RANK='2', "
                           "SKYPILOT_NUM_NODES='2'"), last
