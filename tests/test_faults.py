"""What survives what: damaged checkpoints, torn metrics, unwritable or full disks, a second trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lightjax.files import WorkdirLock, WorkdirLocked
from lightjax.metrics import read_metrics
from lightjax.trainer import train
from tests.test_checkpoint import assert_same_run, losses, run_config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    train(run_config(workdir), workdir / "run")
    return workdir / "run"


@pytest.fixture
def saved_run(tmp_path):
    """A run with checkpoints at steps 6 and 12."""
    workdir = tmp_path / "run"
    train(run_config(tmp_path), workdir)
    return workdir


def _resumes_from_6(saved_run, tmp_path, capsys, uninterrupted):
    train(run_config(tmp_path), saved_run)
    out = capsys.readouterr().out
    newest = (saved_run / "checkpoints" / "12").absolute()
    assert f"Checkpoint {newest} is unreadable or damaged" in out and "(step 6)" in out
    assert [p.name.split("-")[0] for p in (saved_run / "checkpoints_unreadable").iterdir()] == ["12"]
    assert_same_run(uninterrupted, saved_run)  # steps 7-12 trained again, as the first time
    return out


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
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lightjax.files import WorkdirLock; "
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
