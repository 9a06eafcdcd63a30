"""scripts/tpu_vm.py against a stand-in gcloud (tests/fake_gcloud/gcloud) that records its calls and,
where asked, runs the workers' commands in local folders."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lightjax.cloud.tpu_vm import TpuVmError, accelerator
from tests.helpers import ROOT, SHAKESPEARE, script_env

FAKE = ROOT / "tests" / "fake_gcloud"
ZONE = "us-west4-a"


def tpu_vm(state: Path, *args: str, gcloud: bool = True, **env: str) -> subprocess.CompletedProcess:
    e = script_env()
    e.update(FAKE_GCLOUD_DIR=str(state), FAKE_GCLOUD_PYTHON=sys.executable, TMPDIR=str(state.parent), **env)
    if gcloud:
        e["PATH"] = f"{FAKE}{os.pathsep}{e['PATH']}"
    else:
        e["PATH"] = os.pathsep.join(p for p in e["PATH"].split(os.pathsep) if not (Path(p) / "gcloud").exists())
    return subprocess.run([sys.executable, "scripts/tpu_vm.py", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=600)


def calls(state: Path) -> list[list[str]]:
    return [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]


def tpu_calls(state: Path) -> list[list[str]]:
    return [c for c in calls(state) if c[:2] != ["auth", "list"]]


def test_accelerators_have_their_hosts():
    assert (accelerator("v5litepod-8").chips, accelerator("v5litepod-8").hosts) == (8, 1)
    assert (accelerator("v5litepod-16").chips, accelerator("v5litepod-16").hosts) == (16, 4)
    assert (accelerator("v4-8").chips, accelerator("v4-8").hosts) == (4, 1)
    assert (accelerator("v4-32").chips, accelerator("v4-32").hosts) == (16, 4)
    assert accelerator("v6e-256").hosts == 64
    with pytest.raises(TpuVmError, match=r"(?s)'v5e-16' is not a Cloud TPU accelerator.*v5litepod-16 \(16 chips, 4"):
        accelerator("v5e-16")
    with pytest.raises(TpuVmError, match="v5litepod comes in other sizes"):
        accelerator("v5litepod-12")


def test_single_host_create_run_delete(tmp_path):
    """v5litepod-8 is one VM: the checkout is copied there, installed, and the train command runs in it."""
    state, workdir = tmp_path / "gcloud", tmp_path / "run"
    made = tpu_vm(state, "create", "--name=t1", f"--zone={ZONE}", "--accelerator=v5litepod-8", "--spot")
    assert made.returncode == 0, made.stderr
    assert tpu_calls(state) == [["compute", "tpus", "tpu-vm", "create", "t1", f"--zone={ZONE}",
                                 "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot"]]
    done = tpu_vm(state, "run", "--name=t1", f"--zone={ZONE}", f"--workdir={workdir}", "--",
                  "scripts/train.py", "--config", "configs/smoke.py", "--config.train.max_steps=4",
                  "--config.optim.warmup_steps=1",
                  f"--config.data.local_path={SHAKESPEARE}", f"--config.data.data_dir={tmp_path / 'tfds'}",
                  FAKE_GCLOUD_EXEC="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done: 4 steps" in done.stdout  # worker 0's output streamed
    assert (workdir / "checkpoints" / "4").is_dir()
    assert (state / "workers" / "t1" / "0" / "lightjax" / "lightjax" / "cloud" / "tpu_vm.py").is_file()  # the checkout
    issued = tpu_calls(state)[1:]
    assert [c[3] for c in issued] == ["describe", "scp", "ssh", "ssh"]
    assert issued[1][-1] == "--worker=all" and issued[2][-2] == "--worker=all"
    assert "pip install -q -e '.[tpu]'" in issued[2][-1]
    assert issued[3][-2] == "--worker=0" and "python3 scripts/train.py --config configs/smoke.py" in issued[3][-1]
    assert tpu_vm(state, "delete", "--name=t1", f"--zone={ZONE}").returncode == 0
    assert tpu_calls(state)[-1] == ["compute", "tpus", "tpu-vm", "delete", "t1", f"--zone={ZONE}", "--quiet"]
    listed = tpu_vm(state, "list", f"--zone={ZONE}")
    assert listed.returncode == 0 and "t1" not in listed.stdout


def multi_host_args(workdir="gs://bucket/run"):
    return ["run", "--name=pod", f"--zone={ZONE}", "--accelerator=v5litepod-16", f"--workdir={workdir}", "--",
            "scripts/train.py", "--config", "configs/baseline.py", "--distributed"]


def test_multi_host_run_issues_what_dry_run_prints(tmp_path):
    state = tmp_path / "gcloud"
    assert tpu_vm(state, "create", "--name=pod", f"--zone={ZONE}", "--accelerator=v5litepod-16").returncode == 0
    before = len(calls(state))
    dry = tpu_vm(state, "run", "--dry_run", *multi_host_args()[1:])
    assert dry.returncode == 0, dry.stderr
    assert len(calls(state)) == before  # a dry run calls nothing
    printed = [shlex.split(line) for line in dry.stdout.splitlines()]
    done = tpu_vm(state, *multi_host_args())
    assert done.returncode == 0, done.stderr
    issued = calls(state)[before:]
    issued = [c for c in issued if c[:2] != ["auth", "list"]]
    assert sorted(issued) == sorted(c[1:] for c in printed)  # the same commands (the 4 starts in any order)
    starts = [c for c in issued if c[3] == "ssh" and c[-2] != "--worker=all"]
    assert sorted(c[-2] for c in starts) == [f"--worker={w}" for w in range(4)]
    assert all(c[-1].endswith("--distributed --workdir=gs://bucket/run") for c in starts)
    job = f"ran: {starts[0][-1].removeprefix('--command=')}"
    assert f"worker 0 {job}" in done.stdout and f"worker 1 {job}" not in done.stdout  # only worker 0 streams


def test_one_failing_worker_fails_the_job(tmp_path):
    state = tmp_path / "gcloud"
    assert tpu_vm(state, "create", "--name=pod", f"--zone={ZONE}", "--accelerator=v5litepod-16").returncode == 0
    done = tpu_vm(state, *multi_host_args(), FAKE_GCLOUD_FAIL_WORKER="2")
    assert done.returncode == 1
    assert "[worker 2] RuntimeError: worker lost its TPU" in done.stderr
    assert "worker 2 exited with status 1" in done.stderr and "failed on worker(s) 2" in done.stderr


def test_detached_job_is_followed_to_its_exit_status(tmp_path):
    state = tmp_path / "gcloud"
    assert tpu_vm(state, "create", "--name=t2", f"--zone={ZONE}", "--accelerator=v5litepod-4").returncode == 0
    job = ["python3", "-c", "import sys, time; print('hello from the job', flush=True); time.sleep(2); sys.exit(3)"]
    started = tpu_vm(state, "run", "--name=t2", f"--zone={ZONE}", "--detach", "--", *job, FAKE_GCLOUD_EXEC="1")
    assert started.returncode == 0, started.stderr
    assert "Follow it: python scripts/tpu_vm.py logs --name t2" in started.stdout
    followed = tpu_vm(state, "logs", "--name=t2", f"--zone={ZONE}", FAKE_GCLOUD_EXEC="1")
    assert "hello from the job" in followed.stdout
    assert followed.returncode == 3


@pytest.mark.parametrize(("args", "env", "gcloud", "message"), [
    (["list", f"--zone={ZONE}"], {}, False, "gcloud is not on PATH: install the Google Cloud CLI"),
    (["list", f"--zone={ZONE}"], {"FAKE_GCLOUD_LOGGED_OUT": "1"}, True, "no active account: run gcloud auth login"),
    (["create", "--name=x", f"--zone={ZONE}", "--accelerator=v5e-8"], {}, True, "known ones:\n  v4-N: v4-8 (4 chips"),
    (multi_host_args(workdir="runs/local"), {}, True, "must share the workdir: give --workdir=gs://"),
    (multi_host_args()[:-1], {}, True, "add --distributed"),
    (["run", "--name=gone", f"--zone={ZONE}", "--", "scripts/train.py"], {}, True, "NOT_FOUND: gone"),
    (["run", "--name=gone", f"--zone={ZONE}", "--dry_run", "--", "scripts/train.py"], {}, True,
     "--dry_run cannot ask gcloud for the accelerator type of gone (--accelerator)"),
])
def test_errors_are_one_line(tmp_path, args, env, gcloud, message):
    done = tpu_vm(tmp_path / "gcloud", *args, gcloud=gcloud, **env)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("verb", [
    ["create", "--name=pod", f"--zone={ZONE}", "--accelerator=v4-32", "--version=tpu-ubuntu2204-base"],
    ["list", f"--zone={ZONE}", "--project=p1"],
    ["delete", "--name=pod", f"--zone={ZONE}"],
])
def test_dry_run_prints_what_each_verb_issues(tmp_path, verb):
    state = tmp_path / "gcloud"
    if verb[0] == "delete":
        assert tpu_vm(state, "create", "--name=pod", f"--zone={ZONE}", "--accelerator=v4-32").returncode == 0
    before = len(calls(state)) if state.exists() else 0
    dry = tpu_vm(state, *verb, "--dry_run")
    assert dry.returncode == 0, dry.stderr
    assert (len(calls(state)) if state.exists() else 0) == before
    done = tpu_vm(state, *verb)
    assert done.returncode == 0, done.stderr
    assert [["gcloud", *c] for c in tpu_calls(state)[-1:]] == [shlex.split(line) for line in dry.stdout.splitlines()]


def test_git_ref_is_cloned_instead_of_copying(tmp_path):
    dry = tpu_vm(tmp_path / "gcloud", "run", "--name=t3", f"--zone={ZONE}", "--accelerator=v5litepod-8",
                 "--git_ref=v1.2", "--repo=https://example.com/lightjax.git", "--dry_run", "--", "scripts/train.py")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert len(lines) == 2 and "scp" not in dry.stdout
    clone = "git clone -q https://example.com/lightjax.git ~/lightjax && cd ~/lightjax && git checkout -q v1.2"
    assert clone in lines[0]
    assert "--worker=0" in lines[1] and "python3 scripts/train.py" in lines[1]
