"""checkpoint.keep_best: the checkpoints of the lowest validation losses are kept beside the latest ones,
through later, worse evaluations and across resumes, and every script takes them with --step best."""

import json

import jax
import numpy as np
import pytest

from lightjax.convert.export import load_exported
from lightjax.convert.hf import load_hf_checkpoint
from lightjax.train.checkpoint import Checkpointer, CheckpointError, restore_params
from lightjax.train.run import build_run
from lightjax.train.trainer import train
from tests.helpers import SHAKESPEARE, run_script
from tests.runs import run_config

pytestmark = pytest.mark.shakespeare


def test_keeps_the_latest_and_the_best_through_worse_evaluations_and_a_resume(tmp_path):
    state = build_run(run_config(tmp_path), jax.devices()[:1]).init_state()
    ckpt = Checkpointer(tmp_path / "run", keep=2, async_save=False, keep_best=1)
    for step, val in zip(range(1, 6), [5.0, 1.0, 4.0, 3.0, 2.0], strict=True):
        ckpt.save(step, state, {"config": {}}, val_loss=val)
    assert ckpt.steps() == [2, 4, 5]  # the best (val 1.0) and the last two
    ckpt.close()
    resumed = Checkpointer(tmp_path / "run", keep=2, async_save=False, keep_best=1)  # a new process
    resumed.save(6, state, {"config": {}})  # no evaluation
    resumed.save(7, state, {"config": {}}, val_loss=3.5)
    assert resumed.steps() == [2, 6, 7] and resumed.best_step() == 2
    assert [resumed.choose(w) for w in ("best", "latest", None, "6", 7)] == [2, 7, 7, 6, 7]
    resumed.close()
    two = Checkpointer(tmp_path / "run", keep=1, async_save=False, keep_best=2)
    two.save(8, state, {"config": {}}, val_loss=1.5)
    assert two.steps() == [2, 8]  # the two best (1.0, 1.5), 8 also the latest
    two.save(9, state, {"config": {}})
    assert two.steps() == [2, 8, 9]
    two.close()


def test_choosing_a_checkpoint_that_is_not_there_names_what_is(tmp_path):
    state = build_run(run_config(tmp_path), jax.devices()[:1]).init_state()
    ckpt = Checkpointer(tmp_path / "run", keep=3, async_save=False)
    with pytest.raises(CheckpointError, match="No complete checkpoint under"):
        ckpt.choose("latest")
    ckpt.save(4, state, {"config": {}})
    with pytest.raises(CheckpointError, match=r"saved with a validation loss \(there are \[4\]\).*eval_every=0"):
        ckpt.choose("best")
    with pytest.raises(CheckpointError, match=r"No checkpoint for step 3 .*there are \[4\]"):
        ckpt.choose(3)
    with pytest.raises(ValueError, match="step='last' is not 'latest', 'best' or a step number"):
        ckpt.choose("last")
    ckpt.close()


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A 2-layer model that memorises 640 bytes of text: its validation loss is lowest early and rises
    after. Trained in two invocations (stopped at step 20, resumed to 30), evaluated every 5 steps,
    saved only at the ends and on new bests, keeping the latest 1 and the best 1. Returns (workdir,
    {step: val_loss})."""
    tmp = tmp_path_factory.mktemp("overfit")
    (tmp / "text.txt").write_text(SHAKESPEARE.read_text()[:800])
    c = run_config(tmp, max_steps=30, save_every=0, eval_every=5)
    c.data.source, c.data.local_path, c.data.val_fraction, c.data.tokenizer = f"text:{tmp}/text.txt", "", 0.2, "byte"
    c.model.n_layer, c.model.n_embd, c.model.vocab_size = 2, 128, 257
    c.optim.lr, c.optim.min_lr = 2e-2, 0.0
    c.checkpoint.keep, c.checkpoint.keep_best = 1, 1
    with c.unlocked():
        c.train.stop_after = 20
    train(c, tmp / "run")
    c.train.stop_after = 0
    train(c, tmp / "run")
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return tmp / "run", {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def _best(val):
    return min(val, key=val.get)


def test_the_best_evaluation_is_saved_and_kept_after_worse_ones_and_a_resume(overfit):
    workdir, val = overfit
    best = _best(val)
    assert best < 20 and val[30] > val[best] + 0.1, val  # the premise: it overfits after its best
    ckpt = Checkpointer(workdir, async_save=False)
    assert ckpt.steps() == [best, 30]  # saved when evaluated (save_every=0), kept through the resume
    assert ckpt.best_step() == best
    ckpt.close()


def test_evaluate_step_best(overfit):
    workdir, val = overfit
    out = run_script("evaluate.py", f"--workdir={workdir}", "--step=best")
    assert out.returncode == 0, out.stderr
    step, loss = out.stdout.split(" | ")[0], float(out.stdout.split("loss ")[1].split()[0])
    assert step == f"step {_best(val)}" and loss == pytest.approx(val[_best(val)], abs=1e-4)


def test_export_step_best(overfit, tmp_path):
    workdir, val = overfit
    out = run_script("export.py", f"--workdir={workdir}", "--step=best", f"--out={tmp_path / 'best'}")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "best" / "model_config.json").read_text())["step"] == _best(val)
    _, params = load_exported(tmp_path / "best")
    _, want, _ = restore_params(workdir, "best")
    jax.tree.map(np.testing.assert_array_equal, params, want)


def test_convert_hf_export_step_best(overfit, tmp_path):
    workdir, val = overfit
    out = run_script("convert_hf.py", "export", f"--workdir={workdir}", "--step=best", f"--out={tmp_path / 'hf'}")
    assert out.returncode == 0, out.stderr
    _, params = load_hf_checkpoint(tmp_path / "hf")
    _, best, _ = restore_params(workdir, _best(val))
    _, latest, _ = restore_params(workdir, 30)
    np.testing.assert_array_equal(params["wte"]["embedding"], best["wte"]["embedding"])
    assert not np.array_equal(params["wte"]["embedding"], latest["wte"]["embedding"])


def test_generate_step_best(overfit):
    workdir, val = overfit
    out = run_script("generate.py", f"--workdir={workdir}", "--step=best", "--prompt=ROMEO:", "--max_new_tokens=8",
                     "--temperature=0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"# {workdir} step {_best(val)}"
    out = run_script("generate.py", f"--workdir={workdir}", "--step=bst", "--prompt=x")
    assert (out.returncode, out.stderr) == (2, "generate: flag --step=bst: --step must be 'latest', 'best' or a step "
                                               "number\n")
