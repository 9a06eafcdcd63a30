"""Checkpoints and resumption: exact resume, kill -9, corruption, SIGTERM, another mesh, config changes."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from lightjax.convert.export import load_exported, save_exported
from lightjax.convert.hf import load_hf_checkpoint
from lightjax.model.gpt import GPT, stack_layers
from lightjax.runtime.sharding import shard_batch
from lightjax.train.checkpoint import Checkpointer, CheckpointError, _flatten, config_changes, restore_params
from lightjax.train.config import default_config
from lightjax.train.export import export_params
from lightjax.train.run import build_run
from lightjax.train.step import synthetic_batch
from lightjax.train.trainer import _StopSignal, train
from tests.helpers import ROOT, SHAKESPEARE, random_hf_model, require_hf
from tests.runs import assert_same_run, cli_command, final_params, losses, run_config, wait_for_rows

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy


def test_exact_resume(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    first = train(run_config(tmp_path, stop_after=6), workdir)
    assert first["step"] == 6 and sorted(losses(workdir)) == list(range(1, 7))
    train(run_config(tmp_path), workdir)  # the same run, resumed
    assert_same_run(uninterrupted, workdir)
    assert (workdir / "tokenizer" / "tokenizer.json").exists() and (workdir / "config.json").exists()


def test_the_best_validation_loss_is_the_runs_across_resumes(tmp_path):
    """A resumed invocation reports the best validation loss of the whole run, also when it evaluates
    nothing itself (it used to report only its own evaluations')."""
    workdir = tmp_path / "run"
    train(run_config(tmp_path, stop_after=6, eval_every=3), workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    best = min(r["val_loss"] for r in rows if "val_loss" in r)
    assert train(run_config(tmp_path, max_steps=7, eval_every=0), workdir)["best_val_loss"] == best


def test_exact_resume_with_dropout(uninterrupted, tmp_path):
    """With dropout the masks come from the state's RNG and the step: a resume that re-seeded would
    train other masks from step 7 on."""
    def with_dropout(**train_kw):
        c = run_config(tmp_path, **train_kw)
        c.model.dropout = 0.1
        return c

    train(with_dropout(), tmp_path / "full")
    train(with_dropout(stop_after=6), tmp_path / "resumed")
    train(with_dropout(), tmp_path / "resumed")
    assert_same_run(tmp_path / "full", tmp_path / "resumed")
    assert losses(tmp_path / "full")[1] != losses(uninterrupted)[1]  # dropout really on


def test_changed_model_is_refused(tmp_path):
    workdir = tmp_path / "run"
    train(run_config(tmp_path, max_steps=2, save_every=2), workdir)
    c = run_config(tmp_path, max_steps=4, save_every=2)
    c.model.n_layer = 2
    with pytest.raises(CheckpointError, match=r"model.n_layer: 1 -> 2"):
        train(c, workdir)
    c = run_config(tmp_path, max_steps=4, save_every=2)  # max_steps may change
    assert train(c, workdir)["step"] == 4


# The keys whose change makes a resumed run another experiment (model, data, optimizer, seed, batch,
# parameter dtype, loss); written out here so that a new config key is a decision, not a default.
FROZEN = {"data.source", "data.tokenizer", "data.seq_len", "data.text_field", "data.val_split", "data.val_fraction",
          "data.document_mask", "data.hf_streaming", "data.mixture_schedule",
          "train.seed", "train.global_batch_size", "train.param_dtype", "train.z_loss"}


def _changed(value):
    if value is None:
        return 1
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return [*value, "x"]


def test_every_frozen_key_is_refused_and_every_other_allowed():

    saved = json.loads(default_config().to_json_best_effort())
    keys = _flatten(saved)
    frozen = {k for k in keys if k.startswith(("model.", "optim.", "lora."))} | FROZEN
    for key, value in keys.items():
        *path, name = key.split(".")
        changed = json.loads(json.dumps(saved))
        node = changed
        for part in path:
            node = node[part]
        node[name] = _changed(value)
        expected = [f"{key}: {value!r} -> {_changed(value)!r}"] if key in frozen else []
        assert config_changes(saved, changed) == expected, key


def test_a_key_added_since_a_checkpoint_counts_as_its_default():
    """A checkpoint written before config.lora existed resumes; the new section at its default."""
    saved = json.loads(default_config().to_json_best_effort())
    del saved["lora"]
    current = json.loads(default_config().to_json_best_effort())
    assert config_changes(saved, current) == []
    current["lora"]["rank"] = 8
    assert config_changes(saved, current) == ["lora.rank: 0 -> 8"]


def test_restore_onto_other_meshes(tmp_path):
    def setup(mesh):
        c = run_config(tmp_path)
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
        devices = jax.devices()[: int(np.prod(mesh))]
        return build_run(c, devices), c

    training, config = setup((8, 1, 1))
    state = training.init_state()
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(rng, 8, 32, 65) for _ in range(5)]
    for b in batches[:2]:
        state, _ = training.train_step(state, shard_batch(b, training.mesh))
    ckpt = Checkpointer(tmp_path / "saved", async_save=True)
    ckpt.save(2, state, {"config": {}})
    ckpt.wait()
    saved_params = jax.device_get(state.params)
    want = []  # continuing on the original mesh (the step donates `state`: it is not used after this)
    for b in batches[2:]:
        state, m = training.train_step(state, shard_batch(b, training.mesh))
        want.append(float(m["loss"]))
    for mesh in [(1, 4, 2), (1, 1, 1)]:
        other, _ = setup(mesh)
        restored, meta = Checkpointer(tmp_path / "saved").restore(2, other.abstract_state)
        assert meta["step"] == 2
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved_params)
        leaf = restored.params["h_0"]["mlp"]["fc"]["kernel"]
        assert leaf.sharding.mesh.shape == other.mesh.shape
        got = []
        for b in batches[2:]:
            restored, m = other.train_step(restored, shard_batch(b, other.mesh))
            got.append(float(m["loss"]))
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_exits_zero_and_the_run_resumes_exactly(tmp_path, stop):
    common = ["--config.train.max_steps=40", "--config.checkpoint.save_every=0"]
    cmd, env = cli_command(tmp_path / "full", *common)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    workdir = tmp_path / "stopped"
    cmd, env = cli_command(workdir, *common)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_rows(workdir, 5, proc)
    proc.send_signal(getattr(signal, stop))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    (saved,) = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert 5 <= saved < 40 and f"{stop}: saved step {saved} to " in out and max(losses(workdir)) == saved
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    assert_same_run(tmp_path / "full", workdir)


def test_a_second_ctrl_c_aborts_at_once():
    """The first SIGINT asks the loop to save and stop; a second one raises KeyboardInterrupt at once."""


    stop = _StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


@pytest.mark.parametrize("delay", [0.0, 0.4])  # 0.4 s: inside the state's compilation, which a Ctrl-C crashed
def test_ctrl_c_before_the_loop_is_one_line(tmp_path, delay):
    cmd, env = cli_command(tmp_path / "run", "--config.train.max_steps=100000")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = [proc.stdout.readline()]
    while "Prepared" not in seen[-1] and seen[-1]:  # the data is ready; the loop has not started
        seen.append(proc.stdout.readline())
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "Traceback" not in out, out[-2000:]
    assert out.strip().splitlines()[-1] == ("train: interrupted by Ctrl-C; the same command resumes from the "
                                            "last checkpoint.")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_params(uninterrupted, tmp_path, dtype):

    out = export_params(uninterrupted, tmp_path / "export", dtype=dtype)
    cfg, params = load_exported(out)
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (1, 64, 65)
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {dtype}
    want = final_params(uninterrupted)["params"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(dtype))), params, want)
    assert (out / "tokenizer" / "tokenizer.json").exists()
    tokens = np.zeros((1, 8), np.int32)
    assert GPT(cfg).apply({"params": jax.tree.map(lambda x: x.astype("float32"), params)}, tokens).shape == (1, 8, 128)
    with pytest.raises(CheckpointError, match=r"No checkpoint for step 5 under .*; there are \[6, 12\]"):
        export_params(uninterrupted, tmp_path / "x", step=5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_training_starts_from_imported_weights(tmp_path, scan_layers):
    """config.train.init_from: a Hugging Face directory (or its lightjax export) gives the first
    parameters of a run; a different architecture is refused, naming each field."""
    hf = require_hf()
    random_hf_model(hf, "Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=16).save_pretrained(
        tmp_path / "hf")
    cfg, params = load_hf_checkpoint(tmp_path / "hf")
    source = tmp_path / "hf"
    if scan_layers:  # the export directory too, written in the scan layout
        source = save_exported(tmp_path / "export", cfg, stack_layers(params, cfg.n_layer))
    c = run_config(tmp_path, max_steps=1, save_every=1, scan_layers=scan_layers, init_from=str(source))
    c.model.name = "Qwen3-0.6B"
    for k, v in cfg.to_dict().items():
        if k != "name" and v is not None:
            setattr(c.model, k, v)
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 1e-12, 0.0, 0  # one step that changes nothing visible
    train(c, tmp_path / "run")
    _, trained, _ = restore_params(tmp_path / "run")
    want = stack_layers(params, cfg.n_layer) if scan_layers else params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-9, rtol=0), trained, want)

    c.model.n_layer, c.checkpoint.resume = 3, "never"
    with pytest.raises(CheckpointError, match=r"holds another architecture than config.model: n_layer: config 3 "
                                              r"vs weights 2\."):
        train(c, tmp_path / "other")


def test_runs_share_prepared_token_files(tmp_path, capsys):
    """data.tokens_dir: the first run tokenizes into it, a second run on the same data reuses the files
    (and trains alike); a run with another tokenizer, or on edited data, makes its own in a subfolder
    and leaves the first run's files as they were."""
    shared = tmp_path / "tokens"
    text = tmp_path / "corpus.txt"
    text.write_text(SHAKESPEARE.read_text()[:20000])

    def run(name, **data):
        c = run_config(tmp_path, max_steps=3, save_every=0)
        c.data.source, c.data.local_path, c.data.tokens_dir = f"text:{text}", "", str(shared)
        for k, v in data.items():
            setattr(c.data, k, v)
        if data.get("tokenizer") == "byte":
            c.model.vocab_size = 257
        train(c, tmp_path / name)
        return capsys.readouterr().out

    def own_files():  # the folder's own split files and their chunks, not the subfolders of other data's
        return {str(f.relative_to(shared)): f.read_bytes() for f in shared.rglob("*")
                if f.is_file() and f.relative_to(shared).parts[0].startswith(("train.", "validation."))}

    def other_folders():
        return [d for d in shared.iterdir() if d.is_dir() and not d.name.endswith(".tokens.d")]

    assert run("a").count(f"tokens into {shared}/") == 2  # train and validation
    first = own_files()
    assert "Prepared" not in run("b")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert not (tmp_path / "a" / "data").exists()
    out = run("c", tokenizer="byte")
    assert "were made from other data or another tokenizer" in out and out.count("Prepared") == 2
    [byte_dir] = other_folders()
    assert json.loads((byte_dir / "train.tokens.json").read_text())["tokenizer"] == "byte"
    text.write_text(SHAKESPEARE.read_text()[:20000].upper())  # the same settings, other bytes and characters
    assert run("d").count("Prepared") == 2
    assert len(other_folders()) == 2
    assert losses(tmp_path / "d") != losses(tmp_path / "a")
    assert own_files() == first and len(first) > 4  # never overwritten
    text.write_text(SHAKESPEARE.read_text()[:20000])
    assert "Prepared" not in run("e")  # the first data again: its files are found where they were
    assert losses(tmp_path / "e") == losses(tmp_path / "a")
