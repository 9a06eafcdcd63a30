"""A tiny training run for the checkpoint and fault tests: its config (in-process and on the command
line), its losses and final parameters, and the check that two runs are the same run."""

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests.helpers import SHAKESPEARE, script_env, tiny_run_config

TINY = dict(n_layer=1, n_embd=64, n_head=4, vocab_size=65, padding_multiple=64, block_size=32)
CLI_TINY = [f"--config.model.{k}={v}" for k, v in TINY.items()] + [
    "--config.data.seq_len=32", "--config.train.global_batch_size=8", "--config.optim.warmup_steps=2",
    "--config.train.log_every=1", "--config.train.eval_every=0", f"--config.data.local_path={SHAKESPEARE}"]


def run_config(tmp_path, max_steps=12, save_every=6, **train_kw):
    c = tiny_run_config()
    c.model.name = "baseline-tiny"
    for k, v in TINY.items():
        setattr(c.model, k, v)
    c.model.n_head, c.model.n_query_groups = 4, None
    c.data.local_path, c.data.data_dir, c.data.seq_len = str(SHAKESPEARE), str(tmp_path / "tfds"), 32
    c.train.max_steps, c.train.log_every, c.train.eval_every = max_steps, 1, 0
    c.checkpoint.save_every = save_every
    c.mesh.data = -1
    for k, v in train_kw.items():
        setattr(c.train, k, v)
    return c


def losses(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_params(workdir):
    steps = sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())
    return ocp.StandardCheckpointer().restore(Path(workdir).absolute() / "checkpoints" / str(steps[-1]) / "state")


def assert_same_run(a, b):
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    np.testing.assert_allclose([lb[k] for k in sorted(lb)], [la[k] for k in sorted(la)], atol=1e-6, rtol=0)
    jax.tree.map(np.testing.assert_array_equal, final_params(b)["params"], final_params(a)["params"])


def cli_command(workdir, *extra):
    """(command, environment) of the tiny run through scripts/train.py, for tests that signal it."""
    return [sys.executable, "scripts/train.py", "--config", "configs/baseline.py", f"--workdir={workdir}",
            *CLI_TINY, f"--config.data.data_dir={Path(workdir).parent / 'tfds'}", *extra], script_env()


def wait_for_rows(workdir, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read() if proc.stdout else "exited")
        path = Path(workdir) / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("no progress")
