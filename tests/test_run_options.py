"""Run options the docs promise: where a run stops (max_tokens, max_time_s), where it starts
(checkpoint.resume never / a run / one of its checkpoints, init_from), and the z-loss."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lightjax.train.checkpoint import CheckpointError
from lightjax.train.export import export_params
from lightjax.train.loss import cross_entropy, make_loss_fn
from lightjax.train.run import build_run
from lightjax.train.step import synthetic_batch
from lightjax.train.trainer import train
from tests.helpers import tiny_run_config
from tests.runs import losses, run_config

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy


def test_max_tokens_and_max_time_end_the_run(tmp_path):
    c = run_config(tmp_path, max_steps=12, save_every=0)
    c.train.max_tokens = 3 * 8 * 32  # three steps of 8 x 32 tokens
    assert train(c, tmp_path / "tokens")["step"] == 3
    c = run_config(tmp_path, max_steps=12, save_every=0)
    c.train.max_time_s = 1e-6  # reached after the first step
    summary = train(c, tmp_path / "time")
    assert summary["step"] == 1 and sorted(losses(tmp_path / "time")) == [1]
    assert (tmp_path / "time" / "checkpoints" / "1").is_dir()  # the end is saved


def test_resume_never_a_run_or_one_of_its_checkpoints(uninterrupted, tmp_path, capsys):
    full = losses(uninterrupted)
    c = run_config(tmp_path, stop_after=8)  # the same schedule (max_steps 12), stopped at 8
    c.checkpoint.resume = str(uninterrupted / "checkpoints" / "6")  # another run's step 6
    train(c, tmp_path / "from6")
    assert f"Resumed from {(uninterrupted / 'checkpoints' / '6').absolute()} (step 6)" in capsys.readouterr().out
    assert losses(tmp_path / "from6") == {s: full[s] for s in (7, 8)}
    c = run_config(tmp_path, max_steps=12, save_every=0)
    c.checkpoint.resume = str(uninterrupted)  # its latest: 12, nothing left to train
    assert train(c, tmp_path / "from12")["step"] == 12
    assert "(step 12)" in capsys.readouterr().out
    c = run_config(tmp_path, max_steps=2)
    c.checkpoint.resume = "never"  # a fresh start: refused where a run is, before anything is written
    before = {p: p.read_bytes() for p in (tmp_path / "from6").rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"resume='never', but .*from6 already holds a run \(its last checkpoint "
                                              r"is step 8\)"):
        train(c, tmp_path / "from6")
    assert {p: p.read_bytes() for p in (tmp_path / "from6").rglob("*") if p.is_file()} == before
    train(c, tmp_path / "fresh")
    assert "Resumed" not in capsys.readouterr().out
    assert losses(tmp_path / "fresh") == {1: full[1], 2: full[2]}
    for resume, message in [(tmp_path / "nowhere", "no checkpoints/ under"),
                            (uninterrupted / "checkpoints" / "5", r"no complete checkpoint 5 \(there are \[6, 12\]\)")]:
        c.checkpoint.resume = str(resume)
        with pytest.raises(CheckpointError, match=message):
            train(c, tmp_path / "bad")


def test_init_from_starts_the_optimizer_fresh_and_a_resume_restores_the_run(uninterrupted, tmp_path, capsys):
    export = export_params(uninterrupted, tmp_path / "export")
    c = run_config(tmp_path, max_steps=2, save_every=1)
    c.train.init_from = str(export)
    train(c, tmp_path / "run")
    assert "Starting from the weights in" in capsys.readouterr().out
    state = ocp.StandardCheckpointer().restore((tmp_path / "run" / "checkpoints" / "1" / "state").absolute())
    counts = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) == 0]
    assert counts and all(int(x) == 1 for x in counts)  # one update since the weights: a fresh optimizer
    c.train.max_steps = 3
    train(c, tmp_path / "run")
    out = capsys.readouterr().out
    assert "Resumed from" in out and "(step 2)" in out and "Starting from the weights" not in out


def test_z_loss_adds_the_squared_log_partition_function():
    c = tiny_run_config()
    training = build_run(c, jax.devices()[:1])
    params = training.init_state().params
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(np.random.default_rng(0), 4, 16, 96).items()}
    rng = jax.random.PRNGKey(0)
    plain, (nll, count) = make_loss_fn(training.model)(params, batch, rng)
    with_z, (nll_z, _) = make_loss_fn(training.model, z_loss=1e-2)(params, batch, rng)
    logits = training.model.apply({"params": params}, batch["tokens"][:, :-1])
    _, lse = cross_entropy(logits, batch["tokens"][:, 1:], jnp.ones((4, 16)))
    assert float(plain) == pytest.approx(float(nll)) and float(nll_z) == pytest.approx(float(nll))  # reported: NLL
    assert float(with_z) == pytest.approx(float(nll) + 1e-2 * float(jnp.sum(lse ** 2)), rel=1e-6)
    assert float(count) == 64
