"""What survives what: damaged checkpoints, torn metrics, unwritable or full disks, a second trainer."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lightjax.runtime.files import WorkdirLock, WorkdirLocked
from lightjax.train.metrics import read_metrics
from lightjax.train.trainer import train
from tests.helpers import ROOT
from tests.runs import assert_same_run, cli_command, losses, run_config

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy


@pytest.fixture
def saved_run(uninterrupted, tmp_path):
    """A copy of the uninterrupted run (checkpoints at steps 6 and 12), for a test to damage."""
    return Path(shutil.copytree(uninterrupted, tmp_path / "run"))


def _resumes_from_6(saved_run, tmp_path, capsys, uninterrupted):
    train(run_config(tmp_path), saved_run)
    out = capsys.readouterr().out
    newest = (saved_run / "checkpoints" / "12").absolute()
    assert f"Checkpoint {newest} is unreadable or damaged" in out and "(step 6)" in out
    assert [p.name.split("-")[0] for p in (saved_run / "checkpoints_unreadable").iterdir()] == ["12"]
    assert_same_run(uninterrupted, saved_run)  # steps 7-12 trained again, as the first time
    return out


# When the corrupted array's read raises, Orbax leaves its other reads' coroutines un-awaited; Python
# reports each as it is collected, how many depending on timing: Orbax's, and expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_bits_in_array_data_fall_back(saved_run, tmp_path, capsys, uninterrupted):
    state = saved_run / "checkpoints" / "12" / "state"
    biggest = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])  # 4 KB flipped
    biggest.write_bytes(bytes(data))
    _resumes_from_6(saved_run, tmp_path, capsys, uninterrupted)


def test_array_data_that_reads_but_differs_falls_back(saved_run, tmp_path, capsys, uninterrupted):
    """Damage the storage format cannot see (one weight changed, the files well-formed): the digests
    saved with the checkpoint catch it before it trains."""
    path = (saved_run / "checkpoints" / "12" / "state").absolute()
    checkpointer = ocp.StandardCheckpointer()
    state = jax.tree.map(np.array, checkpointer.restore(path))
    state["params"]["wte"]["embedding"][3, 5] += 0.5
    checkpointer.save(path, state, force=True)
    checkpointer.wait_until_finished()
    out = _resumes_from_6(saved_run, tmp_path, capsys, uninterrupted)
    assert "the data of 1 array(s) (params/wte/embedding) differs from what was saved" in out


def test_truncated_array_data_falls_back(saved_run, tmp_path, capsys, uninterrupted):
    for p in (saved_run / "checkpoints" / "12" / "state").rglob("*"):
        if p.is_file() and p.stat().st_size > 1000:
            p.write_bytes(p.read_bytes()[:100])
    _resumes_from_6(saved_run, tmp_path, capsys, uninterrupted)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_missing_or_truncated_metadata_falls_back(saved_run, tmp_path, capsys, uninterrupted, damage):
    meta = saved_run / "checkpoints" / "12" / "meta" / "metadata"
    meta.unlink() if damage == "deleted" else meta.write_text(meta.read_text()[:40])
    _resumes_from_6(saved_run, tmp_path, capsys, uninterrupted)


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys, uninterrupted):
    workdir = tmp_path / "run"
    train(run_config(tmp_path, stop_after=6), workdir)
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 4.1')  # what a crash in the middle of a write leaves
    train(run_config(tmp_path), workdir)
    assert "dropped a partial last line" in capsys.readouterr().out
    assert_same_run(uninterrupted, workdir)


def test_damage_before_the_last_metrics_line_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON object"):
        read_metrics(tmp_path)


def test_a_second_trainer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; "
                               "from lightjax.runtime.files import WorkdirLock; "
                               f"WorkdirLock({str(workdir)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLocked, match=rf"in use by another trainer \(host \S+, pid {holder.pid}, since "):
            train(run_config(tmp_path, max_steps=2), workdir)
    finally:
        holder.kill()  # kill -9: the lock is never released by its holder
        holder.wait()
    with WorkdirLock(workdir):
        assert "Took over the lock of a trainer that stopped without releasing it" in capsys.readouterr().out
    assert (workdir / "lock").read_text() == ""  # released cleanly this time
    assert train(run_config(tmp_path, max_steps=2), workdir)["step"] == 2
    assert not list((workdir / "checkpoints").glob("*tmp*"))
    assert sorted(losses(workdir)) == [1, 2]
    assert np.isfinite(list(losses(workdir).values())).all()
    json.loads((workdir / "config.json").read_text())


def _limit_file_size(limit, cmd):
    """`cmd` run so that writes beyond `limit` bytes per file fail with EFBIG ('File too large'), as a
    quota or a full disk makes them fail, instead of killing the process (the limit and the ignored
    SIGXFSZ survive the exec; no fork of this multithreaded process is needed)."""
    setup = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", setup, *cmd]


def _train_until_a_save_fails(workdir, file_size_limit):
    """A run saved at step 2, then resumed for 400 steps under conditions where its next save (step 200)
    fails; the save after (step 400) is far enough that only a prompt check of the first stops the run."""
    common = ["--config.optim.warmup_steps=1", "--config.logging.tensorboard=False"]
    cmd, env = cli_command(workdir, "--config.train.max_steps=2", "--config.checkpoint.save_every=2", *common)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    cmd, env = cli_command(workdir, "--config.train.max_steps=400", "--config.checkpoint.save_every=200", *common)
    return subprocess.run(_limit_file_size(file_size_limit, cmd), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _stopped_in_one_line(out, workdir, cause):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stderr[-2000:]
    folder = workdir.absolute() / "checkpoints"
    assert lines[-1].startswith(f"train: Saving a checkpoint under {folder} failed: {cause}")
    assert "Traceback" not in out.stdout + out.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]  # intact, no partial save left
    assert max(losses(workdir)) < 300  # stopped soon after the failed save (tiny steps), not at the next one


def test_a_failed_save_stops_the_run_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    out = _train_until_a_save_fails(workdir, 100_000)  # the checkpoint's data file is larger
    _stopped_in_one_line(out, workdir, "File too large (errno 27)")


def test_a_read_only_checkpoint_folder_stops_the_run_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    make_read_only = ["chmod", "555", str(checkpoints)]
    if os.geteuid() == 0:  # root writes through permissions: a read-only bind mount instead
        make_read_only = ["sh", "-c", f"mount --bind {checkpoints} {checkpoints} && "
                                      f"mount -o remount,bind,ro {checkpoints}"]

    common = ["--config.optim.warmup_steps=1"]
    cmd, env = cli_command(workdir, "--config.train.max_steps=2", "--config.checkpoint.save_every=2", *common)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    if subprocess.run(make_read_only, capture_output=True).returncode:
        pytest.skip("this machine cannot make a folder read-only for root (no mount)")
    try:
        cmd, env = cli_command(workdir, "--config.train.max_steps=400", "--config.checkpoint.save_every=200", *common)
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        _stopped_in_one_line(out, workdir, "Read-only file system (errno 30)" if os.geteuid() == 0
                             else "Permission denied (errno 13)")
    finally:
        subprocess.run(["umount", str(checkpoints)] if os.geteuid() == 0 else ["chmod", "755", str(checkpoints)],
                       capture_output=True)


def test_a_failed_export_leaves_no_half_written_folder(uninterrupted, tmp_path):
    from lightjax.train.export import export_params

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    (run / "tokenizer" / "vocab.extra").symlink_to(tmp_path / "nowhere")  # copying it fails mid-export
    out = tmp_path / "export"
    with pytest.raises(OSError):
        export_params(run, out)
    assert not out.exists() and not list(tmp_path.glob(".export*"))
    (run / "tokenizer" / "vocab.extra").unlink()
    export_params(run, out)  # an earlier export
    earlier = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (run / "tokenizer" / "vocab.extra").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OSError):
        export_params(run, out)
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier  # as it was
    assert sorted(p.name for p in out.iterdir()) == ["lightjax_output.json", "model_config.json", "params", "tokenizer"]
    assert not list(tmp_path.glob(".export*"))


def test_kill_9_during_saves_evaluations_and_at_random_resumes_exactly(tmp_path):
    """scripts/fault_injection.py at a small size: 4 kills (during a save, an evaluation, at random, a
    save again) of a 60-step run that evaluates every 10 and saves every 7 steps; every resume's
    metrics equal the uninterrupted run's."""
    cmd, env = cli_command(tmp_path / "unused")
    train_args = [a for a in cmd[2:] if not a.startswith("--workdir")]
    out = subprocess.run([sys.executable, "scripts/fault_injection.py", "--kills=4", "--steps=60", "--seed=1",
                          f"--out={tmp_path / 'faults'}", "--", *train_args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "after 4 kills: metrics.jsonl (66 rows) and the final parameters equal" in out.stdout
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("PASS: 4 of 4 kills landed") and " 0 cut a save short" not in summary, summary
