"""The verification tools: smoke test (overfit one batch, gradient flow) and reproducibility audit."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from lightjax.checks.audit import audit_markdown, determinism_check, environment
from lightjax.checks.smoke import fixed_batch, gradient_flow, overfit_one_batch
from lightjax.runtime.sharding import shard_batch
from lightjax.train.run import build_run
from tests.helpers import SHAKESPEARE, load_config, run_script, script_env, tiny_run_config

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy


def test_smoke_config_overfits_one_batch_with_gradient_in_every_layer():
    """On one device; scripts/smoke_test.py on 8 devices (fsdp=4, data=2) is the test below."""
    config = load_config("smoke")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    result = overfit_one_batch(config, devices=jax.devices()[:1])
    assert result.passed, result.table()
    assert result.reduction >= 0.95 and len(result.losses) == config.train.max_steps + 1
    assert result.leaves_checked == 2 * 12 + 4  # 12 leaves per GPT-NeoX layer; wte, lm_head, ln_f scale+bias
    assert "initial loss" in result.table() and "leaves checked" in result.table()


def test_smoke_fails_when_the_loss_does_not_fall_enough():
    config = load_config("smoke")
    result = overfit_one_batch(config, steps=3, devices=jax.devices()[:1])
    assert not result.passed and result.reduction < 0.95 and not result.dead_leaves


@pytest.mark.parametrize("scan_layers", [False, True])
def test_gradient_flow_names_the_leaves_that_get_no_gradient(scan_layers):
    config = tiny_run_config(scan_layers=scan_layers)
    config.data.local_path = str(SHAKESPEARE)
    training = build_run(config, jax.devices()[:1])
    params = training.init_state().params
    batch = shard_batch(fixed_batch(config), training.mesh)
    assert gradient_flow(training, params, batch)[1] == []
    # Zero layer 0's attention output projection: nothing upstream of it in that layer gets a gradient
    # (with GPT-NeoX's parallel residual, norm_1 feeds only the attention).
    blocks = "h" if scan_layers else "h_0"
    kernel = params[blocks]["attn"]["proj"]["kernel"]
    zeroed = kernel.at[0].set(0.0) if scan_layers else jax.numpy.zeros_like(kernel)
    params[blocks]["attn"]["proj"]["kernel"] = zeroed
    checked, dead = gradient_flow(training, params, batch)
    assert checked == 2 * 12 + 4
    assert dead == ["h_0/attn/qkv/bias", "h_0/attn/qkv/kernel", "h_0/norm_1/bias", "h_0/norm_1/scale"]


def test_determinism_check_on_a_tiny_config(tmp_path):
    config = tiny_run_config(mesh=(8, 1, 1), max_steps=6, eval_every=6)
    config.model.n_layer = 1  # three runs: keep each compile small
    config.data.local_path, config.data.data_dir = str(SHAKESPEARE), str(tmp_path / "tfds")
    result = determinism_check(config, tolerance=0.5, workdir=tmp_path)
    runs = result["runs"]
    assert result["same_seed_identical"] and result["same_seed_max_abs_diff"] == 0.0
    assert [r["steps"] for r in runs.values()] == [6, 6, 6]
    assert runs["seed_b"]["seed"] == runs["seed_a"]["seed"] + 1
    assert runs["seed_a"]["losses"] != runs["seed_b"]["losses"]  # the seed does change the run
    relative = abs(runs["seed_b"]["final_loss"] - runs["seed_a"]["final_loss"]) / runs["seed_a"]["final_loss"]
    assert result["seed_relative_diff"] == pytest.approx(relative)
    assert result["passed"] == (relative <= 0.5)
    assert list(tmp_path.iterdir()) == [tmp_path / "tfds"]  # the runs' directories are cleaned up


def test_environment_record_holds_every_item():
    config = load_config("audit")
    env = environment(config)
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
                    "sentencepiece"):
        assert env["packages"][package], package
    assert env["device_count"] == 8 and env["device_kinds"] == {jax.devices()[0].device_kind: 8}
    assert "xla_force_host_platform_device_count=8" in env["xla_flags"] and "XLA_FLAGS" in env["env"]
    assert env["cpu_model"] and env["python"] and env["platform"] and env["backend"] == "cpu"
    assert len(env["git_commit"]) == 40 and isinstance(env["git_dirty"], bool)
    assert len(env["config_sha256"]) == 64 and env["config"]["train"]["max_steps"] == 300
    config.train.seed += 1
    assert environment(config)["config_sha256"] != env["config_sha256"]
    fake_check = {"same_seed_identical": True, "same_seed_max_abs_diff": 0.0, "seed_relative_diff": 0.002,
                  "seed_tolerance": 0.01, "seed_within_tolerance": True, "passed": True,
                  "runs": {n: {"seed": 1, "steps": 3, "final_loss": 2.0, "seconds": 1.0} for n in ("a", "b")}}
    text = audit_markdown({"environment": env, "determinism": fake_check})
    for item in (*env["packages"], env["git_commit"], env["config_sha256"], env["cpu_model"], "PASS"):
        assert item in text
    json.dumps(env)  # the record is plain JSON


def test_scripts_give_one_line_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = run_script("reproducibility_audit.py", f"--out={blocker / 'x'}")
    assert out.returncode == 1 and out.stderr.strip() == (
        f"reproducibility_audit: cannot write the report to --out={blocker / 'x'}: Not a directory")
    out = run_script("reproducibility_audit.py", "--config.optim.schedule=sine", f"--out={tmp_path}")
    assert out.returncode == 1
    assert out.stderr.strip() == "reproducibility_audit: config.optim.schedule='sine' is not one of cosine, " \
                                 "constant, linear, wsd."
    out = run_script("smoke_test.py", "--config.model.n_head=5")
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "smoke_test: config.model: ModelConfig.n_embd=64 must be divisible by n_head=5 (or set head_size explicitly)."]


def test_smoke_test_script_passes_on_8_devices():
    out = run_script("smoke_test.py", f"--config.data.local_path={SHAKESPEARE}", "--config.mesh.fsdp=4",
                     "--config.mesh.data=2", devices=8)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "smoke test on 8 cpu device(s)" in out.stdout and out.stdout.strip().endswith("PASS")
    reduction = float(out.stdout.split("reduction")[1].split("%")[0])
    assert reduction >= 95.0 and np.isfinite(reduction)


def test_the_audit_passes_outside_a_git_checkout(tmp_path):
    """From a copy of the project without .git (an unpacked release): the report says there is no
    commit, and the checks still run and pass."""
    from tests.helpers import ROOT

    copy = tmp_path / "lightjax"
    for part in ("lightjax", "scripts", "configs"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    env = script_env(copy)
    out = subprocess.run([sys.executable, "scripts/reproducibility_audit.py", f"--out={tmp_path / 'audit'}",
                          f"--config.data.local_path={SHAKESPEARE}", f"--config.data.data_dir={tmp_path / 'tfds'}",
                          "--config.train.max_steps=6", "--config.model.n_layer=1", "--config.train.eval_every=3",
                          "--config.optim.warmup_steps=1", "--tolerance=0.5"], cwd=copy, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "audit" / "environment.json").read_text())
    assert report["environment"]["git_commit"] is None and report["environment"]["git_dirty"] is None
    assert report["determinism"]["passed"] and report["determinism"]["same_seed_identical"]
